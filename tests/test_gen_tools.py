"""Tools for looking at generators, through the real CLI on tiny checkpoints: nearest training images
(`lgen sample nearest=`), latent traversals and interpolations (`traverse=`, `interpolate=`), and
per-image negative log-likelihood (`lgen eval nll`), checked against independent computations.

Checkpoints: a VAE, a PixelCNN and a latent autoencoder trained here by `lgen train` (in this process, a
few steps on 8x8 digits), and tests/data/legacy_ddpm_cfg.pt (a conditional DDPM on 8x8 digits). The
feature-space neighbours use a domain extractor with random weights (a real DomainFeatureNet file
in the extractor cache, as `lgen fid-extractor` writes it; training it is not what is tested here).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_gen.cli import main as lgen_main
from lightning_gen.config import compose, section_object
from lightning_gen.eval.grids import cell_of
from lightning_gen.eval.latent_space import slerp
from lightning_gen.eval.nearest import NearestNeighbours
from lightning_gen.losses import elbo
from lightning_gen.methods.base import load_method
from lightning_gen.randomness import isolated

DDPM = Path(__file__).parent / "data" / "legacy_ddpm_cfg.pt"
SMALL = [
    "data.image_size=8",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "callbacks.fid.enabled=false",
    "callbacks.images.enabled=false",
    "callbacks.embedding_plot.enabled=false",
]
TRAIN = {
    "vae": [
        "experiment=vae_digits",
        "method.width=8",
        "method.latent_dim=4",
        "trainer.limit_train_batches=30",
    ],
    "pixelcnn": [
        "experiment=pixelcnn_digits",
        "method.width=8",
        "method.blocks=1",
        "trainer.limit_train_batches=2",
    ],
    "latent_autoencoder": [
        "experiment=latent_autoencoder_digits",
        "method.channels=[8,8]",  # f = 2: 2x4x4 latents of 8x8 digits
        "method.norm_groups=4",
        "method.latent_channels=2",
        "method.disc_width=8",
        "method.scale_images=64",
        "trainer.limit_train_batches=2",
    ],
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    threads, environment = torch.get_num_threads(), dict(os.environ)
    torch.set_num_threads(1)  # tiny tensors: a second thread only contends on a shared machine
    try:  # in this process (a subprocess each costs more than the training); nothing of it leaks out:
        with isolated():  # the random streams seed_everything sets, and the variables it exports
            for overrides in TRAIN.values():
                assert lgen_main(["train", *overrides, *SMALL, f"runs_dir={runs}", "run_id=t"]) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)
    found = {
        name: runs / f"{TRAIN[name][0].split('=')[1]}" / "t" / "checkpoints" / "last.ckpt" for name in TRAIN
    }
    return {**found, "diffusion": DDPM}


@pytest.fixture(autouse=True)
def extractor_cache(tmp_path_factory, monkeypatch):
    """A digits 8 px domain extractor (random weights) where `lgen` looks for it."""
    from lightning_gen.eval.fid_extractor import DomainFeatureNet, default_path, save_extractor
    from lightning_gen.methods.base import DataInfo

    cache = tmp_path_factory.getbasetemp() / "lgen_cache"
    monkeypatch.setenv("LGEN_CACHE_DIR", str(cache))
    path = default_path("digits", 8)
    if not path.is_file():
        torch.manual_seed(0)
        save_extractor(DomainFeatureNet(1, 8, 10, 4), DataInfo(name="digits", image_size=8), 4, 0.0, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only contends on a shared machine
    yield
    torch.set_num_threads(threads)


def lgen(args: list[str]) -> int:
    """The CLI in this process, on the CPU whatever the machine has: the checks compute on the CPU too."""
    return lgen_main([*args, "device=cpu"])


def digits(split: str) -> torch.Tensor:
    """The uint8 images of a digits split at 8 px, loaded here the plain way (no lgen eval code)."""
    cfg = compose(["data=digits", "data.image_size=8"])
    from lightning_gen import registry

    datamodule = registry.build("data", section_object(cfg.data))
    datamodule.setup()
    dataset = datamodule.eval_dataloader(split).dataset
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def quantised(image: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as it is stored in a PNG grid: 3 x uint8."""
    x = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(3, -1, -1)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


