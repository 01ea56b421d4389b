"""Signature results on disk: the JSON schema, atomic writes, CSV export, validation.

A results file is the serialized form of a :class:`affjax.Signature` with its
:class:`~affjax.signature_type.RunInfo`: :func:`load` reads one (validating it), :func:`to_json`
and :func:`to_csv` write one. It is one JSON object (``FORMAT`` = ``"affjax-signature/1"``)::

    {
      "format": "affjax-signature/1",
      "model": "resnet18", "weights": "random", "dataset": "random", "split": null,
      "batch_size": 128, "batches": "1", "covariance": "empirical", "metrics": false,
      "seed": 987, "num_examples": 10000,
      "batch_indices": [0],            # batches done so far, in order
      "complete": true,                # every selected batch done
      "versions": {"affjax": ..., "jax": ..., "jaxlib": ..., "flax": ..., "numpy": ...,
                   "python": ..., "tensorflow_datasets": ...},
      "device": "cpu",
      "timing": {"started": ISO-8601, "updated": ISO-8601, "seconds": total compute,
                 "batch_seconds": [...],         # compute: forward + score + metrics
                 "stages": {"load": [...], "transform": [...], "forward": [...],
                            "score": [...], "metrics": [...], "write": [...]}},
      "layers": [
        {"name": "layer1/0/relu:0", "kind": "relu", "dim": 64,
         "score": mean over batches, "std": std over batches (population, ddof 0),
         "scores": [one per batch],
         "metrics": {"cka": {"mean": .., "std": .., "values": [..]}, ...}   # with --metrics
        }, ...
      ]
    }

``timing`` is optional in every part: ``batch_seconds`` and ``stages`` hold one entry per
batch, in the order of ``batch_indices``. ``stages`` (``STAGES``, seconds) is the time per
batch of reading the images, the evaluation transform, the forward pass with the capture,
the scoring, the companion metrics and saving the results files; an entry is ``null`` where
it was not measured (batches from before this field existed; the ``write`` of a run's last
batch when the run was interrupted before saving again). A file merged from the parts of
several processes (:mod:`affjax.distributed`) adds ``"processes": N``; its ``device``
counts the devices of all of them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from affjax.signature_type import RunInfo
from affjax.signature_type import Signature

FORMAT = "affjax-signature/1"
RUN_KEYS: tuple[str, ...] = ("model", "weights", "dataset", "split", "batch_size", "batches",
                             "covariance", "metrics", "seed")
REQUIRED_KEYS: tuple[str, ...] = ("format", *RUN_KEYS, "batch_indices", "complete", "versions",
                                  "timing", "layers")
LAYER_KEYS: tuple[str, ...] = ("name", "kind", "dim", "score", "std", "scores")
# Stages of one batch in timing.stages, in the order they run.
STAGES: tuple[str, ...] = ("load", "transform", "forward", "score", "metrics", "write")


class ResultsError(ValueError):
    """A results file is unreadable, malformed, or belongs to another run.

    A ``ValueError``; the message names the file (or ``source``) and the field.
    """


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    r"""Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The text goes to a temporary file in the same folder (same file system), is flushed to
    disk, then renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows). A new
    file gets the mode of any file the process creates (``0o666`` less the umask, as
    ``open`` gives); a file that exists keeps its mode.

    Args:
      path: the file to write; its folder must exist.
      text: written as UTF-8, newlines unchanged.

    Example:
      >>> import tempfile
      >>> path = Path(tempfile.mkdtemp()) / "out.json"
      >>> atomic_write_text(path, "{}\n")
      >>> path.read_text(), [p.name for p in path.parent.iterdir()]   # no temporary left
      ('{}\n', ['out.json'])
    """
    path = Path(path)
    try:
        keep_mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        keep_mode = None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # os.open applies the umask to 0o666, like open(); tempfile.mkstemp would give 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            if keep_mode is not None:
                os.chmod(tmp, keep_mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation of per-batch values (float64).

    Args:
      values: one value per batch, at least one.

    Returns:
      ``(mean, std)`` as Python floats; ``std`` uses ``ddof=0`` (0 for one batch).

    Example:
      >>> summarise([0.5, 0.7])
      (0.6, 0.09999999999999998)
    """
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std())


