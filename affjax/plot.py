"""Plots of signatures and of their clustering (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def figure_formats() -> list[str]:
    """The file suffixes (formats) matplotlib can write, e.g. ``png``, ``pdf``, ``svg``.

    Example:
      >>> {"png", "pdf", "svg"} <= set(figure_formats())
      True
    """
    plt = _pyplot()
    fig = plt.figure()
    try:
        return sorted(fig.canvas.get_supported_filetypes())
    finally:
        plt.close(fig)


def plot_signature(result: Mapping[str, Any], path: str | os.PathLike, *,
                   title: str | None = None) -> None:
    """Draw a signature: score per layer in forward order, coloured by activation kind.

    Args:
      result: a results dictionary as written by ``affjax signature`` (its ``"layers"``
        list with ``name``, ``kind``, ``score``, ``std``), see ``docs/cli.md``.
      path: the PNG file to write.
      title: default ``"<model> on <dataset>"`` with the batch count.

    The line is the mean over batches, the band mean ± std (absent for one batch).

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> result = {"model": "mlp", "dataset": "random", "batch_size": 32, "layers": [
      ...     {"name": f"relu:{i}", "kind": "relu", "score": s, "std": 0.01, "scores": [s]}
      ...     for i, s in enumerate([0.9, 0.8, 0.85])]}
      >>> path = Path(tempfile.mkdtemp()) / "signature.png"
      >>> plot_signature(result, path)
      >>> path.read_bytes()[:4]
      b'\x89PNG'
    """
    plt = _pyplot()
    layers = result["layers"]
    scores = np.array([layer["score"] for layer in layers], float)
    std = np.array([layer.get("std") or 0.0 for layer in layers], float)
    kinds = [layer["kind"] for layer in layers]
    idx = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, min(20.0, 0.12 * len(layers) + 4)), 3.6))
    ax.plot(idx, scores, color="0.55", lw=1, zorder=1)
    ax.fill_between(idx, scores - std, scores + std, color="0.8", alpha=0.6, lw=0, zorder=0,
                    label="mean ± std")
    cmap = plt.get_cmap("tab10")
    for c, kind in enumerate(dict.fromkeys(kinds)):
        sel = np.array([k == kind for k in kinds])
        ax.scatter(idx[sel], scores[sel], s=18, color=cmap(c % 10), label=kind, zorder=2)
    batches = len(layers[0].get("scores", [])) if layers else 0
    weights = Path(str(result.get("weights", "?"))).name
    dataset = Path(str(result.get("dataset", "?"))).name
    ax.set_title(title or f"{result.get('model', '?')} ({weights} weights) on {dataset}, "
                 f"{batches} batch{'es' if batches != 1 else ''} of {result.get('batch_size')}")
    ax.set_xlabel("activation call (forward order)")
    ax.set_ylabel("affinity score")
    ax.set_ylim(min(0.0, float(np.min(scores - std))) if len(scores) else 0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=min(4, len(set(kinds)) + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dendrogram(labels: Sequence[str], distances: np.ndarray, path: str | os.PathLike, *,
                    method: str = "average", title: str = "DTW distance between signatures"
                    ) -> np.ndarray:
    """Hierarchical clustering of signatures from a distance matrix, drawn as a dendrogram.

    Args:
      labels: one name per signature.
      distances: ``(k, k)`` symmetric matrix with a zero diagonal (e.g. DTW distances).
      path: the PNG file to write.
      method: ``scipy.cluster.hierarchy.linkage`` method.

    Returns:
      The ``(k - 1, 4)`` linkage matrix.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> distances = np.array([[0.0, 1.0, 4.0], [1.0, 0.0, 4.0], [4.0, 4.0, 0.0]])
      >>> path = Path(tempfile.mkdtemp()) / "dendrogram.png"
      >>> plot_dendrogram(["a", "b", "c"], distances, path).tolist()
      [[0.0, 1.0, 1.0, 2.0], [2.0, 3.0, 4.0, 3.0]]
      >>> path.stat().st_size > 0
      True
    """
    from scipy.cluster.hierarchy import dendrogram

    from affjax.compare import linkage

    plt = _pyplot()
    link = linkage(distances, method)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(labels) + 3), 4))
    dendrogram(link, labels=list(labels), ax=ax, leaf_rotation=60)
    ax.set_title(title)
    ax.set_ylabel(f"{method} linkage distance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return link
