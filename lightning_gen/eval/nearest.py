"""Each generated sample beside its nearest training images, in pixel space and in a feature space.

    lgen sample ckpt=runs/vae_digits/<run>/checkpoints/last.ckpt n=16 nearest=8

A generator that copies its training set shows it here: a sample whose nearest training image is
(almost) the same picture. Pixel distance catches exact and near-exact copies; a feature space (the
FID extractor's by default: the domain classifier on digits/MNIST/Fashion-MNIST, InceptionV3 otherwise;
``extractor=`` takes any of ``lgen eval gen``'s) also
catches copies that moved by a pixel or changed contrast, which pixel L2 ranks far away.

The search is exact: every training image is compared with every sample (squared L2 distances as
|q|^2 + |b|^2 - 2 q.b in float64, chunk by chunk as the training split streams past on the device,
keeping the k best so far), and the distances reported are recomputed as sum (q - b)^2 from the kept
vectors, so a training image fed in as a query is at distance exactly 0. Pixels are compared in
[0, 1] at the checkpoint's resolution. The training images are the checkpoint's dataset: its run's
``config.yaml`` (else its hyperparameters: dataset name and resolution), ``data.KEY=VALUE`` overrides
(e.g. ``data.root=``) applied, as ``lgen eval`` finds them.

Written beside the samples' grid ``out``: ``<out stem>_nearest.png`` (rows: samples; column blocks:
the sample, its k nearest in pixels, its k nearest in features, each with its distance) and
``<out stem>_nearest.json`` (training-set indices and distances of both, the extractor, the layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lightning_gen.config import ConfigError


def feature_extractor(spec: str, data_info, data_overrides: list[str]) -> tuple[nn.Module, str]:
    """(frozen network: float images in [0, 1] (N, C, H, W) -> features (N, D), its name).

    Any extractor ``lgen eval gen`` and the FID callback take (``lightning_gen.eval.extractors``):
    ``auto`` (the domain classifier on digits/MNIST/Fashion-MNIST, InceptionV3 otherwise), ``domain``,
    ``inception``, ``dinov2``, ``ckpt:<checkpoint>``, ``timm:<model>@<weights file>``, read from the usual
    local paths, never downloaded; images are quantised and resized as for the metrics."""
    from lightning_gen.eval.extractors import load_extractor

    root = next((o.split("=", 1)[1] for o in data_overrides if o.startswith("data.root=")), None)
    extractor, provenance = load_extractor(spec, data_info, data_root=root, log=lambda *_: None)
    arch = provenance.get("arch")
    return extractor, provenance["name"] + (f" ({arch})" if arch and arch != provenance["name"] else "")


class NearestNeighbours:
    """Exact k nearest neighbours (L2) of fixed queries in a bank that arrives in chunks."""

    def __init__(self, queries: torch.Tensor, k: int):
        self.queries = queries.double()
        q, dims = self.queries.shape
        self.k = k
        self.squared_norms = self.queries.pow(2).sum(1, keepdim=True)
        self.distances = torch.full((q, 0), float("inf"), dtype=torch.float64, device=queries.device)
        self.indices = torch.zeros((q, 0), dtype=torch.long, device=queries.device)
        self.vectors = torch.zeros((q, 0, dims), dtype=torch.float64, device=queries.device)

    def add(self, chunk: torch.Tensor, first_index: int) -> None:
        """Bank vectors ``chunk`` (B, D), whose first one is bank item ``first_index``."""
        chunk = chunk.double()
        squared = (self.squared_norms + chunk.pow(2).sum(1) - 2 * self.queries @ chunk.T).clamp(min=0)
        take = min(self.k, len(chunk))
        best, where = squared.topk(take, dim=1, largest=False)
        distances = torch.cat([self.distances, best], 1)
        indices = torch.cat([self.indices, where + first_index], 1)
        vectors = torch.cat([self.vectors, chunk[where]], 1)
        keep = distances.topk(min(self.k, distances.shape[1]), dim=1, largest=False).indices
        self.distances = distances.gather(1, keep)
        self.indices = indices.gather(1, keep)
        self.vectors = vectors.gather(1, keep.unsqueeze(-1).expand(-1, -1, vectors.shape[-1]))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2 distances (Q, k), bank indices (Q, k)), nearest first (ties: lower index first); the
        distances recomputed from the differences, so an identical vector is at exactly 0."""
        exact = (self.queries.unsqueeze(1) - self.vectors).pow(2).sum(-1).sqrt()
        by_index = self.indices.argsort(dim=1, stable=True)
        exact, indices = exact.gather(1, by_index), self.indices.gather(1, by_index)
        order = exact.argsort(dim=1, stable=True)
        return exact.gather(1, order), indices.gather(1, order)


