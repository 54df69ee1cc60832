"""Few-step students of a diffusion teacher (method=distill).

Progressive distillation's target is the closed form of Salimans & Ho's algorithm (two teacher DDIM steps
mapped back to one), written here independently in their alpha/sigma notation; on a 1-D Gaussian with the
exact teacher, students distilled down to 4, 2 and 1 steps draw the data distribution where the teacher
itself cannot in so few steps. A consistency model is the identity at sigma_min by construction. The
teacher is frozen with its EMA weights, the student starts as it, bad teachers and step counts are one
line. Through the CLI, one command from a fresh folder trains the teacher (stage 1) and a progressive
student, which resumes bitwise and samples with steps=1|2|4 (steps=3: one `lgen: error:` line); a
consistency student trains, resumes bitwise and samples.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gen.config import ConfigError, compose, section_object
from lightning_gen.diffusion import distillation
from lightning_gen.diffusion.processes import Coefficients, FlowProcess, VPProcess
from lightning_gen.methods.base import DataInfo, load_method
from lightning_gen.methods.generative.diffusion import Diffusion
from lightning_gen.methods.generative.distill import Distill, DistillConfig
from tests.conftest import lgen_env, run_lgen

INFO = DataInfo(name="digits", channels=1, image_size=8, num_classes=10)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def g(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ progressive distillation: the target
def test_progressive_target_is_two_teacher_ddim_steps_mapped_back_to_one():
    """Salimans & Ho 2022, Algorithm 2, on a variance-preserving process written with an angle:
    alpha_t = cos(phi), sigma_t = sin(phi), and a teacher x_hat given as a function."""
    steps, i = 4, torch.tensor([4, 3, 1])
    x, eps = g(0, 3, 1, 2, 2), g(1, 3, 1, 2, 2)
    teacher = lambda z, t: 0.7 * torch.tanh(z) + 0.1 * t.view(-1, 1, 1, 1)  # noqa: E731  (any x_hat)

    def alpha_sigma(t: torch.Tensor):
        phi = (t + 0.008) / 1.008 * math.pi / 2
        alpha = torch.cos(phi) / math.cos(0.008 / 1.008 * math.pi / 2)
        return alpha.view(-1, 1, 1, 1), (1 - alpha**2).clamp(min=0).sqrt().view(-1, 1, 1, 1)

    t = i / steps
    t1, t2 = t - 0.5 / steps, t - 1 / steps
    (a, s), (a1, s1), (a2, s2) = alpha_sigma(t), alpha_sigma(t1), alpha_sigma(t2)
    z = a * x + s * eps
    x_hat = teacher(z, t)
    z1 = a1 * x_hat + (s1 / s) * (z - a * x_hat)
    x_hat1 = teacher(z1, t1)
    z2 = a2 * x_hat1 + (s2 / s1) * (z1 - a1 * x_hat1)
    expected = (z2 - (s2 / s) * z) / (a2 - (s2 / s) * a)  # x~ of the paper
    # a student predicting anything: the loss is max(SNR, 1) times its mean squared distance to x~
    student = lambda xt, tt, coef: 0.5 * xt - 0.2  # noqa: E731
    loss = distillation.progressive_loss(
        student, lambda xt, tt, coef: teacher(xt, tt), VPProcess("cosine"), x, eps, i, steps
    )
    weight = (a**2 / s**2).clamp(min=1).flatten()
    by_hand = weight * (student(z, t, None) - expected).square().flatten(1).mean(1)
    assert torch.allclose(loss, by_hand, rtol=1e-5, atol=1e-6)
    # one DDIM step from t with x~ lands exactly where the two teacher steps did
    at = lambda a_, s_: Coefficients(a_.flatten(), s_.flatten(), None, None)  # noqa: E731
    target = distillation.progressive_target(z2, z, at(a, s), at(a2, s2))
    assert torch.allclose(target, expected, atol=1e-6)
    assert torch.allclose(distillation.ddim_step(target, z, at(a, s), at(a2, s2)), z2, atol=1e-6)


MU, STD = 1.5, 0.5


def exact_teacher(xt, t, coef):
    """E[x | x_t] for x ~ N(MU, STD^2), x_t = a x + b z: the exact denoiser of the 1-D Gaussian."""
    a, b = coef.a[:, None], coef.b[:, None]
    return MU + a * STD**2 / (a * a * STD**2 + b * b) * (xt - a * MU)


class TableStudent(torch.nn.Module):
    """x_hat = alpha_i x_t + beta_i at the points t = i / 128: enough freedom for every affine map a
    Gaussian needs, so the test measures the algorithm, not a network. Starts as the teacher."""

    def __init__(self, process, finest: int = 128):
        super().__init__()
        coef = process.coefficients(torch.arange(finest + 1) / finest)
        alpha = coef.a * STD**2 / (coef.a**2 * STD**2 + coef.b**2)
        self.finest = finest
        self.alpha, self.beta = torch.nn.Parameter(alpha), torch.nn.Parameter(MU - alpha * coef.a * MU)

    def forward(self, xt, t, coef):
        i = (t * self.finest).round().long()
        return self.alpha[i, None] * xt + self.beta[i, None]


@pytest.mark.parametrize("process", [VPProcess("cosine"), FlowProcess()], ids=["vp", "flow"])
def test_progressive_students_reach_the_gaussian_in_4_2_and_1_steps(process):
    """Rounds 128 -> 64 -> ... -> 1 steps from the exact teacher's 256 DDIM steps. Tolerance: mean and std
    within 0.01 of the data's (50,000 draws: standard errors 0.002 and 0.0016; the 256-step teacher itself
    is 0.001 low in std); the teacher's own DDIM with 1, 2, 4 steps misses by 0.5, 0.3, 0.17."""
    student, teacher, steps = TableStudent(process), exact_teacher, 128
    generator = torch.Generator().manual_seed(0)
    samples = {}
    while steps >= 1:
        optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
        for _ in range(150):
            x = MU + STD * torch.randn(1024, 1, generator=generator)
            z = torch.randn(1024, 1, generator=generator)
            i = torch.randint(1, steps + 1, (1024,), generator=generator)
            loss = distillation.progressive_loss(student, teacher, process, x, z, i, steps).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        teacher = TableStudent(process)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        noise = torch.randn(50000, 1, generator=torch.Generator().manual_seed(1))
        samples[steps] = distillation.progressive_sample(teacher, process, steps, noise)
        steps //= 2
    for steps in (4, 2, 1):
        noise = torch.randn(50000, 1, generator=torch.Generator().manual_seed(1))
        undistilled = distillation.progressive_sample(exact_teacher, process, steps, noise)
        assert abs(undistilled.std().item() - STD) > 0.15  # what the student fixes
        assert abs(samples[steps].mean().item() - MU) < 0.01, steps
        assert abs(samples[steps].std().item() - STD) < 0.01, steps


