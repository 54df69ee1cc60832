"""Deterministic stand-ins for the ops of a training step that have no deterministic CUDA kernel.

``trainer.deterministic=true`` (Lightning's ``torch.use_deterministic_algorithms(True)``) makes an op
without a deterministic CUDA implementation raise; ``warn`` makes it warn. Three of them sit in training
steps here: the backward of adaptive average pooling (the conv backbone pooling multi-crop local views
to its 4x4 map), the backward of bicubic interpolation (the ViT resizing its position embeddings for
another crop size) and the 4-D negative log-likelihood (split-brain colorization's per-pixel
cross-entropy over lightness bins). While deterministic algorithms are on (either mode), each function
here computes the same value with ops whose CUDA kernels are deterministic:

- adaptive average pooling and bicubic resizing are linear and separable: ``rows @ x @ cols^T`` with
  the two 1-D operators as matrices, which the op itself computes (forward only, deterministic) from
  an identity matrix; the backward is two matrix products;
- the cross-entropy gathers each pixel's log-probability (``gather``'s backward is deterministic in
  that mode) and averages.

Otherwise the fused op runs: faster, and bitwise what a run without the setting computed before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def deterministic_mode() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def adaptive_avg_pool2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for (N, C, H, W)."""
    return pool_by_matmul(x, size) if deterministic_mode() else F.adaptive_avg_pool2d(x, size)


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False)`` for (N, C, H, W)."""
    if deterministic_mode():
        return bicubic_by_matmul(x, size)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def cross_entropy_map(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, target)`` for per-pixel classes: logits (N, K, H, W), target (N, H, W)."""
    return (
        cross_entropy_by_gather(logits, target) if deterministic_mode() else F.cross_entropy(logits, target)
    )


# ---------------------------------------------------------------------------- the alternatives


def _operator(op, length: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """The (size, length) matrix of a linear 1-D resampling ``op`` (applied to the identity's rows)."""
    with torch.no_grad():
        eye = torch.eye(length, device=like.device, dtype=like.dtype)
        return op(eye, size).T.contiguous()


def pool_by_matmul(x: torch.Tensor, size: int) -> torch.Tensor:
    rows = _operator(lambda e, n: F.adaptive_avg_pool1d(e[None], n)[0], x.shape[-2], size, x)
    cols = _operator(lambda e, n: F.adaptive_avg_pool1d(e[None], n)[0], x.shape[-1], size, x)
    return rows @ x @ cols.T


def bicubic_by_matmul(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    def bicubic_1d(eye: torch.Tensor, n: int) -> torch.Tensor:  # along the height of a 1-pixel-wide image
        return F.interpolate(eye[None, :, :, None], size=(n, 1), mode="bicubic", align_corners=False)[
            0, :, :, 0
        ]

    rows = _operator(bicubic_1d, x.shape[-2], size[0], x)
    cols = _operator(bicubic_1d, x.shape[-1], size[1], x)
    return rows @ x @ cols.T


def cross_entropy_by_gather(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).mean()
