"""Compile time against run time, per building block of the score, on the current backend.

On an H100 (jax 0.11.2) the first call of ``affinity_score`` at n=2048 took 19 s to compile
at d=512 and 5 s at d=64, against 0.3 s on a 2-core CPU; this script splits that time over
the pieces (eigh, SVD, QR, Cholesky, covariance, cost matrix, assignment, whole score) so
the cause can be found. Each row is compiled ahead of time, then called twice warm.

    python benchmarks/compile_times.py --n 2048 --d 64 512

On a GPU, XLA autotunes every new matrix-product shape (it compiles and times candidate
kernels); ``gpu_check.sh`` runs this script twice, the second time with
``XLA_FLAGS=--xla_gpu_autotune_level=0``, to measure that share. JAX's persistent
compilation cache (the ``affjax`` command turns it on) keeps both the executables and
the autotuning results across runs.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import affjax
from affjax import transport


def _pieces(n: int, d: int):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
    x = jnp.asarray(z @ w)
    y = jax.nn.relu(x)
    cov = x.T @ x / n
    return x, y, cov, {
        "eigh (d x d)": (jnp.linalg.eigh, (cov,)),
        "svd (n x d)": (lambda a: jnp.linalg.svd(a, full_matrices=False), (x,)),
        "qr (n x d)": (lambda a: jnp.linalg.qr(a, mode="r"), (x,)),
        "cholesky (d x d)": (jnp.linalg.cholesky, (cov + jnp.eye(d),)),
        "empirical_covariance": (affjax.empirical_covariance, (x,)),
        "psd_sqrt": (affjax.psd_sqrt, (cov,)),
        "cost matrix": (transport.squared_distances, (x, y)),
        "optimal_permutation scipy": (
            lambda a, b: affjax.optimal_permutation(a, b, solver="scipy"), (x, y)),
        "linear_assignment auction": (
            lambda a, b: affjax.linear_assignment(transport.squared_distances(a, b)), (x, y)),
        "affinity_score scipy": (
            lambda a, b: affjax.affinity_score(a, b, solver="scipy"), (x, y)),
        "affinity_score (auto)": (affjax.affinity_score, (x, y)),
        "affinity_score path=dense": (
            lambda a, b: affjax.affinity_score(a, b, path="dense"), (x, y)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--json", help="save the rows to this path")
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()} {jax.devices()}, jax {jax.__version__}")
    rows = []
    for d in args.d:
        *_, pieces = _pieces(args.n, d)
        for name, (fn, operands) in pieces.items():
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*operands).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(compiled(*operands))
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*operands))
            run_s = time.perf_counter() - t0
            rows.append({"n": args.n, "d": d, "piece": name, "compile_s": compile_s,
                         "run_s": run_s})
            print(f"n={args.n} d={d} {name:28s} compile {compile_s:7.3f} s  run {run_s:.4f} s",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
