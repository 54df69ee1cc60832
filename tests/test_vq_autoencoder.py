"""The VQ tokenizer (method=vq_autoencoder) and its quantisers.

Vector quantisation against brute force and closed forms: the nearest code (plain and l2-normalised),
the straight-through gradient, one EMA step of the codebook, restarts of exactly the dead codes; FSQ's
levels and indices; 2 gloo processes build the codebook one process builds from the whole batch; the
method trains with its discriminator switched on, resumes with codebook and moving averages bitwise,
encodes and decodes, and is what `lgen eval recon` loads.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_gen.config import ConfigError
from lightning_gen.methods.base import DataInfo
from lightning_gen.methods.generative.vq_autoencoder import VQAutoencoder, VQAutoencoderConfig
from lightning_gen.nets.quantizers import FiniteScalarQuantizer, VectorQuantizer
from tests.conftest import lgen_env, run_lgen


def g(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def brute_force_nearest(flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z - e_k|| in float64, one pair at a time (no expansion of the square)."""
    return torch.stack([((codes.double() - z.double()) ** 2).sum(1).argmin() for z in flat])


@pytest.mark.parametrize("l2", [False, True])
def test_vector_quantisation_picks_the_nearest_code(l2):
    vq = VectorQuantizer(64, 8, l2_normalised=l2).eval()
    vq.codebook.copy_(g(0, 64, 8))
    z = g(1, 4, 8, 5, 5)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    codes = vq.codebook
    if l2:  # nearest by angle: the largest cosine similarity
        flat, codes = flat / flat.norm(dim=1, keepdim=True), codes / codes.norm(dim=1, keepdim=True)
    expected = brute_force_nearest(flat, codes)
    assert torch.equal(out.indices.flatten(), expected)
    # the forward value is that code, at every position
    assert torch.allclose(out.quantized.permute(0, 2, 3, 1).reshape(-1, 8), codes[expected], atol=1e-6)
    assert torch.allclose(vq.embed(out.indices), out.quantized.detach(), atol=1e-6)


def test_straight_through_gradient_is_the_identity_on_the_input():
    vq = VectorQuantizer(16, 4, beta=0.0).eval()  # beta 0: only the straight-through path carries gradient
    z = g(2, 3, 4, 2, 2).requires_grad_(True)
    upstream = g(3, 3, 4, 2, 2)
    (vq(z).quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


def test_commitment_gradient_pulls_the_encoding_toward_its_code():
    vq = VectorQuantizer(16, 4, beta=0.25).eval()
    z = g(4, 2, 4, 3, 3).requires_grad_(True)
    out = vq(z)
    out.loss.backward()
    expected = 0.25 * 2 * (z - out.quantized).detach() / z.numel()  # d/dz beta mean (z - sg(e))^2
    assert torch.allclose(z.grad, expected, atol=1e-7)


def test_ema_update_equals_its_closed_form_on_a_toy_batch():
    decay = 0.9
    vq = VectorQuantizer(3, 2, decay=decay, restart_threshold=0.0).train()
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vq.codebook.copy_(codebook)
    vq.ema_sum.copy_(codebook * torch.tensor([[2.0], [1.0], [4.0]]))
    vq.ema_count.copy_(torch.tensor([2.0, 1.0, 4.0]))
    # 4 encodings: two near code 0, one near code 1, one near code 0 again; none near code 2
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [-1.0, -1.0]])
    vq(points.view(1, 2, 2, 2).permute(0, 3, 1, 2))  # (N, D, h, w) whose positions, row-major, are the points
    z = points
    assigned = [0, 0, 1, 0]
    for k, (count, total) in enumerate(zip([2.0, 1.0, 4.0], codebook * torch.tensor([[2.0], [1.0], [4.0]]))):
        members = [z[i] for i in range(4) if assigned[i] == k]
        n_k = float(len(members))
        s_k = torch.stack(members).sum(0) if members else torch.zeros(2)
        count_k = decay * count + (1 - decay) * n_k
        sum_k = decay * total + (1 - decay) * s_k
        assert vq.ema_count[k].item() == pytest.approx(count_k, abs=1e-6)
        assert torch.allclose(vq.ema_sum[k], sum_k, atol=1e-6)
        assert torch.allclose(vq.codebook[k], sum_k / count_k, atol=1e-6)


