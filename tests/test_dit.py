"""The Diffusion Transformer (lightning_gen.nets.dit): adaLN-Zero, where the class enters, the
conditioning sequence, patch layout, presets, bf16, torch.compile, and DDP on 2 gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_gen.config import ConfigError
from lightning_gen.nets.dit import DiT, DiTConfig


def tiny(**kwargs) -> DiT:
    torch.manual_seed(0)
    options = dict(patch_size=2, width=16, depth=2, heads=2, num_classes=5)
    options.update(kwargs)
    return DiT(2, 8, **options)


def perturbed(net: DiT) -> DiT:
    """Every parameter non-zero (adaLN-Zero layers included), as after some training."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return net


def inputs(n: int = 3):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 2, 8, 8, generator=g), torch.rand(n, generator=g) * 1000


def test_an_untrained_block_is_exactly_the_identity_and_an_untrained_dit_predicts_zero():
    x, t = inputs()
    for context in ("none", "cross", "joint"):
        net = tiny(context=context)
        tokens = torch.randn(3, 16, 16)
        c = torch.randn(3, 16) * 5
        sequence = net.context_embedder(torch.randn(3, 4, 16)) if context == "cross" else None
        for block in net.blocks:
            assert torch.equal(block(tokens, c, sequence), tokens), context
        assert torch.equal(net(x, t, torch.tensor([0, 4, 5])), torch.zeros_like(x)), context
    # the same blocks with their gates moved away from zero are not the identity
    block = perturbed(tiny()).blocks[0]
    assert not torch.allclose(block(tokens, c), tokens)


def test_the_class_reaches_the_tokens_only_through_scale_shift_and_gate():
    net = perturbed(tiny())
    x, t = inputs()
    a, b = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])  # 5 is the null class
    out_a, out_b = net(x, t, a), net(x, t, b)
    assert not torch.allclose(out_a, out_b, atol=1e-3)

    # Swap only what the adaLN layers regress from c: the output becomes the other class's, exactly.
    modulators = [block.adaLN_modulation for block in net.blocks] + [net.final_layer.adaLN_modulation]
    recorded = []
    hooks = [m.register_forward_hook(lambda m, i, o: recorded.append(o)) for m in modulators]
    net(x, t, b)
    for hook in hooks:
        hook.remove()
    replay = iter(recorded)
    hooks = [m.register_forward_hook(lambda m, i, o: next(replay)) for m in modulators]
    assert torch.equal(net(x, t, a), out_b)
    for hook in hooks:
        hook.remove()

    # With the modulation's dependence on c removed (weights zero, biases kept), neither the class
    # nor the timestep changes anything.
    with torch.no_grad():
        for m in modulators:
            m[-1].weight.zero_()
    assert torch.equal(net(x, t, a), net(x, t, b))
    assert torch.equal(net(x, t, a), net(x, t.flip(0), a))


def test_the_conditioning_sequence_enters_by_cross_or_joint_attention_and_padding_is_ignored():
    x, t = inputs()
    y = torch.tensor([0, 1, 2])
    g = torch.Generator().manual_seed(3)
    sequence = torch.randn(3, 4, 6, generator=g)
    other = sequence.clone()
    other[:, 2:] = torch.randn(3, 2, 6, generator=g)  # differs only in the last two tokens
    mask = torch.tensor([[True, True, False, False]] * 3)
    for context in ("cross", "joint"):
        net = perturbed(tiny(context=context, context_dim=6))
        assert not torch.allclose(net(x, t, y, sequence), net(x, t, y, other), atol=1e-4), context
        assert torch.allclose(net(x, t, y, sequence, mask), net(x, t, y, other, mask), atol=1e-6), context
    # class as a one-token sequence (no sequence given, context width = DiT width)
    net = perturbed(tiny(context="cross"))
    direct = net(x, t, y, net.y_embedder(y)[:, None])
    assert torch.equal(net(x, t, y), direct)
    plain = perturbed(tiny())
    with pytest.raises(ValueError, match="takes no conditioning sequence"):
        plain(x, t, y, sequence)
    with pytest.raises(ValueError, match="needs a conditioning sequence"):
        perturbed(tiny(context="cross", context_dim=6))(x, t, y)


def test_patches_are_laid_back_where_they_were_taken():
    net = tiny(patch_size=4)
    x = torch.randn(2, 2, 8, 8)
    # tokens built independently: F.unfold gives (c, p, q) per patch; the DiT's layout is (p, q, c)
    patches = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (N, L, C p p)
    tokens = patches.reshape(2, 4, 2, 4, 4).permute(0, 1, 3, 4, 2).reshape(2, 4, 32)
    assert torch.equal(net.unpatchify(tokens), x)
    # the patch embedding is the matching linear map of the same patches
    embedded = net.x_embedder(x).flatten(2).transpose(1, 2)
    linear = patches @ net.x_embedder.weight.flatten(1).T + net.x_embedder.bias
    assert torch.allclose(embedded, linear, atol=1e-5)


