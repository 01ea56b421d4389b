"""Plots of signatures and of their clustering (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

import math
import os
import re
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


def _short(name: str, most: int = 32) -> str:
    """``name`` in at most ``most`` characters: leading path parts give way first (the end of
    a layer name, block and call, tells layers apart)."""
    if len(name) <= most:
        return name
    parts = re.split(r"(?<=[./])", name)  # "features.7.0/block" -> "features.", "7.", ...
    while parts and len("".join(parts)) > most - 1:
        parts.pop(0)
    return "…" + ("".join(parts) or name[len(name) - (most - 1):])


def _plot_data(result: Any) -> tuple[list[str], list[str], np.ndarray, np.ndarray | None,
                                      int, Mapping[str, Any]]:
    """Names, kinds, scores, std (``None``: one batch), batch count and run fields."""
    from affjax import results
    from affjax.signature_type import Signature

    if isinstance(result, str | os.PathLike):
        result = results.load(result)
    if isinstance(result, Signature):
        batches = 1 if result.batch_scores is None else len(result.batch_scores)
        run = {} if result.run is None else vars(result.run)
        std = None if batches < 2 or result.std is None else np.asarray(result.std, float)
        return (list(result.names), list(result.kinds), np.asarray(result.scores, float), std,
                batches, run)
    layers = result["layers"]
    batches = len(layers[0].get("scores", [])) if layers else 0
    std = (np.array([layer.get("std") or 0.0 for layer in layers], float) if batches > 1
           else None)
    return ([str(la["name"]) for la in layers], [la["kind"] for la in layers],
            np.array([la["score"] for la in layers], float), std, batches, result)


def plot_signature(result: Any, path: str | os.PathLike, *,
                   title: str | None = None) -> None:
    """Draw a signature: score per layer in forward order, coloured by activation kind.

    Args:
      result: a :class:`affjax.Signature` (:func:`affjax.run_signature`'s, or
        :func:`affjax.results.load`'s), the path of a results file, or a results
        dictionary as written by ``affjax signature`` (its ``"layers"`` list with
        ``name``, ``kind``, ``score``, ``std``, ``scores``), see ``docs/cli.md``.
      path: the PNG file to write.
      title: default ``"<model> on <dataset>"`` with the batch count.

    The line is the mean over batches, the band mean ± std (drawn from two batches on). The
    x axis names the layers: every one up to what the width holds at a readable size (about
    60), else every k-th, with a tick mark for each layer; names longer than 32 characters
    lose their leading parts.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> result = {"model": "mlp", "dataset": "random", "batch_size": 32, "layers": [
      ...     {"name": f"relu:{i}", "kind": "relu", "score": s, "std": 0.0, "scores": [s]}
      ...     for i, s in enumerate([0.9, 0.8, 0.85])]}
      >>> path = Path(tempfile.mkdtemp()) / "signature.png"
      >>> plot_signature(result, path)
      >>> path.read_bytes()[:4]
      b'\x89PNG'
      >>> from affjax import Signature
      >>> sig = Signature(names=["relu:0", "relu:1"], kinds=["relu", "relu"],
      ...                 scores=np.array([0.9, 0.8]), dims=[4, 4])
      >>> plot_signature(sig, path, title="a Signature")
    """
    plt = _pyplot()
    names, kinds, scores, std, batches, run = _plot_data(result)
    n = len(names)
    band = std is not None
    std = std if band else 0.0
    idx = np.arange(n)
    # Names on the x axis: one label per `pitch` points of axis width at most.
    width = max(6.0, min(20.0, 0.12 * n + 4))
    fontsize = 7.0 if n <= 60 else 6.0
    pitch = 1.7 * fontsize
    step = max(1, math.ceil(n * pitch / ((width - 1.2) * 72)))
    ticks = idx[::step]
    labels = [_short(names[i]) for i in ticks]
    longest = max((len(label) for label in labels), default=0)
    fig, ax = plt.subplots(figsize=(width, 3.2 + 0.5 * fontsize * longest / 72))
    ax.plot(idx, scores, color="0.55", lw=1, zorder=1)
    if band:
        ax.fill_between(idx, scores - std, scores + std, color="0.8", alpha=0.6, lw=0,
                        zorder=0, label=f"mean ± std over {batches} batches")
    cmap = plt.get_cmap("tab10")
    for c, kind in enumerate(dict.fromkeys(kinds)):
        sel = np.array([k == kind for k in kinds])
        ax.scatter(idx[sel], scores[sel], s=18 if n <= 60 else 8, color=cmap(c % 10),
                   label=kind, zorder=2)
    weights = Path(str(run.get("weights", "?"))).name
    dataset = Path(str(run.get("dataset", "?"))).name
    ax.set_title(title or f"{run.get('model', '?')} ({weights} weights) on {dataset}, "
                 f"{batches} batch{'es' if batches != 1 else ''} of {run.get('batch_size')}")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    if step > 1:
        ax.set_xticks(idx, minor=True)
    ax.set_xlim(-0.5, max(n - 0.5, 0.5))
    ax.set_xlabel("activation call (forward order)"
                  + (f", every {step}{_ordinal(step)} named" if step > 1 else ""))
    ax.set_ylabel("affinity score")
    ax.set_ylim(min(0.0, float(np.min(scores - std))) if n else 0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=min(4, len(set(kinds)) + int(band)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ordinal(k: int) -> str:
    return "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")


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