def test_restarts_replace_exactly_the_dead_codes_with_encodings_of_the_batch():
    vq = VectorQuantizer(6, 3, decay=0.5, restart_threshold=1.0).train()
    vq.codebook.copy_(g(5, 6, 3) * 0.1)  # all codes near the origin
    vq.ema_sum.copy_(vq.codebook * 4)
    # code 1 decays to exactly the threshold (alive), codes 3 and 4 below it (dead)
    vq.ema_count.copy_(torch.tensor([4.0, 2.0, 4.0, 1.5, 1.5, 4.0]))
    z = g(6, 2, 3, 2, 2) + 5  # far from every code: all go to the nearest one, the others get none
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = brute_force_nearest(flat, vq.codebook)
    assert set(nearest.tolist()).isdisjoint({1, 3, 4})  # so that none of them is assigned anything
    before = {k: (vq.ema_count[k].item(), vq.ema_sum[k].clone()) for k in range(6)}
    vq(z, seed=3)
    for k in range(6):
        count, total = before[k]
        n_k = float((nearest == k).sum())
        decayed = 0.5 * count + 0.5 * n_k
        if decayed < 1.0:  # dead after the update (1.5 -> 0.75 without assignments): restarted
            assert vq.ema_count[k].item() == 1.0
            assert any(torch.equal(vq.codebook[k], row) for row in flat), k
            assert torch.equal(vq.ema_sum[k], vq.codebook[k])
        else:  # alive (4 -> 2): exactly the moving average, untouched by the restart
            s_k = flat[nearest == k].sum(0) if n_k else torch.zeros(3)
            assert vq.ema_count[k].item() == pytest.approx(decayed)
            assert torch.allclose(vq.ema_sum[k], 0.5 * total + 0.5 * s_k, atol=1e-6)
    restarted = [k for k in range(6) if any(torch.equal(vq.codebook[k], row) for row in flat)]
    assert restarted == [3, 4]  # the two codes that fell below the threshold, and no other
    assert vq.ema_count[1].item() == 1.0 and torch.equal(vq.ema_sum[1], 0.5 * before[1][1])  # at it: kept
    # the draw depends on the seed only: another quantiser in the same state restarts identically
    twin = VectorQuantizer(6, 3, decay=0.5, restart_threshold=1.0).train()
    twin.codebook.copy_(g(5, 6, 3) * 0.1)
    twin.ema_sum.copy_(twin.codebook * 4)
    twin.ema_count.copy_(torch.tensor([4.0, 2.0, 4.0, 1.5, 1.5, 4.0]))
    twin(z, seed=3)
    assert torch.equal(twin.codebook, vq.codebook)


