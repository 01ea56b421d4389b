"""Exact W2 solvers side by side: SciPy on the host, optax's Hungarian and the auction on device.

``affjax.transport.resolve_solver("auto", n, d)`` picks the exact assignment solver. This
script measures what that rule rests on, on the machine it runs on: the warm time of a
jitted ``transport.w2_squared`` (cost matrix, assignment, matched cost) with
``solver="scipy"`` (``linear_sum_assignment`` through ``jax.pure_callback``),
``solver="hungarian"`` (``optax.assignment``) and ``solver="auction"``
(``affjax.linear_assignment``), for one pair of point clouds and for a ``vmap`` over a batch
of pairs (``T(x)`` against ``y`` as in the score, ``y = relu(x W)``). The solvers are exact,
so the values must agree; the script checks it. ``bench_assignment.py`` has the corpus of
real layers and hard cases.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_solvers.py                 # about 2 minutes on 2 cores
    PYTHONPATH=. python benchmarks/bench_solvers.py --n 256 1024 --batch 1 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import affjax
from affjax import transport

SOLVERS = ("scipy", "hungarian", "auction")


def median_time(fn, *args, repeats: int) -> tuple[float, float, jax.Array]:
    """(compile + first call seconds, median warm seconds, value)."""
    start = time.perf_counter()
    value = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), value


def _cells(row: dict) -> list[str]:
    """n, batch, the times, their ratios to scipy and the auto choice, as table cells."""
    times = [f"{row[s]:.4f}" if row.get(s) is not None else "skipped" for s in SOLVERS]
    ratios = [f"{row[s] / row['scipy']:.2f}" if row.get(s) and row.get("scipy") else "-"
              for s in SOLVERS[1:]]
    return [str(row["n"]), str(row["batch"]), *times, *ratios, row["auto"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4],
                   help="1: one pair, unbatched; B > 1: vmap over B pairs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=3.0,
                   help="skip the larger n of a solver once one call took longer than this")
    p.add_argument("--json", help="save the rows to this path")
    args = p.parse_args()

    print(f"backend {jax.default_backend()}, devices {jax.devices()}, d={args.d}, float32")
    rng = np.random.default_rng(0)
    rows, too_slow = [], set()
    for batch in args.batch:
        for n in args.n:
            shape = (n, args.d) if batch == 1 else (batch, n, args.d)
            x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            # The pair the score transports: y = relu(x W) and the affine map T(x) = A x + b
            # fitted by the score (A symmetric), so the clouds are close, as in practice.
            y = jnp.asarray(np.maximum(np.asarray(x) @ rng.standard_normal((args.d, args.d))
                                       / np.sqrt(args.d), 0), jnp.float32)
            fit = affjax.affinity if batch == 1 else jax.vmap(affjax.affinity)
            res = fit(x, y)
            x = x @ res.A + res.b[..., None, :]
            row = {"n": n, "batch": batch,
                   "auto": transport.resolve_solver("auto", n, args.d)}
            values = {}
            for solver in SOLVERS:
                if (solver, batch) in too_slow:
                    row[solver] = None
                    continue
                fn = lambda a, b, s=solver: transport.w2_squared(a, b, solver=s)  # noqa: E731
                fn = jax.jit(fn if batch == 1 else jax.vmap(fn))
                first, warm, value = median_time(fn, x, y, repeats=args.repeats)
                row[solver], row[solver + "_first"] = warm, first
                values[solver] = np.asarray(value, np.float64)
                if warm > args.max_seconds:
                    too_slow.add((solver, batch))
            if "scipy" in values and len(values) > 1:
                rel = max(float(np.max(np.abs(values["scipy"] - v) / np.abs(values["scipy"])))
                          for v in values.values())
                row["rel_diff"] = float(rel)
                if rel > 1e-4:
                    raise SystemExit(f"n={n} batch={batch}: the exact solvers disagree "
                                     f"(relative difference {rel:.2e})")
            rows.append(row)
            print("  ".join(_cells(row)), flush=True)

    print("\n| n | batch | scipy (s) | hungarian (s) | auction (s) | hungarian / scipy "
          "| auction / scipy | auto picks |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(_cells(row)) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": jax.default_backend(),
                       "devices": [str(dv) for dv in jax.devices()],
                       "d": args.d, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
