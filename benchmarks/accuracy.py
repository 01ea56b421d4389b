"""Numerical accuracy of ``affjax.affinity_score``, printed as Markdown tables.

Four parts, and a fifth on request:

a. float32 (and float64) error against the independent float64 NumPy/SciPy/POT reference
   (``tests/reference.py``) over the generated hard cases of ``tests/cases.py``: every kind,
   scales 1 and 10, both covariance estimators, shapes with ``n >= 2d`` and with ``d > n``.
   Both sides see the same inputs: the cases are rounded to float32 once, and the reference
   and float64 affjax run on those rounded values, so the error is that of the algorithm and
   not of the input rounding.
b. Bias of the entropic solver: ``solver="sinkhorn"`` minus the exact score (both float32),
   for a range of ``sinkhorn_epsilon``, with timings against the exact solver.
c. Rank-deficient inputs (kind ``low_rank``: x of rank 8) at scales 1, 10, 100, where the
   ridge sits many decades below the signal and float32 runs out of digits.
d. Finite-sample bias of the estimator itself: the score of coordinate-wise maps of
   ``N(0, I_d)`` (whose population score does not depend on d) against n and d.
e. (``--parts e``) Why the dense path takes an SVD: the float32 error of a variant with one
   ``eigh`` of the Gram matrix ``R^T C_x R`` instead, beside affjax's, on the part (a) shapes
   with ``n >= 2d``.

Usage (from the repository root)::

    python benchmarks/accuracy.py --quick          # about 5 minutes on 2 cores
    python benchmarks/accuracy.py                  # the default grid of docs/numerics.md
    python benchmarks/accuracy.py --parts a --shapes 64x2048,384x3072 --scales 1

The widest shapes are not in the default grid: the float64 reference is the slow part
(several dense ``d x d`` eigendecompositions per case, one to three minutes at d = 3072 on
two cores). ``--ref-cache FILE`` keeps the reference scores in a JSON file, so that a rerun
only recomputes affjax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cases import KINDS  # noqa: E402
from cases import make_case  # noqa: E402
from reference import affinity_score_reference  # noqa: E402

import affjax  # noqa: E402

COVS = ("empirical", "ledoit_wolf")
DEFAULT_SHAPES = "512x64,1024x256,2048x512,4096x1024,256x512,128x1024"
QUICK_SHAPES = "512x64,1024x256,256x512,128x1024"
WIDE_SHAPES = "64x2048,384x3072"  # reference: minutes per case; run with --shapes
SINKHORN_EPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
SINKHORN_SHAPES = ((256, 8), (512, 64), (1024, 256))
LOW_RANK_SHAPES = ((512, 64), (1024, 256), (256, 512), (128, 1024))
LOW_RANK_SCALES = (1.0, 10.0, 100.0)

F32_BUDGET = 1e-3  # n >= 2d: float32 should agree with the definition to this
F64_BUDGET = 1e-5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        n, d = item.lower().split("x")
        shapes.append((int(n), int(d)))
    return shapes


def fmt(v: float) -> str:
    if not np.isfinite(v):
        return "nan"
    return "0" if v == 0 else f"{v:.1e}"


def abs_err(a: float, b: float) -> float:
    return abs(a - b) if np.isfinite(a) and np.isfinite(b) else float("inf")


class RefCache:
    """Reference scores by case, optionally kept in a JSON file between runs."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict[str, float] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def score(self, key: str, x: np.ndarray, y: np.ndarray, covariance: str) -> float:
        if key not in self.data:
            out = affinity_score_reference(x, y, covariance=covariance, w2="lsa")
            self.data[key] = out["score"]
            if self.path:
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(self.data, f, indent=0, sort_keys=True)
                os.replace(tmp, self.path)
        return self.data[key]


def rounded_case(kind: str, n: int, d: int, scale: float, seed: int = 0):
    """The case rounded to float32 once: (float32 pair, the same values in float64)."""
    x, y = make_case(kind, n, d, seed=seed, scale=scale)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    return (x32, y32), (x32.astype(np.float64), y32.astype(np.float64))


def affjax_score(x: np.ndarray, y: np.ndarray, *, x64: bool, **kwargs) -> float:
    jax.config.update("jax_enable_x64", x64)
    try:
        out = affjax.affinity_score(x, y, **kwargs)
        expected = np.float64 if x64 else np.float32
        assert out.dtype == expected, (out.dtype, expected)
        return float(out)
    finally:
        jax.config.update("jax_enable_x64", False)


def path_name(n: int, d: int) -> str:
    return "span" if d > 2 * n else "dense"


# --- (a) float32 / float64 error against the reference ---------------------------------


