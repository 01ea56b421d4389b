"""Comparing signatures across models: DTW distances, clustering, summary statistics, accuracy.

The paper's analyses: signatures of different lengths compared by dynamic time warping and
clustered hierarchically (families cluster together), and per-model summary statistics of the
signature (mean, std, min, max, max/mean) correlated with ImageNet top-1 accuracy.
"""

from __future__ import annotations

import csv
import functools
import itertools
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
# Up to this many models, p-values are exact: all n! pairings (3.6 million for 10) are
# enumerated. Above it, SciPy's large-sample p-values are used.
EXACT_P_MAX_MODELS = 10
# Correlations closer than this are the same value (a tie) in the permutation count.
_TIE_TOLERANCE = 1e-12


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


def _run_fields(result: Any) -> Mapping[str, Any]:
    """``model``, ``weights``, ``dataset``, ... of a Signature's run or a results object."""
    from affjax.signature_type import Signature

    if isinstance(result, Signature):
        return {} if result.run is None else vars(result.run)
    return result


def _layers(result: Any) -> tuple[np.ndarray, list[str]]:
    """Scores and layer names of a Signature, a results file's path or a results object."""
    from affjax import results
    from affjax.signature_type import Signature

    if isinstance(result, str | os.PathLike):
        result = results.load(result)
    if isinstance(result, Signature):
        return np.asarray(result.scores, np.float64), [str(n) for n in result.names]
    layers = result["layers"]
    return (np.array([layer["score"] for layer in layers], np.float64),
            [str(layer.get("name", i)) for i, layer in enumerate(layers)])


def labels_for(results: Sequence[Any], paths: Sequence[str]) -> list[str]:
    """A label per result: the model name, made unique with the weights/dataset, then the file.

    Args:
      results: :class:`affjax.Signature` objects with their ``run``, or results objects,
        with ``model``, ``weights`` and ``dataset``.
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
    runs = [_run_fields(r) for r in results]
    labels = [str(r["model"]) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{r['model']}/{r['weights']}/{r['dataset']}" for r in runs]
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

    Accepted: a JSON object ``{"resnet18": 69.76, ...}``, or a CSV of rows ``model,value,...``.
    A CSV's first row is a header when its second field is not a number; the accuracy is then
    the column named ``accuracy`` (or ``acc@1``, ``top1``), else the second. Without a header
    every row is data and the accuracy is the second column. Every row is kept: a row without
    a model name or an accuracy, a model listed twice, or an accuracy that is not a number is
    an error naming the line; only blank lines are skipped.

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
      >>> _ = path.write_text("resnet18,69.76\nvgg11,69.02\n")   # no header: every row
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
            table = json.loads(text, object_pairs_hook=lambda pairs: _unique(pairs, path))
            if not isinstance(table, dict):
                raise AccuracyError(f"accuracy file {path}: expected a JSON object model -> "
                                    "accuracy")
            return {str(k): _number(v, path, k) for k, v in table.items()}
        rows = [(line, r) for line, r in enumerate(csv.reader(text.splitlines()), start=1)
                if any(cell.strip() for cell in r)]
        if not rows:
            raise AccuracyError(f"accuracy file {path}: no rows; expected one row per model "
                                "(model,accuracy), optionally after a header row")
        col = 1
        first = rows[0][1]
        if len(first) < 2 or not _is_number_text(first[1]):  # a header row
            head = [h.strip().lower() for h in first]
            col = next((head.index(h) for h in ("accuracy", "acc@1", "top1") if h in head), 1)
            rows = rows[1:]
        table: dict[str, float] = {}
        for line, r in rows:
            model = r[0].strip()
            if len(r) <= col:
                raise AccuracyError(
                    f"accuracy file {path}: line {line} ({','.join(r)!r}) has no column "
                    f"{col + 1}; expected comma-separated rows of a model and its accuracy")
            if not model:
                raise AccuracyError(f"accuracy file {path}: line {line} ({','.join(r)!r}) has "
                                    "no model name")
            if model in table:
                raise AccuracyError(f"accuracy file {path}: model {model!r} is listed twice "
                                    f"(again on line {line})")
            table[model] = _number(r[col], path, model)
        return table
    except (ValueError, IndexError) as e:
        if isinstance(e, AccuracyError):
            raise
        raise AccuracyError(f"accuracy file {path}: {e}") from None


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unique(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys; a repeated model would lose a value.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise AccuracyError(f"accuracy file {path}: model {key!r} is listed twice")
        out[key] = value
    return out


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


@functools.lru_cache(maxsize=1)
def _orderings(n: int) -> np.ndarray:
    """All ``n!`` permutations of ``range(n)``, one per row (int8)."""
    perms = np.array(list(itertools.permutations(range(n))), np.int8).reshape(-1, n)
    perms.flags.writeable = False
    return perms


def _standardised(v: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit norm (NaN for a constant column)."""
    c = v - v.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / np.sqrt((c * c).sum(axis=0))


