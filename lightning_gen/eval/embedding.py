"""2-D views of a representation: PCA and t-SNE of a fixed subset, coloured by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def fixed_subset(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """The same ``n`` sample indices every time (sorted), chosen by a seeded permutation."""
    if n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def pca_2d(x: torch.Tensor) -> np.ndarray:
    """Projection of the centred features on their first two principal directions."""
    x = x.double().cpu()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy()


def tsne_2d(x: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    from sklearn.manifold import TSNE

    x = x.double().cpu().numpy()
    perplexity = min(perplexity, max(1.0, (len(x) - 1) / 3))  # t-SNE needs perplexity < n
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_embeddings(
    x: torch.Tensor, labels: torch.Tensor, path: Path, title: str = "", seed: int = 0, tsne: bool = True
) -> Path:
    """Save a PNG with PCA (and t-SNE) scatter plots of ``x`` coloured by ``labels``; returns the path."""
    # The object-oriented API draws off-screen without touching pyplot's global backend (a notebook's
    # inline plots keep working while a callback saves these).
    import matplotlib
    from matplotlib.figure import Figure

    views = {"PCA": pca_2d(x)}
    if tsne and len(x) > 5:
        views["t-SNE"] = tsne_2d(x, seed)
    labels = labels.cpu().numpy()
    fig = Figure(figsize=(5 * len(views), 4.6))
    axes = fig.subplots(1, len(views), squeeze=False)
    classes = np.unique(labels)
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for ax, (name, xy) in zip(axes[0], views.items()):
        for i, c in enumerate(classes):
            mask = labels == c
            name_c = "unlabeled" if c < 0 else str(int(c))
            ax.scatter(
                xy[mask, 0], xy[mask, 1], s=6, color=cmap(i % cmap.N), label=name_c, alpha=0.8, linewidths=0
            )
        ax.set_title(f"{name} {title}".strip())
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0][-1].legend(
            markerscale=2.5, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