def part_a(shapes, kinds, scales, refs: RefCache, detail: bool) -> list[dict]:
    rows, cases = [], []
    for n, d in shapes:
        t_ref = t32 = t64 = 0.0
        for cov in COVS:
            errs32, errs64 = [], []
            for kind in kinds:
                for scale in scales:
                    (x32, y32), (x64, y64) = rounded_case(kind, n, d, scale)
                    key = f"{kind}|{n}|{d}|{scale:g}|{cov}|0"
                    t = time.perf_counter()
                    ref = refs.score(key, x64, y64, cov)
                    t_ref += time.perf_counter() - t
                    t = time.perf_counter()
                    s32 = affjax_score(x32, y32, x64=False, covariance=cov)
                    t32 += time.perf_counter() - t
                    t = time.perf_counter()
                    s64 = affjax_score(x64, y64, x64=True, covariance=cov)
                    t64 += time.perf_counter() - t
                    e32, e64 = abs_err(s32, ref), abs_err(s64, ref)
                    errs32.append((e32, kind, scale))
                    errs64.append((e64, kind, scale))
                    cases.append(
                        dict(
                            n=n,
                            d=d,
                            cov=cov,
                            kind=kind,
                            scale=scale,
                            ref=ref,
                            f32=s32,
                            f64=s64,
                            err32=e32,
                            err64=e64,
                        )
                    )
            worst32 = max(errs32)
            worst64 = max(errs64)
            rows.append(
                dict(
                    n=n,
                    d=d,
                    cov=cov,
                    path=path_name(n, d),
                    cases=len(errs32),
                    max32=worst32[0],
                    median32=statistics.median(e for e, _, _ in errs32),
                    worst=f"{worst32[1]} x{worst32[2]:g}",
                    max64=worst64[0],
                    worst64=f"{worst64[1]} x{worst64[2]:g}",
                )
            )
        log(f"(a) {n}x{d}: reference {t_ref:.0f} s, affjax f32 {t32:.1f} s, f64 {t64:.1f} s")

    print("\n### (a) Error against the float64 reference\n")
    print("|error| of the score; max and median over kinds x scales; the worst case named.\n")
    print(
        "| n | d | covariance | path | cases | float32 max | float32 median | worst (f32) "
        "| float64 max | worst (f64) |"
    )
    print("|---:|---:|---|---|---:|---:|---:|---|---:|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['d']} | {r['cov']} | {r['path']} | {r['cases']} "
            f"| {fmt(r['max32'])} | {fmt(r['median32'])} | {r['worst']} "
            f"| {fmt(r['max64'])} | {r['worst64']} |"
        )

    flagged = [
        c
        for c in cases
        if (c["n"] >= 2 * c["d"] and not c["err32"] <= F32_BUDGET) or not c["err64"] <= F64_BUDGET
    ]
    if flagged:
        print(
            f"\nOver budget (float32 > {F32_BUDGET:g} with n >= 2d, or float64 > {F64_BUDGET:g}):\n"
        )
    if detail or flagged:
        if not flagged:
            print()
        print(
            "| n | d | covariance | kind | scale | reference | float32 | float64 "
            "| f32 err | f64 err |"
        )
        print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
        for c in cases if detail else flagged:
            print(
                f"| {c['n']} | {c['d']} | {c['cov']} | {c['kind']} | {c['scale']:g} "
                f"| {c['ref']:.6f} | {c['f32']:.6f} | {c['f64']:.6f} "
                f"| {fmt(c['err32'])} | {fmt(c['err64'])} |"
            )
    elif not flagged:
        print(
            f"\nNo case over budget (float32 <= {F32_BUDGET:g} wherever n >= 2d, "
            f"float64 <= {F64_BUDGET:g} everywhere)."
        )
    return cases


# --- (b) Sinkhorn bias --------------------------------------------------------------------


def timed(fn) -> tuple[float, float]:
    """(value, fastest seconds per call), after one untimed call that compiles.

    The fastest of up to 5 calls (fewer when calls are slow): the least disturbed by
    whatever else the machine runs.
    """
    value = float(fn())
    times = []
    while len(times) < 5 and sum(times) < 2.0:
        t = time.perf_counter()
        float(fn())
        times.append(time.perf_counter() - t)
    return value, min(times)