def validate(result: Any, *, source: str = "results") -> dict:
    """Check a results object against the schema above; return it.

    Args:
      result: the parsed JSON object.
      source: the name used in error messages (the file path).

    Returns:
      A shallow copy of ``result`` as a ``dict``.

    Raises:
      ResultsError: naming the first missing or ill-typed field.

    Example:
      >>> result = {"format": FORMAT, **dict.fromkeys(RUN_KEYS), "batch_indices": [0, 1],
      ...           "complete": True, "versions": {}, "timing": {},
      ...           "layers": [{"name": "relu:0", "kind": "relu", "dim": 4, "score": 0.9,
      ...                       "std": 0.01, "scores": [0.89, 0.91]}]}
      >>> validate(result)["layers"][0]["score"]
      0.9
      >>> validate({**result, "layers": [{"name": "relu:0"}]}, source="run.json")
      Traceback (most recent call last):
      ...
      affjax.results.ResultsError: run.json: layer 0 lacks ['kind', 'dim', 'score', 'std', 'scores']
    """
    if not isinstance(result, Mapping):
        raise ResultsError(f"{source}: expected a JSON object, got {type(result).__name__}")
    if result.get("format") != FORMAT:
        raise ResultsError(f"{source}: not an affjax signature file (format "
                           f"{result.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ResultsError(f"{source}: missing fields {missing}")
    indices = result["batch_indices"]
    if not isinstance(indices, list) or not all(_is_int(i) and i >= 0 for i in indices):
        raise ResultsError(f"{source}: 'batch_indices' must be a list of batch numbers, got "
                           f"{indices!r}")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ResultsError(f"{source}: 'batch_indices' lists batch {repeated[0]} more than once "
                           "(its scores would count twice in the means)")
    if not isinstance(result["complete"], bool):
        raise ResultsError(f"{source}: 'complete' must be true or false, got "
                           f"{result['complete']!r}")
    timing = result["timing"]
    if not isinstance(timing, Mapping):
        raise ResultsError(f"{source}: 'timing' must be an object")
    if "seconds" in timing and not _is_number(timing["seconds"]):
        raise ResultsError(f"{source}: 'timing'.'seconds' must be a number")
    if "batch_seconds" in timing:  # optional (hand-made files)
        seconds = timing["batch_seconds"]
        if not isinstance(seconds, list) or len(seconds) != len(indices) or not all(
                _is_number(t) for t in seconds):
            raise ResultsError(f"{source}: 'timing'.'batch_seconds' must hold one number per "
                               "batch")
    if "stages" in timing:  # optional (files written before it existed)
        stages = timing["stages"]
        if not isinstance(stages, Mapping) or not all(
                isinstance(v, list) and len(v) == len(indices)
                and all(t is None or _is_number(t) for t in v) for v in stages.values()):
            raise ResultsError(f"{source}: 'timing'.'stages' must map each stage to one number "
                               "(or null) per batch")
    layers = result["layers"]
    if not isinstance(layers, list):
        raise ResultsError(f"{source}: 'layers' must be a list")
    nb = len(indices)
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise ResultsError(f"{source}: layer {i} must be an object, got {layer!r}")
        lack = [k for k in LAYER_KEYS if k not in layer]
        if lack:
            raise ResultsError(f"{source}: layer {i} lacks {lack}")
        if not (isinstance(layer["name"], str) and isinstance(layer["kind"], str)
                and _is_int(layer["dim"])):
            raise ResultsError(f"{source}: layer {i} has an ill-typed name, kind or dim")
        if not isinstance(layer["scores"], list) or len(layer["scores"]) != nb:
            raise ResultsError(f"{source}: layer {i} ({layer['name']}) needs one per-batch "
                               f"score for each of its {nb} batches")
        if not all(_is_number(v) for v in (layer["score"], layer["std"], *layer["scores"])):
            raise ResultsError(f"{source}: layer {i} ({layer['name']}) has a score that is "
                               "not a number")
        _check_metrics(layer, i, nb, result["metrics"] is True,
                       layers[0].get("metrics") if isinstance(layers[0], Mapping) else None,
                       source)
    return dict(result)


def _check_metrics(layer: Mapping, i: int, nb: int, wanted: bool, first: Any,
                   source: str) -> None:
    """The companion metrics of layer ``i``: ``{name: {"mean", "std", "values"}}``."""
    where = f"{source}: layer {i} ({layer['name']})"
    if "metrics" not in layer:
        if wanted:
            raise ResultsError(f"{where} lacks 'metrics', which the run computed "
                               "(\"metrics\": true)")
        return
    metrics = layer["metrics"]
    if not isinstance(metrics, Mapping) or not metrics:
        raise ResultsError(f"{where}: 'metrics' must be an object of metrics")
    if isinstance(first, Mapping) and list(metrics) != list(first):
        raise ResultsError(f"{where} has metrics {list(metrics)}, layer 0 {list(first)}")
    for name, entry in metrics.items():
        ok = (isinstance(entry, Mapping) and _is_number(entry.get("mean"))
              and _is_number(entry.get("std")) and isinstance(entry.get("values"), list)
              and len(entry["values"]) == nb and all(_is_number(v) for v in entry["values"]))
        if not ok:
            raise ResultsError(f"{where}: metric {name!r} needs a number 'mean' and 'std' and "
                               f"one number per batch in 'values' ({nb})")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # NaN is a number here: a NaN score is a result worth keeping (see to_json).
    return isinstance(v, int | float) and not isinstance(v, bool)


_TOP_KEYS: tuple[str, ...] = ("format", *RUN_KEYS, "num_examples", "batch_indices", "complete",
                               "versions", "device", "timing", "layers")
_OPTIONAL_KEYS = ("num_examples", "device")  # left out of a file when unknown


def from_dict(result: Any, *, source: str = "results") -> Signature:
    """The :class:`Signature` of a results object (the parsed JSON), validated first.

    Args:
      result: the parsed JSON object.
      source: the name used in error messages (the file path).

    Returns:
      A :class:`Signature` whose ``run`` holds the run's fields; ``std`` is ``None`` for
      one batch (a spread over one batch is not a measurement; the file keeps its 0).

    Raises:
      ResultsError: as :func:`validate`.

    Example:
      >>> result = {"format": FORMAT, **dict.fromkeys(RUN_KEYS), "batch_indices": [0, 1],
      ...           "complete": True, "versions": {}, "timing": {},
      ...           "layers": [{"name": "relu:0", "kind": "relu", "dim": 4, "score": 0.9,
      ...                       "std": 0.01, "scores": [0.89, 0.91]}]}
      >>> sig = from_dict(result)
      >>> sig.names, sig.batch_scores.tolist(), sig.run.batch_indices
      (['relu:0'], [[0.89], [0.91]], (0, 1))
      >>> to_dict(sig) == result
      True
    """
    obj = validate(result, source=source)
    layers, nb = obj["layers"], len(obj["batch_indices"])
    table = np.array([layer["scores"] for layer in layers], np.float64).reshape(len(layers), nb)
    metrics = None
    if layers and "metrics" in layers[0]:
        metrics = {m: np.array([layer["metrics"][m]["values"] for layer in layers],
                               np.float64).reshape(len(layers), nb).T.copy()
                   for m in layers[0]["metrics"]}
    known = {f.name for f in dataclasses.fields(RunInfo)}
    run = RunInfo(**{k: obj[k] for k in known if k in obj and k != "batch_indices"},
                  batch_indices=tuple(obj["batch_indices"]),
                  extra={k: v for k, v in obj.items() if k not in _TOP_KEYS})
    return Signature(names=[la["name"] for la in layers], kinds=[la["kind"] for la in layers],
                     dims=[la["dim"] for la in layers],
                     scores=np.array([la["score"] for la in layers], np.float64),
                     std=np.array([la["std"] for la in layers], np.float64) if nb > 1 else None,
                     batch_scores=table.T.copy(), metrics=metrics, run=run)


def to_dict(sig: Signature) -> dict:
    """The results object (the JSON layout above) of a :class:`Signature`.

    Fields the signature lacks are written as ``null`` (or empty; ``num_examples`` and
    ``device`` are left out); the per-batch scores
    are ``sig.batch_scores`` (one batch: ``sig.scores``), metric means and stds are those
    of their per-batch values.

    Example:
      >>> import numpy as np
      >>> sig = Signature(names=["relu:0"], kinds=["relu"], scores=np.array([0.9]), dims=[4])
      >>> obj = to_dict(sig)
      >>> obj["format"], obj["batch_indices"], obj["layers"][0]["scores"], obj["layers"][0]["std"]
      ('affjax-signature/1', [0], [0.9], 0.0)
    """
    table = (np.asarray(sig.batch_scores, np.float64) if sig.batch_scores is not None
             else np.asarray(sig.scores, np.float64)[None, :])
    run = sig.run or RunInfo(batch_indices=tuple(range(len(table))))
    std = None if sig.std is None else np.asarray(sig.std, np.float64)
    layers = []
    for i, name in enumerate(sig.names):
        layer = {"name": name, "kind": sig.kinds[i], "dim": int(sig.dims[i]),
                 "score": float(sig.scores[i]), "std": 0.0 if std is None else float(std[i]),
                 "scores": table[:, i].tolist()}
        if sig.metrics is not None:
            layer["metrics"] = {}
            for m, values in sig.metrics.items():
                column = np.asarray(values, np.float64)[:, i].tolist()
                mean, spread = summarise(column)
                layer["metrics"][m] = {"values": column, "mean": mean, "std": spread}
        layers.append(layer)
    out = {"format": FORMAT}
    for key in _TOP_KEYS[1:-1]:
        value = getattr(run, key)
        if value is not None or key not in _OPTIONAL_KEYS:
            out[key] = list(value) if key == "batch_indices" else value
    out["versions"], out["timing"] = dict(run.versions), dict(run.timing)
    return {**out, **run.extra, "layers": layers}


def load(path: str | os.PathLike) -> Signature:
    """Read and validate a results JSON file.

    Args:
      path: the ``.json`` file.

    Returns:
      Its :class:`Signature` (see :func:`from_dict`).

    Raises:
      ResultsError: unreadable file, invalid JSON, or a schema error.

    Example:
      >>> import tempfile
      >>> result = {"format": FORMAT, **dict.fromkeys(RUN_KEYS), "batch_indices": [0, 1],
      ...           "complete": True, "versions": {}, "timing": {},
      ...           "layers": [{"name": "relu:0", "kind": "relu", "dim": 4, "score": 0.9,
      ...                       "std": 0.01, "scores": [0.89, 0.91]}]}
      >>> path = Path(tempfile.mkdtemp()) / "run.json"
      >>> atomic_write_text(path, to_json(result))
      >>> sig = load(path)
      >>> sig.scores.tolist(), sig.std.tolist(), to_dict(sig) == result
      ([0.9], [0.01], True)
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ResultsError(f"cannot read results file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a results file (not UTF-8 text)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"results file {path} is not valid JSON ({e})") from None
    return from_dict(obj, source=str(path))


def to_json(result: Signature | Mapping[str, Any]) -> str:
    """The JSON text of a results file, as written to disk.

    One-space indentation and a final newline. Non-finite scores are written as
    ``NaN``/``Infinity`` (Python's JSON extension, which :func:`load` reads back)
    rather than failing: a NaN score is a result worth keeping.

    Args:
      result: a :class:`Signature` (see :func:`to_dict`), or a results object.

    Returns:
      The text.

    Example:
      >>> print(to_json({"format": FORMAT, "score": float("nan")}), end="")
      {
       "format": "affjax-signature/1",
       "score": NaN
      }
    """
    obj = to_dict(result) if isinstance(result, Signature) else result
    return json.dumps(obj, indent=1, allow_nan=True) + "\n"


def to_csv(result: Signature | Mapping[str, Any]) -> str:
    """One row per layer: index, name, kind, dim, score, std, metric means, per-batch scores.

    Args:
      result: a :class:`Signature`, or a results object (validated here).

    Returns:
      CSV text with a header row; floats are written with ``repr`` (no rounding),
      per-batch columns are named ``batch_<index>``. With one batch there is no ``std``
      column (a spread over one batch is not a measurement; the JSON keeps its 0).

    Example:
      >>> result = {"format": FORMAT, **dict.fromkeys(RUN_KEYS), "batch_indices": [0, 1],
      ...           "complete": True, "versions": {}, "timing": {},
      ...           "layers": [{"name": "relu:0", "kind": "relu", "dim": 4, "score": 0.9,
      ...                       "std": 0.01, "scores": [0.89, 0.91]}]}
      >>> print(to_csv(result), end="")
      index,name,kind,dim,score,std,batch_0,batch_1
      0,relu:0,relu,4,0.9,0.01,0.89,0.91
      >>> one = {**result, "batch_indices": [0], "layers": [
      ...     {"name": "relu:0", "kind": "relu", "dim": 4, "score": 0.9, "std": 0.0,
      ...      "scores": [0.9]}]}
      >>> print(to_csv(one), end="")
      index,name,kind,dim,score,batch_0
      0,relu:0,relu,4,0.9,0.9
    """
    obj = to_dict(result if isinstance(result, Signature) else from_dict(result))
    layers = obj["layers"]
    metric_names = list(layers[0].get("metrics", {})) if layers else []
    batch_cols = [f"batch_{b}" for b in obj["batch_indices"]]
    spread = len(batch_cols) > 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "name", "kind", "dim", "score", *(["std"] if spread else []),
                *metric_names, *batch_cols])
    for i, layer in enumerate(layers):
        means = [repr(layer["metrics"][m]["mean"]) for m in metric_names]
        w.writerow([i, layer["name"], layer["kind"], layer["dim"], repr(layer["score"]),
                    *([repr(layer["std"])] if spread else []), *means,
                    *(repr(s) for s in layer["scores"])])
    return buf.getvalue()


def save(result: Signature, path: str | os.PathLike) -> None:
    """Write ``result`` to its results file and the CSV beside it, atomically.

    The folder is made if it is missing. Each file is replaced whole
    (``affjax.atomic_write_text``): a reader sees the old file or the new one.

    Raises:
      OSError: the files cannot be written; they hold what they held before.

    Example:
      >>> import tempfile, numpy as np
      >>> sig = Signature(names=["relu:0"], kinds=["relu"], scores=np.array([0.9]), dims=[4])
      >>> path = Path(tempfile.mkdtemp()) / "new" / "run.json"
      >>> save(sig, path)
      >>> sorted(p.name for p in path.parent.iterdir())
      ['run.csv', 'run.json']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # first save: the folder is new
    atomic_write_text(path, to_json(result))
    atomic_write_text(path.with_suffix(".csv"), to_csv(result))
