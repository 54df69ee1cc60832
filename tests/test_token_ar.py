"""The autoregressive Transformer over VQ tokens (method=token_ar).

The likelihood is exactly causal (no gradient from a token to the logits that predict it or earlier
ones); sampling with the KV cache gives the logits of the uncached pass and the same seed draws the same
sequence; top-k / top-p keep exactly the tokens they should; the exact NLL is the sum of the model's own
conditionals; the bits/dim bound is its token and decoder parts. Through the CLI, one command from a
fresh folder trains the tokenizer (stage 1) and the token model, which resumes bitwise, samples with
top_k/top_p/temperature/guidance and is scored by lgen eval bpd's function; bad input is one line.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gen.config import ConfigError
from lightning_gen.methods.base import DataInfo, load_method
from lightning_gen.methods.generative.token_ar import (
    TokenAR,
    TokenARConfig,
    check_sampling,
    draw,
    filter_logits,
)
from lightning_gen.methods.generative.vq_autoencoder import VQAutoencoder, VQAutoencoderConfig
from lightning_gen.nets.token_transformer import TokenTransformer
from tests.conftest import lgen_env, run_lgen


def tiny_net(vocab: int = 11, length: int = 9, starts: int = 4) -> TokenTransformer:
    torch.manual_seed(0)
    return TokenTransformer(vocab, length, starts, width=16, depth=2, heads=2, dropout=0.0).eval()


def test_the_likelihood_is_exactly_causal():
    """d logits_i / d (embedding of token j) = 0 for j >= i: position i predicts token i from tokens < i."""
    net = tiny_net()
    tokens = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    inputs = net.embed(tokens, torch.tensor([0, 2, 3])).detach().requires_grad_(True)
    logits = net.transform(inputs)
    for i in range(9):
        (grad,) = torch.autograd.grad(logits[:, i].sum(), inputs, retain_graph=True)
        # input position p carries token p - 1 (position 0: the class token)
        seen = grad.abs().sum((0, 2))
        assert torch.all(seen[i + 1 :] == 0), (i, seen)  # tokens >= i: exactly no influence
        assert torch.all(seen[: i + 1] > 0), (i, seen)  # the class token and tokens < i do influence it
    # the same through the tokens themselves: changing token j leaves the logits at positions <= j unchanged
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    a, b = net(tokens, torch.tensor([0, 2, 3])), net(changed, torch.tensor([0, 2, 3]))
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.equal(a[:, 6:], b[:, 6:])


def test_kv_cache_gives_the_logits_of_the_full_pass():
    net = tiny_net()
    tokens = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(2))
    starts = torch.tensor([0, 1, 2, 3])
    full = net(tokens, starts)
    cache = net.new_cache(4, net.position)
    for i in range(9):
        step = net.step(cache, starts=starts) if i == 0 else net.step(cache, token=tokens[:, i - 1])
        assert (step - full[:, i]).abs().max() < 1e-5, i
    assert cache.length == 9


def test_top_k_and_top_p_keep_exactly_their_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.2, 0.15, 0.1], [0.1, 0.2, 0.3, 0.25, 0.15]]))
    kept = filter_logits(logits, 2, None).isfinite()
    assert kept.tolist() == [[True, False, True, False, False], [False, False, True, True, False]]
    # nucleus 0.8: the most likely tokens until their mass reaches 0.8 (0.5 + 0.2 + 0.15; 0.3 + 0.25 + 0.2 + 0.15)
    kept = filter_logits(logits, None, 0.8).isfinite()
    assert kept.tolist() == [[True, False, True, True, False], [False, True, True, True, True]]
    assert filter_logits(logits, None, 1e-6).isfinite().sum(1).tolist() == [1, 1]  # the top token survives
    assert torch.equal(filter_logits(logits, 5, 1.0), logits)
    # the Gumbel-max draw follows softmax(logits) and never draws a filtered token
    many = filter_logits(logits[:1].expand(20000, 5), 3, None)
    drawn = draw(many, torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=5).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.2, 0.15, 0.0]) / 0.85, atol=0.015)


def test_sampling_options_are_checked():
    for bad, message in [
        ((1.0, 0, None), "top_k must be at least 1"),
        ((1.0, None, 0.0), "top_p"),
        ((0.0, None, None), "temperature"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_sampling(*bad, vocab=10)


def tiny_tokenizer(name: str = "digits", image_size: int = 8, codes: int = 16) -> VQAutoencoder:
    cfg = VQAutoencoderConfig(
        name="vq_autoencoder", channels=(8, 8), norm_groups=4, latent_channels=8, code_dim=4,
        codebook_size=codes, attention=False, disc_width=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return VQAutoencoder(cfg, DataInfo(name=name, image_size=image_size, channels=1, num_classes=10))


def tiny_model(**overrides) -> TokenAR:
    cfg = TokenARConfig(
        name="token_ar", width=16, depth=2, heads=2, conditional=True, dropout=0.0, **overrides
    )
    return TokenAR(
        cfg, DataInfo(name="digits", image_size=8, channels=1, num_classes=10), tokenizer=tiny_tokenizer()
    )


def test_same_seed_same_sequence_and_the_nll_is_the_sum_of_the_conditionals():
    model = tiny_model(ema_decay=0.0).eval()
    labels = torch.tensor([3, 7])
    args = (labels, 1.5, 1.0, 5, 0.9)
    a = model.sample_tokens(2, *args, torch.Generator().manual_seed(4))
    b = model.sample_tokens(2, *args, torch.Generator().manual_seed(4))
    c = model.sample_tokens(2, *args, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 16) and int(a.max()) < 16
    # exact NLL = -sum_i log softmax(logits_i)[t_i], each conditional computed separately
    logits = model.net(a, labels)
    by_hand = -sum(torch.log_softmax(logits[:, i], -1).gather(1, a[:, i : i + 1])[:, 0] for i in range(16))
    assert torch.allclose(model.nll(model.net, a, labels), by_hand, atol=1e-5)
    images = model.sample(2, cond=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0), top_k=3)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_bits_per_dim_bound_is_the_token_nll_plus_the_decoder_nll():
    model = tiny_model(ema_decay=0.0).eval()
    images = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 255).to(torch.uint8)
    out = model.bits_per_dim_bound(images)
    tokens = model.tokenizer.encode(images).flatten(1)
    null = torch.full((3,), 10)
    token_nll = model.nll(model.net, tokens, null).double()
    decoder_nll = model.tokenizer.decoder_nll(images, tokens.view(3, 4, 4))
    assert torch.allclose(out["bits_per_dim"], (token_nll + decoder_nll) / (64 * math.log(2)))
    assert torch.allclose(out["bits_per_dim"], out["token_bits_per_dim"] + out["decoder_bits_per_dim"])
    assert torch.allclose(out["bits_per_token"], token_nll / (16 * math.log(2)))


def test_bad_tokenizer_and_codebook_sizes_are_one_line_errors():
    info = DataInfo(name="digits", image_size=8, channels=1, num_classes=10)
    with pytest.raises(ConfigError, match="trained on fashion_mnist at 8 px"):
        TokenAR(TokenARConfig(name="token_ar"), info, tokenizer=tiny_tokenizer("fashion_mnist"))
    with pytest.raises(ConfigError, match="trained on digits at 16 px"):
        TokenAR(TokenARConfig(name="token_ar"), info, tokenizer=tiny_tokenizer(image_size=16))
    with pytest.raises(ConfigError, match="codebook_size=32, but the tokenizer .* has 16 codes"):
        TokenAR(TokenARConfig(name="token_ar", codebook_size=32), info, tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="method.tokenizer is not set"):
        TokenAR(TokenARConfig(name="token_ar"), info)
    with pytest.raises(ConfigError, match="no such file"):
        TokenAR(TokenARConfig(name="token_ar", tokenizer="ckpt:/nonexistent.ckpt"), info)


# ------------------------------------------------------------------ through the CLI
ENV = lgen_env(OMP_NUM_THREADS="1")
TINY = [
    "experiment=token_ar_digits",
    "data.image_size=16",
    "data.batch_size=32",
    "method.width=16",
    "method.depth=1",
    "method.heads=2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "callbacks.images.enabled=false",
    # the tokenizer: tiny, one epoch of 2 batches, D never on
    "stage1.data.image_size=16",
    "stage1.data.batch_size=32",
    "stage1.method.channels=[8,16]",
    "stage1.method.norm_groups=4",
    "stage1.method.latent_channels=8",
    "stage1.method.code_dim=4",
    "stage1.method.codebook_size=32",
    "stage1.method.attention=false",
    "stage1.method.disc_width=8",
    "stage1.method.disc_start_epochs=5",
    "stage1.method.scale_images=64",
    "stage1.trainer.max_epochs=1",
    "stage1.trainer.limit_train_batches=2",
    "stage1.trainer.limit_val_batches=0",
    "stage1.callbacks.images.enabled=false",
]


def test_one_command_trains_tokenizer_and_model_resumes_bitwise_samples_and_scores(tmp_path):
    runs = tmp_path / "runs"
    first = run_lgen("train", *TINY, "run_id=cut", "callbacks.stop_after.steps=3", cwd=tmp_path, env=ENV)
    assert "stage 1: training the tokenizer" in first.stdout + first.stderr
    stage1 = runs / "vq_digits" / "stage1-seed0" / "checkpoints" / "last.ckpt"
    assert stage1.is_file()
    resumed = run_lgen("train", *TINY, "run_id=cut", cwd=tmp_path, env=ENV)
    assert "reusing the finished tokenizer" in resumed.stdout + resumed.stderr
    full = run_lgen("train", *TINY, "run_id=full", cwd=tmp_path, env=ENV)
    assert "stage 1: training" not in full.stdout + full.stderr
    a = torch.load(runs / "token_ar_digits" / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(runs / "token_ar_digits" / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    assert any(k.startswith("tokenizer.autoencoder.quantizer.codebook") for k in a["state_dict"])

    ckpt = runs / "token_ar_digits" / "full" / "checkpoints" / "last.ckpt"
    stage1.unlink()  # the token model's checkpoint carries its tokenizer
    out = tmp_path / "grid.png"
    proc = run_lgen(
        "sample", f"ckpt={ckpt}", "n=4", "top_k=5", "top_p=0.9", "temperature=0.8", "guidance=1.0",
        "class=3", f"out={out}", cwd=tmp_path, env=ENV,
    )  # fmt: skip
    assert out.is_file() and "4 token_ar samples" in proc.stdout
    bad = run_lgen("sample", f"ckpt={ckpt}", "top_k=0", cwd=tmp_path, env=ENV, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "lgen: error: lgen sample: top_k=0: top_k must be at least 1"
    ]
    from lightning_gen.eval import likelihood  # what lgen eval bpd computes for each batch

    model = load_method(str(ckpt))
    images = (torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    bpd, variance, what = likelihood.bits_per_dim(model, images)
    assert what == likelihood.BOUND_THROUGH_TOKENS and torch.equal(variance, torch.zeros(4))
    assert torch.allclose(bpd, model.bits_per_dim_bound(images)["bits_per_dim"]) and (bpd > 0).all()


def test_the_result_script_runs_tiny(tmp_path):
    """benchmarks/token_ar_fashion_mnist.py with everything shrunk, an untrained extractor, the token model only
    (stage 1, its recon row, the model's FID rows per guidance weight, the bound's parts, a grid)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lightning_gen.eval.fid_extractor import DomainFeatureNet, save_extractor
    from tests.conftest import REPO

    torch.manual_seed(0)
    extractor = tmp_path / "fashion_mnist.pt"
    save_extractor(
        DomainFeatureNet(1, 28, 10, width=4).eval(),
        DataInfo(name="fashion_mnist", image_size=28),
        4,
        0.0,
        Path(extractor),
    )
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "token_ar_fashion_mnist.py"), "--tiny", "--results", str(out),
         "--n", "20", "--guidance", "0", "1", "--only", "token_ar_fashion_mnist", "--extractor", str(extractor)],
        cwd=tmp_path, env=ENV, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    rows = json.loads((out / "token_ar_fashion_mnist.json").read_text())
    assert sorted(rows) == [
        "floor",
        "token_ar_fashion_mnist",
        "token_ar_fashion_mnist, w=0",
        "token_ar_fashion_mnist, w=1",
        "vq_fashion_mnist",
    ]
    model = rows["token_ar_fashion_mnist"]
    assert model["steps"] == 2 and (out / "grids" / model["grid"]).is_file()
    assert model["test_bits_per_dim"] == pytest.approx(
        model["token_bits_per_dim"] + model["decoder_bits_per_dim"]
    )
    assert rows["vq_fashion_mnist"]["codebook_size"] == 16 and 0 < rows["vq_fashion_mnist"]["usage"] <= 1
