"""DINO's self-distillation loss (Caron et al. 2021): H(t, s) between sharpened, centred teacher and student.

    H(t, s) = - Σ_k softmax((t - C) / τ_t)_k · log softmax(s / τ_s)_k

summed over all (teacher global view, student view) pairs of *different* views and averaged.
The center C is a buffer (saved in checkpoints) updated as C <- m C + (1 - m) mean(teacher outputs),
where the mean is all-reduced over ranks, so every rank holds the same center and it equals the
single-process center on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gen.distributed import all_reduce_mean
from lightning_gen.losses.precision import full_precision


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @full_precision
    def forward(
        self, student: list[torch.Tensor], teacher: list[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        """student: outputs of every view (global first); teacher: outputs of the global views only."""
        targets = [F.softmax((t - self.center.float()) / teacher_temp, dim=-1).detach() for t in teacher]
        log_probs = [F.log_softmax(s / self.student_temp, dim=-1) for s in student]
        total, pairs = 0.0, 0
        for ti, t in enumerate(targets):
            for si, log_p in enumerate(log_probs):
                if si == ti:  # the same view on both sides is skipped
                    continue
                total = total + (-(t * log_p).sum(-1)).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    @full_precision
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        batch_mean = all_reduce_mean(torch.cat(teacher).mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)