def part_b(shapes, seeds) -> list[dict]:
    rows = []
    for n, d in shapes:
        exact, t_exact = {}, []
        pairs = {}
        for kind in ("relu", "tanh"):
            for seed in seeds:
                (x, y), _ = rounded_case(kind, n, d, 1.0, seed)
                pairs[kind, seed] = (x, y)
                exact[kind, seed], t = timed(lambda x=x, y=y: affjax.affinity_score(x, y))
                t_exact.append(t)
        for eps in SINKHORN_EPS:
            bias, t_sink = [], []
            for (kind, seed), (x, y) in pairs.items():
                s, t = timed(
                    lambda x=x, y=y, eps=eps: affjax.affinity_score(
                        x, y, solver="sinkhorn", sinkhorn_epsilon=eps
                    )
                )
                bias.append(s - exact[kind, seed])
                t_sink.append(t)
            rows.append(
                dict(
                    n=n,
                    d=d,
                    eps=eps,
                    cases=len(bias),
                    mean=float(np.mean(bias)),
                    max=float(max(bias, key=abs)),
                    t_sink=statistics.median(t_sink),
                    t_exact=statistics.median(t_exact),
                )
            )
            log(f"(b) {n}x{d} eps={eps:g}: mean bias {rows[-1]['mean']:+.2e}")

    print("\n### (b) Sinkhorn bias\n")
    print(
        'score(solver="sinkhorn") - score(exact), float32, kinds relu and tanh, '
        f"seeds {list(seeds)}; times: seconds per call after compilation, median over the "
        "cases of the fastest of up to 5 calls.\n"
    )
    print("| n | d | epsilon | cases | mean bias | largest bias | sinkhorn s | exact s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']} | {r['d']} | {r['eps']:g} | {r['cases']} | {r['mean']:+.1e} "
            f"| {r['max']:+.1e} | {r['t_sink']:.3f} | {r['t_exact']:.3f} |"
        )
    return rows


# --- (c) rank-deficient inputs ------------------------------------------------------------


def part_c(shapes, refs: RefCache) -> list[dict]:
    rows = []
    for n, d in shapes:
        for scale in LOW_RANK_SCALES:
            for cov in COVS:
                (x32, y32), (x64, y64) = rounded_case("low_rank", n, d, scale)
                key = f"low_rank|{n}|{d}|{scale:g}|{cov}|0"
                ref = refs.score(key, x64, y64, cov)
                s32 = affjax_score(x32, y32, x64=False, covariance=cov)
                s64 = affjax_score(x64, y64, x64=True, covariance=cov)
                rows.append(
                    dict(
                        n=n,
                        d=d,
                        scale=scale,
                        cov=cov,
                        ref=ref,
                        f32=s32,
                        f64=s64,
                        err32=abs_err(s32, ref),
                        err64=abs_err(s64, ref),
                    )
                )
        log(f"(c) {n}x{d} done")

    print("\n### (c) Rank-deficient input (x of rank 8, y = relu(x))\n")
    print("The ridge (1e-6) sits about scale^2 * d / 1e-6 below the largest eigenvalue of C_x.\n")
    print("| n | d | scale | covariance | reference | float32 | f32 err | float64 | f64 err |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']} | {r['d']} | {r['scale']:g} | {r['cov']} | {r['ref']:.6f} "
            f"| {r['f32']:.6f} | {fmt(r['err32'])} | {r['f64']:.6f} | {fmt(r['err64'])} |"
        )
    return rows


# --- (d) estimator bias at small n / d ---------------------------------------------------


def part_d(dims, sizes, seeds) -> list[dict]:
    maps = {"relu": lambda x: np.maximum(x, 0), "square": np.square}
    rows = []
    for name, f in maps.items():
        for d in dims:
            for cov in COVS:
                scores = []
                for n in sizes:
                    s = []
                    for seed in seeds:
                        x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
                        s.append(float(affjax.affinity_score(x, f(x), covariance=cov)))
                    scores.append(float(np.mean(s)))
                rows.append(dict(map=name, d=d, cov=cov, scores=scores))
        log(f"(d) {name} done")

    print("\n### (d) Finite-sample bias of the score\n")
    print(
        "x ~ N(0, I_d), y = f(x) coordinate-wise, so the population score does not depend on "
        f"d; mean over seeds {list(seeds)}, float32.\n"
    )
    print("| f | d | covariance | " + " | ".join(f"n = {n}" for n in sizes) + " |")
    print("|---|---:|---|" + "---:|" * len(sizes))
    for r in rows:
        cells = " | ".join(f"{v:.3f}" for v in r["scores"])
        print(f"| {r['map']} | {r['d']} | {r['cov']} | {cells} |")
    return rows


# --- (e) the one-eigh variant that the dense path does not use ------------------------