# ---------------------------------------------------------------------------------------- nearest


def test_chunked_search_is_exact_and_a_training_image_is_its_own_nearest_at_distance_zero(ckpts):
    from lightning_gen.eval.nearest import TrainingImages

    torch.manual_seed(0)
    queries, bank = torch.randn(5, 7), torch.randn(50, 7)
    search = NearestNeighbours(queries, 4)
    for first in range(0, 50, 8):  # chunks of 8, the last of 2: fewer than k
        search.add(bank[first : first + 8], first)
    distances, indices = search.result()
    brute = torch.cdist(queries.double(), bank.double())
    expected = brute.argsort(dim=1)[:, :4]
    assert torch.equal(indices, expected)
    assert torch.allclose(distances, brute.gather(1, expected), rtol=1e-12)

    method = load_method(str(ckpts["vae"]))
    train = digits("train")
    chosen = [0, 17, 600, len(train) - 1]
    tool = TrainingImages(str(ckpts["vae"]), method, 3, "auto", [], torch.device("cpu"))
    found = tool.search(train[chosen].float() / 255)
    distances, indices = found["pixels"]
    assert indices[:, 0].tolist() == chosen and (distances[:, 0] == 0).all()  # exactly 0, not ~1e-7
    assert (distances[:, 1] > 0).all()
    feature_distances, feature_indices = found["features"]
    assert feature_indices[:, 0].tolist() == chosen and (feature_distances[:, 0] < 1e-6).all()


def test_lgen_sample_nearest_grid_holds_the_true_nearest_training_images(ckpts, tmp_path):
    from lightning_gen.eval.nearest import feature_extractor

    out = tmp_path / "s.png"
    assert lgen(["sample", f"ckpt={ckpts['vae']}", "n=4", "nearest=3", f"out={out}"]) == 0
    record = json.loads((tmp_path / "s_nearest.json").read_text())
    assert record["train_images"] == len(train := digits("train")) and record["k"] == 3
    method = load_method(str(ckpts["vae"]))
    samples = method.sample(4, generator=torch.Generator().manual_seed(0))  # what lgen sample drew
    extractor, _ = feature_extractor(
        "auto", method.data_info, []
    )  # the network; the search is what is checked
    real = train.float() / 255
    with torch.no_grad():
        spaces = {
            "pixels": (samples.flatten(1), real.flatten(1)),
            "features": (extractor(samples), extractor(real)),
        }
    picture = Image.open(tmp_path / "s_nearest.png")
    for space, (queries, bank) in spaces.items():
        brute = torch.cdist(queries.double(), bank.double())
        expected = brute.argsort(dim=1)[:, :3]
        assert record[space]["indices"] == expected.tolist(), space
        assert torch.allclose(
            torch.tensor(record[space]["distances"], dtype=torch.float64),
            brute.gather(1, expected),
            rtol=1e-6,
        )
        for row in range(4):
            for j, col in enumerate(record["columns"][space]):
                index = record[space]["indices"][row][j]
                assert torch.equal(cell_of(picture, record["layout"], row, col), quantised(real[index]))
    assert torch.equal(cell_of(picture, record["layout"], 2, 0), quantised(samples[2]))
    assert (tmp_path / "s.png").is_file()  # the samples' own grid, as without nearest=


# ---------------------------------------------------------------------------------------- latents


def test_slerp_keeps_its_endpoints_and_the_norm_of_the_arc():
    torch.manual_seed(0)
    z0, z1 = torch.randn(6, 32), torch.randn(6, 32) * 1.5
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    path = slerp(z0, z1, t)
    assert torch.equal(path[:, 0], z0) and torch.equal(path[:, -1], z1)
    a, b = z0.double(), z1.double()
    omega = torch.acos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).unsqueeze(1)
    u, v = torch.sin((1 - t) * omega), torch.sin(t * omega)
    # |p(t)|^2 = (u^2 |z0|^2 + v^2 |z1|^2 + 2 u v <z0, z1>) / sin^2 W
    norm2 = u**2 * (a * a).sum(1, True) + v**2 * (b * b).sum(1, True) + 2 * u * v * (a * b).sum(1, True)
    assert torch.allclose(path.double().norm(dim=-1), (norm2 / torch.sin(omega) ** 2).sqrt(), rtol=1e-5)
    on_sphere = z1 * (z0.norm(dim=1, keepdim=True) / z1.norm(dim=1, keepdim=True))
    same_norm = slerp(z0, on_sphere, t)  # |z0| = |z1|: the arc stays on that sphere
    assert torch.allclose(same_norm.norm(dim=-1), z0.norm(dim=1, keepdim=True).expand(-1, 7), rtol=1e-5)
    assert torch.allclose(slerp(z0, 2 * z0, t)[:, 3], 1.5 * z0)  # parallel ends: the straight line


