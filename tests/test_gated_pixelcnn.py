"""Gated PixelCNN: exact causality without a blind spot (gradient checks), the classic PixelCNN's blind
spot for contrast, class conditioning, and a conditional model trained and sampled through the CLI."""

from __future__ import annotations

import pytest
import torch

from lightning_gen.nets.gated_pixelcnn import GatedPixelCNN
from lightning_gen.nets.pixelcnn import PixelCNN
from tests.conftest import FAST


def raster_order(channels: int, h: int, w: int) -> torch.Tensor:
    """(C, H, W) tensor of each subpixel's position: pixels in raster order, channels within a pixel."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(rows * w + cols) * channels + c for c in range(channels)])


def input_gradient(logits: torch.Tensor, x: torch.Tensor, c: int, r: int, col: int) -> torch.Tensor:
    """d(sum of the 256 logits of subpixel (c, r, col)) / d(input), for the first image."""
    return torch.autograd.grad(logits[0, c, :, r, col].sum(), x, retain_graph=True)[0][0]


@pytest.mark.parametrize("channels", [1, 3])
def test_gated_pixelcnn_sees_exactly_the_earlier_subpixels(channels):
    """Every output subpixel i: non-zero gradient from *every* earlier subpixel (no blind spot, whole
    causal context in reach on a 5x5 image), exactly zero from i itself and every later one."""
    torch.manual_seed(0)
    # width 48: 16 features per colour group, so no group's head ReLUs are all off by chance
    net = GatedPixelCNN(channels, width=48, layers=5, kernel_size=3, num_classes=4)
    h = w = 5
    x = torch.randn(1, channels, h, w, requires_grad=True)
    logits = net(x, torch.tensor([2]))
    order = raster_order(channels, h, w)
    for r in range(h):
        for col in range(w):
            for c in range(channels):
                grad = input_gradient(logits, x, c, r, col)
                earlier = order < order[c, r, col]
                assert (grad[~earlier] == 0).all(), f"output {(c, r, col)} sees itself or a later subpixel"
                assert (grad[earlier] != 0).all(), (
                    f"output {(c, r, col)} is blind to {earlier.nonzero().tolist()}"
                )


def test_classic_pixelcnn_has_a_blind_spot_up_and_to_the_right():
    """Why the gated network exists. Stacked masked convolutions (a 7x7 mask-A stem, then 3x3 mask-B
    layers) reach at most 3 columns right in the 3 rows above through the stem, and each further layer
    one column right per row up: pixel (r - a, c + b) is out of reach when b > a + 2, however deep the
    stack. On an 8x8 image, output (5, 1) is blind to exactly those 6 earlier pixels."""
    torch.manual_seed(0)
    net = PixelCNN(1, width=12, blocks=5, kernel_size=3)
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    r, c = 5, 1
    grad = input_gradient(net(x), x, 0, r, c)[0]
    earlier = raster_order(1, 8, 8)[0] < r * 8 + c
    blind = {(rr, cc) for rr, cc in (earlier & (grad == 0)).nonzero().tolist()}
    expected = {(r - a, c + b) for a in range(1, r + 1) for b in range(a + 3, 8 - c)}
    assert blind == expected == {(4, 5), (4, 6), (4, 7), (3, 6), (3, 7), (2, 7)}
    assert (grad[~earlier] == 0).all()  # causal all the same


def test_gated_rows_below_do_not_change_the_logits_of_a_row_and_labels_condition_every_pixel():
    """Sampling stops each pass at the current row (as for the classic net); the class label changes
    the logits everywhere, including the first subpixel, which has no context."""
    torch.manual_seed(0)
    net = GatedPixelCNN(3, width=12, layers=3, kernel_size=5, num_classes=10).eval()
    torch.nn.init.normal_(net.class_bias.weight)  # trained embeddings are not zero
    x, labels = torch.randn(2, 3, 6, 6), torch.tensor([1, 7])
    with torch.no_grad():
        full, cropped = net(x, labels)[..., :3, :], net(x[:, :, :3], labels)
        assert torch.allclose(full, cropped, atol=1e-6)
        other = net(x, torch.tensor([4, 4]))
        unlabeled = net(x, torch.tensor([-1, -1]))  # the null class
    assert not torch.allclose(net(x, labels)[:, 0, :, 0, 0], other[:, 0, :, 0, 0])
    assert torch.isfinite(unlabeled).all()
    with pytest.raises(ValueError, match="class-conditional"):
        net(x)


def test_conditional_gated_pixelcnn_trains_and_samples_a_class_through_the_cli(lgen):
    tiny = ["method.width=8", "method.blocks=1", "callbacks.fid.enabled=false", "run_id=g"]
    lgen("train", "experiment=gated_pixelcnn_digits", *FAST, *tiny)
    ckpt = lgen.cwd / "runs" / "gated_pixelcnn_digits" / "g" / "checkpoints" / "last.ckpt"
    from lightning_gen.methods.base import load_method

    method = load_method(str(ckpt))
    assert method.conditional and type(method.net).__name__ == "GatedPixelCNN"
    images = (torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.tensor([0, 3, 9])
    # a conditional model's predictions depend on the label it is given (the embeddings, zero at
    # initialisation, were trained). Compared per logit: after 3 steps the change is far below what a
    # float32 sum of 256 log-probabilities (~1400 nats) resolves.
    with torch.no_grad():
        logits = method.logits(method.net, images, labels)
        swapped = method.logits(method.net, images, labels.flip(0))
    assert (logits != swapped).flatten(1).any(1).tolist() == [True, False, True]
    out = lgen.cwd / "sevens.png"
    proc = lgen("sample", f"ckpt={ckpt}", "n=2", "class=7", f"out={out}")
    assert out.is_file() and "2 pixelcnn samples" in proc.stdout
    bad = lgen("train", "experiment=pixelcnn_digits", *FAST, "method.conditional=true", check=False)
    error = bad.stderr.strip().splitlines()[-1]  # the one line lgen writes (a SLURM hint may precede it)
    assert bad.returncode == 2 and error.startswith("lgen: error: method=pixelcnn cannot be built")
    assert "method.conditional=true needs the gated network (set method.net=gated)" in error