def test_presets_have_the_papers_sizes_and_bad_sizes_are_one_line_errors():
    def closed_form(d: int, depth: int, p: int, c_in: int, c_out: int, classes: int, tokens: int) -> int:
        """Parameters of the DiT architecture counted by hand (the position table included, as the
        official code keeps it as a frozen parameter)."""
        patch_embed = p * p * c_in * d + d
        time_mlp = 256 * d + d + d * d + d
        block = (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d) + (6 * d * d + 6 * d)
        final = (2 * d * d + 2 * d) + (d * p * p * c_out + p * p * c_out)
        return patch_embed + time_mlp + (classes + 1) * d + depth * block + final + tokens * d

    # Peebles & Xie 2023: S, B, L, XL = (12, 384, 6), (12, 768, 12), (24, 1024, 16), (28, 1152, 16);
    # ImageNet 256: 32x32x4 latents, 1000 classes, learned sigma (8 output channels)
    for preset, (depth, d, heads) in {
        "S/2": (12, 384, 6),
        "B/4": (12, 768, 12),
        "L/8": (24, 1024, 16),
        "XL/2": (28, 1152, 16),
    }.items():
        p = int(preset.split("/")[1])
        assert DiTConfig(preset=preset).sizes() == {
            "patch_size": p,
            "depth": depth,
            "width": d,
            "heads": heads,
        }
        with torch.device("meta"):
            net = DiT.from_config(DiTConfig(preset=preset, learn_sigma=True), 4, 32, 1000)
        count = sum(q.numel() for q in net.parameters()) + net.pos_embed.numel()
        assert count == closed_form(d, depth, p, 4, 8, 1000, (32 // p) ** 2), preset
    assert count == pytest.approx(675e6, rel=1e-3)  # DiT-XL/2: the paper's 675 M-parameter model
    sizes = DiTConfig(preset="B/4", depth=3).sizes()  # an explicit value wins over the preset
    assert sizes == {"patch_size": 4, "depth": 3, "width": 768, "heads": 12}
    assert DiTConfig().sizes() == {"patch_size": 2, "depth": 6, "width": 128, "heads": 4}
    with pytest.raises(ConfigError) as error:
        DiT.from_config(DiTConfig(patch_size=2), 4, 7, 10, what="latent")
    message = str(error.value)
    assert "patch_size=2 does not divide the latent size 7" in message and "\n" not in message
    with pytest.raises(ConfigError, match="multiple of 4 and of method.dit.heads=5"):
        DiT.from_config(DiTConfig(width=128, heads=5), 4, 8)


def test_dit_config_validates_as_a_nested_method_section():
    from omegaconf import OmegaConf

    from lightning_gen.config import _check_keys, _typed, section_object

    def section(*overrides: str) -> DiTConfig:
        node = OmegaConf.from_dotlist(list(overrides))
        _check_keys(node, DiTConfig, "method.dit")
        return section_object(_typed(node, DiTConfig, "method.dit"))

    assert section("preset=XL/2", "depth=4").sizes() == {
        "patch_size": 2,
        "depth": 4,
        "width": 1152,
        "heads": 16,
    }
    with pytest.raises(ConfigError, match=r"'XL/3' for method.dit.preset \(did you mean 'XL/8'\?\)"):
        section("preset=XL/3")
    with pytest.raises(ConfigError, match="method.dit.patch_size: it must be at least 1"):
        section("patch_size=0")
    with pytest.raises(ConfigError, match="expected one of: none, cross, joint"):
        section("context=text")


def test_bf16_autocast_and_a_full_graph_compile_run_forward_and_backward():
    net = perturbed(tiny(context="cross"))
    x, t = inputs(4)
    y = torch.tensor([0, 1, 2, 5])
    reference = net(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, t, y)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
    low.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)

    # The whole forward and backward as one graph (no graph breaks): what trainer.compile captures.
    # aot_eager traces exactly as inductor does but skips C++ code generation (minutes on a CPU).
    net.zero_grad()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    out = compiled(x, t, y)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    eager = net(x, t, y)
    eager.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    for got, want in zip(grads, [p.grad for p in net.parameters()]):
        assert torch.allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------ DDP: 2 gloo processes vs 1
WORLD, PER_RANK = 2, 3


def ddp_problem():
    net = perturbed(tiny(context="cross"))
    g = torch.Generator().manual_seed(4)
    n = WORLD * PER_RANK
    x = torch.randn(n, 2, 8, 8, generator=g)
    t = torch.rand(n, generator=g) * 1000
    y = torch.randint(0, 6, (n,), generator=g)
    target = torch.randn(n, 2, 8, 8, generator=g)
    sequence = torch.randn(n, 3, 16, generator=g)  # cross-attended: every parameter gets a gradient
    return net, x, t, y, sequence, target


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    net, x, t, y, sequence, target = ddp_problem()
    model = DistributedDataParallel(net)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    loss = F.mse_loss(model(x[part], t[part], y[part], sequence[part]), target[part])
    loss.backward()  # DDP averages the gradients over the ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save(
        {"loss": mean_loss / WORLD, "grads": [p.grad.clone() for p in net.parameters()]},
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_processes_give_the_loss_and_gradients_of_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    net, x, t, y, sequence, target = ddp_problem()
    loss = F.mse_loss(net(x, t, y, sequence), target)
    loss.backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
        for (name, p), got in zip(net.named_parameters(), result["grads"]):
            # float32 sums in another order: agreement to ~1e-6 of the gradient's own scale
            tolerance = 1e-5 * float(p.grad.abs().max())
            assert tolerance > 1e-9, name  # a gradient that is really there
            assert torch.allclose(got, p.grad, rtol=0, atol=tolerance), (name, (got - p.grad).abs().max())