# ------------------------------------------------------------------ the method
def teacher_model(*overrides: str, data: DataInfo = INFO) -> Diffusion:
    cfg = compose(["experiment=flow_digits", "method.width=8", "method.mults=[1,2]", "method.attention_resolutions=[4]",
                   "method.conditional=true", *overrides])  # fmt: skip
    torch.manual_seed(0)
    teacher = Diffusion(section_object(cfg.method), data)
    with torch.no_grad():  # an EMA that differs from the trained weights, both non-trivial
        for p, q in zip(teacher.net.parameters(), teacher.ema.parameters()):
            p.add_(0.01 * torch.randn_like(p))
            q.add_(0.02 * torch.randn_like(q))
    return teacher


def student(teacher: Diffusion, **overrides) -> Distill:
    return Distill(DistillConfig(name="distill", **overrides), INFO, teacher=teacher)


def test_teacher_is_frozen_with_its_ema_weights_and_the_student_starts_as_it():
    teacher = teacher_model()
    ema = {k: v.clone() for k, v in teacher.ema.state_dict().items()}
    model = student(teacher, guidance_max=2.0, start_steps=4)
    assert not hasattr(model.teacher, "ema") and not any(p.requires_grad for p in model.teacher.parameters())
    for name, value in model.teacher.net.state_dict().items():
        assert torch.equal(value, ema[name]), name
    for name, value in model.net.net.state_dict().items():  # the student inside its guidance input
        assert torch.equal(value, ema[name]), name
    assert {"teacher", "rounds", "ema"} <= model.frozen_module_names()
    trained = {
        id(p)
        for group in model.parameter_groups(model.trainable_modules(), 1e-4, 0.0)
        for p in group["params"]
    }
    assert trained == {id(p) for p in model.net.parameters()}
    # untrained, the guidance input adds nothing: the student computes the teacher's conditional network
    x, t, y = g(2, 2, 1, 8, 8), torch.tensor([300.0, 700.0]), torch.tensor([1, 4])
    assert torch.equal(model.net(x, t, y, torch.tensor([0.5, 2.0])), model.teacher.net(x, t, y))


