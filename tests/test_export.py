"""`lgen export`: backbone weights that load into torchvision's ResNets and compute the same features,
and the embeddings of a split with their labels."""

from __future__ import annotations

import json

import numpy as np
import torch

from lightning_gen.config import compose, section_object
from lightning_gen.eval.features import split_features
from lightning_gen.export import export_backbone
from lightning_gen.methods.base import load_method
from lightning_gen.registry import build
from tests.conftest import FAST, lgen_env, run_lgen


def torchvision_model_from(snippet: str, path) -> torch.nn.Module:
    """Run the Python that the export prints (and writes into its .json) for the user."""
    namespace: dict = {}
    exec(snippet.replace("PATH", repr(str(path))), namespace)
    return namespace["model"].eval()


def test_trained_backbone_round_trips_into_torchvision_resnet18_and_embeddings_export(tmp_path):
    env = lgen_env(OMP_NUM_THREADS="1")
    run_lgen(
        "train",
        "experiment=simclr_digits",
        "method.backbone.name=resnet18",
        *FAST,
        "run_id=x",
        cwd=tmp_path,
        env=env,
    )
    ckpt = tmp_path / "runs" / "simclr_digits" / "x" / "checkpoints" / "last.ckpt"
    out = tmp_path / "resnet18.pt"
    printed = run_lgen("export", "backbone", f"ckpt={ckpt}", f"out={out}", cwd=tmp_path, env=env).stdout
    described = json.loads(out.with_suffix(".json").read_text())
    # 16 px digits: one channel and the CIFAR stem, both said
    assert described["architecture"] == "resnet18" and described["cifar_stem"] is True
    assert described["in_channels"] == 1 and "CIFAR stem: 3x3, stride 1" in printed

    state = torch.load(out, weights_only=True)  # a plain state dict: no pickled code
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "conv1.weight" in state
    model = torchvision_model_from(described["torchvision"], out)
    assert isinstance(model, __import__("torchvision").models.ResNet)
    method = load_method(str(ckpt)).eval()
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method.backbone(x), rtol=1e-5, atol=1e-5)

    embeddings = tmp_path / "test.npz"
    run_lgen("export", "embeddings", f"ckpt={ckpt}", "split=test", f"out={embeddings}", cwd=tmp_path, env=env)
    saved = np.load(embeddings)
    datamodule = build("data", section_object(compose(["data=digits", "data.image_size=16"]).data))
    datamodule.setup()
    expected = split_features(method, datamodule, "test")
    assert saved["features"].shape == (359, 512)  # digits' test split: 20% of 1797
    np.testing.assert_array_equal(saved["labels"], datamodule.datasets["test"].labels.numpy())
    np.testing.assert_allclose(saved["features"], expected.features.numpy(), rtol=1e-5, atol=1e-5)


def test_resnet50_with_group_norm_and_the_imagenet_stem_round_trips(tmp_path):
    cfg = compose(
        [
            "experiment=simclr_digits",
            "data=color_digits",
            "method.backbone.name=resnet50",
            "method.backbone.cifar_stem=false",
            "method.backbone.norm=layer",
        ]
    )
    datamodule = build("data", section_object(cfg.data))
    method = build("method", section_object(cfg.method), data=datamodule.info).eval()
    state, described = export_backbone(method)
    assert (described["architecture"], described["cifar_stem"], described["norm"]) == (
        "resnet50",
        False,
        "layer",
    )
    assert "GroupNorm(1, c)" in described["torchvision"] and "maxpool" not in described["torchvision"]
    torch.save(state, tmp_path / "r50.pt")
    model = torchvision_model_from(described["torchvision"], tmp_path / "r50.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method.backbone(x), rtol=1e-5, atol=1e-5)


def test_dino_exports_the_teacher_it_evaluates(tmp_path):
    cfg = compose(["experiment=dino_digits", "method.backbone.name=resnet18"])
    datamodule = build("data", section_object(cfg.data))
    method = build("method", section_object(cfg.method), data=datamodule.info).eval()
    with torch.no_grad():  # make the teacher differ from the student, as training does
        for p in method.teacher_backbone.parameters():
            p.add_(torch.randn_like(p))
    state, described = export_backbone(method)
    torch.save(state, tmp_path / "teacher.pt")
    model = torchvision_model_from(described["torchvision"], tmp_path / "teacher.pt")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method.embed(x), rtol=1e-5, atol=1e-5)