def test_generators_decode_the_noise_they_are_given_as_they_decode_their_own_draws(ckpts):
    from lightning_gen.methods.base import DataInfo
    from lightning_gen.methods.generative.gan import GAN

    tiny = ["method=gan", "data=digits", "method.g_width=8", "method.d_width=8", "method.z_dim=8"]
    gan = GAN(section_object(compose(tiny).method), DataInfo(name="digits", image_size=8)).eval()
    models = {"gan": (gan, {}), "vae": (load_method(str(ckpts["vae"])), {})}
    models["diffusion"] = (load_method(str(DDPM)), {"sampler": "ddim", "steps": 3, "eta": 0.0, "cond": 4})
    for name, (model, options) in models.items():
        drawn = torch.randn(3, *model.noise_shape, generator=torch.Generator().manual_seed(1))
        own = model.sample(3, generator=torch.Generator().manual_seed(1), **options)
        assert torch.equal(model.sample(3, noise=drawn, **options), own), name


def test_lgen_sample_interpolates_vae_latents_and_diffusion_noise(ckpts, tmp_path):
    for name, extra in (("vae", []), ("diffusion", ["steps=3"])):
        out = tmp_path / f"{name}.png"
        args = ["sample", f"ckpt={ckpts[name]}", "interpolate=5", "n=3", f"out={out}", *extra]
        assert lgen(args) == 0
        record = json.loads(out.with_suffix(".json").read_text())
        saved = torch.load(out.with_suffix(".pt"))
        method = load_method(str(ckpts[name]))
        ends = torch.randn(2, 3, *method.noise_shape, generator=torch.Generator().manual_seed(0))
        latents = saved["latents"]
        assert record["path"] == "slerp" and latents.shape == (3, 5, *method.noise_shape)
        assert torch.equal(latents[:, 0], ends[0]) and torch.equal(latents[:, -1], ends[1])
        assert torch.allclose(latents, slerp(ends[0], ends[1], torch.linspace(0, 1, 5)))
        options = record["sampling"]
        if name == "diffusion":  # the deterministic sampler, one class per row
            assert options == {"sampler": "ddim", "steps": 3, "eta": 0.0} and record["labels"] == [0, 1, 2]
        labels = None if record["labels"] is None else torch.tensor(record["labels"]).repeat_interleave(5)
        decoded = method.sample(15, cond=labels, noise=latents.flatten(0, 1), **options)
        assert torch.allclose(saved["images"].flatten(0, 1), decoded, atol=1e-6)
        picture = Image.open(out)
        assert torch.equal(cell_of(picture, record["layout"], 1, 4), quantised(saved["images"][1, 4]))