def _exact_tests(xs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlations of the columns of ``xs`` with ``y``, and their exact p-values.

    The p-value counts the pairings of ``y``'s values with the rows of ``xs`` (all ``n!``)
    whose correlation is at least as extreme: ``min(1, 2 min(P(r' <= r), P(r' >= r)))``, the
    two-sided definition of ``scipy.stats.permutation_test``.
    """
    zx, zy = _standardised(xs), _standardised(y)
    cx, cy = xs - xs.mean(axis=0), y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):  # one rounding: r = 1 stays 1
        observed = np.clip(cy @ cx / np.sqrt((cx * cx).sum(axis=0) * (cy @ cy)), -1.0, 1.0)
    n = len(y)
    # Pairings enumerated as a fixed head of zy's values (all ordered choices) followed by
    # every ordering of the rest (at most 8! = 40320 rows at a time).
    head = max(0, n - 8)
    tails = _orderings(n - head)
    low = np.zeros(xs.shape[1])
    high = np.zeros(xs.shape[1])
    for prefix in itertools.permutations(range(n), head):
        rest = np.setdiff1d(np.arange(n), prefix)
        null = zy[list(prefix)] @ zx[:head] + zy[rest][tails] @ zx[head:]
        low += (null <= observed + _TIE_TOLERANCE).sum(axis=0)
        high += (null >= observed - _TIE_TOLERANCE).sum(axis=0)
    p = np.minimum(1.0, 2 * np.minimum(low, high) / math.factorial(n))
    return observed, np.where(np.isnan(observed), np.nan, p)


def exact_correlation_test(x: Sequence[float], y: Sequence[float], *,
                           method: str = "spearman") -> tuple[float, float]:
    """A correlation and its exact two-sided permutation p-value, for small samples.

    Every pairing of ``y``'s values with ``x``'s (``n!`` of them) is equally likely under the
    null hypothesis of no association; the p-value is the share of pairings whose
    correlation is at least as extreme as the observed one, doubled from the smaller tail
    (as ``scipy.stats.permutation_test`` with ``permutation_type="pairings"``). Exact at any
    n, with no assumption on the distributions; the enumeration limits it to small n (n = 10
    takes a fraction of a second).

    Args:
      x, y: ``n`` paired values, ``3 <= n <= EXACT_P_MAX_MODELS``.
      method: ``"pearson"`` or ``"spearman"`` (Pearson's on average ranks).

    Returns:
      ``(correlation, p_value)``; both NaN when ``x`` or ``y`` is constant.

    Example:
      >>> exact_correlation_test([0.9, 0.8, 0.7], [60.0, 70.0, 75.0])  # 1 of 6 pairings
      (-1.0, 0.3333333333333333)
    """
    from scipy.stats import rankdata

    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape or not 3 <= len(x) <= EXACT_P_MAX_MODELS:
        raise ValueError(f"exact_correlation_test needs two sequences of equal length 3 to "
                         f"{EXACT_P_MAX_MODELS}, got shapes {x.shape} and {y.shape}")
    if method == "spearman":
        x, y = rankdata(x), rankdata(y)
    r, p = _exact_tests(x[:, None], y)
    return float(r[0]), float(p[0])


def correlations(stats: Mapping[str, Mapping[str, float]], accuracy: Mapping[str, float]
                 ) -> dict[str, dict[str, float]]:
    """Pearson and Spearman correlation of each summary statistic with accuracy.

    Args:
      stats: label -> :func:`summary_statistics`.
      accuracy: label -> accuracy; every label of ``stats`` must be present.

    Returns:
      statistic -> ``{"pearson", "pearson_p", "spearman", "spearman_p", "n", "p_method"}``.
      Up to ``EXACT_P_MAX_MODELS`` models the p-values are exact permutation p-values
      (``p_method`` ``"exact"``, see :func:`exact_correlation_test`); above, SciPy's
      (``"asymptotic"``: ``pearsonr``'s under normality, ``spearmanr``'s t approximation).
      A constant statistic gives NaN correlations and p-values.

    Raises:
      AccuracyError: a label without accuracy, or fewer than 3 models.

    Example:
      >>> stats = {name: summary_statistics(s) for name, s in
      ...          {"a": [0.5, 0.7], "b": [0.6, 0.9], "c": [0.8, 1.0]}.items()}
      >>> out = correlations(stats, {"a": 60.0, "b": 70.0, "c": 75.0})
      >>> out["mean"]["spearman"], out["mean"]["spearman_p"], out["mean"]["p_method"]
      (1.0, 0.3333333333333333, 'exact')
    """
    from scipy.stats import pearsonr
    from scipy.stats import rankdata
    from scipy.stats import spearmanr

    missing = [k for k in stats if k not in accuracy]
    if missing:
        raise AccuracyError(f"no accuracy for {missing}; the table has {sorted(accuracy)}")
    labels = list(stats)
    n = len(labels)
    if n < 3:
        raise AccuracyError(f"a correlation needs at least 3 models, got {n}")
    acc = np.array([accuracy[k] for k in labels], np.float64)
    values = np.array([[stats[k][name] for name in STATISTICS] for k in labels], np.float64)
    if n <= EXACT_P_MAX_MODELS:
        pearson, pearson_p = _exact_tests(values, acc)
        spearman, spearman_p = _exact_tests(rankdata(values, axis=0), rankdata(acc))
        method = "exact"
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            tests = [(pearsonr(v, acc), spearmanr(v, acc)) for v in values.T]
        pearson = [p.statistic for p, _ in tests]
        pearson_p = [p.pvalue for p, _ in tests]
        spearman = [s.statistic for _, s in tests]
        spearman_p = [s.pvalue for _, s in tests]
        method = "asymptotic"
    return {name: {"pearson": float(pearson[j]), "pearson_p": float(pearson_p[j]),
                   "spearman": float(spearman[j]), "spearman_p": float(spearman_p[j]),
                   "n": n, "p_method": method}
            for j, name in enumerate(STATISTICS)}


def smallest_p_value(n: int) -> float:
    """The smallest two-sided p-value an exact permutation test can give with ``n`` pairs.

    Example:
      >>> smallest_p_value(3), smallest_p_value(5)
      (0.3333333333333333, 0.016666666666666666)
    """
    return min(1.0, 2 / math.factorial(n))


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


def compare(results: Sequence[Any], labels: Sequence[str], *,
            accuracy: Mapping[str, float] | None = None, nan: str = "raise") -> dict[str, Any]:
    """DTW distance matrix, summary statistics and (optionally) correlations with accuracy.

    Args:
      results: :class:`affjax.Signature` objects (``affjax.results.load``,
        :func:`affjax.run_signature`), paths of results files, or results objects (a
        ``"layers"`` list with a ``"score"`` per layer).
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
      >>> from affjax import Signature
      >>> sigs = [Signature(names=["relu:0", "relu:1"], kinds=["relu"] * 2, dims=[4, 4],
      ...                   scores=np.array(s)) for s in ([0.9, 0.8], [0.5, 0.5])]
      >>> [round(d, 6) for d in compare(sigs, ["a", "b"])["dtw"][0]]
      [0.0, 0.7]
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
        scores, names = _layers(r)
        bad = ~np.isfinite(scores)  # NaN (kept in results files), or a hand-edited infinity
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