class TrainingImages:
    """The checkpoint's training split, and the extractor, made ready (and checked) before sampling."""

    def __init__(self, ckpt: str, method, k: int, extractor: str, data_overrides: list[str], device):
        from lightning_gen.eval.cli import EvalConfig, build_data
        from lightning_gen.eval.wandb_run import run_dir_of_checkpoint

        if k < 1:
            raise ConfigError(f"nearest={k}: the number of nearest training images must be at least 1")
        self.datamodule = build_data(
            EvalConfig(ckpt=ckpt), method, run_dir_of_checkpoint(ckpt), data_overrides
        )
        self.dataset = self.datamodule.eval_dataloader("train").dataset
        if k > len(self.dataset):
            raise ConfigError(
                f"nearest={k} is more than the {len(self.dataset)} images of "
                f"{self.datamodule.registry_name}'s training split: use nearest={len(self.dataset)} or fewer"
            )
        self.k, self.device = k, device
        self.extractor, self.extractor_name = feature_extractor(extractor, method.data_info, data_overrides)
        self.extractor.to(device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return torch.cat([self.extractor(x.float()).double() for x in images.split(250)])

    @torch.no_grad()
    def search(self, samples: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Nearest training images of ``samples`` (N, C, H, W) in [0, 1]: {"pixels": ..., "features": ...}."""
        samples = samples.to(self.device)
        pixels = NearestNeighbours(samples.flatten(1), self.k)
        features = NearestNeighbours(self.features(samples), self.k)
        first = 0
        for batch in self.datamodule.eval_dataloader("train"):
            x = batch["image"].to(self.device).float() / 255
            pixels.add(x.flatten(1), first)
            features.add(self.features(x), first)
            first += len(x)
        return {"pixels": pixels.result(), "features": features.result()}

    def write(self, samples: torch.Tensor, found: dict, out: Path, ckpt: str, method_name: str) -> Path:
        """The labelled grid and the JSON beside ``out``; returns the grid's path."""
        from lightning_gen.eval.grids import image_table

        (d_pix, i_pix), (d_feat, i_feat) = found["pixels"], found["features"]
        rows = []
        for n, sample in enumerate(samples.float().cpu()):
            train = [self.dataset[int(i)]["image"].float() / 255 for i in (*i_pix[n], *i_feat[n])]
            rows.append(torch.stack([sample, *train]))
        captions = [
            ["", *(f"{d:.3g}" for d in d_pix[n].tolist()), *(f"{d:.3g}" for d in d_feat[n].tolist())]
            for n in range(len(samples))
        ]
        data, k = self.datamodule.registry_name, self.k
        picture, layout = image_table(
            torch.stack(rows),
            title=f"{method_name} samples and their {k} nearest of the {len(self.dataset)} {data} "
            "training images (L2 distance under each)",
            groups=[
                ("sample", 1),
                ("nearest in pixels", k),
                (f"nearest in {self.extractor_name} features", k),
            ],
            captions=captions,
        )
        grid = out.with_name(f"{out.stem}_nearest.png")
        picture.save(grid)
        payload = {
            "checkpoint": str(ckpt),
            "method": method_name,
            "data": data,
            "split": "train",
            "train_images": len(self.dataset),
            "k": k,
            "samples": len(samples),
            "pixels": {
                "space": "pixel values in [0, 1], flattened",
                "indices": i_pix.tolist(),
                "distances": d_pix.tolist(),
            },
            "features": {
                "extractor": self.extractor_name,
                "indices": i_feat.tolist(),
                "distances": d_feat.tolist(),
            },
            "columns": {
                "sample": [0],
                "pixels": list(range(1, 1 + k)),
                "features": list(range(1 + k, 1 + 2 * k)),
            },
            "layout": layout.to_dict(),
        }
        grid.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        return grid