def test_lgen_sample_traversal_rows_vary_only_their_dimension(ckpts, tmp_path):
    out = tmp_path / "tr.png"
    args = ["sample", f"ckpt={ckpts['vae']}", "traverse=0,2", "base=posterior", "image=3", f"out={out}"]
    assert lgen(args) == 0
    saved, record = torch.load(out.with_suffix(".pt")), json.loads(out.with_suffix(".json").read_text())
    method = load_method(str(ckpts["vae"]))
    with torch.no_grad():
        mu = method.nets.encode(digits("test")[3:4].float() / 255)[0][0]
    values = torch.linspace(-3, 3, 9)
    latents = saved["latents"]
    assert latents.shape == (2, 9, 4) and record["dims"] == [0, 2] and record["base"] == "posterior"
    for row, dim in enumerate([0, 2]):
        others = [d for d in range(4) if d != dim]
        assert torch.allclose(latents[row][:, others], mu[others].expand(9, -1))
        assert torch.allclose(latents[row][:, dim], values)
    images = method.sample(18, noise=latents.flatten(0, 1))
    assert torch.allclose(saved["images"].flatten(0, 1), images, atol=1e-6)
    assert torch.equal(cell_of(Image.open(out), record["layout"], 1, 8), quantised(saved["images"][1, 8]))

    # the latent autoencoder: a flat index of its C x H/f x W/f latent, around a test image's latent
    out = tmp_path / "ae.png"
    assert (
        lgen(["sample", f"ckpt={ckpts['latent_autoencoder']}", "traverse=5", "points=3", f"out={out}"]) == 0
    )
    latents = torch.load(out.with_suffix(".pt"))["latents"].flatten(2)  # (1, 3, 32)
    autoencoder = load_method(str(ckpts["latent_autoencoder"]))
    base = autoencoder.encode_latents(digits("test")[:1].float() / 127.5 - 1).flatten()
    keep = [d for d in range(32) if d != 5]
    assert torch.allclose(latents[0][:, keep], base[keep].expand(3, -1), atol=1e-6)
    assert latents[0][:, 5].tolist() == [-3.0, 0.0, 3.0]
    out = tmp_path / "ae_path.png"
    assert lgen(["sample", f"ckpt={ckpts['latent_autoencoder']}", "interpolate=3", "n=2", f"out={out}"]) == 0
    record, latents = (
        json.loads(out.with_suffix(".json").read_text()),
        torch.load(out.with_suffix(".pt"))["latents"],
    )
    assert record["path"] == "lerp" and torch.allclose(
        latents[:, 1], (latents[:, 0] + latents[:, 2]) / 2, atol=1e-6
    )


# ---------------------------------------------------------------------------------------- likelihood


def test_importance_weighted_bound_of_a_linear_gaussian_model():
    """p(z) = N(0, 1), p(x|z) = N(z, s^2): log p(x) = log N(x; 0, 1 + s^2), posterior N(x/(1+s^2), s^2/(1+s^2))."""
    torch.manual_seed(0)
    s2, x = 0.25, torch.tensor([[0.3], [-1.7], [2.5]], dtype=torch.float64)
    log_px = elbo.log_normal(x, 0.0, math.log(1 + s2))

    def bound(mu, logvar, k, repeats=1):
        """IWAE_k estimates (repeats, N) with q = N(mu, exp(logvar)), all draws in one batch."""
        shape = (repeats, k, *x.shape)
        z = (mu + (0.5 * logvar).exp() * torch.randn(shape, dtype=torch.float64)).reshape(-1, 1)
        xs, mus, logvars = (v.expand(shape).reshape(-1, 1) for v in (x, mu, logvar))
        log_w = elbo.log_normal(xs, z, math.log(s2)) + elbo.log_normal(z) - elbo.log_normal(z, mus, logvars)
        return torch.stack([elbo.importance_weighted_bound(w) for w in log_w.view(repeats, k, len(x))])

    exact_q = (x / (1 + s2), torch.full_like(x, math.log(s2 / (1 + s2))))
    for k in (1, 5):  # the exact posterior makes every weight p(x): any k gives log p(x)
        assert torch.allclose(bound(*exact_q, k)[0], log_px, atol=1e-12)
    wrong_q = (torch.zeros_like(x), torch.zeros_like(x))  # the prior as the posterior
    means = [bound(*wrong_q, k, repeats=200).mean(0) for k in (1, 10, 1000)]
    assert (means[0] < means[1]).all() and (means[1] < means[2]).all() and (means[2] <= log_px + 0.01).all()
    assert torch.allclose(means[2], log_px, atol=0.05)