def test_finite_scalar_quantisation_levels_and_indices():
    fsq = FiniteScalarQuantizer((8, 5, 3))
    assert fsq.codebook_size == 120
    z = g(7, 4, 3, 6, 6) * 3
    out = fsq(z)
    values = out.quantized.permute(0, 2, 3, 1).reshape(-1, 3)
    for channel, levels in enumerate((8, 5, 3)):  # L values k / (L // 2), k = -(L // 2) .. (L - 1) // 2
        allowed = torch.arange(-(levels // 2), (levels - 1) // 2 + 1) / (levels // 2)
        assert set(values[:, channel].unique().tolist()) <= set(allowed.tolist())
    # index = sum_i (level_i + L_i // 2) prod_{j<i} L_j, and back
    shifted = (values * torch.tensor([4.0, 2.0, 1.0]) + torch.tensor([4.0, 2.0, 1.0])).round()
    expected = shifted[:, 0] + 8 * shifted[:, 1] + 40 * shifted[:, 2]
    assert torch.equal(out.indices.flatten(), expected.long())
    every = torch.arange(120).view(1, 10, 12)
    codes = fsq.embed(every).permute(0, 2, 3, 1).reshape(-1, 3)  # the 120 codes, each once
    assert torch.equal(fsq.indices_of(codes), every.flatten())
    assert torch.equal(fsq(torch.zeros(1, 3, 1, 1)).quantized.flatten(), torch.tensor([0.0, 0.0, 0.0]))


def test_image_size_must_be_a_multiple_of_the_downsampling_factor():
    cfg = VQAutoencoderConfig(name="vq_autoencoder", channels=(8, 8, 8), norm_groups=4, latent_channels=8)
    with pytest.raises(ConfigError, match="multiple of the downsampling factor f=4"):
        VQAutoencoder(cfg, DataInfo(name="digits", image_size=30))
    module = VQAutoencoder(cfg, DataInfo(name="digits", image_size=28))
    assert module.token_grid == (7, 7) and module.codebook_size == 512
    names = dict(module.named_buffers())
    assert all(n in names for n in module.buffers_identical_on_all_ranks())
    assert {"autoencoder.quantizer.codebook", "autoencoder.quantizer.ema_count"} <= set(
        module.buffers_identical_on_all_ranks()
    )


# ------------------------------------------------------------------ DDP: 2 gloo processes vs 1
WORLD, STEPS = 2, 4


def codebook_problem():
    vq = VectorQuantizer(32, 4, decay=0.8, restart_threshold=1.0).train()
    vq.codebook.copy_(g(8, 32, 4) * 0.01)  # most codes die at the first step and restart
    vq.ema_sum.copy_(vq.codebook)
    batches = [g(20 + step, 2 * WORLD, 4, 3, 3) for step in range(STEPS)]
    return vq, batches


def codebook_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    vq, batches = codebook_problem()
    for step, batch in enumerate(batches):
        vq(batch.chunk(WORLD)[rank], seed=step)  # this rank's half of the global batch
    torch.save({name: b.clone() for name, b in vq.named_buffers()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_processes_build_the_codebook_of_one_process(tmp_path):
    mp.spawn(codebook_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    vq, batches = codebook_problem()
    first = vq.codebook.clone()
    for step, batch in enumerate(batches):
        vq(batch, seed=step)
    assert (vq.codebook != first).any(1).float().mean() > 0.5  # the restarts did fire
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, value in vq.named_buffers():
        assert torch.equal(ranks[0][name], ranks[1][name]), (
            name
        )  # identical on the ranks: no broadcast needed
        # sums over ranks in another order than over one batch: equal to float32 rounding
        assert torch.allclose(ranks[0][name], value, rtol=1e-5, atol=1e-5), name


# ------------------------------------------------------------------ the method through the CLI
ENV = lgen_env(OMP_NUM_THREADS="1")  # bitwise comparisons of sums need one fixed thread count
TINY = [
    "experiment=vq_digits",
    "data.image_size=16",
    "data.batch_size=32",
    "method.channels=[8,16]",  # f = 2: 8x8 tokens
    "method.norm_groups=4",
    "method.latent_channels=8",
    "method.code_dim=4",
    "method.codebook_size=32",
    "method.attention=false",
    "method.disc_width=8",
    "method.disc_layers=1",
    "method.disc_start_epochs=1",
    "method.scale_images=64",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32-true",
    "logger.wandb.enabled=false",
    "callbacks.images.enabled=false",
]


def test_trains_resumes_bitwise_with_its_codebook_encodes_and_decodes(tmp_path):
    runs = tmp_path / "runs" / "vq_digits"
    run_lgen("train", *TINY, "run_id=full", cwd=tmp_path, env=ENV)
    run_lgen("train", *TINY, "run_id=cut", "callbacks.stop_after.steps=4", cwd=tmp_path, env=ENV)
    cut = torch.load(runs / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert cut["global_step"] == 4  # epoch 0: 2 autoencoder steps; epoch 1, batch 0: autoencoder and D
    resumed = run_lgen("train", *TINY, "run_id=cut", cwd=tmp_path, env=ENV)
    assert "resuming from" in resumed.stdout + resumed.stderr
    full = torch.load(runs / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    after = torch.load(runs / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert full["global_step"] == 2 + 4 and full["optimizer_states"][1]["state"]  # D trained in epoch 1
    buffers = [k for k in full["state_dict"] if ".quantizer." in k]
    assert sorted(b.rsplit(".", 1)[1] for b in buffers) == ["codebook", "ema_count", "ema_sum"]
    for name, value in full["state_dict"].items():  # the codebook and its moving averages included
        assert torch.equal(value, after["state_dict"][name]), name
    assert (full["state_dict"]["autoencoder.quantizer.ema_count"] != 1).any()  # they did move

    from lightning_gen.methods.base import load_method

    module = load_method(str(runs / "full" / "checkpoints" / "last.ckpt"))
    images = (torch.rand(3, 1, 16, 16) * 255).to(torch.uint8)
    indices = module.encode(images)
    assert indices.shape == (3, 8, 8) and indices.dtype == torch.long and int(indices.max()) < 32
    decoded = module.decode(indices)
    assert decoded.shape == (3, 1, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1
    assert torch.equal(module.reconstruct(images), decoded)
    assert 1 / 255 <= module.decoder_std.item() < 2 and module.decoder_std.item() != 1.0  # fitted on data
    nll = module.decoder_nll(images, indices)
    assert nll.shape == (3,) and torch.isfinite(nll).all()

    from lightning_gen.eval.recon import load_reconstructor  # what lgen eval recon loads

    assert isinstance(load_reconstructor(str(runs / "full" / "checkpoints" / "last.ckpt")), VQAutoencoder)
