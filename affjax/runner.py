"""The signature of a model over the batches of a dataset, saved as it goes and resumable.

:func:`run_signature` is what ``affjax signature`` runs, callable from a notebook: the batch
loop, resume, merging batches, saving after every batch, stage timing, progress callbacks.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from affjax import data
from affjax import distributed
from affjax import results
from affjax._batch import DEFAULT_FORWARD_CHUNK
from affjax._batch import StageClock as _StageClock
from affjax._batch import batch_signature as _batch_signature
from affjax.options import ScoreOptions
from affjax.signature_type import RunInfo
from affjax.signature_type import Signature

# Options a results file is tied to; ``batches`` may grow to include more batches.
FIXED_KEYS = ("model", "weights", "dataset", "split", "batch_size", "covariance", "metrics",
              "seed")


class RunError(ValueError):
    """A results file this run cannot resume or write (a ``ValueError`` naming the file)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_signature`; the batches saved so far stay in the file.

    Attributes:
      saved: batches in the results file; path: the results file, or ``None``.

    Example:
      >>> e = RunInterrupted(2, Path("run.json"))
      >>> isinstance(e, KeyboardInterrupt), e.saved, e.path.name
      (True, 2, 'run.json')
    """

    def __init__(self, saved: int, path: Path | None):
        super().__init__(saved, path)
        self.saved, self.path = saved, path


def _versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib

    import affjax

    tfds = sys.modules.get("tensorflow_datasets")
    return {"affjax": affjax.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__,
            "python": platform.python_version(),
            **({} if tfds is None else {"tensorflow_datasets": tfds.__version__})}


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{len(jax.devices())}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")



def _new_result(info: dict[str, Any], num_examples: int | None) -> Signature:
    """A run with no batch yet (saved with its first batch)."""
    run = RunInfo(**info, num_examples=num_examples, versions=_versions(), device=_device(),
                  timing={"started": _now(), "updated": _now(), "seconds": 0.0,
                          "batch_seconds": []})
    return Signature(names=[], kinds=[], scores=np.zeros(0), dims=[], std=None,
                     batch_scores=np.zeros((0, 0)), run=run)


def _merge_batch(result: Signature, index: int, rows: list[dict], seconds: float,
                 stages: dict[str, float | None] | None = None) -> Signature:
    """The result with one batch's per-layer values added and its summaries refreshed.

    Rows stay in batch order, so a run extended to more batches equals one that selected
    them from the start. ``seconds``: compute time (forward, score, metrics).
    """
    run = result.run
    before = len(run.batch_indices)
    names = [r["name"] for r in rows]
    if len(result) and list(result.names) != names:
        raise RuntimeError(f"batch {index} gives different activation calls than the saved ones")
    at = bisect.bisect(run.batch_indices, index)
    table = np.asarray(result.batch_scores, np.float64).reshape(before, len(rows))
    table = np.insert(table, at, [r["score"] for r in rows], axis=0)
    metrics = None
    if "metrics" in rows[0]:
        metrics = {m: np.insert(np.asarray((result.metrics or {}).get(m, np.zeros((0, len(rows)))),
                                           np.float64).reshape(before, len(rows)),
                                at, [r["metrics"][m] for r in rows], axis=0)
                   for m in rows[0]["metrics"]}
    summaries = [results.summarise(table[:, i].tolist()) for i in range(len(rows))]
    timing = {**run.timing}
    batch_seconds = list(timing.get("batch_seconds", [0.0] * before))  # hand-made: none
    batch_seconds.insert(at, seconds)
    # Batches computed without a breakdown (older files) have null stages.
    breakdown = {s: list(v) for s, v in timing.get("stages", {}).items()}
    for stage in results.STAGES:
        breakdown.setdefault(stage, [None] * before).insert(at, (stages or {}).get(stage))
    timing.update(batch_seconds=batch_seconds, stages=breakdown,
                  seconds=float(sum(batch_seconds)), updated=_now())
    indices = list(run.batch_indices)
    indices.insert(at, index)
    return dataclasses.replace(
        result, names=names, kinds=[r["kind"] for r in rows], dims=[r["dim"] for r in rows],
        scores=np.array([m for m, _ in summaries]),
        std=np.array([s for _, s in summaries]) if len(indices) > 1 else None,
        batch_scores=table, metrics=metrics,
        run=dataclasses.replace(run, batch_indices=tuple(indices), timing=timing))


def _with_write_time(result: Signature, index: int, seconds: float) -> Signature:
    """The result with the ``write`` stage of batch ``index`` set (saved with the next save)."""
    timing = {**result.run.timing}
    stages = {**timing["stages"], "write": list(timing["stages"]["write"])}
    stages["write"][result.run.batch_indices.index(index)] = seconds
    timing["stages"] = stages
    return dataclasses.replace(result, run=dataclasses.replace(result.run, timing=timing))



def _listing(indices: list[int], most: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


def open_results(path: str | os.PathLike, info: dict[str, Any],
                 selection: data.BatchSelection, *, overwrite: bool = False
                 ) -> Signature | None:
    """The saved results of this run in ``path``, or ``None`` for a new run.

    A saved file continues when its run options (``FIXED_KEYS``) equal ``info``'s and
    ``selection`` selects every batch it holds (the same selection, or a larger one: the
    new batches are added). ``info`` holds ``FIXED_KEYS`` and ``batches``; ``overwrite``
    ignores the file. The messages name the command's options (``--overwrite`` is
    ``overwrite=True``, ``--out`` another ``path``).

    Raises:
      RunError: the file is a folder, not a results file, or another run's.

    Example:
      >>> import tempfile
      >>> path = Path(tempfile.mkdtemp()) / "run.json"
      >>> info = dict.fromkeys(FIXED_KEYS) | {"batches": "2"}
      >>> open_results(path, info, data.parse_batches("2")) is None   # nothing saved yet
      True
    """
    path = Path(path)
    if overwrite or not path.exists():
        return None
    if path.is_dir():
        raise RunError(f"{path} is a folder, not a results file: choose another --out.")
    try:
        saved = results.load(path)
    except results.ResultsError as e:
        raise RunError(f"{e}. Choose another --out, or pass --overwrite to replace it.") from None
    diff = [f"{k} {getattr(saved.run, k)!r} (this run: {info[k]!r})" for k in FIXED_KEYS
            if getattr(saved.run, k) != info[k]]
    if diff:
        raise RunError(f"results file {path} belongs to another run: it has "
                       f"{'; '.join(diff)}. Resume with the same options, choose another --out, "
                       "or pass --overwrite to start again.")
    outside = [i for i in saved.run.batch_indices
               if i < selection.start or (selection.stop is not None and i >= selection.stop)]
    if outside:
        raise RunError(f"results file {path} holds batch(es) {_listing(outside)}, which "
                       f"--batches {info['batches']} does not select (it was run with --batches "
                       f"{saved.run.batches}). Resume with a selection that includes them (its "
                       "new batches are added), choose another --out, or pass --overwrite to "
                       "start again.")
    return saved


def plan(saved: Signature | None, dataset: data.Dataset, batch_size: int,
         selection: data.BatchSelection, path: str | os.PathLike | None = None
         ) -> tuple[list[int] | None, bool]:
    """The batches a run selects, and whether ``saved`` already holds them all.

    Checks, before any file is written, that the dataset still has the examples ``saved``
    was computed on and that the selection fits it. Returns ``(todo, finished)``: the
    selected batch indices (``None``: unknown until read) and whether ``saved`` is complete
    with every one of them (or with this selection).

    Raises:
      RunError: the dataset changed since ``saved``.
      affjax.data.DataError: the selection does not fit the dataset.

    Example:
      >>> ds = data.load_dataset("random", lambda im: im, random_size=40)
      >>> plan(None, ds, 8, data.parse_batches("all"))
      ([0, 1, 2, 3, 4], False)
    """
    # A finished file too: with examples added, "complete" would leave new batches out.
    if saved is not None and saved.run.num_examples != dataset.num_examples():
        raise RunError(f"results file {path} was computed on {saved.run.num_examples} examples "
                       f"of {saved.run.dataset}, which now has {dataset.num_examples()}: its "
                       "batches would not be the same images. Choose another --out, or pass "
                       "--overwrite to start again.")
    dataset.check_selection(batch_size, selection)
    todo = selection.indices(dataset.num_batches(batch_size))
    todo = None if todo is None else list(todo)
    finished = saved is not None and saved.run.complete and (
        saved.run.batches == str(selection)
        or (todo is not None and set(todo) <= set(saved.run.batch_indices)))
    return todo, finished



def _interrupted_in_callback(e: BaseException) -> bool:
    """Whether ``e`` is JAX's report of a KeyboardInterrupt raised inside a host callback."""
    # JAX re-raises it as JaxRuntimeError(INTERNAL), no cause: only the text names it.
    return "callback" in str(e).lower() and "KeyboardInterrupt" in str(e)


def _save_or_fail(result: Signature, path: Path | None) -> None:
    if path is None:
        return
    try:
        results.save(result, path)
    except OSError as e:  # the atomic write leaves the file as it was before this write
        raise RunError(f"cannot write results file {path} ({e.strerror or e}); it still "
                       "holds what was saved before.") from None


def _loop(result: Signature, model: Any, variables: Any, dataset: data.Dataset,
          selection: data.BatchSelection, todo: list[int] | None, path: Path | None,
          options: dict[str, Any], stop_after: int | None,
          progress: Callable[[int, int | None], None] | None, others: list[int]) -> Signature:
    """The batch loop of :func:`run_signature`: compute, merge and save each batch.

    ``others``: batches that other processes score (skipped here).
    """
    done = list(result.run.batch_indices)
    total = None if todo is None else len(todo)
    if progress is not None:
        progress(len(done), total)
    new = 0
    write_pending = False  # the last batch's write time is not on disk yet
    stream = dataset.batches(result.run.batch_size, selection, skip=done + others,
                             prepare=False)
    try:
        while True:
            clock = _StageClock()
            with clock("load"):
                item = next(stream, None)
            if item is None:
                break
            # Checked before the next batch, so a run whose last batch was the last to do
            # finishes (complete, saved) instead of asking to be resumed.
            if stop_after is not None and new >= stop_after:
                if write_pending:
                    _save_or_fail(result, path)
                return result
            index, raw = item
            with clock("transform"):
                images = dataset.prepare(raw)
            rows = _batch_signature(model, variables, images, clock=clock, **options)
            compute = sum(clock.seconds[k] for k in ("forward", "score", "metrics"))
            stages = {**clock.seconds, "write": None}  # measured by the save below
            result = _merge_batch(result, index, rows, compute, stages)
            with clock("write"):
                _save_or_fail(result, path)
            # On disk with the next save (the next batch's, or the run's last).
            result = _with_write_time(result, index, clock.seconds["write"])
            new, write_pending = new + 1, True
            if progress is not None:
                progress(len(result.run.batch_indices), total)
    except KeyboardInterrupt:
        raise RunInterrupted(len(result.run.batch_indices) if path else 0, path) from None
    except Exception as e:
        # Ctrl-C inside the scipy assignment's host callback reaches us as JAX's error
        # about the callback, not as a KeyboardInterrupt.
        if not _interrupted_in_callback(e):
            raise
        raise RunInterrupted(len(result.run.batch_indices) if path else 0, path) from None
    result = dataclasses.replace(result, run=dataclasses.replace(result.run, complete=True))
    _save_or_fail(result, path)
    return result


def run_signature(
    model: Any,
    variables: Any,
    dataset: data.Dataset,
    *,
    batch_size: int,
    batches: str | data.BatchSelection = "1",
    covariance: str = "empirical",
    solver: str = "auto",
    metrics: bool = False,
    forward_chunk: int = DEFAULT_FORWARD_CHUNK,
    path: str | os.PathLike | None = None,
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    stop_after: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    log: Callable[[str], None] | None = None,
    processes: distributed.ProcessContext | None = None,
) -> Signature:
    """The signature of ``model`` over batches of ``dataset``, saved after every batch.

    What ``affjax signature`` runs. With ``path``, the results file is written after every
    batch (atomically, with its CSV) and a file of the same run found there is resumed: its
    batches are kept, only the missing ones computed (a larger ``batches`` adds batches).

    Args:
      model, variables: a Flax module and its variables; dataset: an ``affjax.data``
        dataset (:func:`affjax.data.load_dataset`); batch_size: images per batch.
      batches: ``"all"``, ``"K"`` (the first K), ``"@I"`` or ``"I:J"``.
      covariance, solver: the score's options; metrics: add the companion metrics;
        forward_chunk: forward passes over slices of this many images (same numbers).
      path: the results file (``.json``), or ``None`` (in memory only); overwrite: start
        again instead of resuming it.
      info: the names saved in the file: ``model``, ``weights``, ``dataset``, ``split``,
        ``seed`` (default: the module's class name, the dataset's name, ``None``).
      stop_after: return, unfinished, once this many new batches are saved.
      progress: called as ``progress(done, total)`` when the loop starts and after every
        batch (``total`` ``None`` when unknown); log: called with a line on resuming.
      processes: under ``jax.distributed`` (:func:`affjax.distributed.initialize`), this
        process's context: it scores its share of the batches
        (:func:`affjax.distributed.partition`) into its own file beside ``path``
        (:func:`affjax.distributed.part_path`), then every process takes part in gathering
        the parts and process 0 writes the merged file at ``path``. Every process returns
        the merged signature. ``None``: one process.

    Returns:
      The :class:`~affjax.Signature` (mean scores, ``std``, ``batch_scores``, ``metrics``)
      with ``run`` (:class:`~affjax.signature_type.RunInfo`: options, batch indices,
      per-stage timing, versions, device; ``run.complete`` false after ``stop_after``).

    Raises:
      RunError: ``path`` holds another run's results, or its dataset changed.
      RunInterrupted: Ctrl-C; the batches saved so far stay in ``path``.
      affjax.data.DataError: the selection does not fit the dataset.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> import affjax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return affjax.Activation(jnp.tanh)(nn.Dense(4)(x.mean((1, 2))))
      >>> model = Net(); variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
      >>> ds = affjax.data.load_dataset("random", lambda im: im[:, :8, :8], random_size=64)
      >>> sig = run_signature(model, variables, ds, batch_size=16, batches="2")
      >>> sig.names, sig.batch_scores.shape, sig.run.batch_indices, sig.run.complete
      (['Activation_0:0'], (2, 1), (0, 1), True)
    """
    score_options = ScoreOptions(covariance=covariance, solver=solver)
    selection = data.parse_batches(batches) if isinstance(batches, str) else batches
    info = {"model": type(model).__name__, "weights": None,
            "dataset": getattr(dataset, "name", type(dataset).__name__), "split": None,
            "seed": None, **(info or {}), "batch_size": batch_size,
            "batches": str(selection), "covariance": covariance, "metrics": metrics}
    path = None if path is None else Path(path)
    ctx = processes or distributed.ProcessContext()
    own = None if path is None else ctx.own_path(path)
    saved = None if own is None else open_results(own, info, selection, overwrite=overwrite)
    todo, finished = plan(saved, dataset, batch_size, selection, own)
    todo, others = _share(todo, ctx)
    if ctx.distributed:  # this process's share done (a part is complete only then)
        finished = saved is not None and set(todo) <= set(saved.run.batch_indices)
        if finished:
            saved = dataclasses.replace(saved, run=dataclasses.replace(saved.run, complete=True))
    result = saved if finished else _continue(saved, info, own, log, dataset)
    if not finished:
        options = {"options": score_options, "metrics": metrics, "forward_chunk": forward_chunk}
        result = _loop(result, model, variables, dataset, selection, todo, own, options,
                       stop_after, progress, others)
    return _merged(result, ctx, path) if ctx.distributed else result


def _continue(saved: Signature | None, info: dict[str, Any], path: Path | None,
              log: Callable[[str], None] | None, dataset: data.Dataset) -> Signature:
    """The run to continue: ``saved`` reopened, or a new one."""
    if saved is None:
        result = _new_result(info, dataset.num_examples())  # saved with its first batch
    else:
        count = len(saved.run.batch_indices)
        if saved.run.batches != info["batches"]:
            if log is not None:
                log(f"extending {path} from --batches {saved.run.batches} to "
                    f"{info['batches']}: {count} batch(es) already done")
        elif count and log is not None:
            log(f"resuming {path}: {count} batch(es) already done")
        result = dataclasses.replace(saved, run=dataclasses.replace(
            saved.run, batches=info["batches"], complete=False))
    return result


def _share(todo: list[int] | None, ctx: distributed.ProcessContext
           ) -> tuple[list[int] | None, list[int]]:
    """This process's batches of ``todo`` and the other processes' ones."""
    if not ctx.distributed:
        return todo, []
    if todo is None:
        raise RunError("a run over several processes splits a known number of batches: "
                       "select them with --batches K or I:J, or use a dataset whose size "
                       "is known")
    mine = distributed.partition(todo, ctx.process_index, ctx.process_count)
    return mine, sorted(set(todo) - set(mine))


def _merged(result: Signature, ctx: distributed.ProcessContext,
            path: Path | None) -> Signature:
    """Every process's part gathered (a collective), merged; process 0 saves it at ``path``."""
    parts = distributed.gather_parts(results.to_dict(result))
    merged = results.from_dict(distributed.merge(parts))
    if ctx.is_main:
        _save_or_fail(merged, path)
    return merged
