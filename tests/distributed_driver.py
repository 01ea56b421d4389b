"""One process of a signature study split over processes, and a launcher of N of them.

``tests/test_distributed.py`` and ``benchmarks/bench_distributed.py`` run this file as
``python tests/distributed_driver.py --out DIR/name.json [--dtypes float32,float64]
[--coordinator HOST:PORT --num-processes N --process-id I]``, or as ``... --cli ARGS``:
``affjax signature ARGS`` with a zoo of one tiny model. It runs what ``affjax signature
--coordinator ...`` runs: :func:`affjax.distributed.initialize`, then
:func:`affjax.run_signature` with this process's context, on a tiny CNN (three activation
calls, the zoo's ``EvalTransform`` on the ``random`` dataset): the process scores its share
of the batches into its part file (resuming it), the parts are gathered through JAX and
process 0 writes the merged file (one per dtype, ``name_float32.json``).

It prints one JSON line per event (``{"event": "batch", "batch": 3, ...}`` once a batch is
saved in its part), so the caller sees what was computed. ``--die-after K`` exits hard
(``os._exit``, no cleanup, like a killed host) once K batches are saved.
"""

from __future__ import annotations

import argparse
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


def _report_saves(own_paths: dict[Path, str], die_after: int | None) -> None:
    """Print an event for each batch the runner saves to a part; exit hard after K of them.

    ``results.save`` is wrapped: after the real (atomic) save of this process's own file,
    the batches new in it are reported, so a batch is counted once it is on disk.
    """
    from affjax import results

    # What the files hold already (a resumed run): only what is saved from now on is new.
    seen = {path: set(results.load(path).run.batch_indices) if path.exists() else set()
            for path in own_paths}
    real, saved = results.save, [0]

    def save(result, path):
        real(result, path)
        path = Path(path)
        if path not in own_paths:
            return  # the merged file (process 0)
        new = sorted(set(result.run.batch_indices) - seen[path])
        seen[path].update(new)
        for index in new:
            _event(event="batch", batch=index, dtype=own_paths[path])
            saved[0] += 1
            if die_after is not None and saved[0] >= die_after:
                os._exit(DIE_EXIT_CODE)  # a host lost mid-run: no cleanup, no shutdown

    results.save = save


def _check_library(module, variables, x) -> dict:
    """The public signature equals score_layers to the bit; foreign devices are refused."""
    import jax
    import numpy as np

    import affjax
    from affjax.capture import capture_layers
    from affjax.layer_scoring import score_layers

    layers = capture_layers(module, variables, x)
    scores = np.asarray(score_layers(layers))
    assert scores.dtype == x.dtype, scores.dtype
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


def cli_main(argv: list[str]) -> int:
    """``affjax signature ARGV`` with a zoo of one tiny model, ``tiny`` (as tests/test_cli)."""
    import types

    import jax
    import jax.numpy as jnp

    from affjax import cli
    from affjax import models

    module = _model()()

    def create(name, *, seed=0, num_classes=1000):
        return module, module.init(jax.random.key(seed), jnp.zeros((1, 12, 12, 3)))

    transform = models.EvalTransform(resize_size=16, crop_size=12)
    zoo = types.SimpleNamespace(list_models=lambda: ["tiny"], create=create,
                                from_torchvision=None, eval_transform=lambda name: transform)
    cli._model_api = lambda: zoo
    return cli.main(["signature", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cli"]:  # the command line itself; its arguments follow
        return cli_main(argv[1:])
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
    p.add_argument("--die-after", type=int, help="exit hard after saving K batches")
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

    ctx = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                 initialization_timeout=60 if args.coordinator else None)
    import jax.numpy as jnp

    from affjax import data
    from affjax import models
    from affjax import runner

    dataset = data.load_dataset("random", models.EvalTransform(resize_size=16, crop_size=12),
                                random_size=args.batches * args.batch_size)
    module = _model()(width=args.width)
    variables32 = module.init(jax.random.key(987), jnp.zeros((1, 12, 12, 3), jnp.float32))
    files = {dtype: _results_file(Path(args.out), dtype) for dtype in dtypes}
    _report_saves({ctx.own_path(f): d for d, f in files.items()}, args.die_after)
    mine = distributed.partition(range(args.batches), ctx.process_index, ctx.process_count)
    _event(event="start", process=ctx.process_index, count=ctx.process_count, mine=mine,
           seconds=time.perf_counter() - start)
    for dtype in dtypes:
        with jax.enable_x64(dtype == "float64"):
            variables = jax.tree.map(lambda v, t=dtype: v.astype(t), variables32)
            # What `affjax signature` runs, on this process's share of the batches.
            sig = runner.run_signature(
                module, variables, dataset, batch_size=args.batch_size,
                batches=str(args.batches), path=files[dtype], processes=ctx,
                info={"model": "tiny", "weights": "random", "dataset": "random", "seed": 987})
            assert sig.run.complete and list(sig.run.batch_indices) == list(range(args.batches))
            if args.check_library and mine:
                x = jnp.asarray(dataset.batch(mine[0], args.batch_size), dtype)
                _event(event="check", process=ctx.process_index, dtype=dtype,
                       **_check_library(module, variables, x))
    _event(event="done", process=ctx.process_index, seconds=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
