"""A zoo model's whole signature on one batch: forward pass plus every score, cold and warm.

Random weights, standard-normal images of ``--size`` pixels, batch ``--n``. For each solver
the jitted ``signature_scores`` is timed on its first call (compile included: "cold") and
on later calls ("warm"); the forward pass alone is timed the same way. With
``--cache DIR`` JAX's persistent compilation cache is on, so a second process started with
the same ``DIR`` measures a cold start from the cache.

    python benchmarks/bench_zoo_signature.py --model resnet50 --n 2048 --size 224
    python benchmarks/bench_zoo_signature.py --n 128 --size 64 --solvers auto scipy   # CPU

Prints one row per solver and, with ``--json``, writes them.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import affjax
from affjax import models


def _timed(fn, *args, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        warm.append(time.perf_counter() - t0)
    return cold, float(np.median(warm))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--solvers", nargs="+", default=["auto", "auction", "scipy"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", help="JAX persistent compilation cache folder")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print(f"backend {jax.default_backend()} {jax.devices()}, jax {jax.__version__}, "
          f"{args.model} n={args.n} {args.size}px, cache {args.cache or 'off'}", flush=True)
    module, variables = models.create(args.model, seed=0, num_classes=1000)
    x = jax.random.normal(jax.random.key(0), (args.n, args.size, args.size, 3), jnp.float32)
    forward = jax.jit(lambda v, x: module.apply(v, x))
    cold, warm = _timed(forward, variables, x, repeats=args.repeats)
    rows = [{"what": "forward", "cold_s": cold, "warm_s": warm}]
    print(f"forward only           cold {cold:8.2f} s  warm {warm:8.3f} s", flush=True)
    reference = None
    for solver in args.solvers:
        fn = jax.jit(lambda v, x, s=solver: affjax.signature_scores(module, v, x, solver=s))
        cold, warm = _timed(fn, variables, x, repeats=args.repeats)
        scores = np.asarray(fn(variables, x))
        reference = scores if reference is None else reference
        diff = float(np.max(np.abs(scores - reference)))
        rows.append({"what": f"signature {solver}", "cold_s": cold, "warm_s": warm,
                     "layers": int(scores.size), "max_diff": diff})
        print(f"signature {solver:12s} cold {cold:8.2f} s  warm {warm:8.3f} s  "
              f"{scores.size} layers, max |diff| to the first row {diff:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "size": args.size,
                       "backend": jax.default_backend(), "cache": args.cache, "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
