"""GAN losses on discriminator logits (Goodfellow et al. 2014), D(x) = sigmoid(logit).

Discriminator: maximise log D(x) + log(1 - D(G(z)))  ==  minimise softplus(-real) + softplus(fake).
Generator, ``minimax`` (Goodfellow's original): minimise log(1 - D(G(z))) = -softplus(fake).
Generator, ``non_saturating`` (standard in practice): minimise -log D(G(z)) = softplus(-fake).
Written with softplus so that saturated logits neither overflow nor lose their gradient.

The hinge loss and the adaptive weight below are the latent-diffusion autoencoder's (VQGAN's) GAN term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_gen.losses.precision import full_precision

GENERATOR_LOSSES = ("non_saturating", "minimax")


@full_precision
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


@full_precision
def generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "minimax":
        return -F.softplus(fake_logits).mean()
    raise ValueError(f"unknown generator loss {kind!r}: use one of {GENERATOR_LOSSES}")


@full_precision
def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of D (Lim & Ye 2017), halved as in VQGAN/LDM: 1/2 (E relu(1 - D(x)) + E relu(1 + D(x^)))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


@full_precision
def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge loss: -E D(x^)."""
    return -fake_logits.mean()


def adaptive_weight(
    reconstruction_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    delta: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7): ||grad_w L_rec|| / (||grad_w L_GAN|| + delta)
    at the decoder's last layer w, clamped to [0, max_weight], without gradient.

    Under DDP each rank's gradient is of its own batch's loss; their mean over ranks is the gradient of
    the whole batch's loss, so the weight is the one a single process would compute on that batch.
    """
    from lightning_gen.distributed import all_reduce_mean

    (rec_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    rec_grad, gan_grad = all_reduce_mean(rec_grad), all_reduce_mean(gan_grad)
    # Not @full_precision: casting a bf16 last_layer would cut it from the graph. The losses arrive in
    # float32 from their guarded functions; the norms are taken in float32 here.
    rec_norm, gan_norm = rec_grad.float().norm(), gan_grad.float().norm()
    return (rec_norm / (gan_norm + delta)).clamp(0.0, max_weight).detach()
