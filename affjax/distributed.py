"""Signatures over several processes (``jax.distributed``): split the batches, merge the parts.

Under JAX's multi-controller runtime every process (a TPU pod host, one process per GPU)
runs the same program. A study is split by **batches**: each process scores its own
batches (:func:`partition`) on its own devices (``jax.local_devices()``, the library's
default placement), writes them to its own results file (:func:`part_path`), and at the
end the parts travel to every process (:func:`gather_parts`, one ``process_allgather`` of
their JSON text, so no shared disk is needed) where process 0 merges them
(:func:`merge`) into the file a single process would have written. Only finished scores
move between processes, never activations. Design, commands and limits:
``docs/distributed.md``.

A run on one process needs none of this: :func:`initialize` with no arguments returns the
single-process context, :func:`partition` keeps every batch, :func:`merge` of one part
is that part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affjax import results

__all__ = ["DistributedError", "ProcessContext", "initialize", "partition", "part_path",
           "gather_parts", "merge"]


class DistributedError(ValueError):
    """Bad ``jax.distributed`` arguments, or parts that cannot be merged.

    A ``ValueError``; the message names the argument, the part or the field.
    """


@dataclasses.dataclass(frozen=True)
class ProcessContext:
    """Which process this is, of how many.

    Attributes:
      process_index: this process, from 0 (``jax.process_index()``).
      process_count: the number of processes (``jax.process_count()``).

    Example:
      >>> ctx = ProcessContext(1, 4)
      >>> ctx.is_main, ctx.distributed
      (False, True)
      >>> ProcessContext()
      ProcessContext(process_index=0, process_count=1)
    """

    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        _check_index(self.process_index, self.process_count)

    @property
    def is_main(self) -> bool:
        """Process 0, which merges and writes the merged file."""
        return self.process_index == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.process_count > 1

    def own_path(self, results_path: str | os.PathLike) -> Path:
        """The file this process writes: ``results_path`` alone, else its :func:`part_path`.

        Example:
          >>> ProcessContext(1, 2).own_path("run.json").name
          'run.part-1-of-2.json'
          >>> ProcessContext().own_path("run.json").name
          'run.json'
        """
        if not self.distributed:
            return Path(results_path)
        return part_path(results_path, self.process_index, self.process_count)


def _check_index(process_index: Any, process_count: Any, *, names: tuple[str, str] = (
        "process_index", "process_count")) -> None:
    index_name, count_name = names
    for name, v in ((index_name, process_index), (count_name, process_count)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool):
            raise DistributedError(f"{name} must be an integer, got {v!r}")
    if process_count < 1:
        raise DistributedError(f"{count_name} must be at least 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise DistributedError(f"{index_name} must be in [0, {count_name}) = "
                               f"[0, {process_count}), got {process_index}")


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]+):(\d{1,5})$")


def _check_coordinator(coordinator: Any) -> None:
    match = _HOST_PORT.match(coordinator) if isinstance(coordinator, str) else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise DistributedError(
            f"coordinator must be HOST:PORT (e.g. 10.0.0.1:1234, or [::1]:1234 for IPv6), "
            f"the address of process 0 and a free port on it, got {coordinator!r}")


def _is_initialized() -> bool:
    import jax

    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed as state  # jax without is_initialized

    return state.global_state.client is not None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               local_device_ids: int | Sequence[int] | None = None,
               initialization_timeout: int | None = None) -> ProcessContext:
    """Start JAX's multi-process runtime (``jax.distributed.initialize``), arguments checked.

    Three ways:

    - nothing asked (the default): one process, nothing is started; returns
      ``ProcessContext(0, 1)``;
    - ``coordinator``, ``num_processes`` and ``process_id`` together (the CLI's
      ``--coordinator HOST:PORT --num-processes N --process-id I``): every process gets
      the same coordinator (process 0's address and a free port) and count, and its own id;
    - ``auto=True`` (the CLI's ``--distributed``): JAX finds them itself, as on a TPU pod
      slice or under SLURM/Open MPI; any of the three given as well are passed on.

    The CPU backend needs a cross-process collectives implementation for
    :func:`gather_parts`: where none is configured (jax before 0.5), Gloo is chosen. It
    only concerns the CPU client, so it is set before the backends exist, whatever they
    will be. Calling this again after JAX's runtime is up returns the running context.

    Args:
      coordinator: ``HOST:PORT`` of the coordination service (process 0).
      num_processes: the number of processes, at least 1.
      process_id: this process, in ``[0, num_processes)``.
      auto: let JAX detect the cluster (TPU pods, SLURM, Open MPI, ...).
      local_device_ids: this process's devices, e.g. one GPU of a host (passed on).
      initialization_timeout: seconds to wait for every process (JAX's default: 300).

    Returns:
      A :class:`ProcessContext` (``jax.process_index()``, ``jax.process_count()``).

    Raises:
      DistributedError: only some of the three given without ``auto``; a ``process_id``
        outside ``[0, num_processes)``; a coordinator that is not ``HOST:PORT``.

    Example:
      >>> initialize()                        # one process: a no-op
      ProcessContext(process_index=0, process_count=1)
      >>> initialize("127.0.0.1:1234", 4, 4)
      Traceback (most recent call last):
      ...
      affjax.distributed.DistributedError: process_id must be in [0, num_processes) = [0, 4), got 4
      >>> initialize("127.0.0.1", 4, 0)
      Traceback (most recent call last):
      ...
      affjax.distributed.DistributedError: coordinator must be HOST:PORT ..., got '127.0.0.1'
      >>> initialize("127.0.0.1:1234", 4)
      Traceback (most recent call last):
      ...
      affjax.distributed.DistributedError: give the coordinator, ... (missing: process_id), ...
    """
    import jax

    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    missing = [name for name, v in given.items() if v is None]
    if not auto and len(missing) == 3:
        if local_device_ids is not None:
            raise DistributedError("local_device_ids needs a distributed run (the coordinator, "
                                   "num_processes and process_id, or auto=True)")
        if _is_initialized():
            return ProcessContext(jax.process_index(), jax.process_count())
        return ProcessContext()
    if not auto and missing:
        raise DistributedError(
            f"give the coordinator, num_processes and process_id together (missing: "
            f"{', '.join(missing)}), or auto=True to let JAX find them (TPU pods, SLURM)")
    if coordinator is not None:
        _check_coordinator(coordinator)
    if num_processes is not None and process_id is not None:
        _check_index(process_id, num_processes, names=("process_id", "num_processes"))
    elif num_processes is not None:
        _check_index(0, num_processes, names=("process_id", "num_processes"))
    elif process_id is not None and (isinstance(process_id, bool) or not isinstance(
            process_id, int | np.integer) or process_id < 0):
        raise DistributedError(f"process_id must be an integer from 0, got {process_id!r}")
    if _is_initialized():
        ctx = ProcessContext(jax.process_index(), jax.process_count())
        if (num_processes, process_id) not in ((None, None), (ctx.process_count,
                                                              ctx.process_index)):
            raise DistributedError(
                f"JAX's distributed runtime already runs as process {ctx.process_index} of "
                f"{ctx.process_count}, not {process_id} of {num_processes}")
        return ctx
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if initialization_timeout is not None:
        kwargs["initialization_timeout"] = int(initialization_timeout)
    jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    return ProcessContext(jax.process_index(), jax.process_count())


def partition(indices: Sequence[int], process_index: int, process_count: int) -> list[int]:
    """The batches that process ``process_index`` of ``process_count`` scores.

    Round robin over the sorted batch indices (``sorted(indices)[process_index::count]``):
    deterministic (every process computes every process's share alone), balanced (shares
    differ by at most one batch, whether or not the count divides the number of batches),
    and each share spreads over the whole selection, so that a slow tail of big batches
    does not fall to one process.

    Args:
      indices: the selected batch indices (any order; repeated indices count once).
      process_index: this process, in ``[0, process_count)``.
      process_count: the number of processes.

    Returns:
      This process's batch indices, ascending; possibly empty (more processes than batches).

    Example:
      >>> [partition(range(5), i, 2) for i in range(2)]
      [[0, 2, 4], [1, 3]]
      >>> [partition([10, 11, 12], i, 4) for i in range(4)]
      [[10], [11], [12], []]
    """
    _check_index(process_index, process_count)
    return sorted(set(int(i) for i in indices))[process_index::process_count]


_PART = re.compile(r"^(?P<stem>.+)\.part-(?P<index>\d+)-of-(?P<count>\d+)$")


def part_path(results_path: str | os.PathLike, process_index: int,
              process_count: int) -> Path:
    """Where process ``process_index`` of ``process_count`` keeps its own batches.

    Beside the merged file: ``name.json`` -> ``name.part-1-of-4.json`` (the CSV and
    figures are written for the merged file only). The count is in the name, so that
    the parts of a run on another number of processes are never taken for this run's:
    its batches were split otherwise.

    Args:
      results_path: the merged results file (``.json``).
      process_index: this process, in ``[0, process_count)``.
      process_count: the number of processes.

    Returns:
      The part's path.

    Example:
      >>> part_path("out/resnet18_random.json", 1, 4).as_posix()
      'out/resnet18_random.part-1-of-4.json'
    """
    _check_index(process_index, process_count)
    path = Path(results_path)
    return path.with_name(f"{path.stem}.part-{process_index}-of-{process_count}{path.suffix}")


def gather_parts(part: Mapping[str, Any]) -> list[dict]:
    """Every process's part, on every process, ordered by process index (a collective).

    Every process must call it, with its own part. The part's JSON text
    (:func:`affjax.results.to_json`, which round-trips every float exactly) travels as
    bytes through ``jax.experimental.multihost_utils.process_allgather``: first the
    lengths, then the texts padded to the longest. It goes over JAX's own transport (ICI
    or DCN on a TPU pod, NCCL or Gloo elsewhere), so the hosts need no shared disk; a part
    is a few kB per batch (one float per layer and metric). With one process it returns
    ``[part]`` and starts nothing.

    Args:
      part: this process's results object.

    Returns:
      The parts as dicts (parsed back from JSON), ``process_count`` of them.

    Example:
      >>> part = {"format": "affjax-signature/1", "batch_indices": [0]}
      >>> gather_parts(part) == [part]        # one process
      True
    """
    import jax

    text = results.to_json(part).encode("utf-8")
    if jax.process_count() == 1:
        return [json.loads(text)]
    from jax.experimental import multihost_utils

    size = np.asarray([len(text)], np.int32)
    sizes = np.asarray(multihost_utils.process_allgather(size)).reshape(-1)
    buffer = np.zeros((int(sizes.max()),), np.uint8)
    buffer[:len(text)] = np.frombuffer(text, np.uint8)
    texts = np.asarray(multihost_utils.process_allgather(buffer))
    if texts.shape[0] != len(sizes):
        raise RuntimeError(f"gathered {texts.shape[0]} parts from "
                           f"{len(sizes)} processes")
    return [json.loads(bytes(t[:n]).decode("utf-8")) for t, n in zip(texts, sizes, strict=True)]


def merge(parts: Sequence[Mapping[str, Any]]) -> dict:
    """One results object from the parts of several processes, as one process would write it.

    Every per-batch list (each layer's ``scores``, each metric's ``values``,
    ``timing.batch_seconds`` and each of ``timing.stages``) is interleaved into ascending
    ``batch_indices``, and the summaries are recomputed from the merged lists with
    :func:`affjax.results.summarise`, as the single-process run computes them, so the
    numbers are equal to the last bit. A batch found in two parts (a part and an earlier
    merged file) is kept once if its values are equal, an error if not.

    Other fields: the run's options (``affjax.results.RUN_KEYS``), ``num_examples``,
    ``versions`` and the layers' ``name``, ``kind`` and ``dim`` must agree; ``complete``
    is true when every part is; ``timing.started`` is the earliest, ``updated`` the
    latest, ``seconds`` the sum of the batches' compute; ``timing.processes`` is the
    number of parts merged; the rest (``device``, ...) is the first part's. A part without
    batches (more processes than batches) adds nothing but its ``complete``.

    It needs of each part only its data: ``batch_indices``, the per-batch lists named
    above, and the fields that must agree; it reads and writes no file.

    Args:
      parts: results objects (``affjax.results`` format), at least one.

    Returns:
      The merged results object (a new dict; the parts are not modified).

    Raises:
      DistributedError: no parts; parts of different runs (naming the field); different
        layers; a batch in two parts with different values.

    Example:
      >>> def part(indices, scores):
      ...     return {"format": "affjax-signature/1", "model": "m", "batches": "3",
      ...             "batch_indices": indices, "complete": True, "timing": {},
      ...             "layers": [{"name": "relu:0", "kind": "relu", "dim": 4,
      ...                         "score": None, "std": None, "scores": scores}]}
      >>> merged = merge([part([0, 2], [0.5, 0.75]), part([1], [0.625])])
      >>> merged["batch_indices"], merged["layers"][0]["scores"]
      ([0, 1, 2], [0.5, 0.625, 0.75])
      >>> merged["layers"][0]["score"], merged["timing"]["processes"]
      (0.625, 2)
    """
    if not parts:
        raise DistributedError("merge needs at least one part")
    parts = [p for p in parts]
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for key in (*results.RUN_KEYS, "format", "num_examples", "versions"):
            if p.get(key) != first.get(key):
                raise DistributedError(
                    f"part {i} belongs to another run: its {key!r} is {p.get(key)!r}, part "
                    f"0's {first.get(key)!r}")
    with_layers = [p for p in parts if p["batch_indices"]]
    layers0 = (with_layers or parts)[0]["layers"]
    for i, p in enumerate(parts):
        if p["batch_indices"] and [(x["name"], x["kind"], x["dim"]) for x in p["layers"]] != [
                (x["name"], x["kind"], x["dim"]) for x in layers0]:
            raise DistributedError(f"part {i} has other activation calls than part "
                                   f"{parts.index(with_layers[0])}")
    # Where each merged batch comes from: (part, position in that part).
    source: dict[int, tuple[int, int]] = {}
    for i, p in enumerate(parts):
        for at, b in enumerate(p["batch_indices"]):
            if b in source:
                j, at_j = source[b]
                if _batch_values(parts[j], at_j) != _batch_values(p, at):
                    raise DistributedError(f"batch {b} is in parts {j} and {i} with different "
                                           "values")
                continue
            source[b] = (i, at)
    order = sorted(source)

    def pick(get) -> list:
        return [get(parts[source[b][0]], source[b][1]) for b in order]

    merged = {key: _copy(v) for key, v in first.items()}
    merged["batch_indices"] = list(order)
    merged["complete"] = all(bool(p.get("complete")) for p in parts)
    merged["layers"] = []
    for k, layer in enumerate(layers0):
        out = {key: _copy(v) for key, v in layer.items()}
        out["scores"] = pick(lambda p, at, k=k: p["layers"][k]["scores"][at])
        out["score"], out["std"] = _summary(out["scores"])
        if "metrics" in layer:
            for name in layer["metrics"]:
                values = pick(lambda p, at, k=k, m=name: p["layers"][k]["metrics"][m]["values"][at])
                mean, std = _summary(values)
                out["metrics"][name] = {**out["metrics"][name], "mean": mean, "std": std,
                                        "values": values}
        merged["layers"].append(out)
    merged["timing"] = _merge_timing(parts, pick)
    return merged


def _copy(v: Any) -> Any:
    return json.loads(json.dumps(v, allow_nan=True))


def _summary(values: list[float]) -> tuple[float | None, float | None]:
    return results.summarise(values) if values else (None, None)


def _batch_values(part: Mapping[str, Any], at: int) -> list:
    """A batch's scores and metric values in ``part`` (NaN-safe comparison via repr)."""
    values = []
    for layer in part["layers"]:
        values.append(repr(layer["scores"][at]))
        for name, metric in sorted(layer.get("metrics", {}).items()):
            values.append((name, repr(metric["values"][at])))
    return values


def _merge_timing(parts: Sequence[Mapping[str, Any]], pick: Any) -> dict:
    timings = [p.get("timing") or {} for p in parts]
    timing = {key: _copy(v) for key, v in timings[0].items()}
    for key, choose in (("started", min), ("updated", max)):
        stamps = [t[key] for t in timings if t.get(key) is not None]
        if stamps:
            timing[key] = choose(stamps)
    if any("batch_seconds" in t for t in timings):
        timing["batch_seconds"] = pick(
            lambda p, at: ((p.get("timing") or {}).get("batch_seconds") or [0.0] * (at + 1))[at])
        timing["seconds"] = float(sum(timing["batch_seconds"]))
    stage_names = [s for s in results.STAGES if any(s in t.get("stages", {}) for t in timings)]
    stage_names += sorted({s for t in timings for s in t.get("stages", {})} - set(stage_names))
    if stage_names:
        timing["stages"] = {s: pick(lambda p, at, s=s: _stage(p, s, at)) for s in stage_names}
    timing["processes"] = len(parts)
    return timing


def _stage(part: Mapping[str, Any], stage: str, at: int) -> float | None:
    values = ((part.get("timing") or {}).get("stages") or {}).get(stage)
    return None if values is None else values[at]
