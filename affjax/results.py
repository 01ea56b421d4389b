"""Signature results on disk: the JSON schema, atomic writes, CSV export, validation.

A results file is one JSON object (``FORMAT`` = ``"affjax-signature/1"``)::

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
                 "batch_seconds": [...]},
      "layers": [
        {"name": "layer1/0/relu:0", "kind": "relu", "dim": 64,
         "score": mean over batches, "std": std over batches (population, ddof 0),
         "scores": [one per batch],
         "metrics": {"cka": {"mean": .., "std": .., "values": [..]}, ...}   # with --metrics
        }, ...
      ]
    }
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "affjax-signature/1"
RUN_KEYS: tuple[str, ...] = ("model", "weights", "dataset", "split", "batch_size", "batches",
                             "covariance", "metrics", "seed")
REQUIRED_KEYS: tuple[str, ...] = ("format", *RUN_KEYS, "batch_indices", "complete", "versions",
                                  "timing", "layers")
LAYER_KEYS: tuple[str, ...] = ("name", "kind", "dim", "score", "std", "scores")


class ResultsError(ValueError):
    """A results file is unreadable, malformed, or belongs to another run."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The text goes to a temporary file in the same folder (same file system), is flushed to
    disk, then renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation of per-batch values (float64)."""
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std())


def validate(result: Any, *, source: str = "results") -> dict:
    """Check a results object against the schema above; return it.

    Raises:
      ResultsError: naming the first missing or ill-typed field.
    """
    if not isinstance(result, Mapping):
        raise ResultsError(f"{source}: expected a JSON object, got {type(result).__name__}")
    if result.get("format") != FORMAT:
        raise ResultsError(f"{source}: not an affjax signature file (format "
                           f"{result.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ResultsError(f"{source}: missing fields {missing}")
    layers = result["layers"]
    if not isinstance(layers, list):
        raise ResultsError(f"{source}: 'layers' must be a list")
    nb = len(result["batch_indices"])
    for i, layer in enumerate(layers):
        lack = [k for k in LAYER_KEYS if k not in layer]
        if lack:
            raise ResultsError(f"{source}: layer {i} lacks {lack}")
        if not isinstance(layer["scores"], list) or len(layer["scores"]) != nb:
            raise ResultsError(f"{source}: layer {i} ({layer['name']}) has "
                               f"{len(layer['scores'])} per-batch scores for {nb} batches")
        if not isinstance(layer["dim"], int) or not isinstance(layer["name"], str):
            raise ResultsError(f"{source}: layer {i} has an ill-typed name or dim")
    return dict(result)


def load(path: str | os.PathLike) -> dict:
    """Read and validate a results JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ResultsError(f"cannot read results file {path}: {e.strerror or e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"results file {path} is not valid JSON ({e})") from None
    return validate(obj, source=str(path))


def to_json(result: Mapping[str, Any]) -> str:
    return json.dumps(result, indent=1, allow_nan=True) + "\n"


def to_csv(result: Mapping[str, Any]) -> str:
    """One row per layer: index, name, kind, dim, score, std, metric means, per-batch scores."""
    layers = result["layers"]
    metric_names = list(layers[0].get("metrics", {})) if layers else []
    batch_cols = [f"batch_{b}" for b in result["batch_indices"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "name", "kind", "dim", "score", "std", *metric_names, *batch_cols])
    for i, layer in enumerate(layers):
        means = [repr(layer["metrics"][m]["mean"]) for m in metric_names]
        w.writerow([i, layer["name"], layer["kind"], layer["dim"], repr(layer["score"]),
                    repr(layer["std"]), *means, *(repr(s) for s in layer["scores"])])
    return buf.getvalue()
