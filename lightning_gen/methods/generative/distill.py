"""Few-step students of a trained diffusion or flow model (the teacher): progressive distillation and
consistency models. The maths is in ``lightning_gen/diffusion/distillation.py``; this file trains it.

The teacher is a ``method=diffusion`` checkpoint (any process and prediction, pixels or latents), frozen,
its EMA weights in place of its trained ones; the student is a copy of that network (dropout off) that
predicts what the teacher predicts, read as a data prediction x_hat. A conditional teacher is guided
with classifier-free guidance at a weight w drawn per example from [guidance_min, guidance_max]; where
guidance_max > 0 the student takes w as one more input (an embedding of w added to its time embedding,
zero-initialised, so the untrained student is the teacher's conditional network) and learns the guided
model for every w of that range (Meng et al. 2023).

``algorithm=progressive`` (Salimans & Ho 2022): rounds of N = start_steps, start_steps / 2, ...,
final_steps student steps, an equal share of training each (a function of training progress). Round
r's teacher is the teacher's network for the first round, then the previous round's student (its EMA
weights), kept frozen in ``rounds``; the student continues from one round to the next. The student of
a round samples with DDIM on N steps; a checkpoint keeps every finished round's student, so it samples
with the step counts of the finished rounds and of the current one, and with no others.

``algorithm=consistency`` (Song et al. 2023): consistency distillation on the sigma grid of
``grid_points`` points with the teacher's Heun (or Euler) step; ``consistency_training``: the same
without a teacher. theta- is the student under stop-gradient (``target_decay`` 0, Song & Dhariwal 2023)
or its moving average. It samples with 1 to grid_points - 1 steps (the grid's times).

``lgen sample ckpt=... steps=1|2|4`` runs the student; other step counts are one-line errors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lightning_gen.config import ConfigError, bounded, choice
from lightning_gen.diffusion import cfg_combine, distillation
from lightning_gen.diffusion.predictions import to_x_and_eps
from lightning_gen.methods.base import ema_update
from lightning_gen.methods.generative.frozen import FrozenChildren, checkpoint_of
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod, evaluating
from lightning_gen.nets.unet import sinusoidal_embedding
from lightning_gen.registry import register_method
from lightning_gen.stages import Stage1Input

GUIDANCE_SCALE = 250.0  # w enters the sinusoidal embedding as a time of 250 w (w = 4 -> 1000, the time range)


@dataclass
class DistillConfig(GenerativeConfig):
    # ckpt:<diffusion checkpoint>, or stage1: the experiment's stage-1 teacher, trained first if missing
    teacher: str | None = None
    algorithm: str = choice("progressive", "progressive", "consistency", "consistency_training")
    # progressive: rounds of start_steps, start_steps / 2, ..., final_steps student steps (teacher: 2N)
    start_steps: int = bounded(16, 1, hint="the first round's student steps, a power of 2 times final_steps")
    final_steps: int = bounded(1, 1)
    # consistency: the sigma grid (Karras et al.'s rho = 7) within the teacher's range
    grid_points: int = bounded(18, 2)
    sigma_min: float = bounded(0.002, 0)
    sigma_max: float = bounded(80.0, 0)
    sigma_data: float = bounded(0.5, 0)
    teacher_solver: str = choice("heun", "heun", "euler")  # consistency distillation's ODE step
    metric: str = choice("pseudo_huber", "pseudo_huber", "l2")
    target_decay: float = bounded(0.0, 0, 1, hint="mu of theta-: 0 is the student under stop-gradient")
    # guidance baked in (conditional teachers): w ~ U[guidance_min, guidance_max] per example
    guidance_min: float = bounded(0.0, 0)
    guidance_max: float = bounded(0.0, 0)
    guidance: float = bounded(0.0, 0)  # w of sample() (within the trained range)
    sample_steps: int = bounded(
        1, 1
    )  # consistency: default steps of sample(); progressive: the latest round's
    optimizer: str = "adam"
    lr: float = bounded(1e-4, 0)
    ema_decay: float = 0.999


class GuidanceInput(nn.Module):
    """net(x, t, y, w): the network with the guidance weight as an input, embedded and added to its time
    embedding; the last layer starts at zero, so the untrained wrapper computes net(x, t, y)."""

    def __init__(self, net: nn.Module, frequencies: int = 256):
        super().__init__()
        self.net, self.frequencies = net, frequencies
        dim = net.embedding_dim
        self.w_mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.w_mlp[-1].weight)
        nn.init.zeros_(self.w_mlp[-1].bias)

    def forward(self, x, t, y, w):
        embedding = self.w_mlp(sinusoidal_embedding(w * GUIDANCE_SCALE, self.frequencies).to(x.dtype))
        return self.net(x, t, y, embedding=embedding)


def frozen_teacher(teacher):
    """The teacher as distillation keeps it: its EMA weights as its network, no EMA copy, no gradients."""
    if teacher.cfg.ema_decay > 0:
        teacher.net = teacher.ema
        del teacher.ema, teacher.ema_updates
        teacher.cfg.ema_decay = 0.0
        teacher.hparams["cfg"] = {**teacher.hparams["cfg"], "ema_decay": 0.0}
    return teacher.eval().requires_grad_(False)


def load_teacher(path):
    from lightning_gen.checkpoint import load_checkpoint
    from lightning_gen.methods.base import load_method

    name = load_checkpoint(path).get("hyper_parameters", {}).get("method")
    if name not in ("diffusion", "ddpm", "flow"):
        raise ConfigError(
            f"{path} is a {name} checkpoint, not a diffusion model: train one with method=diffusion"
        )
    return load_method(str(path))


@register_method("distill", DistillConfig)
class Distill(FrozenChildren, GenerativeMethod):
    """Few-step student of a diffusion teacher: progressive distillation or consistency distillation/training."""

    config_class = DistillConfig
    sample_options = ("steps", "guidance")
    frozen_children = ("teacher", "rounds", "target")
    stage1_input = Stage1Input("teacher", "teacher", "teacher", ("diffusion",), "flow_digits")

    def __init__(self, cfg: DistillConfig, data=None, teacher=None):
        """``teacher``: the frozen teacher of ``method.teacher``, when it is not to be read from there
        (rebuilt from a checkpoint's hyperparameters, or an untrained one of the stage-1 recipe)."""
        super().__init__(cfg, data)
        cfg = self.cfg
        where = f"method.teacher={cfg.teacher}"
        if teacher is None:
            teacher = load_teacher(
                checkpoint_of("method.teacher", cfg.teacher, "diffusion teacher", "method=diffusion")
            )
        self.check_teacher(teacher, where)
        self.teacher = frozen_teacher(teacher)
        self.hparams["teacher"] = dict(teacher.hparams)
        self.conditional = teacher.conditional
        self.guided = self.conditional and cfg.guidance_max > 0
        if cfg.guidance_max and not self.conditional:
            raise ConfigError(
                f"method.guidance_max={cfg.guidance_max}: the teacher of {where} is unconditional"
            )
        if not cfg.guidance_min <= cfg.guidance <= max(cfg.guidance_max, cfg.guidance_min):
            raise ConfigError(
                f"method.guidance={cfg.guidance} is outside the trained range [{cfg.guidance_min}, {cfg.guidance_max}]"
            )
        student = copy.deepcopy(teacher.net).requires_grad_(True)
        for module in student.modules():  # distillation regresses exact targets: no dropout
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.net = GuidanceInput(student) if self.guided else student
        if cfg.algorithm == "progressive":
            self.setup_progressive(where)
        else:
            self.setup_consistency()
        self.setup_ema("net")
        self.last_sample: dict = {}

    @property
    def process(self):
        """The teacher's noising process (not a child of this module: it is the teacher's)."""
        return self.teacher.process

    def buffers_identical_on_all_ranks(self) -> list[str]:
        grid = ["sigmas"] if self.cfg.algorithm != "progressive" else []  # built from the config
        return [*super().buffers_identical_on_all_ranks(), *grid]

    def check_teacher(self, teacher, where: str) -> None:
        if teacher.registry_name != "diffusion":
            raise ConfigError(f"{where}: a {teacher.registry_name} model is no diffusion teacher")
        mine, theirs = self.data_info, teacher.data_info
        fields = ("name", "image_size", "channels", "num_classes")
        if any(getattr(mine, f) != getattr(theirs, f) for f in fields):
            raise ConfigError(
                f"the teacher of {where} was trained on {theirs.name} at {theirs.image_size} px with "
                f"{theirs.channels} channel(s) and {theirs.num_classes} classes, but this run's data is "
                f"{mine.name} at {mine.image_size} px with {mine.channels} channel(s) and {mine.num_classes} "
                "classes: distil a teacher of this data, or choose its data"
            )

    @classmethod
    def from_hyperparameters(cls, cfg: DistillConfig, data, hparams: dict) -> Distill:
        from lightning_gen import registry
        from lightning_gen.methods.base import DataInfo, _dataclass_from_dict

        stored = hparams.get("teacher")
        if stored is None:
            return cls(cfg, data)
        entry, teacher_cfg = registry.checkpoint_method(stored["method"], stored["cfg"])
        teacher = entry.cls.from_hyperparameters(
            _dataclass_from_dict(entry.config, teacher_cfg),
            _dataclass_from_dict(DataInfo, stored["data"]),
            stored,
        )
        return cls(cfg, data, teacher=teacher)

    # ---------------------------------------------------------------- progressive distillation
    def setup_progressive(self, where: str) -> None:
        cfg = self.cfg
        ratio = cfg.start_steps // cfg.final_steps
        if cfg.start_steps % cfg.final_steps or ratio & (ratio - 1):
            raise ConfigError(
                f"method.start_steps={cfg.start_steps} does not halve down to method.final_steps={cfg.final_steps}: "
                "give a power of 2 times final_steps (e.g. 16 and 1)"
            )
        counts = [cfg.start_steps // 2**r for r in range(ratio.bit_length())]
        if self.process.pure_noise_at_end and self.teacher.cfg.prediction == "eps":
            raise ConfigError(
                f"the teacher of {where} predicts eps on process={self.process.name}, which is pure noise at t = 1: "
                "progressive distillation evaluates the student there; distil a teacher with prediction=v or x"
            )
        self.round_steps = counts  # N of each round
        self.finished_rounds = 0  # host count, saved in checkpoints; their students are in self.rounds
        self.rounds = nn.ModuleDict(
            {str(n): copy.deepcopy(self.net).requires_grad_(False) for n in counts[:-1]}
        )

    def current_round(self) -> int:
        """The round training is in: an equal share of training progress each."""
        progress = self.progress()
        if progress.total == float("inf"):
            raise ConfigError(
                "progressive distillation needs a planned length: set trainer.max_epochs or max_steps"
            )
        return min(int(progress.step * len(self.round_steps) / progress.total), len(self.round_steps) - 1)

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        if self.cfg.algorithm == "progressive":
            round_now = self.current_round()
            while self.finished_rounds < round_now:  # the student of a finished round is kept, frozen
                steps = self.round_steps[self.finished_rounds]
                self.rounds[str(steps)].load_state_dict(self.sampling_net().state_dict())
                self.finished_rounds += 1

    def progressive_step(self, x, z, labels, w) -> torch.Tensor:
        steps = self.round_steps[self.finished_rounds]
        if self.finished_rounds == 0:
            teacher = self.teacher_x_hat(labels, w)
        else:  # the previous round's student
            teacher = self.student_x_hat(
                self.rounds[str(self.round_steps[self.finished_rounds - 1])], labels, w
            )
        i = torch.randint(1, steps + 1, (len(x),), device=x.device)
        loss = distillation.progressive_loss(
            self.student_x_hat(self.net, labels, w), teacher, self.process, x, z, i, steps
        )
        if self.training:
            self.log_value("train/round_steps", steps, on_step=True, on_epoch=False)
        return loss

    # ---------------------------------------------------------------- consistency
    def setup_consistency(self) -> None:
        cfg = self.cfg
        lo, hi = max(cfg.sigma_min, self.process.sigma_lo), min(cfg.sigma_max, self.process.sigma_hi)
        if not lo < hi:
            raise ConfigError(
                f"method.sigma_min / sigma_max: no noise levels between {lo} and {hi} for this teacher"
            )
        self.sigma_range = (lo, hi)
        grid = distillation.karras_sigmas(cfg.grid_points, lo, hi)
        self.register_buffer("sigmas", torch.tensor(grid, dtype=torch.float32), persistent=False)
        self.sigma_grid = grid  # on the host, for the samplers
        if cfg.target_decay > 0:
            self.target = copy.deepcopy(self.net).requires_grad_(False)

    def consistency_step(self, x, z, labels, w) -> torch.Tensor:
        n = torch.randint(0, self.cfg.grid_points - 1, (len(x),), device=x.device)
        target = self.target if self.cfg.target_decay > 0 else self.net
        teacher = (
            None if self.cfg.algorithm == "consistency_training" else self.teacher_x_hat_sigma(labels, w)
        )
        return distillation.consistency_loss(
            self.x_hat_sigma(self.net, labels, w),
            self.x_hat_sigma(target, labels, w),
            teacher,
            x,
            z,
            n,
            self.sigmas,
            self.sigma_range[0],
            self.cfg.sigma_data,
            self.cfg.teacher_solver,
            self.cfg.metric,
        )

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.cfg.algorithm != "progressive" and self.cfg.target_decay > 0:
            ema_update(self.target, self.net, self.cfg.target_decay)

    # ---------------------------------------------------------------- the models as data predictions
    def predict(self, net, xt, coef, t, labels, w) -> torch.Tensor:
        """The raw prediction (eps, x or v, as the teacher's) of ``net`` at x_t and per-example times t."""
        shape = (-1, *([1] * (xt.ndim - 1)))
        coef = type(coef)(*(v.view(shape) for v in (coef.a, coef.b, coef.da, coef.db)))
        run = net if w is None or not isinstance(net, GuidanceInput) else (lambda x, tt, y: net(x, tt, y, w))
        return self.teacher.predict(run, xt, coef, self.process.network_time(t), labels), coef

    def student_x_hat(self, net, labels, w):
        """(x_t, t, coefficients) -> x_hat of a student (or a finished round's student)."""

        def x_hat(xt, t, coef):
            y, coef = self.predict(net, xt, coef, t, labels, w if self.guided else None)
            return to_x_and_eps(self.teacher.cfg.prediction, y, xt, coef)[0]

        return x_hat

    def teacher_x_hat(self, labels, w):
        """(x_t, t, coefficients) -> x_hat of the teacher, guided at the per-example w (one batch of 2N)."""
        net = self.teacher.net

        def x_hat(xt, t, coef):
            if not self.guided:
                y, view = self.predict(net, xt, coef, t, labels, None)
            else:
                null = torch.full_like(labels, self.data_info.num_classes)
                both = type(coef)(*(torch.cat([v, v]) for v in (coef.a, coef.b, coef.da, coef.db)))
                out, view = self.predict(
                    net, torch.cat([xt, xt]), both, torch.cat([t, t]), torch.cat([labels, null]), None
                )
                y = cfg_combine(*out.chunk(2), w.view(-1, *([1] * (xt.ndim - 1))))
                view = type(view)(*(v[: len(xt)] for v in (view.a, view.b, view.da, view.db)))
            return to_x_and_eps(self.teacher.cfg.prediction, y, xt, view)[0]

        return x_hat

    def in_sigma(self, x_hat_t):
        """A data prediction in (x_t, t) turned into one in (x~, sigma): t = t(sigma), x_t = a x~."""

        def x_hat(x_tilde, sigma):
            t = self.process.t_of_sigma(sigma.to(x_tilde.dtype)).clamp(0, 1).to(x_tilde.dtype)
            coef = self.process.coefficients(t)
            xt = coef.a.view(-1, *([1] * (x_tilde.ndim - 1))) * x_tilde
            return x_hat_t(xt, t, coef)

        return x_hat

    def x_hat_sigma(self, net, labels, w):
        return self.in_sigma(self.student_x_hat(net, labels, w))

    def teacher_x_hat_sigma(self, labels, w):
        return self.in_sigma(self.teacher_x_hat(labels, w))

    # ---------------------------------------------------------------- training
    def step(self, batch, stage: str) -> torch.Tensor:
        x = self.teacher.encode(batch["image"])
        z = torch.randn_like(x)
        labels = None
        if self.conditional:  # unlabeled images (-1) as the null class
            labels = torch.where(batch["label"] < 0, self.data_info.num_classes, batch["label"])
        w = None
        if self.guided:
            span = self.cfg.guidance_max - self.cfg.guidance_min
            w = self.cfg.guidance_min + span * torch.rand(len(x), device=x.device)
        if self.cfg.algorithm == "progressive":
            loss = self.progressive_step(x, z, labels, w).mean()
        else:
            loss = self.consistency_step(x, z, labels, w).mean()
        self.log_loss(stage, loss)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        # the same loss on held-out images; validation is also where the FID and grid callbacks run
        return self.step(batch, "val")

    # ---------------------------------------------------------------- sampling
    def trained_steps(self) -> list[int]:
        """The step counts this student samples with."""
        if self.cfg.algorithm == "progressive":
            return self.round_steps[: self.finished_rounds + 1]
        return list(range(1, self.cfg.grid_points))

    @torch.no_grad()
    def sample(self, n, cond=None, generator=None, steps=None, guidance=None):
        self.check_sample_options(cond, {})
        cfg = self.cfg
        progressive = cfg.algorithm == "progressive"
        if steps is None:
            steps = self.round_steps[self.finished_rounds] if progressive else cfg.sample_steps
        if steps not in self.trained_steps():
            trained = (
                "|".join(map(str, self.trained_steps()))
                if progressive
                else f"1..{cfg.grid_points - 1} (its grid)"
            )
            raise ValueError(
                f"this {cfg.algorithm} student was trained for steps={trained}, not steps={steps}"
            )
        guidance = cfg.guidance if guidance is None else guidance
        if guidance and not self.guided:
            raise ValueError(
                "guidance needs a student distilled with method.guidance_max > 0 from a conditional teacher"
            )
        if self.guided and not cfg.guidance_min <= guidance <= cfg.guidance_max:
            raise ValueError(
                f"guidance={guidance} is outside the range this student was distilled for "
                f"[{cfg.guidance_min}, {cfg.guidance_max}]"
            )
        labels = self.sample_labels(n, cond)
        w = torch.full((n,), float(guidance), device=self.device) if self.guided else None
        shape, device = (n, *self.teacher.model_shape), generator.device if generator else self.device
        noise = lambda: torch.randn(shape, generator=generator, device=device).to(self.device)  # noqa: E731
        if progressive:
            finished = steps in self.round_steps[: self.finished_rounds] and str(steps) in self.rounds
            net = self.rounds[str(steps)] if finished else self.sampling_net()
            clip = 1.0 if self.teacher.cfg.clip_x0 and not getattr(self.teacher, "latent", False) else None
            with evaluating(net):
                x = distillation.progressive_sample(
                    self.student_x_hat(net, labels, w),
                    self.process,
                    steps,
                    self.process.prior_std * noise(),
                    clip,
                )
        else:
            taus = [self.sigma_grid[i] for i in distillation.schedule_indices(cfg.grid_points, steps)]
            with evaluating(self.sampling_net()) as net:
                x = distillation.consistency_sample(
                    self.x_hat_sigma(net, labels, w), taus, self.sigma_range[0], cfg.sigma_data, noise
                )
        self.last_sample = {"sampler": cfg.algorithm, "steps": steps, "nfe": steps, "guided": False}
        return self.teacher.decode(x)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.cfg.algorithm == "progressive":
            checkpoint["distill_finished_rounds"] = self.finished_rounds

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.cfg.algorithm == "progressive":
            self.finished_rounds = checkpoint.get("distill_finished_rounds", 0)
