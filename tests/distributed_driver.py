"""One process of a signature study split over processes, and a launcher of N of them.

``tests/test_distributed.py`` and ``benchmarks/bench_distributed.py`` run this file as
``python tests/distributed_driver.py --out DIR/name.json [--dtypes float32,float64]
[--coordinator HOST:PORT --num-processes N --process-id I]``. It does what the CLI will do with
:mod:`affjax.distributed` (the CLI's wiring is pending, docs/distributed.md): initialise,
take this process's batches (``partition``), skip those already in its part file, score
each batch of a tiny CNN (three activation calls, the zoo's ``EvalTransform`` on the
``random`` dataset) on the local devices, append it to the part (as the CLI's
``_merge_batch`` does) and rewrite the part atomically; then gather the parts through
JAX and let process 0 write the merged file (one per dtype, ``name_float32.json``).

It prints one JSON line per event (``{"event": "batch", "batch": 3, ...}``), so the caller
sees what was computed. ``--die-after K`` exits hard (``os._exit``, no cleanup, like a
killed host) after scoring K batches (in every dtype).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DIE_EXIT_CODE = 17


def free_port() -> int:
    """A free TCP port on the loopback interface (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, args: list[str], *, timeout: float = 120.0,
           per_process: dict[int, list[str]] | None = None,
           expect_exit: dict[int, int] | None = None) -> list[dict]:
    """Run ``num_processes`` drivers on a loopback coordinator; return each one's outcome.

    Each outcome is ``{"returncode", "events", "stderr", "seconds"}``. With one process
    no coordinator is given (a plain single-process run). Processes that have not ended
    when the first process listed in ``expect_exit`` ends with its code, or at
    ``timeout``, are killed (the rest of a job whose host died); every process is killed
    on any error. Nothing outside this machine is contacted.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process, as the tests assume
    base = [sys.executable, str(Path(__file__).resolve()), *args]
    if num_processes > 1:
        base += ["--coordinator", f"127.0.0.1:{free_port()}",
                 "--num-processes", str(num_processes)]
    procs: list[subprocess.Popen] = []
    start = time.perf_counter()
    try:
        for i in range(num_processes):
            cmd = base + (["--process-id", str(i)] if num_processes > 1 else [])
            cmd += (per_process or {}).get(i, [])
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env, cwd=ROOT))
        outcomes: dict[int, tuple] = {}
        deadline = start + timeout
        while len(outcomes) < len(procs):
            for i, p in enumerate(procs):
                if i not in outcomes and p.poll() is not None:
                    out, err = p.communicate()
                    outcomes[i] = (p.returncode, out, err, time.perf_counter() - start)
                    if expect_exit and expect_exit.get(i) == p.returncode:
                        deadline = min(deadline, time.perf_counter())  # the job is lost
            if time.perf_counter() > deadline:
                for i, p in enumerate(procs):
                    if i not in outcomes:
                        p.kill()
                        out, err = p.communicate()
                        outcomes[i] = (None, out, err, time.perf_counter() - start)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [{"returncode": code, "events": [json.loads(line) for line in out.splitlines()
                                            if line.startswith("{")],
             "stderr": err, "seconds": seconds}
            for code, out, err, seconds in (outcomes[i] for i in range(len(procs)))]


# --------------------------------------------------------------------------- one process


def _model():
    import flax.linen as nn
    import jax.numpy as jnp

    import affjax

    class Tiny(nn.Module):
        """conv -> relu -> conv -> relu -> pool -> dense -> tanh -> dense (as tests/test_cli)."""

        width: int = 4

        @nn.compact
        def __call__(self, x):
            relu = affjax.Activation(nn.relu, name="relu")
            h = relu(nn.Conv(self.width, (3, 3), name="conv0")(x))
            h = relu(nn.Conv(self.width, (3, 3), name="conv1")(h))
            h = jnp.mean(h, axis=(1, 2))
            h = affjax.Activation(jnp.tanh, name="tanh")(nn.Dense(self.width, name="fc0")(h))
            return nn.Dense(10, name="head")(h)

    return Tiny


def _event(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _new_part(args, dtype: str, num_examples: int) -> dict:
    from affjax import results

    return {"format": results.FORMAT, "model": "tiny", "weights": "random",
            "dataset": "random", "split": None, "batch_size": args.batch_size,
            "batches": str(args.batches), "covariance": "empirical", "metrics": False,
            "seed": 987, "num_examples": num_examples, "batch_indices": [], "complete": False,
            "versions": {"dtype": dtype}, "device": "cpu",
            "timing": {"started": None, "updated": None, "seconds": 0.0, "batch_seconds": []},
            "layers": []}


def _add_batch(part: dict, index: int, rows: list[dict], seconds: float) -> None:
    """As the CLI's ``_merge_batch``: lists in batch order, summaries recomputed."""
    from affjax.results import summarise

    if not part["layers"]:
        part["layers"] = [{"name": r["name"], "kind": r["kind"], "dim": r["dim"],
                           "score": None, "std": None, "scores": []} for r in rows]
    at = bisect.bisect(part["batch_indices"], index)
    for layer, row in zip(part["layers"], rows, strict=True):
        layer["scores"].insert(at, row["score"])
        layer["score"], layer["std"] = summarise(layer["scores"])
    part["batch_indices"].insert(at, index)
    part["timing"]["batch_seconds"].insert(at, seconds)
    part["timing"]["seconds"] = float(sum(part["timing"]["batch_seconds"]))


