"""Diffusion and flow models in one formulation (``method=diffusion``); DDPM and rectified flow are presets.

Training step (Ho et al. 2020, Algorithm 1, generalised; Liu et al. 2023 for the flow instance):

    x ~ data (pixels in [-1, 1], or a frozen autoencoder's latents), z ~ N(0, I), t ~ p(t)
    x_t = a(t) x + b(t) z                   process: vp | ve | flow   (diffusion/processes.py)
    y   = c(t) x + d(t) z                   prediction: eps | x | v   (diffusion/predictions.py)
    minimise  w(t) || f_theta(x_t, t, class) - y ||^2,   w(t) = 1

p(t): ``uniform`` (DDPM's t ~ U{1..T} on its discrete chain), or ``logit_normal``: t = sigmoid(m + s u),
u ~ N(0, 1), which weights the middle noise levels (Esser et al. 2024), or ``log_normal``: the noise level
sigma = b/a with ln sigma ~ N(m, s^2), t = sigma^-1 of it (Karras et al. 2022's training distribution, for any
process). The resolution shift of Esser et
al. moves t toward noise on larger inputs: t' = alpha t / (1 + (alpha - 1) t), alpha = sqrt(H W) / base
(``shift_base_size``), in training and on the t-grid of the samplers that start at t = 1. With label
dropout the network is also unconditional, and sampling guides it with classifier-free guidance
(Ho & Salimans 2022): f = (1 + w) f(x, y) - w f(x, null), both halves in one batch.

Sampling converts the prediction to what each sampler needs (diffusion/samplers.py): ``ddpm``
(ancestral), ``ddim``, ``euler``, ``heun`` and ``dpm++2m``, on the EMA weights. ``bits_per_dim`` gives
the variational bound or the probability-flow ODE likelihood (diffusion/likelihood.py).

Latent diffusion (Rombach et al. 2022, arXiv:2112.10752): with ``latents=ckpt:<file or folder>`` the
model runs on the scaled latents of a frozen KL autoencoder (an ``lgen train method=latent_autoencoder``
checkpoint, or a diffusers AutoencoderKL folder such as Stable Diffusion's f8 VAE): every rank encodes
its own batch, drawing z ~ q(z|x) as LDM and DiT train; sampling decodes. The autoencoder is a frozen
child module, out of the optimizer, the EMA and DDP's gradient and buffer syncs, always in eval mode,
and it is saved in this model's checkpoints with its architecture, so a copied checkpoint samples on
its own. ``latents=stage1`` names the last checkpoint of the experiment's stage 1 (lightning_gen/stages.py).

The ``ddpm``, ``ddpm_cfg`` and ``flow`` presets (conf/method/) train bitwise like the methods of those
names that this one replaced (the same random draws in the same order), and their checkpoints load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.diffusion import guided, likelihood, samplers
from lightning_gen.diffusion.predictions import PREDICTIONS, training_target
from lightning_gen.diffusion.processes import PROCESSES, Coefficients, build_process
from lightning_gen.losses.regression import squared_error
from lightning_gen.methods.generative.frozen import FrozenChildren
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod, evaluating
from lightning_gen.methods.generative.latent_autoencoder import LatentAutoencoder, frozen_autoencoder
from lightning_gen.nets.dit import DiT, DiTConfig
from lightning_gen.nets.unet import UNet
from lightning_gen.registry import register_legacy_method, register_method
from lightning_gen.stages import Stage1Input


@dataclass
class DiffusionConfig(GenerativeConfig):
    process: str = choice("vp", *PROCESSES)  # x_t = a x + b z: variance preserving / exploding, or flow
    prediction: str = choice("v", *PREDICTIONS)  # the network's target: noise, data, or the velocity of x_t
    # vp only: > 0 is DDPM's discrete chain of this many steps (t drawn from its steps); 0 is continuous time
    timesteps: int = bounded(0, 0)
    noise_schedule: str = choice("cosine", "linear", "cosine")  # vp: abar(t) linear-beta or cosine
    sigma_min: float = bounded(0.01, 0, low_open=True)  # ve: sigma(0) (Song et al. 2021)
    sigma_max: float = bounded(50.0, 0, low_open=True)  # ve: sigma(1), the std of the prior
    t_sampling: str = choice("uniform", "uniform", "logit_normal", "log_normal")  # p(t) in training
    logit_mean: float = 0.0  # logit_normal: t = sigmoid(logit_mean + logit_std u)
    logit_std: float = bounded(1.0, 0, low_open=True)
    # log_normal: the noise level sigma = b/a with ln sigma = log_sigma_mean + log_sigma_std u (Karras et al.)
    log_sigma_mean: float = -1.2
    log_sigma_std: float = bounded(1.2, 0, low_open=True)
    shift_base_size: int = bounded(0, 0)  # > 0: shift t toward noise by sqrt(H W) / this (Esser et al.)
    loss_reduction: str = choice("mean", "mean", "sum")  # over pixels: mean keeps the LR resolution-free
    net: str = choice("unet", "unet", "dit")  # the denoising network: U-Net, or Diffusion Transformer
    dit: DiTConfig = field(default_factory=DiTConfig)  # net=dit: preset (S/2 ... XL/8) and/or sizes
    width: int = bounded(64, 1)  # U-Net channels at the first level
    mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = bounded(1, 1)
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = bounded(0.1, 0, 1, high_open=True)
    conditional: bool = False  # class-conditional with classifier-free guidance
    label_dropout: float = bounded(0.1, 0, 1)  # p(y -> null) in training; Ho & Salimans used 0.1-0.2
    sampler: str = choice("heun", *samplers.SAMPLERS)  # default sampler of sample(), grids and FID
    sample_steps: int = bounded(18, 1)  # solver steps (Heun: 2 steps - 1 network evaluations)
    sample_eta: float = bounded(0.0, 0)  # DDIM's eta: 0 deterministic, 1 the DDPM posterior's noise
    guidance: float = bounded(0.0, 0)  # default CFG weight w at sampling time
    clip_x0: bool = True  # clamp the predicted x to [-1, 1] while sampling (pixels; ignored for latents)
    # The space diffusion runs in. null: pixels. ckpt:<path>: the latents of a frozen autoencoder, an
    # lgen latent_autoencoder checkpoint or a diffusers AutoencoderKL folder. stage1: the last checkpoint
    # of the experiment's stage 1 (its `stage1:` section), trained first when it does not exist yet.
    latents: str | None = None
    latent_sample: bool = True  # train on z ~ q(z|x) (LDM, DiT); false: on the posterior mean
    lr: float = 2e-4
    ema_decay: float = 0.999


def _unet(cfg: DiffusionConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    try:
        return UNet(
            channels,
            image_size,
            cfg.width,
            tuple(cfg.mults),
            cfg.blocks_per_level,
            tuple(cfg.attention_resolutions),
            cfg.dropout,
            num_classes,
        )
    except ValueError as error:  # sizes that do not fit the (latent) image
        space = "latent" if cfg.latents else "image"
        raise ConfigError(
            f"method.mults={list(cfg.mults)} on the {space} size {image_size}: {error}"
        ) from error


def _dit(cfg: DiffusionConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    return DiT.from_config(cfg.dit, channels, image_size, num_classes, "latent" if cfg.latents else "image")


# Networks f(x_t, t, y) by ``method.net``: the same call and time input; ``num_classes`` > 0 adds the
# class embedding with its null class ``num_classes`` for classifier-free guidance.
NETWORKS = {"unet": _unet, "dit": _dit}


def build_network(cfg: DiffusionConfig, channels: int, image_size: int, num_classes: int) -> nn.Module:
    if cfg.net not in NETWORKS:
        raise ConfigError(f"method.net={cfg.net}: no such network; available: {', '.join(NETWORKS)}")
    return NETWORKS[cfg.net](cfg, channels, image_size, num_classes)


def _view(coef: Coefficients, like: torch.Tensor) -> Coefficients:
    shape = (-1, *([1] * (like.ndim - 1)))
    return Coefficients(*(v.view(shape) for v in (coef.a, coef.b, coef.da, coef.db)))


@register_method("diffusion", DiffusionConfig)
class Diffusion(FrozenChildren, GenerativeMethod):
    """Generalised diffusion: VP / VE / flow, eps / x / v prediction, CFG, five samplers, bits/dim."""

    config_class = DiffusionConfig
    sample_options = ("sampler", "steps", "guidance", "eta")
    frozen_children = (
        "autoencoder",
    )  # latent diffusion's: out of optimizer, EMA and DDP syncs, in eval mode
    stage1_input = Stage1Input(
        "latents", "autoencoder", "autoencoder", ("latent_autoencoder",), "latent_autoencoder_digits"
    )

    def __init__(self, cfg: DiffusionConfig, data=None, autoencoder: LatentAutoencoder | None = None):
        """``autoencoder``: the frozen autoencoder of ``latents``, when it is not to be read from there
        (rebuilt from a checkpoint's hyperparameters, or an untrained one of the stage-1 recipe whose
        shapes are checked before stage 1 trains)."""
        super().__init__(cfg, data)
        cfg, info = self.cfg, self.data_info  # cfg: a dataclass even when rebuilt from a checkpoint's dict
        if cfg.latents:  # before the network: its input is the latent shape
            self.autoencoder = frozen_autoencoder(cfg.latents, info, autoencoder)
            self.hparams["latent_autoencoder"] = self.autoencoder.architecture()
        if cfg.timesteps > 0 and cfg.process != "vp":
            raise ConfigError(
                f"method.timesteps={cfg.timesteps} (a discrete chain) exists for process=vp only (DDPM); "
                f"set method.timesteps=0 for process={cfg.process}"
            )
        self.conditional = cfg.conditional and info.num_classes > 0
        self.process = build_process(
            cfg.process, cfg.noise_schedule, cfg.timesteps, cfg.sigma_min, cfg.sigma_max
        )
        try:  # the configured sampler must work for this process and prediction (steps: when sampling)
            samplers.check(cfg.sampler, 1, self.process, cfg.prediction)
        except samplers.SamplerError as error:
            raise ConfigError(f"method.sampler={cfg.sampler}: {error}") from error
        channels, size = self.model_shape[0], self.model_shape[1]
        self.net = build_network(cfg, channels, size, info.num_classes if self.conditional else 0)
        self.setup_ema("net")
        # Esser et al.'s resolution shift: alpha = sqrt(m / n) for m = H W of the model's input
        self.time_shift = math.sqrt(size * size) / cfg.shift_base_size if cfg.shift_base_size else 1.0
        self.last_sample: dict = {}  # sampler, steps and network evaluations of the latest sample() call

    @classmethod
    def from_hyperparameters(cls, cfg: DiffusionConfig, data, hparams: dict) -> Diffusion:
        # a latent model's checkpoint holds the autoencoder's architecture and (in its state dict) weights
        architecture = hparams.get("latent_autoencoder")
        if cfg.latents and architecture is not None:
            return cls(cfg, data, autoencoder=LatentAutoencoder.from_architecture(architecture))
        return cls(cfg, data)

    def buffers_identical_on_all_ranks(self) -> list[str]:
        # The schedule tables are built from the config on every rank: nothing to broadcast. (The frozen
        # autoencoder, read from the same file by every rank: FrozenChildren.)
        return [
            *super().buffers_identical_on_all_ranks(),
            *(f"process.{n}" for n, _ in self.process.named_buffers()),
        ]

    # ------------------------------------------------------------------ the space diffusion runs in
    # Pixels in [-1, 1], or the scaled latents of the frozen autoencoder.
    @property
    def latent(self) -> bool:
        return "autoencoder" in self._modules

    @property
    def model_shape(self) -> tuple[int, int, int]:
        if self.latent:
            return self.autoencoder.latent_shape
        info = self.data_info
        return info.channels, info.image_size, info.image_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self.to_float(images, "symmetric")
        if not self.latent:
            return x
        # under the trainer's autocast (the encoder is frozen: no gradients), the latents in float32
        return self.autoencoder.encode_latents(x, sample=self.cfg.latent_sample).float()

    def encode_batch(self, batch: dict) -> torch.Tensor:
        """The data x of a batch: its images encoded, or latents cached by `lgen latents` (data=latents),
        drawn from the cached posterior and scaled exactly as ``encode`` does."""
        if "latent_mean" not in batch:
            return self.encode(batch["image"])
        # in the memory layout the encoder's output has (channels_last when the trainer uses it), so that
        # the noise drawn like it (randn_like follows the layout) is the noise of encoding on the fly
        mean, std = (self.to_float(batch[k]) for k in ("latent_mean", "latent_std"))
        return self.autoencoder.scale_latents(mean, std if self.cfg.latent_sample else None).float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (what FID and the grids expect) from pixels in [-1, 1] or latents."""
        if self.latent:
            x = self.autoencoder.decode_latents(x).float()
        return ((x + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ training
    def draw_time(self, n: int, device) -> tuple[Coefficients, torch.Tensor]:
        """p(t): coefficients at each drawn time and the network's time input, both (n,)."""
        process, cfg = self.process, self.cfg
        if process.discrete and cfg.t_sampling == "uniform" and self.time_shift == 1.0:
            step = torch.randint(0, process.T, (n,), device=device)  # Algorithm 1: t ~ U{1..T}
            return process.at_step(step), step
        if cfg.t_sampling == "logit_normal":
            t = (cfg.logit_mean + cfg.logit_std * torch.randn(n, device=device)).sigmoid()
        elif cfg.t_sampling == "log_normal":
            sigma = (cfg.log_sigma_mean + cfg.log_sigma_std * torch.randn(n, device=device)).exp()
            t = process.t_of_sigma(sigma)
        else:
            t = torch.rand(n, device=device)
        if self.time_shift != 1.0:
            t = self.time_shift * t / (1 + (self.time_shift - 1) * t)
        if process.discrete:  # the step whose interval ((k-1)/T, k/T] holds t
            step = torch.ceil(t * process.T).clamp(1, process.T).long() - 1
            return process.at_step(step), step
        return process.coefficients(t), process.network_time(t)

    def predict(self, net, xt: torch.Tensor, coef: Coefficients, t_net: torch.Tensor, y) -> torch.Tensor:
        scale = self.process.input_scale(coef)
        return self.prediction_of(net(xt if isinstance(scale, float) else xt * scale, t_net, y))

    def prediction_of(self, out: torch.Tensor) -> torch.Tensor:
        """The prediction in the network's output: the first channels when it also outputs a variance
        (DiT's ``learn_sigma``, which this method does not train)."""
        return out[:, : self.model_shape[0]] if out.shape[1] != self.model_shape[0] else out

    def draw_noise(self, x: torch.Tensor) -> tuple[Coefficients, torch.Tensor, torch.Tensor]:
        """Everything random in a training step but the label dropout: (coefficients, network time, z)."""
        # The order of the draws is each preset's original one, so that they train bitwise as before:
        if self.process.discrete:  # DDPM's Algorithm 1 draws t, then eps
            coef, t_net = self.draw_time(len(x), x.device)
            return coef, t_net, torch.randn_like(x)
        z = torch.randn_like(x)  # the rectified-flow recipe draws z, then t
        coef, t_net = self.draw_time(len(x), x.device)
        return coef, t_net, z

    def step(self, batch, stage: str) -> torch.Tensor:
        x = self.encode_batch(batch)
        coef, t_net, z = self.draw_noise(x)
        y = self.drop_labels(batch["label"], self.cfg.label_dropout) if self.conditional else None
        coef = _view(coef, x)
        xt = coef.a * x + coef.b * z
        target = training_target(self.cfg.prediction, x, z, coef)
        loss = squared_error(self.predict(self.net, xt, coef, t_net, y), target, self.cfg.loss_reduction)
        self.log_loss(stage, loss)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    # ------------------------------------------------------------------ sampling
    def default_steps(self, sampler: str) -> int:
        """DDPM's ancestral sampler walks the whole chain by default; everything else ``sample_steps``."""
        if sampler == "ddpm" and self.process.discrete:
            return self.process.T
        return self.cfg.sample_steps

    def guided_model(self, net, labels: torch.Tensor | None, guidance: float):
        """The network as the samplers and likelihoods call it: (x_in, t_net) -> prediction."""
        fn = lambda x, t, y: self.prediction_of(net(x.float(), t.float(), y))  # noqa: E731  (float64 in: likelihoods)
        return guided(fn, labels, self.data_info.num_classes, float(guidance))

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return self.model_shape  # x_T, the initial noise of the samplers

    @torch.no_grad()
    def sample(
        self, n, cond=None, generator=None, sampler=None, steps=None, guidance=None, eta=None, noise=None
    ):
        """``noise``: the standard normal x_T (n, *noise_shape) to start from instead of a fresh draw."""
        self.check_sample_options(cond, {})
        sampler = sampler or self.cfg.sampler
        if eta is not None and sampler != "ddim":
            raise ValueError(f"eta is the noise of sampler=ddim; sampler={sampler} takes no eta")
        eta = self.cfg.sample_eta if eta is None else eta
        guidance = self.cfg.guidance if guidance is None else guidance
        if guidance and not self.conditional:
            raise ValueError("guidance needs a conditional model (method.conditional=true)")
        steps = self.default_steps(sampler) if steps is None else steps
        samplers.check(sampler, steps, self.process, self.cfg.prediction)
        labels = self.sample_labels(n, cond)
        with evaluating(self.sampling_net()) as net:
            x, nfe = samplers.sample(
                self.guided_model(net, labels, guidance),
                self.process,
                self.cfg.prediction,
                (n, *self.model_shape),
                sampler,
                steps,
                eta=eta,
                clip=1.0 if self.cfg.clip_x0 and not self.latent else None,
                generator=generator,
                device=self.device,
                shift=self.time_shift,
                initial=noise,
            )
        # a guided evaluation runs the conditional and unconditional halves as one batch: one NFE
        self.last_sample = {
            "sampler": sampler,
            "steps": steps,
            "nfe": nfe,
            "guided": bool(labels is not None and guidance),
        }
        return self.decode(x)

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def bits_per_dim(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        estimator: str = "vlb",
        draws: int = 4,
        steps: int = 50,
        sigma_lo: float = 1e-3,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bits/dim of uint8 ``images`` (N,) and the variance of each estimate over its Monte Carlo draws.

        ``vlb``: the variational bound (DDPM's chain: Ho et al.'s; continuous time: Kingma et al.'s, from
        ``sigma_lo``), a discrete likelihood of the 8-bit values, ``draws`` draws of t per image.
        ``ode``: the probability-flow ODE with ``steps`` Runge-Kutta steps from ``sigma_lo`` and Hutchinson's
        trace, of images uniformly dequantised within their bin (a bound on the discrete likelihood).
        A conditional model gives -log p(x | y) for ``labels``, else the unconditional -log p(x) (null class).
        """
        if self.latent:
            raise ValueError(
                "a latent diffusion model bounds the likelihood of its latents, not of the images: "
                "bits/dim of the pixels is defined for pixel-space diffusion models"
            )
        x = self.encode(images).double()
        dims = x[0].numel()
        cond = None
        if self.conditional:
            cond = labels if labels is not None else torch.full((len(x),), self.data_info.num_classes)
            cond = cond.to(self.device).long()
        process, prediction = self.process, self.cfg.prediction
        lo, hi = max(sigma_lo, process.sigma_lo), min(process.sigma_hi, samplers.EDM_SIGMA_MAX)
        per_bit = dims * math.log(2)  # nats per image -> bits per dimension
        with evaluating(self.sampling_net()) as net:
            model = self.guided_model(net, cond, 0.0)
            if estimator == "vlb":
                if process.discrete:
                    nats, var = likelihood.vlb_discrete(model, process, prediction, x, draws, generator)
                else:
                    nats, var = likelihood.vlb_continuous(
                        model, process, prediction, x, draws, lo, hi, generator=generator
                    )
                return nats / per_bit, var / per_bit**2
            if estimator == "ode":
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
                x = x + (u - 0.5) * 2 * likelihood.BIN_HALF_WIDTH  # uniform within each value's bin
                nats = likelihood.ode_nll(model, process, prediction, x, steps, lo, hi, generator=generator)
                # a bin of width 2/255 per dimension: -log P(values) <= -log p(x) + D log(255 / 2)
                nats = nats + dims * math.log(1 / (2 * likelihood.BIN_HALF_WIDTH))
                return nats / per_bit, torch.zeros_like(nats)
        raise ValueError(f"unknown likelihood estimator {estimator!r}: use vlb or ode")


def _ddpm_checkpoint(cfg: dict) -> dict:
    """The config of a checkpoint of the former ``ddpm`` method, as the preset it is now."""
    kept = {k: v for k, v in cfg.items() if k != "schedule_name"}
    return {
        **kept,
        "name": "diffusion",
        "process": "vp",
        "prediction": "eps",
        "timesteps": cfg.get("timesteps", 1000),
        "noise_schedule": cfg.get("schedule_name", "linear"),
        "t_sampling": "uniform",
        "shift_base_size": 0,
        "loss_reduction": "mean",
        "net": "unet",
        "sampler": cfg.get("sampler", "ddim"),
        "sample_steps": cfg.get("sample_steps", 50),
        "clip_x0": cfg.get("clip_x0", True),
    }


def _flow_checkpoint(cfg: dict) -> dict:
    """The config of a checkpoint of the former ``flow`` method (rectified flow), as the preset it is now."""
    kept = {k: v for k, v in cfg.items() if k != "time_sampling"}
    return {
        **kept,
        "name": "diffusion",
        "process": "flow",
        "prediction": "v",
        "timesteps": 0,
        "t_sampling": cfg.get("time_sampling", "logit_normal"),
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "shift_base_size": 0,
        "net": "unet",
        "sampler": "euler",
        "sample_steps": cfg.get("sample_steps", 50),
        "sample_eta": 0.0,
        "clip_x0": False,
    }


register_legacy_method("ddpm", "diffusion", _ddpm_checkpoint)
register_legacy_method("flow", "diffusion", _flow_checkpoint)