def test_lgen_eval_nll_iwae_elbo_ranking_and_grid(ckpts, tmp_path):
    vae = ckpts["vae"]
    results = {}
    for k in (1, 16):
        out = tmp_path / f"k{k}"
        assert (
            lgen(["eval", "nll", f"ckpt={vae}", f"k={k}", "n=40", "show=4", f"out={out}", "wandb=false"]) == 0
        )
        results[k] = json.loads((out / "nll.json").read_text())
    one, many = results[1], results[16]
    assert (one["k"], one["n"], one["split"], one["seed"], one["estimator"]) == (
        1,
        40,
        "test",
        0,
        "negative ELBO",
    )
    assert many["estimator"] == "IWAE bound, k=16" and len(many["per_image"]) == 40

    # k = 1 is the ELBO: -log p(x|z) of the fixed-sigma Gaussian decoder + closed-form KL, z from seed 0
    method = load_method(str(vae))
    x = digits("test")[:40].float() / 255
    sigma, dims = method.cfg.decoder_std, x[0].numel()
    with torch.no_grad():
        mu, logvar = method.nets.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
        mean = torch.sigmoid(method.nets.decode(z))
    nll = (0.5 * math.log(2 * math.pi * sigma**2) + (x - mean) ** 2 / (2 * sigma**2)).flatten(1).sum(1)
    kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(1)
    elbo_bpd = (nll + kl + dims * math.log(256)) / (dims * math.log(2))
    assert torch.allclose(
        torch.tensor(one["per_image"], dtype=torch.float64), elbo_bpd.double(), rtol=1e-6, atol=0
    )
    assert many["bits_per_dim"] < one["bits_per_dim"]  # a tighter bound: fewer bits/dim on average
    assert one["bits_per_dim"] == pytest.approx(sum(one["per_image"]) / 40)
    assert one["stderr"] == pytest.approx(torch.tensor(one["per_image"]).std().item() / math.sqrt(40))

    # the ranking and the grid: the lowest and highest bits/dim of the JSON, those test images in the cells
    per_image = torch.tensor(many["per_image"])
    assert [e["index"] for e in many["most_likely"]] == per_image.argsort()[:4].tolist()
    assert [e["index"] for e in many["least_likely"]] == per_image.argsort(descending=True)[:4].tolist()
    picture = Image.open(tmp_path / "k16" / "nll_extremes.png")
    layout = many["grid"]["layout"]
    for row, key in enumerate(("most_likely", "least_likely")):
        for col, entry in enumerate(many[key]):
            assert torch.equal(cell_of(picture, layout, row, col), quantised(x[entry["index"]]))

    out = tmp_path / "pixelcnn"  # exact likelihood; the same numbers as lgen eval bpd (one implementation)
    args = [f"ckpt={ckpts['pixelcnn']}", "n=10", f"out={out}", "wandb=false"]
    assert lgen(["eval", "nll", *args]) == 0 and lgen(["eval", "bpd", *args]) == 0
    nll_record, bpd_record = (
        json.loads((out / "nll.json").read_text()),
        json.loads((out / "bpd.json").read_text()),
    )
    assert nll_record["estimator"] == "exact" and nll_record["k"] is None
    assert nll_record["per_image"] == bpd_record["results"]["per_image"]


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "{vae}", "nearest=0"], "nearest=0"),
        (["sample", "{vae}", "nearest=5000"], "more than the 1222 images"),
        (["sample", "{vae}", "nearest=3", "extractor=incepton"], "did you mean"),
        (["sample", "{vae}", "nearest=3", "extractor=timm:resnet50"], "timm:<model name>@<weights file>"),
        (["sample", "{vae}", "traverse=1,4"], "latent indices run from 0 to 3"),
        (["sample", "{diffusion}", "traverse=0"], "use vae, latent_autoencoder"),
        (["sample", "{pixelcnn}", "interpolate=4"], "no latent noise"),
        (["sample", "{vae}", "interpolate=1"], "interpolate=1"),
        (["sample", "{diffusion}", "interpolate=4", "sampler=ddpm"], "deterministic sampler"),
        (["eval", "nll", "{vae}", "k=0"], "nll.k"),
        (["eval", "nll", "{latent_autoencoder}"], "has no likelihood"),
        (["eval", "nll", "{pixelcnn}", "k=4"], "importance samples"),
    ],
)
def test_bad_input_is_one_error_line_and_creates_nothing(ckpts, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    args = [a.format(**{k: f"ckpt={v}" for k, v in ckpts.items()}) for a in args]
    place = [f"out={out}"] if args[0] == "eval" else [f"out={out}.png"]
    assert lgen([*args, *place]) == 2
    assert message in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []
