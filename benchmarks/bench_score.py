"""Benchmark ``affjax.affinity_score`` against the published NumPy/SciPy/POT pipeline.

Run it from the repository root with OpenBLAS's CPU overrides unset (some machines set
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE``, which slow NumPy's OpenBLAS and would make the
baseline look worse than it is)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_score.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_score.py --quick
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_score.py \\
        --n 512 2048 --d 64 512 --repeats 5 --budget-seconds 30 --json out.json

(with ``PYTHONPATH=.`` if affjax is not installed).

What is timed, per cell ``(n, d)``:

* ``affjax``: ``affjax.affinity_score(x, y)`` in float32, jitted; one call to compile, then
  the median of ``--repeats`` calls, each ended by ``.block_until_ready()``.
* ``baseline``: the affinity score the published way, written out below in NumPy/SciPy/POT
  (float64 by default, ``--baseline-dtype``): ``np.cov + ridge I``; ``C_y^1/2`` by
  ``np.linalg.eigh``; the inner matrix ``C_y^1/2 C_x C_y^1/2`` and its pseudo-inverse square
  root by a second ``np.linalg.eigh``; ``A``; the cost matrix ``ot.dist``; the exact W2 by
  ``scipy.optimize.linear_sum_assignment`` on it (the same optimum as ``ot.emd2`` for uniform
  weights of equal size, which is also timed for ``n <= --emd-max-n``);
  ``1 - sqrt(W2^2 / (2 tr C_y))``. Its time is split into covariance, eigh (both
  decompositions), dense (the other d x d products and the map), cost matrix and assignment.
* ``floor``: a naive lower bound on any pipeline of the published shape, in float32 NumPy:
  two ``np.linalg.eigh`` of d x d (on ``C_y`` and on the inner matrix) + the n x n cost matrix
  + ``linear_sum_assignment`` on it.

Data (fixed seed): ``x = z @ W / sqrt(d) + bias`` with ``z``, ``W`` standard normal (correlated
features) and ``bias ~ N(0, 0.5^2)``, ``y = relu(x)``, generated in float32; the baseline
casts to its dtype. ``|diff|`` is ``|score_affjax - score_baseline|``.

Budget: a baseline or floor cell whose estimated time (scaled from cells already measured:
eigendecompositions as d^3, cost matrices as n^2 d, ...) exceeds ``--budget-seconds`` is
skipped and printed as "skipped (budget)"; repeats of any measurement stop once their total
would exceed the budget (at least one warm timed run is always made for affjax, after it is
compiled ahead of time; when that one call exceeds the budget it is not repeated, marked ``*``).
The ``compile`` column is affjax's compile time for the cell's shape, apart from the timings.

Two headline ratios are printed at the end:

* n=2048, d=512: affjax time / naive floor (target <= 0.8), followed by the one-eigh bound:
  one float32 ``eigh`` + the Gram products ``x^T x``, ``y^T y`` + the cost matrix + the
  assignment, i.e. the least that any exact pipeline with one eigendecomposition per score
  still does, timed in NumPy, and its ratio to the floor; and the one-eigh variant of
  ``benchmarks/accuracy.py`` (part e: affjax with ``eigh`` of the Gram matrix in place of the
  SVD, too inaccurate in float32) timed in JAX, the same way as affjax;
* n=384, d=3072: affjax time / time of two float32 ``np.linalg.eigh`` of d x d (target <= 0.05),
  on the two matrices the published pipeline decomposes, and on a generic dense SPD matrix.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import ot
import scipy
import scipy.optimize

import affjax

FULL_N = (512, 2048, 8192)
FULL_D = (1, 64, 512, 2048, 4096)
QUICK_N = (256, 512)
QUICK_D = (1, 16, 128)
RIDGE = 1e-6
HEADLINE_FLOOR = (2048, 512, 0.8)
HEADLINE_EIGH = (384, 3072, 0.05)
BLAS_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# Scaling exponents (in n, in d) used to estimate a stage's time from a measured cell.
MIN_EXTRAPOLATED_SECONDS = 1e-3
EXPONENTS = {
    "cov": (1.0, 2.0),
    "eigh": (0.0, 3.0),
    "dense": (0.0, 3.0),
    "cost": (2.0, 1.0),
    "assign": (2.5, 0.0),
    "emd2": (3.0, 0.0),
}


# --- machine description -------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "fma", "avx512f")
                    return " ".join(w for w in wanted if w in flags) or "-"
    except OSError:
        pass
    return "?"


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _blas_info() -> list[str]:
    try:
        import threadpoolctl
    except ImportError:
        return ["threadpoolctl not installed: BLAS libraries unknown"]
    out = []
    for info in threadpoolctl.threadpool_info():
        if info.get("user_api") != "blas":
            continue
        path = info.get("filepath", "?")
        lib = os.path.basename(path)
        owner = os.path.basename(os.path.dirname(path)).removesuffix(".libs")
        if owner == "scipy":
            owner = "scipy, also jax's CPU LAPACK"
        out.append(
            f"{info.get('internal_api')} {info.get('version')} ({owner}: {lib}), "
            f"arch {info.get('architecture', '?')}, {info.get('num_threads')} threads"
        )
    return out or ["no BLAS library found by threadpoolctl"]


def machine_description() -> dict:
    # A tiny linalg call on each side loads every BLAS/LAPACK library before we look.
    np.linalg.eigh(np.eye(2))
    scipy.linalg.eigh(np.eye(2))
    jnp.linalg.svd(jnp.eye(2))[1].block_until_ready()
    try:
        cores_avail = len(os.sched_getaffinity(0))
    except AttributeError:
        cores_avail = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_available": cores_avail,
        "mem_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(getattr(jax, "lib", None), "__version__", None) or _pkg_version("jaxlib"),
        "backend": jax.default_backend(),
        "devices": [str(dv) for dv in jax.devices()],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pot": ot.__version__,
        "affjax": getattr(affjax, "__version__", "?"),
        "blas": _blas_info(),
        "blas_env": {k: os.environ[k] for k in BLAS_ENV_VARS if k in os.environ},
        "thread_env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
            if k in os.environ
        },
    }


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def print_machine(info: dict) -> None:
    mem = f", {info['mem_gib']:.0f} GiB RAM" if info["mem_gib"] else ""
    print(
        f"Machine: {info['cpu']} ({info['cpu_flags']}), {info['cores']} cores "
        f"({info['cores_available']} available){mem}"
    )
    print(
        f"Software: Python {info['python']}, jax {info['jax']} (jaxlib {info['jaxlib']}), "
        f"backend {info['backend']} {info['devices']}, numpy {info['numpy']}, "
        f"scipy {info['scipy']}, POT {info['pot']}, affjax {info['affjax']}"
    )
    for line in info["blas"]:
        print(f"BLAS: {line}")
    if info["thread_env"]:
        print(f"Thread settings: {info['thread_env']}")
    if info["blas_env"]:
        print(
            f"WARNING: {info['blas_env']} set: NumPy's OpenBLAS is slowed by these; for a fair "
            "baseline run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python "
            "benchmarks/bench_score.py`"
        )


# --- background load ------------------------------------------------------------------------


class CpuMonitor:
    """CPU time used by *other* processes while a block runs, in cores (0 = machine idle)."""

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.busy0, self.own0, self.t0 = self._busy_seconds(), _own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy1, own1, t1 = self._busy_seconds(), _own_cpu(), time.perf_counter()
        if self.busy0 is None or busy1 is None or t1 <= self.t0:
            self.other_cores = None
        else:
            other = (busy1 - self.busy0) - (own1 - self.own0)
            self.other_cores = max(other, 0.0) / (t1 - self.t0)
        return False


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def wait_for_idle(max_wait: float, threshold: float = 0.3) -> tuple[float, float | None]:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` cores.

    Returns ``(seconds waited, background cores in the last 1 s sample)``.
    """
    if max_wait <= 0:
        return 0.0, None
    t0 = time.perf_counter()
    while True:
        with CpuMonitor() as mon:
            time.sleep(1.0)
        waited = time.perf_counter() - t0
        if mon.other_cores is None or mon.other_cores < threshold or waited >= max_wait:
            return waited, mon.other_cores


# --- timing helpers -------------------------------------------------------------------------


def _settle() -> None:
    # Let the BLAS thread pools of the previous phase stop spinning before the next one.
    gc.collect()
    time.sleep(0.2)


def time_repeats(fn: Callable[[], object], repeats: int, budget: float) -> tuple[list, object]:
    """Run ``fn`` at least once, up to ``repeats`` times, while the total stays in ``budget``."""
    times: list[float] = []
    out = None
    while len(times) < repeats:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if sum(times) + times[-1] > budget:
            break
    return times, out


class Stages:
    """Accumulates wall time per named stage."""

    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


# --- data -----------------------------------------------------------------------------------


def make_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated Gaussian pre-activations and their ReLU, float32, reproducible per cell."""
    rng = np.random.default_rng([seed, n, d])
    w = rng.standard_normal((d, d), dtype=np.float32)
    bias = 0.5 * rng.standard_normal(d, dtype=np.float32)
    x = rng.standard_normal((n, d), dtype=np.float32) @ w
    x *= np.float32(1.0 / math.sqrt(d))
    x += bias
    return x, np.maximum(x, np.float32(0.0))


# --- the published pipeline in NumPy/SciPy/POT -----------------------------------------------


def published_score(
    x: np.ndarray,
    y: np.ndarray,
    *,
    stages: Stages,
    ridge: float = RIDGE,
    emd2: bool = False,
    assignment: str = "lsa",
) -> dict:
    """Affinity score, the published way (METHOD.md section 1), timed stage by stage.

    ``assignment="lsa"``: the exact W2 by ``linear_sum_assignment`` (stage ``assign``);
    ``"emd2"``: by POT's exact linear program, as the published pipeline solved it (stage
    ``emd2``). ``emd2=True`` times ``ot.emd2`` in addition to the assignment.
    """
    n, d = x.shape
    dtype = x.dtype
    eye = np.eye(d, dtype=dtype)
    with stages("cov"):
        mx, my = x.mean(axis=0), y.mean(axis=0)
        cx = np.atleast_2d(np.cov(x, rowvar=False)).astype(dtype, copy=False) + ridge * eye
        cy = np.atleast_2d(np.cov(y, rowvar=False)).astype(dtype, copy=False) + ridge * eye
        tr_cy = float(np.trace(cy))
    dead = tr_cy <= 2.0 * ridge * d
    with stages("eigh"):
        wy, vy = np.linalg.eigh(cy)
    with stages("dense"):
        cy_half = (vy * np.sqrt(np.clip(wy, 0.0, None))) @ vy.T
        inner = cy_half @ cx @ cy_half
        inner = 0.5 * (inner + inner.T)
    with stages("eigh"):
        wi, vi = np.linalg.eigh(inner)
    with stages("dense"):
        # Pseudo-inverse of (inner)^1/2: singular values at or below d * eps * max count as 0.
        s = np.sqrt(np.clip(wi, 0.0, None))
        keep = s > d * np.finfo(dtype).eps * s.max()
        inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0).astype(dtype)
        a = cy_half @ ((vi * inv) @ vi.T) @ cy_half
        a = 0.5 * (a + a.T)
        if dead:
            a = np.zeros_like(a)
        tx = (x - mx) @ a + my
    with stages("cost"):
        cost = ot.dist(tx, y, metric="sqeuclidean")
    if assignment == "emd2":
        w = np.full(n, 1.0 / n)
        with stages("emd2"):
            w2_sq = float(ot.emd2(w, w, cost.astype(np.float64), numItermax=10**7))
        emd2 = False
    else:
        with stages("assign"):
            rows, cols = scipy.optimize.linear_sum_assignment(cost)
            w2_sq = float(cost[rows, cols].sum()) / n
    out = {"score": 1.0 - math.sqrt(max(w2_sq, 0.0) / (2.0 * tr_cy)), "w2_sq": w2_sq}
    if emd2:
        w = np.full(n, 1.0 / n)
        with stages("emd2"):
            out["w2_sq_emd2"] = float(ot.emd2(w, w, cost.astype(np.float64), numItermax=10**7))
    out["_floor_inputs"] = (cy, inner, tx)
    return out


def floor_times(
    cy: np.ndarray,
    second: np.ndarray,
    tx: np.ndarray,
    y: np.ndarray,
    repeats: int,
    budget: float,
    x: np.ndarray | None = None,
) -> dict:
    """Naive floor in float32: two d x d eigh + the n x n cost matrix + the assignment.

    ``cy`` and ``second`` are the matrices to decompose (``C_y`` and the inner matrix),
    ``tx`` the mapped samples ``T(x_i)``; all are cast to float32.

    With ``x``, also the one-eigh bound: what any exact pipeline with a single d x d
    eigendecomposition still has to do, at NumPy's speed: one ``eigh``, the two Gram
    products ``x^T x`` and ``y^T y`` behind the covariances, the cost matrix and the
    assignment (keys ``eigh1``, ``gram``, ``one_eigh_bound``).
    """
    cy, second = cy.astype(np.float32), second.astype(np.float32)
    tx, y32 = tx.astype(np.float32), y.astype(np.float32)
    out: dict[str, float] = {}
    _settle()
    t, _ = time_repeats(lambda: (np.linalg.eigh(cy), np.linalg.eigh(second)), repeats, budget)
    out["eigh"] = statistics.median(t)
    if x is not None:
        xc = x.astype(np.float32) - x.astype(np.float32).mean(axis=0)
        yc = y32 - y32.mean(axis=0)
        _settle()
        t, _ = time_repeats(lambda: np.linalg.eigh(second), repeats, budget)
        out["eigh1"] = statistics.median(t)
        _settle()
        t, _ = time_repeats(lambda: (xc.T @ xc, yc.T @ yc), repeats, budget)
        out["gram"] = statistics.median(t)
    _settle()
    t, cost = time_repeats(lambda: ot.dist(tx, y32, metric="sqeuclidean"), repeats, budget)
    out["cost"] = statistics.median(t)
    _settle()
    t, _ = time_repeats(lambda: scipy.optimize.linear_sum_assignment(cost), repeats, budget)
    out["assign"] = statistics.median(t)
    out["total"] = out["eigh"] + out["cost"] + out["assign"]
    if x is not None:
        out["one_eigh_bound"] = out["eigh1"] + out["gram"] + out["cost"] + out["assign"]
    return out


# --- budget estimation ----------------------------------------------------------------------


class Estimator:
    """Estimates stage times of a new cell from the nearest measured cell."""

    def __init__(self):
        self.samples: dict[str, list[tuple[int, int, float]]] = {}

    def add(self, n: int, d: int, stage_times: dict[str, float]) -> None:
        for k, v in stage_times.items():
            self.samples.setdefault(k, []).append((n, d, v))

    def stage(self, name: str, n: int, d: int) -> float:
        # Times under a millisecond are mostly call overhead, and scaling them by d^3 (from
        # d = 1 to 64, say) predicted minutes for cells that take a second, more so on a
        # busy machine: such cells were skipped. They are not extrapolated from.
        rows = [r for r in self.samples.get(name, []) if r[2] >= MIN_EXTRAPOLATED_SECONDS]
        if not rows:
            return 0.0
        en, ed = EXPONENTS.get(name, (1.0, 1.0))

        def distance(r):
            # Nearest in the sizes the stage depends on; the other size only breaks ties.
            dn, dd = abs(math.log(n / r[0])), abs(math.log(d / r[1]))
            return (dn if en else 0.01 * dn) + (dd if ed else 0.01 * dd)

        n0, d0, t0 = min(rows, key=lambda r: (distance(r), -r[2]))
        return t0 * (n / n0) ** en * (d / d0) ** ed

    def total(self, stages: Sequence[str], n: int, d: int) -> float:
        return sum(self.stage(s, n, d) for s in stages)


# --- affjax ---------------------------------------------------------------------------------


def time_affjax(
    x: np.ndarray, y: np.ndarray, repeats: int, budget: float, score_fn=None
) -> dict:
    """``affjax.affinity_score`` (or ``score_fn``, same signature), float32, jitted, warm.

    Compiled ahead of the timed calls, and the compile time kept apart: on a GPU, XLA's
    compile (autotuning included) took 5-26 s for one shape, far more than the call itself.
    """
    score_fn = score_fn or affjax.affinity_score
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    jax.block_until_ready((xj, yj))
    t0 = time.perf_counter()
    compiled = jax.jit(score_fn).lower(xj, yj).compile()
    compile_s = time.perf_counter() - t0
    _settle()
    t0 = time.perf_counter()
    score = compiled(xj, yj).block_until_ready()
    first = time.perf_counter() - t0
    if first > budget:
        # One warm call already exceeds the budget: report it rather than repeat it.
        return {"compile": compile_s, "first": first, "times": [first], "median": first,
                "score": float(score), "warm": True, "repeated": False}
    _settle()
    times, _ = time_repeats(lambda: compiled(xj, yj).block_until_ready(), repeats, budget)
    return {
        "compile": compile_s,
        "first": first,
        "times": times,
        "median": statistics.median(times),
        "score": float(score),
        "warm": True,
        "repeated": True,
    }


def affjax_breakdown(x: np.ndarray, y: np.ndarray, repeats: int) -> dict[str, float]:
    """Times of the sub-steps of affjax's score, each jitted on its own.

    Re-traces the steps of ``affjax/score.py`` (empirical covariance, scipy assignment) with
    affjax's own building blocks; indicative only, fusion across steps is lost.
    """
    from affjax import transport
    from affjax.covariance import covariance_parts

    n, d = x.shape
    span = d > 2 * n
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    @jax.jit
    def centre(x, y):
        cx, cy = covariance_parts(x, ridge=RIDGE), covariance_parts(y, ridge=RIDGE)
        return cx.centered, cy.centered, cx.alpha, cx.shift, cy.alpha, cy.shift

    @jax.jit
    def basis_qr(xc, yc):
        # The score reads the coordinates off R; the basis Q itself is never formed.
        r = jnp.linalg.qr(jnp.concatenate([xc, yc], axis=0).T, mode="r")
        n = xc.shape[0]
        return r[:, :n].T, r[:, n:].T

    @jax.jit
    def factors(a, b, ax, sx, ay, sy):
        eye = jnp.eye(a.shape[1], dtype=a.dtype)
        fx = jnp.concatenate([jnp.sqrt(ax) * a, jnp.sqrt(sx) * eye])
        fy = jnp.concatenate([jnp.sqrt(ay) * b, jnp.sqrt(sy) * eye])
        return fx, fy

    @jax.jit
    def qr_r(f):
        return jnp.linalg.qr(f, mode="r")

    @jax.jit
    def lower_factor(f):
        return transport._lower_factor(f)

    @jax.jit
    def fx_r(fx, r):
        return fx @ r

    @jax.jit
    def svd(m):
        return jnp.linalg.svd(m, full_matrices=False)

    @jax.jit
    def bures(fx, fy):
        return transport.bures_from_factors(fx, fy)[0]

    @jax.jit
    def mapped(a, a_k):
        return a @ a_k

    @jax.jit
    def cost(m, b):
        return transport.squared_distances(m, b)

    @jax.jit
    def perm(m, b):
        return transport.optimal_permutation(m, b, solver="scipy")

    def t(fn, *args):
        jax.block_until_ready(fn(*args))
        _settle()
        ts, out = time_repeats(lambda: jax.block_until_ready(fn(*args)), repeats, 60.0)
        return statistics.median(ts), out

    res: dict[str, float] = {}
    res["centre"], (xc, yc, ax, sx, ay, sy) = t(centre, xj, yj)
    if span:
        res["span QR (d x 2n), R only: the coordinates"], (a, b) = t(basis_qr, xc, yc)
    else:
        a, b = xc, yc
    res["factors"], (fx, fy) = t(factors, a, b, ax, sx, ay, sy)
    res["lower factor R of C_y (Cholesky; QR where it fails)"], r = t(lower_factor, fy)
    res["F_x R"], g = t(fx_r, fx, r)
    if g.shape[0] > g.shape[1]:
        res["QR(F_x R)"], g = t(qr_r, g)
    res["SVD (k x k)"], _ = t(svd, g)
    res["bures_from_factors (all of the above from R)"], a_k = t(bures, fx, fy)
    res["map a @ A"], m = t(mapped, a, a_k)
    if d == 1:
        return res
    res["cost matrix (jit)"], c = t(cost, m, b)
    c_np = np.asarray(c)
    _settle()
    ts, _ = time_repeats(lambda: scipy.optimize.linear_sum_assignment(c_np), repeats, 60.0)
    res["linear_sum_assignment (host, float32 cost)"] = statistics.median(ts)
    res["optimal_permutation (cost + callback, jit)"], _ = t(perm, m, b)
    return res


def _floor_inputs_without_baseline(x: np.ndarray, y: np.ndarray):
    eye = np.eye(x.shape[1], dtype=np.float32)
    cx = np.atleast_2d(np.cov(x, rowvar=False)).astype(np.float32) + np.float32(RIDGE) * eye
    cy = np.atleast_2d(np.cov(y, rowvar=False)).astype(np.float32) + np.float32(RIDGE) * eye
    r = affjax.affinity(jnp.asarray(x), jnp.asarray(y))
    tx = np.asarray(jnp.asarray(x) @ r.A + r.b)
    return cy, cx, tx


# --- one cell -------------------------------------------------------------------------------


def run_cell(n: int, d: int, args, est_base: Estimator, est_floor: Estimator) -> dict:
    x32, y32 = make_data(n, d, args.seed)
    cell: dict = {"n": n, "d": d}
    allowance = min(args.wait_idle, max(args.wait_idle_total - args.waited_total, 0.0))
    waited, bg = wait_for_idle(allowance)
    args.waited_total += waited
    if waited > 1.5:
        tail = "" if bg is None else f", background {bg:.1f} cores"
        print(f"  (waited {waited:.0f} s for an idle machine{tail})", flush=True)
    cell["waited_for_idle_s"] = waited
    with CpuMonitor() as mon:
        af = time_affjax(x32, y32, args.repeats, args.budget_seconds)
        cell["affjax"] = af
        if (n, d) == HEADLINE_FLOOR[:2]:
            # The one-eigh variant (benchmarks/accuracy.py part e): affjax with eigh of the
            # Gram matrix in place of the SVD. Too inaccurate in float32; timed to show what
            # one decomposition per score buys in JAX on this machine.
            from accuracy import gram_eigh_score

            cell["one_eigh_variant"] = time_affjax(
                x32, y32, args.repeats, args.budget_seconds, score_fn=gram_eigh_score)

        base_stages = ["cov", "eigh", "dense", "cost", "assign"]
        with_emd = n <= args.emd_max_n
        estimate = est_base.total(base_stages + (["emd2"] if with_emd else []), n, d)
        cell["baseline_estimate"] = estimate
        floor_inputs = None
        if estimate > args.budget_seconds:
            cell["baseline"] = None
        else:
            bdt = np.dtype(args.baseline_dtype)
            xb, yb = x32.astype(bdt), y32.astype(bdt)
            runs = []
            total = 0.0
            while len(runs) < args.repeats:
                _settle()
                st = Stages()
                t0 = time.perf_counter()
                res = published_score(xb, yb, stages=st, emd2=with_emd and not runs)
                wall = time.perf_counter() - t0 - st.t.get("emd2", 0.0)
                inputs = res.pop("_floor_inputs")
                if not runs:
                    floor_inputs = inputs
                del inputs
                runs.append((wall, st.t, res))
                total += wall
                if total + wall > args.budget_seconds:
                    break
            del xb, yb
            walls = [r[0] for r in runs]
            stage_med = {k: statistics.median(r[1][k] for r in runs) for k in base_stages}
            first = runs[0]
            cell["baseline"] = {
                "times": walls,
                "median": statistics.median(walls),
                "stages": stage_med,
                "score": first[2]["score"],
                "w2_sq": first[2]["w2_sq"],
            }
            if "emd2" in first[1]:
                stage_med["emd2"] = first[1]["emd2"]
                cell["baseline"]["emd2"] = first[1]["emd2"]
                diff = abs(first[2]["w2_sq_emd2"] - first[2]["w2_sq"])
                cell["baseline"]["emd2_w2_sq_diff"] = diff
            est_base.add(n, d, stage_med)

        floor_estimate = est_floor.total(["eigh", "cost", "assign"], n, d)
        cell["floor_estimate"] = floor_estimate
        if floor_estimate > args.budget_seconds:
            cell["floor"] = None
        else:
            if floor_inputs is None:
                # Baseline skipped: C_x stands in for the inner matrix (an eigh of the same
                # size), affjax's map gives T(x_i).
                floor_inputs = _floor_inputs_without_baseline(x32, y32)
                cell["floor_second_eigh"] = "C_x"
            else:
                cell["floor_second_eigh"] = "inner"
            cell["floor"] = floor_times(
                *floor_inputs, y32, args.repeats, args.budget_seconds,
                x=x32 if (n, d) == HEADLINE_FLOOR[:2] else None,
            )
            del floor_inputs
            est_floor.add(n, d, {k: cell["floor"][k] for k in ("eigh", "cost", "assign")})
    cell["other_cores"] = mon.other_cores
    return cell


# --- reporting ------------------------------------------------------------------------------


def fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 100:
        return f"{t:.0f}"
    if t >= 1:
        return f"{t:.2f}"
    return f"{t:.3g}"


def fmt_r(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "-"
    return f"{r:.3g}"


SKIP = "skipped (budget)"


def cell_row(c: dict) -> list[str]:
    af, base, fl = c["affjax"], c["baseline"], c["floor"]
    star = "" if af.get("repeated", True) else "*"
    row = [str(c["n"]), str(c["d"]), fmt_t(af["median"]) + star, fmt_t(af.get("compile"))]
    if base is None:
        row += [SKIP, "-"]
    else:
        row += [fmt_t(base["median"]), fmt_r(base["median"] / af["median"]) + "x"]
    if fl is None:
        row += [SKIP, "-"]
    else:
        row += [fmt_t(fl["total"]), fmt_r(af["median"] / fl["total"])]
    if base is None:
        row += ["-"] * 6
    else:
        s = base["stages"]
        row += [fmt_t(s[k]) for k in ("cov", "eigh", "dense", "cost", "assign")]
        row.append(fmt_t(base.get("emd2")))
    row.append(f"{af['score']:.4f}")
    row.append("-" if base is None else f"{abs(af['score'] - base['score']):.1e}")
    oc = c.get("other_cores")
    row.append("-" if oc is None else f"{oc:.1f}")
    return row


HEADER = [
    "n",
    "d",
    "affjax (s)",
    "compile (s)",
    "baseline (s)",
    "speed-up",
    "floor (s)",
    "affjax / floor",
    "b: cov",
    "b: eigh x2",
    "b: dense",
    "b: cost",
    "b: assign",
    "ot.emd2",
    "score",
    "|diff|",
    "bg cores",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def headline_eigh(args) -> dict:
    n, d, _ = HEADLINE_EIGH
    x32, y32 = make_data(n, d, args.seed)
    af = time_affjax(x32, y32, args.repeats, args.budget_seconds)
    res = published_score(x32, y32, stages=Stages())
    cy, inner, _ = res.pop("_floor_inputs")
    del res
    _settle()
    t_pub, _ = time_repeats(
        lambda: (np.linalg.eigh(cy), np.linalg.eigh(inner)), args.repeats, args.budget_seconds
    )
    rng = np.random.default_rng(args.seed)
    g = rng.standard_normal((d, d), dtype=np.float32)
    g = g @ g.T / np.float32(d)
    _settle()
    t_gen, _ = time_repeats(
        lambda: (np.linalg.eigh(g), np.linalg.eigh(g)), args.repeats, args.budget_seconds
    )
    return {
        "n": n,
        "d": d,
        "affjax": af,
        "eigh2_pipeline": statistics.median(t_pub),
        "eigh2_dense_spd": statistics.median(t_gen),
    }


def print_headlines(cells: list[dict], hl_eigh: dict | None) -> dict:
    out = {}
    n, d, target = HEADLINE_FLOOR
    c = next((c for c in cells if c["n"] == n and c["d"] == d), None)
    if c is not None and c["floor"] is not None:
        ratio = c["affjax"]["median"] / c["floor"]["total"]
        ok = "MET" if ratio <= target else f"MISSED by {ratio / target:.2f}x"
        print(
            f"HEADLINE n={n}, d={d}: affjax {fmt_t(c['affjax']['median'])} s / naive floor "
            f"{fmt_t(c['floor']['total'])} s = {ratio:.3f} (target <= {target}): {ok}"
        )
        out["floor"] = {"n": n, "d": d, "ratio": ratio, "target": target}
        bound = c["floor"].get("one_eigh_bound")
        if bound is not None:
            fl = c["floor"]
            print(
                f"  one-eigh bound (one float32 eigh {fmt_t(fl['eigh1'])} + Gram products "
                f"x^T x, y^T y {fmt_t(fl['gram'])} + cost {fmt_t(fl['cost'])} + assignment "
                f"{fmt_t(fl['assign'])}) = {fmt_t(bound)} s = "
                f"{bound / fl['total']:.3f} x floor: the least any exact one-eigh pipeline "
                f"does, at NumPy's speed"
            )
            out["floor"]["one_eigh_bound_ratio"] = bound / fl["total"]
        variant = c.get("one_eigh_variant")
        if variant is not None:
            v = variant["median"]
            print(
                f"  one-eigh variant in JAX (accuracy.py part e: eigh of the Gram matrix, "
                f"float32 errors up to 2e-2): {fmt_t(v)} s = {v / c['floor']['total']:.3f} x "
                f"floor, {v / c['affjax']['median']:.2f} x affjax"
            )
            out["floor"]["one_eigh_variant_ratio"] = v / c["floor"]["total"]
    if hl_eigh is not None:
        n, d, target = HEADLINE_EIGH
        af = hl_eigh["affjax"]["median"]
        ratio = af / hl_eigh["eigh2_pipeline"]
        ratio_gen = af / hl_eigh["eigh2_dense_spd"]
        ok = "MET" if ratio <= target else f"MISSED by {ratio / target:.2f}x"
        print(
            f"HEADLINE n={n}, d={d}: affjax {fmt_t(af)} s / two float32 np.linalg.eigh "
            f"{fmt_t(hl_eigh['eigh2_pipeline'])} s = {ratio:.4f} (target <= {target}): {ok} "
            f"[vs a generic dense SPD matrix: {fmt_t(hl_eigh['eigh2_dense_spd'])} s, "
            f"ratio {ratio_gen:.4f}]"
        )
        out["eigh"] = {
            "n": n,
            "d": d,
            "ratio": ratio,
            "ratio_dense_spd": ratio_gen,
            "target": target,
        }
    return out


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items() if not k.startswith("_")}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return o


def write_json(path: str, **fields) -> None:
    """Write the run's numbers to ``path`` (parents created), replacing it atomically.

    Keys: ``machine``, ``args``, ``cells`` (one dict per grid cell, as ``run_cell`` returns
    them: ``n``, ``d``, ``affjax`` / ``baseline`` / ``floor`` timings in seconds, ``None``
    when skipped), ``complete`` (false while the grid runs), and at the end ``headlines``,
    ``headline_eigh``, ``breakdowns``, ``elapsed_s``.
    """
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(fields), f, indent=1)
    os.replace(tmp, target)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help=f"default {FULL_N}")
    p.add_argument("--d", type=int, nargs="+", default=None, help=f"default {FULL_D}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=60.0,
        help="skip a baseline/floor cell estimated to take longer; cap repeats",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: n in {QUICK_N}, d in {QUICK_D}, 2 repeats, no idle wait",
    )
    p.add_argument("--baseline-dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--emd-max-n", type=int, default=512, help="also time ot.emd2 for n up to this")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        help="before each cell, wait up to this many seconds for other processes to go "
        "quiet (default 20, 0 with --quick)",
    )
    p.add_argument(
        "--wait-idle-total",
        type=float,
        default=120.0,
        help="at most this many seconds of such waiting in the whole run",
    )
    p.add_argument("--no-headlines", action="store_true", help="skip the headline cells")
    p.add_argument(
        "--breakdown", action="store_true", help="time affjax's sub-steps at the headline cells"
    )
    p.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="limit every BLAS library (both sides) to this many threads",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        type=str,
        default=None,
        metavar="PATH",
        help="write the raw numbers here as JSON (folders created), rewritten after every cell "
        "so that an interrupted run keeps what it measured; 'complete' is true at the end",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n = args.n or list(QUICK_N)
        args.d = args.d or list(QUICK_D)
        args.repeats = min(args.repeats, 2)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 20.0
    args.waited_total = 0.0
    args.n = args.n or list(FULL_N)
    args.d = args.d or list(FULL_D)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.blas_threads is not None:
        import threadpoolctl

        threadpoolctl.threadpool_limits(limits=args.blas_threads, user_api="blas")
    warnings.filterwarnings("ignore", module="ot")
    t_start = time.perf_counter()
    info = machine_description()
    print_machine(info)
    if args.json:
        # Fail now, not after a 25-minute grid, if the file cannot be written.
        write_json(args.json, machine=info, args=vars(args), cells=[], complete=False)
    print(
        f"Grid: n {args.n} x d {args.d}, repeats {args.repeats}, budget "
        f"{args.budget_seconds:g} s, baseline {args.baseline_dtype}, seed {args.seed}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(flush=True)

    est_base, est_floor = Estimator(), Estimator()
    cells = []
    for d in sorted(args.d):
        for n in sorted(args.n):
            c = run_cell(n, d, args, est_base, est_floor)
            cells.append(c)
            pairs = zip(HEADER, cell_row(c), strict=True)
            print(" ".join(f"{h}={v}" for h, v in pairs), flush=True)
            if args.json:
                write_json(args.json, machine=info, args=vars(args), cells=cells, complete=False)

    cells.sort(key=lambda c: (c["n"], c["d"]))
    print()
    print(
        f"Affinity score, affjax (float32, jit, {info['backend']}) vs the published "
        f"NumPy/SciPy/POT pipeline ({args.baseline_dtype}); median of up to {args.repeats} "
        "runs, seconds."
    )
    print()
    print(markdown_table(HEADER, [cell_row(c) for c in cells]))
    print()
    print(
        "b: = baseline stages (cov = np.cov x2; eigh x2 = the two np.linalg.eigh; dense = "
        "other d x d products and the map; cost = ot.dist; assign = "
        "linear_sum_assignment). floor = float32 eigh x2 + cost matrix + assignment. "
        "ot.emd2 = POT's exact LP on the same cost (same optimum). |diff| = |score_affjax - "
        "score_baseline|. bg cores = CPU used by other processes during the cell. "
        "compile = affjax's compile time for the shape (not in its timing). * = one warm call, "
        "over the budget, so not repeated."
    )
    for c in cells:
        b = c["baseline"]
        if b and "emd2_w2_sq_diff" in b:
            print(
                f"  n={c['n']}, d={c['d']}: |W2^2(emd2) - W2^2(linear_sum_assignment)| = "
                f"{b['emd2_w2_sq_diff']:.1e}"
            )
    print()

    hl_eigh = None
    if not args.no_headlines:
        n, d, _ = HEADLINE_FLOOR
        if not any(c["n"] == n and c["d"] == d for c in cells):
            cells_h = run_cell(n, d, args, Estimator(), Estimator())
            cells.append(cells_h)
        if args.quick:
            print(f"(--quick: headline n={HEADLINE_EIGH[0]}, d={HEADLINE_EIGH[1]} skipped)")
        else:
            wait_for_idle(min(args.wait_idle, max(args.wait_idle_total - args.waited_total, 0)))
            hl_eigh = headline_eigh(args)
    headlines = print_headlines(cells, hl_eigh)

    breakdowns = {}
    if args.breakdown:
        for n, d, _ in (HEADLINE_FLOOR, HEADLINE_EIGH):
            x32, y32 = make_data(n, d, args.seed)
            try:
                bd = affjax_breakdown(x32, y32, args.repeats)
            except Exception as e:  # affjax internals may have moved
                print(f"breakdown n={n}, d={d} unavailable: {type(e).__name__}: {e}")
                continue
            breakdowns[f"{n}x{d}"] = bd
            print(f"\naffjax sub-steps, n={n}, d={d} (each jitted alone, median s):")
            for k, v in bd.items():
                print(f"  {k:<52s} {fmt_t(v)}")

    elapsed = time.perf_counter() - t_start
    print(f"\nTotal benchmark time {elapsed:.0f} s; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        write_json(
            args.json,
            machine=info,
            args=vars(args),
            cells=cells,
            complete=True,
            headlines=headlines,
            headline_eigh=hl_eigh,
            breakdowns=breakdowns,
            elapsed_s=elapsed,
        )
        print(f"raw numbers saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