def _check_library(module, variables, x, layers, scores) -> dict:
    """The public signature equals score_layers to the bit; foreign devices are refused."""
    import jax
    import numpy as np

    import affjax
    from affjax.layer_scoring import score_layers

    public = np.asarray(affjax.signature_scores(module, variables, x))
    checks = {"signature_scores_equal": bool(np.array_equal(public, scores)),
              "devices": [str(d) for d in jax.local_devices()]}
    if jax.process_count() > 1:
        try:
            score_layers(layers, devices=jax.devices())
            checks["foreign_devices"] = "accepted"
        except ValueError as e:
            checks["foreign_devices"] = str(e)
    return checks


def _results_file(out: Path, dtype: str) -> Path:
    """The merged file of one dtype: ``name.json`` -> ``name_float32.json``."""
    return out.with_name(f"{out.stem}_{dtype}{out.suffix}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True,
                   help="the merged results file (.json); one per dtype, name_DTYPE.json")
    p.add_argument("--batches", type=int, default=4, help="batches 0..K-1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated; float64 runs under jax.enable_x64, float32 without")
    p.add_argument("--width", type=int, default=4, help="the tiny CNN's channels")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--die-after", type=int, help="exit hard after scoring K batches")
    p.add_argument("--check-library", action="store_true")
    p.add_argument("--cache", help="a JAX persistent compilation cache folder, shared by the runs")
    args = p.parse_args(argv)
    dtypes = args.dtypes.split(",")
    start = time.perf_counter()

    import jax

    if args.cache:  # every process compiles the same programs: compile them once
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from affjax import distributed
    from affjax import results

    ctx = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                 initialization_timeout=60 if args.coordinator else None)
    import jax.numpy as jnp
    import numpy as np

    from affjax import data
    from affjax import models
    from affjax.capture import capture_layers
    from affjax.layer_scoring import score_layers

    dataset = data.load_dataset("random", models.EvalTransform(resize_size=16, crop_size=12),
                                random_size=args.batches * args.batch_size)
    module = _model()(width=args.width)
    variables32 = module.init(jax.random.key(987), jnp.zeros((1, 12, 12, 3), jnp.float32))
    mine = distributed.partition(range(args.batches), ctx.process_index, ctx.process_count)
    parts, files = {}, {}
    for dtype in dtypes:
        files[dtype] = distributed.part_path(_results_file(Path(args.out), dtype),
                                             ctx.process_index, ctx.process_count)
        parts[dtype] = _new_part(args, dtype, dataset.num_examples())
        if files[dtype].exists():
            parts[dtype] = results.load(files[dtype])
            if parts[dtype]["batches"] != str(args.batches):
                raise SystemExit(f"{files[dtype]} belongs to another run")
        stray = sorted(set(parts[dtype]["batch_indices"]) - set(mine))
        if stray:
            raise SystemExit(f"{files[dtype]} holds batches {stray}, not this process's")
    _event(event="start", process=ctx.process_index, count=ctx.process_count, mine=mine,
           done={d: parts[d]["batch_indices"] for d in dtypes},
           seconds=time.perf_counter() - start)
    scored = 0
    for index in mine:
        todo = [d for d in dtypes if index not in parts[d]["batch_indices"]]
        if not todo:
            continue
        t0 = time.perf_counter()
        images = dataset.batch(index, args.batch_size)
        _event(event="images", process=ctx.process_index, batch=index,
               seconds=time.perf_counter() - t0)
        for dtype in todo:
            t0 = time.perf_counter()
            with jax.enable_x64(dtype == "float64"):
                variables = jax.tree.map(lambda v, t=dtype: v.astype(t), variables32)
                x = jnp.asarray(images, dtype)
                layers = capture_layers(module, variables, x)
                scores = np.asarray(score_layers(layers))
                assert scores.dtype == dtype, scores.dtype
                if args.check_library and scored == 0:
                    _event(event="check", process=ctx.process_index, dtype=dtype,
                           **_check_library(module, variables, x, layers, scores))
            rows = [{"name": layer.name, "kind": layer.kind, "dim": int(layer.x.shape[1]),
                     "score": float(s)} for layer, s in zip(layers, scores, strict=True)]
            part = parts[dtype]
            _add_batch(part, index, rows, time.perf_counter() - t0)
            part["timing"]["started"] = part["timing"]["started"] or _now()
            part["timing"]["updated"] = _now()
            results.atomic_write_text(files[dtype], results.to_json(part))
            _event(event="batch", process=ctx.process_index, batch=index, dtype=dtype,
                   seconds=time.perf_counter() - t0)
        scored += 1
        if args.die_after is not None and scored >= args.die_after:
            os._exit(DIE_EXIT_CODE)  # a host lost mid-run: no cleanup, no shutdown
    gathered = 0.0
    for dtype in dtypes:
        parts[dtype]["complete"] = True
        results.atomic_write_text(files[dtype], results.to_json(parts[dtype]))
        t0 = time.perf_counter()
        everyone = distributed.gather_parts(parts[dtype])
        gathered += time.perf_counter() - t0
        if ctx.is_main:
            merged = distributed.merge(everyone)
            results.atomic_write_text(_results_file(Path(args.out), dtype),
                                      results.to_json(merged))
    _event(event="done", process=ctx.process_index, scored=scored, gather_seconds=gathered,
           seconds=time.perf_counter() - start)
    return 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


if __name__ == "__main__":
    sys.exit(main())
