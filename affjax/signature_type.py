"""The result of a signature: :class:`Signature`, with the record of its run (:class:`RunInfo`).

One type for every way a signature is made: :func:`affjax.signature` (one batch, names and
scores), :func:`affjax.signature_over_batches` (adds the per-batch scores and their std), and
:func:`affjax.run_signature` (adds the companion metrics and the run's record). A results
file (``affjax.results``) is its serialized form.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """How a signature was computed: the run's options and its record, as in a results file.

    Every field is optional (``None``, empty): a signature computed in memory has none.

    Attributes:
      model, weights, dataset, split: names as given to the run (a weights file and an
        image folder by their path).
      batch_size: images per batch.
      batches: the batch selection, as text (``"1"``, ``"all"``, ``"@3"``, ``"2:5"``).
      covariance: the covariance estimator.
      metrics: whether the companion metrics were computed.
      seed: seed of the random weights and of the ``random`` dataset.
      num_examples: examples in the dataset (``None``: unknown).
      batch_indices: the batches done, ascending; row ``i`` of ``Signature.batch_scores``
        is batch ``batch_indices[i]``.
      complete: every selected batch is done.
      versions: package -> version of the run.
      device: the device the run used.
      timing: ``started``, ``updated``, ``seconds``, ``batch_seconds``, ``stages``
        (see ``affjax.results``).
      extra: any other fields of the results file, kept as read.
    """

    model: str | None = None
    weights: str | None = None
    dataset: str | None = None
    split: str | None = None
    batch_size: int | None = None
    batches: str | None = None
    covariance: str | None = None
    metrics: bool | None = None
    seed: int | None = None
    num_examples: int | None = None
    batch_indices: tuple[int, ...] = ()
    complete: bool = False
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    device: str | None = None
    timing: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


@dataclasses.dataclass
class Signature:
    """A model's non-linearity signature with its layer names.

    Attributes:
      names: module path and call index per activation call, forward order.
      kinds: activation name per call (``relu``, ``gelu``, ...).
      scores: ``(L,)`` NumPy array (mean over batches for
        :func:`signature_over_batches`).
      dims: reduced feature count per call.
      std: ``(L,)`` standard deviation over batches, or ``None``.
      batch_scores: ``(B, L)`` per-batch scores, or ``None``.
      metrics: companion metric name -> ``(B, L)`` per-batch values, or ``None``.
      run: the record of the run that computed it (:class:`RunInfo`), or ``None``.

    ``str(sig)`` is a table, one row per call; the JSON form stores float64.

    Example:
      >>> import numpy as np
      >>> sig = Signature(names=["Activation_0:0", "Activation_1:1"], kinds=["relu", "gelu"],
      ...                 scores=np.array([0.81, 0.93]), dims=[16, 16])
      >>> print(sig)
        #  layer           kind    dim    score
      -----------------------------------------
        0  Activation_0:0  relu     16   0.8100
        1  Activation_1:1  gelu     16   0.9300
      >>> Signature.from_json(sig.to_json()).scores.tolist()
      [0.81, 0.93]
    """

    names: list[str]
    kinds: list[str]
    scores: np.ndarray
    dims: list[int]
    std: np.ndarray | None = None
    batch_scores: np.ndarray | None = None
    metrics: dict[str, np.ndarray] | None = None
    run: RunInfo | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        # Field by field, arrays elementwise (NaN equal to NaN: a NaN score is a result).
        if not isinstance(other, Signature):
            return NotImplemented
        mine, theirs = self.metrics or {}, other.metrics or {}
        return (list(self.names) == list(other.names) and list(self.kinds) == list(other.kinds)
                and [int(d) for d in self.dims] == [int(d) for d in other.dims]
                and all(_same(getattr(self, f), getattr(other, f))
                        for f in ("scores", "std", "batch_scores"))
                and (self.metrics is None) == (other.metrics is None)
                and list(mine) == list(theirs)
                and all(_same(mine[m], theirs[m]) for m in mine)
                and self.run == other.run)

    __hash__ = None  # mutable, compared by value

    def metric_means(self) -> dict[str, np.ndarray]:
        """Companion metric name -> ``(L,)`` mean over batches (empty without metrics).

        Example:
          >>> import numpy as np
          >>> sig = Signature(names=["relu:0"], kinds=["relu"], scores=np.array([0.9]),
          ...                 dims=[4], metrics={"cka": np.array([[0.5], [0.7]])})
          >>> sig.metric_means()["cka"].tolist()
          [0.6]
        """
        return {m: np.asarray(v, np.float64).mean(axis=0) for m, v in (self.metrics or {}).items()}

    def __str__(self) -> str:
        width = max([len("layer")] + [len(n) for n in self.names])
        kw = max([len("kind")] + [len(k) for k in self.kinds])
        head = f"{'#':>3}  {'layer':<{width}}  {'kind':<{kw}}  {'dim':>5}  {'score':>7}"
        if self.std is not None:
            head += f"  {'std':>7}"
        lines = [head, "-" * len(head)]
        for i, (n, k, d, s) in enumerate(zip(self.names, self.kinds, self.dims, self.scores,
                                            strict=True)):
            line = f"{i:>3}  {n:<{width}}  {k:<{kw}}  {d:>5}  {s:>7.4f}"
            if self.std is not None:
                line += f"  {self.std[i]:>7.4f}"
            lines.append(line)
        return "\n".join(lines)

    def to_json(self) -> str:
        """JSON text; :meth:`from_json` reads it back."""
        def arr(a):
            return None if a is None else np.asarray(a, np.float64).tolist()

        return json.dumps({"names": self.names, "kinds": self.kinds, "dims": self.dims,
                           "scores": arr(self.scores), "std": arr(self.std),
                           "batch_scores": arr(self.batch_scores)})

    @classmethod
    def from_json(cls, text: str) -> Signature:
        """The :class:`Signature` that :meth:`to_json` wrote."""
        d = json.loads(text)
        def arr(a):
            return None if a is None else np.asarray(a, np.float64)

        return cls(names=list(d["names"]), kinds=list(d["kinds"]), scores=arr(d["scores"]),
                   dims=[int(v) for v in d["dims"]], std=arr(d.get("std")),
                   batch_scores=arr(d.get("batch_scores")))
