"""Comparing signatures across models: DTW distances, clustering, summary statistics, accuracy.

The paper's analyses: signatures of different lengths compared by dynamic time warping and
clustered hierarchically (families cluster together), and per-model summary statistics of the
signature (mean, std, min, max, max/mean) correlated with ImageNet top-1 accuracy.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affjax.metrics import dtw_matrix

STATISTICS: tuple[str, ...] = ("mean", "std", "min", "max", "max_over_mean")


def summary_statistics(scores: Sequence[float]) -> dict[str, float]:
    """Mean, std (population), min, max and max/mean of a signature's scores.

    Example:
      >>> summary_statistics([0.5, 1.0])["max_over_mean"]
      1.3333333333333333
    """
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        raise ValueError("summary_statistics of an empty signature")
    mean = float(s.mean())
    return {"mean": mean, "std": float(s.std()), "min": float(s.min()), "max": float(s.max()),
            "max_over_mean": float(s.max() / mean) if mean != 0 else float("nan")}


def labels_for(results: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> list[str]:
    """A label per result: the model name, made unique with the weights/dataset, then the file.

    Args:
      results: results objects with ``model``, ``weights`` and ``dataset``.
      paths: the file of each result, same length.

    Returns:
      One label per result.

    Raises:
      ValueError: ``paths`` and ``results`` differ in length, or a path is given twice.

    Example:
      >>> results = [{"model": "resnet18", "weights": "random", "dataset": "random"},
      ...            {"model": "resnet18", "weights": "imagenet", "dataset": "random"}]
      >>> labels_for(results, ["a.json", "b.json"])
      ['resnet18/random/random', 'resnet18/imagenet/random']
    """
    if len(paths) != len(results):
        raise ValueError(f"labels_for needs one path per result, got {len(paths)} paths for "
                         f"{len(results)} results")
    resolved = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p, r in zip(paths, resolved, strict=True)
                    if resolved.count(r) > 1})
    if twice:
        raise ValueError(f"the same results file is given twice: {', '.join(twice)}")
    labels = [str(r["model"]) for r in results]
    if len(set(labels)) < len(labels):
        labels = [f"{r['model']}/{r['weights']}/{r['dataset']}" for r in results]
    if len(set(labels)) < len(labels):
        labels = [Path(p).stem for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return labels


class AccuracyError(ValueError):
    """The accuracy table cannot be read or does not cover the compared models.

    A ``ValueError``; the message names the file or the missing models.
    """


def read_accuracy(path: str | os.PathLike) -> dict[str, float]:
    r"""Read a model -> accuracy table.

    Accepted: a JSON object ``{"resnet18": 69.76, ...}``, or a CSV with a header row whose
    first column is the model and which has a column named ``accuracy`` (or ``acc@1``,
    ``top1``); otherwise the second column is used.

    Args:
      path: a ``.json`` file, or any other suffix read as CSV.

    Returns:
      model -> accuracy, floats as written (no unit conversion).

    Raises:
      AccuracyError: unreadable file, wrong layout, or a value that is not a number.

    Example:
      >>> import tempfile
      >>> path = Path(tempfile.mkdtemp()) / "acc.csv"
      >>> _ = path.write_text("model,params,acc@1\nresnet18,11.7,69.76\nvgg11,132.9,69.02\n")
      >>> read_accuracy(path)
      {'resnet18': 69.76, 'vgg11': 69.02}
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AccuracyError(f"cannot read accuracy file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise AccuracyError(f"cannot read accuracy file {path}: not UTF-8 text ({e.reason} at "
                            f"byte {e.start})") from None
    try:
        if path.suffix.lower() == ".json":
            table = json.loads(text)
            if not isinstance(table, dict):
                raise AccuracyError(f"accuracy file {path}: expected a JSON object model -> "
                                    "accuracy")
            return {str(k): _number(v, path, k) for k, v in table.items()}
        rows = list(csv.reader(text.splitlines()))
        if len(rows) < 2:
            raise AccuracyError(f"accuracy file {path}: expected a header row and one row per "
                                "model")
        head = [h.strip().lower() for h in rows[0]]
        col = next((head.index(h) for h in ("accuracy", "acc@1", "top1") if h in head), 1)
        table = {}
        for line, r in enumerate(rows[1:], start=2):
            if not r or not r[0].strip():
                continue
            if len(r) <= col:
                raise AccuracyError(
                    f"accuracy file {path}: line {line} ({','.join(r)!r}) has no column "
                    f"{col + 1}; expected comma-separated rows of a model and its accuracy")
            table[r[0].strip()] = _number(r[col], path, r[0].strip())
        return table
    except (ValueError, IndexError) as e:
        if isinstance(e, AccuracyError):
            raise
        raise AccuracyError(f"accuracy file {path}: {e}") from None


def _number(value: Any, path: Path, model: str) -> float:
    # Numbers, or text that reads as one (CSV cells); not null, true, lists, ...
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise AccuracyError(f"accuracy file {path}: the accuracy of {model!r} is "
                            f"{json.dumps(value)}, not a number")
    try:
        number = float(value)
    except ValueError:
        raise AccuracyError(f"accuracy file {path}: the accuracy of {model!r} is {value!r}, "
                            "not a number") from None
    if not math.isfinite(number):  # would make every correlation NaN, without a word
        raise AccuracyError(f"accuracy file {path}: the accuracy of {model!r} is {value!r}, "
                            "not a finite number")
    return number


def correlations(stats: Mapping[str, Mapping[str, float]], accuracy: Mapping[str, float]
                 ) -> dict[str, dict[str, float]]:
    """Pearson and Spearman correlation of each summary statistic with accuracy.

    Args:
      stats: label -> :func:`summary_statistics`.
      accuracy: label -> accuracy; every label of ``stats`` must be present.

    Returns:
      statistic -> ``{"pearson", "pearson_p", "spearman", "spearman_p", "n"}``.
      A constant statistic gives NaN correlations (SciPy warns); with few
      models the p-values are unreliable.

    Raises:
      AccuracyError: a label without accuracy, or fewer than 3 models.

    Example:
      >>> stats = {name: summary_statistics(s) for name, s in
      ...          {"a": [0.5, 0.7], "b": [0.6, 0.9], "c": [0.8, 1.0]}.items()}
      >>> out = correlations(stats, {"a": 60.0, "b": 70.0, "c": 75.0})
      >>> out["mean"]["spearman"], out["mean"]["n"]
      (1.0, 3)
    """
    from scipy.stats import pearsonr
    from scipy.stats import spearmanr

    missing = [k for k in stats if k not in accuracy]
    if missing:
        raise AccuracyError(f"no accuracy for {missing}; the table has {sorted(accuracy)}")
    labels = list(stats)
    if len(labels) < 3:
        raise AccuracyError(f"a correlation needs at least 3 models, got {len(labels)}")
    acc = np.array([accuracy[k] for k in labels], np.float64)
    out = {}
    for name in STATISTICS:
        v = np.array([stats[k][name] for k in labels], np.float64)
        p = pearsonr(v, acc)
        s = spearmanr(v, acc)
        out[name] = {"pearson": float(p.statistic), "pearson_p": float(p.pvalue),
                     "spearman": float(s.statistic), "spearman_p": float(s.pvalue),
                     "n": len(labels)}
    return out


def linkage(distances: Any, method: str = "average") -> np.ndarray:
    """Hierarchical clustering of signatures from their distance matrix (SciPy's ``linkage``).

    Args:
      distances: ``(k, k)`` symmetric matrix with a zero diagonal (e.g. DTW distances).
      method: a ``scipy.cluster.hierarchy.linkage`` method.

    Returns:
      The ``(k - 1, 4)`` linkage matrix.

    Example:
      >>> linkage([[0.0, 1.0, 4.0], [1.0, 0.0, 4.0], [4.0, 4.0, 0.0]]).tolist()
      [[0.0, 1.0, 1.0, 2.0], [2.0, 3.0, 4.0, 3.0]]
    """
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    return scipy_linkage(squareform(np.asarray(distances, float), checks=False), method=method)


def compare(results: Sequence[Mapping[str, Any]], labels: Sequence[str], *,
            accuracy: Mapping[str, float] | None = None, nan: str = "raise") -> dict[str, Any]:
    """DTW distance matrix, summary statistics and (optionally) correlations with accuracy.

    Args:
      results: validated results objects (``affjax.results.load``).
      labels: one unique label per result.
      accuracy: label -> accuracy, or ``None``.
      nan: what to do with layers whose score is NaN (affjax gives NaN for a layer with
        non-finite activations): ``"raise"`` (default) or ``"drop"``, which
        leaves those layers out of that signature and lists them under ``"dropped"``.

    Returns:
      ``{"labels", "dtw" (k x k list), "statistics" {label: stats}, "correlations" or None,
      "dropped" {label: [layer names]}}``.

    Raises:
      ValueError: fewer than 2 results, labels that are not one unique label per result,
        NaN scores with ``nan="raise"``, or a signature left empty by ``nan="drop"``.

    Example:
      >>> results = [{"layers": [{"score": s} for s in scores]}
      ...            for scores in ([0.9, 0.8], [0.9, 0.8, 0.8], [0.5])]
      >>> out = compare(results, ["a", "b", "c"])
      >>> [round(d, 6) for d in out["dtw"][0]], round(out["statistics"]["b"]["mean"], 4)
      ([0.0, 0.0, 0.7], 0.8333)
      >>> out["correlations"] is None   # no accuracy table given
      True
    """
    if len(results) < 2:
        raise ValueError(f"compare needs at least 2 results, got {len(results)}")
    if len(labels) != len(results) or len(set(labels)) != len(labels):
        raise ValueError(f"compare needs one unique label per result, got {list(labels)} for "
                         f"{len(results)} results")
    if nan not in ("raise", "drop"):
        raise ValueError(f"nan must be 'raise' or 'drop', got {nan!r}")
    sigs, dropped = [], {}
    for label, r in zip(labels, results, strict=True):
        scores = np.array([layer["score"] for layer in r["layers"]], np.float64)
        bad = ~np.isfinite(scores)  # NaN (kept in results files), or a hand-edited infinity
        names = [str(layer.get("name", i)) for i, layer in enumerate(r["layers"])]
        if bad.any():
            bad_names = [name for name, b in zip(names, bad, strict=True) if b]
            if nan == "raise":
                raise ValueError(
                    f"{label}: {len(bad_names)} of {len(scores)} layers have a NaN score "
                    f"({', '.join(bad_names[:5])}{', ...' if len(bad_names) > 5 else ''}); "
                    "leave them out with nan='drop' (--nan drop), or find why those layers' "
                    "activations are not finite (NaN or overflow in the model or its input; "
                    "half precision overflows first) and recompute them)")
            if bad.all():
                raise ValueError(f"{label}: every layer has a NaN score; nothing to compare")
            dropped[label] = bad_names
        sigs.append(scores[~bad])
    stats = {lab: summary_statistics(s) for lab, s in zip(labels, sigs, strict=True)}
    return {
        "labels": list(labels),
        "dtw": dtw_matrix(sigs).tolist(),
        "statistics": stats,
        "correlations": None if accuracy is None else correlations(stats, accuracy),
        "dropped": dropped,
    }