@jax.jit
def gram_eigh_score(x, y):
    """The score with ``eigh`` of the Gram matrix ``R^T C_x R`` in place of the SVD of
    ``F_x R`` (empirical covariance, ridge 1e-6, scipy assignment): one eigendecomposition
    per score, as fast as a dense score can be, in the input dtype. Eigenvalues at or below
    ``k eps max`` (the rounding level of ``eigh``) count as zero. ``bench_score.py`` times it
    beside affjax at its dense headline cell.
    """
    from affjax import transport
    from affjax.covariance import covariance_parts

    cx, cy = covariance_parts(x, ridge=1e-6), covariance_parts(y, ridge=1e-6)
    k = x.shape[1]
    eye = jnp.eye(k, dtype=x.dtype)
    cov_x = cx.alpha * cx.centered.T @ cx.centered + cx.shift * eye
    # The same lower factor of C_y as affjax's: Cholesky, QR where Cholesky breaks down.
    f_y = jnp.concatenate([jnp.sqrt(cy.alpha) * cy.centered, jnp.sqrt(cy.shift) * eye])
    r = transport._lower_factor(f_y)
    w, v = jnp.linalg.eigh(r.T @ cov_x @ r)
    keep = w > k * jnp.finfo(x.dtype).eps * w[-1]
    inv_sqrt = (v * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0)) @ v.T
    a = r @ inv_sqrt @ r.T
    a = jnp.where(cy.trace() <= 2e-6 * k, 0.0, 0.5 * (a + a.T))
    mapped = cx.centered @ a
    perm = transport.optimal_permutation(mapped, cy.centered, solver="scipy")
    w2 = jnp.mean(jnp.sum((mapped - cy.centered[perm]) ** 2, axis=1))
    return 1.0 - jnp.sqrt(jnp.clip(w2 / (2.0 * cy.trace()), 0.0, 1.0))


def part_e(shapes, kinds, refs: RefCache) -> list[dict]:
    rows = []
    for n, d in shapes:
        for kind in kinds:
            for scale in (1.0, 10.0):
                (x32, y32), (x64, y64) = rounded_case(kind, n, d, scale)
                key = f"{kind}|{n}|{d}|{scale:g}|empirical|0"
                ref = refs.score(key, x64, y64, "empirical")
                svd = affjax_score(x32, y32, x64=False, path="dense")
                gram = float(gram_eigh_score(jnp.asarray(x32), jnp.asarray(y32)))
                rows.append(dict(n=n, d=d, kind=kind, scale=scale, ref=ref,
                                 err_svd=abs_err(svd, ref), err_gram=abs_err(gram, ref)))
        log(f"(e) {n}x{d} done")

    print("\n### (e) The one-eigh variant, float32\n")
    print("|error| against the float64 reference, empirical covariance: affjax (SVD of the factor")
    print("`F_x R`) and the variant with `eigh` of the Gram matrix `R^T C_x R` instead.\n")
    print("| n | d | kind | scale | reference | affjax err | eigh-of-Gram err |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['d']} | {r['kind']} | {r['scale']:g} | {r['ref']:.5f} "
              f"| {fmt(r['err_svd'])} | {fmt(r['err_gram'])} |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, a few minutes")
    p.add_argument(
        "--shapes",
        help=f"part (a) shapes as NxD,... (default {DEFAULT_SHAPES}; wide: {WIDE_SHAPES})",
    )
    p.add_argument("--kinds", help=f"part (a) kinds, comma-separated (default: all {KINDS})")
    p.add_argument("--scales", default="1,10", help="part (a) scales, comma-separated")
    p.add_argument("--parts", default="abcd",
                   help="which parts to run, e.g. 'a' or 'bc'; 'e' (the one-eigh variant, on "
                        "the shapes with n >= 2d) is not in the default")
    p.add_argument("--ref-cache", help="JSON file keeping reference scores between runs")
    p.add_argument("--detail", action="store_true", help="print every case of part (a)")
    p.add_argument("--json", help="write all results to this file")
    args = p.parse_args(argv)

    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kinds {sorted(unknown)}; expected some of {KINDS}")
    refs = RefCache(args.ref_cache)

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print("## affjax accuracy\n")
    print(
        f"- date: {time.strftime('%Y-%m-%d')}; jax {jax.__version__} on "
        f"{jax.default_backend()} ({cpu}, {os.cpu_count()} cores)"
    )
    print(f"- command: `{command.strip()}`")

    start = time.perf_counter()
    results = {}
    if "a" in args.parts:
        scales = tuple(float(v) for v in args.scales.split(","))
        results["a"] = part_a(shapes, kinds, scales, refs, args.detail)
    if "b" in args.parts:
        sh = SINKHORN_SHAPES[:2] if args.quick else SINKHORN_SHAPES
        results["b"] = part_b(sh, (0,) if args.quick else (0, 1))
    if "c" in args.parts:
        sh = LOW_RANK_SHAPES[::2] if args.quick else LOW_RANK_SHAPES
        results["c"] = part_c(sh, refs)
    if "d" in args.parts:
        sizes = (128, 512) if args.quick else (128, 512, 2048)
        results["d"] = part_d((2, 64, 256), sizes, (0,) if args.quick else (0, 1))
    if "e" in args.parts:
        sh = [(n, d) for n, d in shapes if n >= 2 * d]
        results["e"] = part_e(sh, ("relu", "tanh", "psd_affine", "dead_units"), refs)
    print(f"\nTotal time {time.perf_counter() - start:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