def test_consistency_model_is_the_identity_at_sigma_min_by_construction():
    model = student(teacher_model(), algorithm="consistency", guidance_max=1.0)
    with torch.no_grad():
        for p in model.net.parameters():  # any student, trained or not
            p.add_(0.1 * torch.randn_like(p))
    x = g(3, 4, 1, 8, 8)
    sigma_min = model.sigma_range[0]
    sigma = torch.full((4,), sigma_min)
    x_hat = model.x_hat_sigma(model.net, torch.tensor([0, 1, 2, 3]), torch.full((4,), 0.5))(x, sigma)
    assert not torch.equal(x_hat, x)  # the network's own prediction differs from the input
    out = distillation.consistency_function(x, sigma, x_hat, sigma_min, model.cfg.sigma_data)
    assert torch.equal(out, x)
    # and nowhere else: just above sigma_min the network's prediction enters
    above = distillation.consistency_function(x, sigma * 1.5, x_hat, sigma_min, model.cfg.sigma_data)
    assert not torch.equal(above, x)


def test_bad_teachers_and_step_counts_are_one_line_errors():
    with pytest.raises(ConfigError, match="trained on fashion_mnist at 8 px"):
        student(
            teacher_model("data=fashion_mnist", data=DataInfo(name="fashion_mnist", channels=1, image_size=8))
        )
    with pytest.raises(ConfigError, match="at 16 px"):
        student(teacher_model(data=DataInfo(name="digits", channels=1, image_size=16, num_classes=10)))
    with pytest.raises(ConfigError, match="and 5 classes"):
        student(teacher_model(data=DataInfo(name="digits", channels=1, image_size=8, num_classes=5)))
    with pytest.raises(ConfigError, match="predicts eps on process=flow"):
        student(teacher_model("method.prediction=eps", "method.sampler=heun"))
    with pytest.raises(ConfigError, match="does not halve down"):
        student(teacher_model(), start_steps=12)
    with pytest.raises(ConfigError, match="unconditional"):
        student(teacher_model("method.conditional=false"), guidance_max=2.0)
    with pytest.raises(ConfigError, match="no such file"):
        Distill(DistillConfig(name="distill", teacher="ckpt:/nonexistent.ckpt"), INFO)
    model = student(teacher_model(), start_steps=4)
    with pytest.raises(ValueError, match=r"trained for steps=4, not steps=2"):  # no round finished yet
        model.sample(2, steps=2)
    assert model.sample(2, steps=4).shape == (2, 1, 8, 8)


# ------------------------------------------------------------------ through the CLI
ENV = lgen_env(OMP_NUM_THREADS="1")
TINY = [
    "experiment=distill_digits",
    "data.image_size=8",
    "data.batch_size=16",
    "method.start_steps=4",
    "trainer.max_epochs=3",  # rounds of 4, 2, 1 steps: one epoch each
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "callbacks.images.enabled=false",
    # the teacher: a tiny conditional flow model, one epoch of 2 batches
    "stage1.data.image_size=8",
    "stage1.data.batch_size=16",
    "stage1.method.width=8",
    "stage1.method.mults=[1,2]",
    "stage1.method.attention_resolutions=[4]",
    "stage1.trainer.max_epochs=1",
    "stage1.trainer.limit_train_batches=2",
    "stage1.trainer.limit_val_batches=0",
    "stage1.callbacks.images.enabled=false",
]
CM = ["method.algorithm=consistency", "method.grid_points=6", "trainer.max_epochs=2"]


def checkpoint(tmp_path, run_id: str) -> dict:
    return torch.load(
        tmp_path / "runs" / "distill_digits" / run_id / "checkpoints" / "last.ckpt", weights_only=False
    )


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


def test_one_command_trains_teacher_and_students_which_resume_bitwise_and_sample(tmp_path):
    cut = run_lgen("train", *TINY, "run_id=cut", "callbacks.stop_after.steps=3", cwd=tmp_path, env=ENV)
    assert "stage 1: training the teacher" in cut.stdout + cut.stderr
    assert checkpoint(tmp_path, "cut")["distill_finished_rounds"] == 1  # stopped in the second round
    run_lgen("train", *TINY, "run_id=cut", cwd=tmp_path, env=ENV)
    full = run_lgen("train", *TINY, "run_id=full", cwd=tmp_path, env=ENV)
    assert "reusing the finished teacher" in full.stdout + full.stderr
    a, b = checkpoint(tmp_path, "full"), checkpoint(tmp_path, "cut")
    assert_same_state(a, b)
    assert a["distill_finished_rounds"] == 2 and a["global_step"] == 6
    # the finished rounds' students are kept: the 4- and 2-step ones differ from each other
    assert not torch.equal(
        a["state_dict"]["rounds.4.w_mlp.2.weight"], a["state_dict"]["rounds.2.w_mlp.2.weight"]
    )

    ckpt = tmp_path / "runs" / "distill_digits" / "full" / "checkpoints" / "last.ckpt"
    bad = run_lgen("sample", f"ckpt={ckpt}", "steps=3", cwd=tmp_path, env=ENV, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "lgen: error: this progressive student was trained for steps=4|2|1, not steps=3"
    ]

    # consistency distillation from the same teacher (stage 1 reused)
    run_lgen("train", *TINY, *CM, "run_id=cm_cut", "callbacks.stop_after.steps=3", cwd=tmp_path, env=ENV)
    run_lgen("train", *TINY, *CM, "run_id=cm_cut", cwd=tmp_path, env=ENV)
    again = run_lgen("train", *TINY, *CM, "run_id=cm", cwd=tmp_path, env=ENV)
    assert "stage 1: training" not in again.stdout + again.stderr
    assert_same_state(checkpoint(tmp_path, "cm"), checkpoint(tmp_path, "cm_cut"))

    # both students sample on their own: their checkpoints carry the teacher
    (tmp_path / "runs" / "flow_digits" / "stage1-seed0" / "checkpoints" / "last.ckpt").unlink()
    model = load_method(str(ckpt))  # what lgen sample loads
    for steps in (1, 2, 4):
        images = model.sample(3, generator=torch.Generator().manual_seed(0), steps=steps, guidance=1.5)
        assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
        assert model.last_sample == {"sampler": "progressive", "steps": steps, "nfe": steps, "guided": False}
    model = load_method(str(tmp_path / "runs" / "distill_digits" / "cm" / "checkpoints" / "last.ckpt"))
    assert model.trained_steps() == [1, 2, 3, 4, 5]
    for steps in (1, 2, 4):
        assert model.sample(
            3, generator=torch.Generator().manual_seed(0), steps=steps, guidance=2.0
        ).shape == (3, 1, 8, 8)


def test_the_result_script_runs_tiny(tmp_path):
    """benchmarks/distill_fashion_mnist.py with everything shrunk and an untrained extractor: the teacher
    (stage 1) at 1 and 2 steps, both students at 1, 2 and 4 steps, their grids."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lightning_gen.eval.fid_extractor import DomainFeatureNet, save_extractor
    from tests.conftest import REPO

    torch.manual_seed(0)
    extractor = tmp_path / "fashion_mnist.pt"
    info = DataInfo(name="fashion_mnist", image_size=28)
    save_extractor(DomainFeatureNet(1, 28, 10, width=4).eval(), info, 4, 0.0, Path(extractor))
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "distill_fashion_mnist.py"), "--tiny", "--results", str(out),
         "--n", "20", "--teacher-steps", "1", "2", "--extractor", str(extractor)],
        cwd=tmp_path, env=ENV, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    rows = json.loads((out / "distill_fashion_mnist.json").read_text())
    teacher = "teacher (diffusion_fashion_mnist_28)"
    expected = {"floor", teacher, "progressive", "consistency", f"{teacher}, 1 steps", f"{teacher}, 2 steps"}
    expected |= {f"{s}, {k} steps" for s in ("progressive", "consistency") for k in (1, 2, 4)}
    assert set(rows) == expected
    for student in ("progressive", "consistency"):
        for k in (1, 2, 4):
            row = rows[f"{student}, {k} steps"]
            assert row["nfe"] == k and row["sampler"] == student and (out / "grids" / row["grid"]).is_file()
    assert rows[f"{teacher}, 2 steps"]["sampler"] == "ddim"
