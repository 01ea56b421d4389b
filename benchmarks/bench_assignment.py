"""The exact assignment of the score: affjax's auction against scipy, POT and optax.

A corpus of float64 cost matrices of the score's exact W2 (``|T(x_i) - y_j|^2``, built by
``affjax.score.fit_map`` + ``assignment_cost`` exactly as the score builds them), solved
side by side by

* ``scipy``: ``scipy.optimize.linear_sum_assignment`` on the host, NumPy float64 (the
  reference optimum);
* ``pot``: POT's network simplex ``ot.emd2`` (uniform weights, the cost matrix);
* ``hungarian``: ``affjax.linear_assignment(solver="hungarian")`` (optax, jitted);
* ``auction``: ``affjax.linear_assignment(solver="auction")`` (jitted), in float64 and,
  as a second set of columns, on the same matrix rounded to float32;
* ``auto``: ``affjax.linear_assignment(solver="auto")`` (jitted, float64): on CPU the
  identity's certificate on device, then SciPy for the matrices it leaves.

Corpus:

* ``zoo``: a few layers (first, middle, last) of resnet18, resnet50, vgg11 and vit_b_16
  with random weights, on random N(0, 1) inputs (what normalised images look like) at a
  small image size, reduced activations ``(n, d)`` as ``affjax.signature.capture_layers``
  returns them (the forward runs in float32, in chunks; the cost is built in float64);
* ``syn``: synthetic hard cases at d = 64: low-rank inputs, dead units, class-like
  clusters, duplicated samples, outliers; and dead units at d = 16 (many exactly zero
  output rows).

The matrices are cached, one ``.npz`` per case, under ``--corpus`` (default
``benchmarks/results/assignment_corpus/``, git-ignored), so reruns skip the forward passes.

Every solver runs in its own process (``--worker``), one after the other: the thread pools
of XLA, NumPy and POT would otherwise compete. Times are warm (the best of ``--repeats``
calls by default, ``--stat median`` for the median; the JAX solvers are compiled ahead of
time and their compile times reported separately). The load average at start and end and,
per phase, the CPU taken by other processes and the hypervisor's steal are printed: on a
shared machine they say how far to trust the times.

Also (``--signatures``): the whole scoring of a resnet18 and a resnet50 signature at
n = 2048, ``affjax.signature.score_layers(layers, solver=...)`` for each solver, and the
batched assignment alone (``linear_assignment`` on the stacked ``(L, n, n)`` float32 cost
matrices of the layers, the one call ``score_layers`` makes).

Exits with status 1, after a block of ``!!`` lines, if a float64 auction cost exceeds
scipy's optimum by more than 1e-9 relative or a ``lower_bound`` exceeds it (beyond
``4 n eps max|C|`` rounding). See ``benchmarks/README.md`` for every option and column.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_assignment.py --quick          # ~2 minutes
    PYTHONPATH=. python benchmarks/bench_assignment.py --json out.json  # n = 512 and 2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(ROOT, "benchmarks", "results", "assignment_corpus")

ZOO_MODELS = ("resnet18", "resnet50", "vgg11", "vit_b_16")
SYNTHETIC = ("rank4", "dead", "clustered", "duplicated", "outliers", "dead16")
SOLVERS = ("scipy", "pot", "jax")
SIGNATURE_MODELS = ("resnet18", "resnet50")
SIGNATURE_SOLVERS = ("auto", "auction", "scipy", "hungarian")

SYNTHETIC_DOC = {
    "rank4": "x of rank 4 lifted to d, y = relu(x)",
    "dead": "y = relu(x - 1.5)",
    "clustered": "10-class Gaussian mixture, y = gelu(x)",
    "duplicated": "half the rows repeated, y = relu(x)",
    "outliers": "1.5% of rows scaled x10, y = tanh(x)",
    "dead16": "y = relu(x - 1.5) at d = 16 (1/3 of the outputs all zero)",
}


# --- small helpers (no JAX here: the main process and the NumPy workers never load it) ------


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return f"load average: {_load()}"


class CpuSample:
    """CPU used by other processes and stolen by the hypervisor while a phase runs.

    ``others``: cores busy outside this process and its (waited-for) workers; ``steal``:
    the fraction of CPU time the hypervisor gave to other guests.
    """

    @staticmethod
    def _read() -> tuple[float, float, float, float]:
        import resource

        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        idle = v[3] + v[4]
        steal = v[7] if len(v) > 7 else 0.0
        total = sum(v[:8])
        own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return (total - idle - steal) / tick, steal / tick, total / tick, own

    def __enter__(self):
        self.wall = time.perf_counter()
        try:
            self.start = self._read()
        except (OSError, ValueError, IndexError):
            self.start = None
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.others = self.steal = None
        if self.start is not None and self.wall > 0:
            end = self._read()
            busy, steal, total, own = (b - a for a, b in zip(self.start, end, strict=True))
            self.others = max(busy - own, 0.0) / self.wall
            self.steal = steal / total if total > 0 else 0.0
        return False

    def __str__(self) -> str:
        if self.others is None:
            return f"{self.wall:.0f} s"
        return (f"{self.wall:.0f} s, other processes {self.others:.1f} cores, "
                f"steal {100 * self.steal:.0f}%")


def _version(name: str) -> str:
    try:
        return pkg_version(name)
    except PackageNotFoundError:
        return "-"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {
        "host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(),
        "cores_available": available, "python": platform.python_version(),
        **{k: _version(k) for k in ("jax", "jaxlib", "numpy", "scipy", "POT", "optax")},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _stat(times: list[float], cfg: dict) -> float:
    return float(np.min(times) if cfg["stat"] == "min" else np.median(times))


def _timed(fn, repeats: int, budget: float) -> tuple[list[float], object]:
    """At least one call, up to ``repeats``, stopping when another would exceed ``budget``."""
    times: list[float] = []
    out = None
    while len(times) < repeats:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if sum(times) + times[-1] > budget:
            break
    return times, out


class Estimator:
    """Predicts a solver's time on a case from its times on the same family at smaller n."""

    def __init__(self, power: float = 3.0):
        self.power = power
        self.seen: list[tuple[str, int, float]] = []

    def add(self, family: str, n: int, t: float) -> None:
        self.seen.append((family, n, t))

    def predict(self, family: str, n: int) -> float | None:
        same = [(m, t) for f, m, t in self.seen if f == family and m <= n]
        pool = same or [(m, t) for _, m, t in self.seen if m <= n]
        if not pool:
            return None
        return max(t * (n / m) ** self.power for m, t in pool)


def _matched(c: np.ndarray, perm: np.ndarray) -> float:
    return math.fsum(c[np.arange(c.shape[0]), perm].tolist())


def _case_path(corpus: str, case_id: str) -> str:
    return os.path.join(corpus, case_id + ".npz")


def _load_cost(corpus: str, case_id: str) -> np.ndarray:
    with np.load(_case_path(corpus, case_id)) as f:
        return np.ascontiguousarray(f["cost"], np.float64)


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# --- corpus ----------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _synthetic_xy(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(x, y)`` of one synthetic case (x64 must be on for the gelu)."""
    import jax

    rng = np.random.default_rng([seed, n, SYNTHETIC.index(kind)])
    d = 16 if kind == "dead16" else 64
    if kind == "rank4":
        x = rng.standard_normal((n, 4)) @ rng.standard_normal((4, d))
        y = np.maximum(x, 0.0)
    elif kind in ("dead", "dead16"):
        x = rng.standard_normal((n, d))
        y = np.maximum(x - 1.5, 0.0)
    elif kind == "clustered":
        centres = 3.0 * rng.standard_normal((10, d))
        x = centres[rng.integers(0, 10, n)] + 0.3 * rng.standard_normal((n, d))
        y = np.asarray(jax.nn.gelu(x, approximate=False))
    elif kind == "duplicated":
        half = rng.standard_normal(((n + 1) // 2, d))
        x = np.concatenate([half, half])[:n][rng.permutation(n)]
        y = np.maximum(x, 0.0)
    elif kind == "outliers":
        x = rng.standard_normal((n, d))
        out = rng.choice(n, max(1, round(0.015 * n)), replace=False)
        x[out] *= 10.0
        y = np.tanh(x)
    else:
        raise ValueError(kind)
    return x, y


def _cost_builder():
    import jax

    from affjax import score

    @jax.jit
    def build(x, y):
        with jax.default_matmul_precision("highest"):
            f = score.fit_map(x, y, covariance="empirical", ridge=1e-6)
            return score.assignment_cost(f.mapped, f.target, f.dead)

    return build


def _save_case(corpus: str, case_id: str, cost: np.ndarray, meta: dict) -> dict:
    diag = np.diagonal(cost)
    meta = dict(meta, id=case_id,
                diag_min=float(np.mean(diag <= cost.min(axis=1))),
                zero_rows_y=meta.get("zero_rows_y"))
    os.makedirs(corpus, exist_ok=True)
    tmp = _case_path(corpus, case_id) + ".tmp.npz"
    np.savez(tmp, cost=cost, meta=json.dumps(meta))
    os.replace(tmp, _case_path(corpus, case_id))
    return meta


def _read_meta(corpus: str, case_id: str) -> dict | None:
    path = _case_path(corpus, case_id)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return json.loads(str(f["meta"]))


def _zoo_model(name: str, size: int):
    from affjax import models

    kw = {"image_size": size} if models.get_spec(name).size_argument else {}
    return models.create(name, seed=0, **kw)


def _zoo_capture(name: str, size: int, n: int, chunk: int, keep=None, model=None):
    """Reduced float32 ``(x, y)`` of the kept layers (all when ``keep`` is None) over ``n``
    random inputs, the forward run in chunks; returns ``(names, kinds, xs, ys, seconds)``."""
    import jax
    import jax.numpy as jnp

    from affjax.signature import capture_layers

    module, variables = model or _zoo_model(name, size)
    capture = jax.jit(lambda v, x: [(lay.x, lay.y) for lay in capture_layers(module, v, x)])
    layers = jax.eval_shape(lambda v, x: capture_layers(module, v, x), variables,
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    names = [lay.name for lay in layers]
    kinds = [lay.kind for lay in layers]
    keep = list(range(len(names))) if keep is None else keep
    xs: list[list] = [[] for _ in keep]
    ys: list[list] = [[] for _ in keep]
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        images = jax.random.normal(jax.random.key(start), (m, size, size, 3), jnp.float32)
        pairs = capture(variables, images)
        for j, i in enumerate(keep):
            xs[j].append(np.asarray(pairs[i][0]))
            ys[j].append(np.asarray(pairs[i][1]))
    seconds = time.perf_counter() - t0
    return ([names[i] for i in keep], [kinds[i] for i in keep],
            [np.concatenate(a) for a in xs], [np.concatenate(a) for a in ys], seconds)


def _layer_indices(count: int, k: int) -> list[int]:
    if k >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def worker_build(cfg: dict) -> None:
    """Builds the missing cases of the corpus, emits one JSON line per case (its meta)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    corpus = cfg["corpus"]
    build = _cost_builder()
    ns = sorted(cfg["n"])
    for kind in cfg["synthetic"]:
        for n in ns:
            case_id = f"syn-{kind}-n{n}-s{cfg['seed']}"
            meta = None if cfg["rebuild"] else _read_meta(corpus, case_id)
            if meta is None:
                x, y = _synthetic_xy(kind, n, cfg["seed"])
                t0 = time.perf_counter()
                cost = np.asarray(build(jnp.asarray(x), jnp.asarray(y)))
                meta = _save_case(corpus, case_id, cost, {
                    "group": "syn", "family": f"syn-{kind}", "label": f"{kind} (d={x.shape[1]})",
                    "n": n, "d": x.shape[1], "zero_rows_y": int(np.sum(~y.any(axis=1))),
                    "build_s": time.perf_counter() - t0})
                meta = dict(meta, fresh=True)
            _emit(meta)
    from affjax.models import get_spec

    for name in cfg["models"]:
        size = cfg["vit_size"] if get_spec(name).size_argument else cfg["image_size"]
        module, variables = _zoo_model(name, size)
        from affjax.signature import capture_layers

        layers = jax.eval_shape(lambda v, x, m=module: capture_layers(m, v, x), variables,
                                jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
        keep = _layer_indices(len(layers), cfg["layers_per_model"])
        ids = {(i, n): f"zoo-{name}-{i:02d}-{_safe(layers[i].name)}-px{size}-n{n}"
               for i in keep for n in ns}
        metas = {} if cfg["rebuild"] else {k: _read_meta(corpus, v) for k, v in ids.items()}
        missing = [k for k in ids if metas.get(k) is None]
        if missing:
            n_max = max(n for _, n in missing)
            sel = sorted({i for i, _ in missing})
            names, kinds, xs, ys, fwd = _zoo_capture(name, size, n_max, cfg["chunk"], sel,
                                                     (module, variables))
            for (i, n) in missing:
                j = sel.index(i)
                x = xs[j][:n].astype(np.float64)
                y = ys[j][:n].astype(np.float64)
                t0 = time.perf_counter()
                cost = np.asarray(build(jnp.asarray(x), jnp.asarray(y)))
                metas[(i, n)] = _save_case(corpus, ids[(i, n)], cost, {
                    "group": "zoo", "family": f"zoo-{name}-{i}", "model": name,
                    "layer": names[j], "kind": kinds[j], "layer_index": i,
                    "layers": len(layers), "image_size": size,
                    "label": f"{name} {names[j]}", "n": n, "d": int(x.shape[1]),
                    "zero_rows_y": int(np.sum(~y.any(axis=1))),
                    "forward_s": fwd, "forward_images": n_max,
                    "build_s": time.perf_counter() - t0})
                metas[(i, n)]["fresh"] = True
        for k in ids:
            _emit(metas[k])


# --- solver workers ----------------------------------------------------------------------------


def worker_scipy(cfg: dict) -> None:
    from scipy.optimize import linear_sum_assignment

    for case in cfg["cases"]:
        c = _load_cost(cfg["corpus"], case["id"])
        times, (rows, cols) = _timed(lambda c=c: linear_sum_assignment(c), cfg["repeats"],
                                     cfg["budget"])
        perm = np.empty(c.shape[0], np.int64)
        perm[rows] = cols
        _emit({"id": case["id"], "scipy": {"time": _stat(times, cfg),
                                           "times": times, "cost": _matched(c, perm)}})


def worker_pot(cfg: dict) -> None:
    # POT's torch / TensorFlow / JAX backends are not needed: skip their imports (seconds)
    # and thread pools.
    for backend in ("PYTORCH", "TENSORFLOW", "JAX", "CUPY"):
        os.environ[f"POT_BACKEND_DISABLE_{backend}"] = "1"
    import ot

    est = Estimator(power=2.5)
    for case in cfg["cases"]:
        n = case["n"]
        guess = est.predict(case["family"], n)
        if n > cfg["pot_max_n"] or (guess is not None and guess > cfg["budget"]):
            why = f"n > {cfg['pot_max_n']}" if n > cfg["pot_max_n"] else f"~{guess:.0f} s"
            _emit({"id": case["id"], "pot": {"skipped": why}})
            continue
        c = _load_cost(cfg["corpus"], case["id"])
        a = np.full(n, 1.0 / n)

        def run(c=c, a=a):
            return ot.emd2(a, a, c, numItermax=100_000_000, log=True)

        times, (value, log) = _timed(run, cfg["repeats"], cfg["budget"])
        est.add(case["family"], n, min(times))
        _emit({"id": case["id"], "pot": {
            "time": _stat(times, cfg), "times": times, "cost": float(value) * n,
            "result_code": int(log.get("result_code", -1)), "warning": log.get("warning")}})


def worker_jax(cfg: dict) -> None:
    """Auction (float64 and float32) and optax's Hungarian, compiled ahead of time."""
    import functools

    import jax
    import jax.numpy as jnp

    import affjax

    jax.config.update("jax_enable_x64", True)
    compiled: dict[tuple, object] = {}
    est = Estimator(power=3.0)

    def solver_fn(solver: str, shape, dtype):
        key = (solver, shape, str(dtype))
        if key not in compiled:
            fn = jax.jit(functools.partial(affjax.linear_assignment, solver=solver))
            t0 = time.perf_counter()
            compiled[key] = fn.lower(jax.ShapeDtypeStruct(shape, dtype)).compile()
            _emit({"compile": {"solver": solver, "n": shape[0], "dtype": str(dtype),
                               "time": time.perf_counter() - t0}})
        return compiled[key]

    def run(solver: str, c: np.ndarray, dtype) -> dict:
        dev = jax.device_put(jnp.asarray(c, dtype))
        fn = solver_fn(solver, dev.shape, dev.dtype)
        r = jax.block_until_ready(fn(dev))  # warm-up
        times, r = _timed(lambda: jax.block_until_ready(fn(dev)), cfg["repeats"], cfg["budget"])
        perm = np.asarray(r.permutation)
        return {"time": _stat(times, cfg), "times": times,
                "cost": _matched(c, perm),  # on the float64 matrix
                "cost_reported": float(r.cost), "lower_bound": float(r.lower_bound),
                "converged": bool(r.converged), "rounds": int(r.rounds),
                "certified_candidate": bool(r.certified_candidate),
                "valid_permutation": bool(np.array_equal(np.sort(perm), np.arange(c.shape[0])))}

    for case in cfg["cases"]:
        c = _load_cost(cfg["corpus"], case["id"])
        out: dict = {"id": case["id"], "auction": run("auction", c, jnp.float64),
                     "auto": run("auto", c, jnp.float64)}
        if cfg["float32"]:
            out["auction32"] = run("auction", c, jnp.float32)
        n = case["n"]
        guess = est.predict(case["family"], n)
        if "hungarian" not in cfg["jax_solvers"]:
            pass
        elif n > cfg["hungarian_max_n"] or (guess is not None and guess > cfg["budget"]):
            why = (f"n > {cfg['hungarian_max_n']}" if n > cfg["hungarian_max_n"]
                   else f"~{guess:.0f} s")
            out["hungarian"] = {"skipped": why}
        else:
            out["hungarian"] = run("hungarian", c, jnp.float64)
            est.add(case["family"], n, out["hungarian"]["time"])
        _emit(out)


def worker_signature(cfg: dict) -> None:
    """One zoo model's captured layers (float32): ``score_layers`` per solver, and the
    batched assignment alone on the stacked ``(L, n, n)`` cost matrices."""
    import functools

    import jax
    import jax.numpy as jnp

    import affjax
    from affjax.signature import Layer
    from affjax.signature import score_layers

    name, n = cfg["model"], cfg["n"]
    names, kinds, xs, ys, fwd = _zoo_capture(name, cfg["image_size"], n, cfg["chunk"])
    layers = [Layer(a, k, jnp.asarray(x), jnp.asarray(y))
              for a, k, x, y in zip(names, kinds, xs, ys, strict=True)]
    out: dict = {"model": name, "n": n, "image_size": cfg["image_size"], "layers": len(layers),
                 "dims": sorted({int(x.shape[1]) for x in xs}), "forward_s": fwd, "solvers": {}}
    # The layers' cost matrices, as the score builds them (one batched assignment call in
    # score_layers solves all of them).
    build = _cost_builder()
    costs = jnp.stack([build(lay.x, lay.y) for lay in layers])
    opt = None
    for solver in cfg["solvers"]:
        r_out: dict = {}
        out["solvers"][solver] = r_out
        if solver == "hungarian":
            # First, middle and last layer alone: skip when the whole signature (two calls)
            # or the batched assignment would exceed the budget.
            one = jax.jit(lambda c: affjax.linear_assignment(c, solver="hungarian").cost)
            sample = sorted({0, len(layers) // 2, len(layers) - 1})
            one(costs[0]).block_until_ready()
            per = []
            for i in sample:
                t0 = time.perf_counter()
                one(costs[i]).block_until_ready()
                per.append(time.perf_counter() - t0)
            estimate = float(np.mean(per)) * len(layers)
            r_out["estimate"] = estimate
            if 2 * estimate > cfg["budget"]:
                r_out["skipped"] = (f"~{2 * estimate:.0f} s: 2 calls x {len(layers)} layers x "
                                    f"{np.mean(per):.2f} s")
                _emit({"progress": out})
                continue
        # The batched assignment alone.
        fn = jax.jit(functools.partial(affjax.linear_assignment, solver=solver))
        t0 = time.perf_counter()
        compiled = fn.lower(costs).compile()
        r_out["assign_compile"] = time.perf_counter() - t0
        r = jax.block_until_ready(compiled(costs))
        times, r = _timed(lambda compiled=compiled: jax.block_until_ready(compiled(costs)),
                          cfg["repeats"], cfg["budget"])
        r_out["assign"] = _stat(times, cfg)
        r_out["assign_times"] = times
        r_out["converged"] = int(np.sum(np.asarray(r.converged)))
        r_out["certified_candidate"] = int(np.sum(np.asarray(r.certified_candidate)))
        r_out["max_rounds"] = int(np.max(np.asarray(r.rounds)))
        cost = np.asarray(r.cost, np.float64)
        if solver == "scipy":
            opt = cost
        # score_layers, first (compiling) and warm calls.
        t0 = time.perf_counter()
        sc = score_layers(layers, solver=solver).block_until_ready()
        r_out["first"] = time.perf_counter() - t0
        times, sc = _timed(lambda solver=solver: score_layers(layers, solver=solver)
                           .block_until_ready(), cfg["repeats"], cfg["budget"])
        r_out.update(time=_stat(times, cfg), times=times, _cost=cost.tolist(),
                     _scores=np.asarray(sc, np.float64).tolist(),
                     nan_scores=int(np.sum(~np.isfinite(np.asarray(sc)))))
        _emit({"progress": out})
    ref = out["solvers"].get("scipy", {})
    for r_out in out["solvers"].values():
        if "_scores" in r_out and "_scores" in ref:
            r_out["max_score_diff_vs_scipy"] = float(np.max(np.abs(
                np.asarray(r_out["_scores"]) - np.asarray(ref["_scores"]))))
        if "_cost" in r_out and opt is not None:
            r_out["max_rel_cost_vs_scipy"] = float(np.max(
                (np.asarray(r_out["_cost"]) - opt) / np.maximum(np.abs(opt), 1e-30)))
    for r_out in out["solvers"].values():
        r_out.pop("_scores", None)
        r_out.pop("_cost", None)
    _emit({"signature": out})


WORKERS = {"build": worker_build, "scipy": worker_scipy, "pot": worker_pot,
           "jax": worker_jax, "signature": worker_signature}


# --- driver ------------------------------------------------------------------------------------


def run_worker(kind: str, cfg: dict, timeout: float) -> tuple[list[dict], str | None]:
    """Runs one worker process; returns its JSON lines and an error (or None)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
           "--worker-config", json.dumps(cfg)]
    error = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc, error = None, f"over the worker timeout ({timeout:g} s)"
    if rc not in (0, None):
        error = f"exit {rc}"
    if error:
        print(f"!! worker {kind}: {error}\n{stderr[-3000:]}", file=sys.stderr)
    lines = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines, error


def fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.4f}" if t < 0.1 else f"{t:.3f}" if t < 10 else f"{t:.1f}"


def fmt_e(v: float | None) -> str:
    return "-" if v is None else "0" if v == 0 else f"{v:.1e}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *(line(r) for r in rows)])


def _solver_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "skipped" in r:
        return f"skip ({r['skipped']})"
    if "error" in r:
        return r["error"]
    return fmt_t(r["time"])


def analyse(case: dict) -> list[str]:
    """Fills the derived numbers of one case; returns its violations (wrong answers)."""
    problems = []
    opt = case.get("scipy", {}).get("cost")
    n = case["n"]
    rounding = 4 * n * np.finfo(np.float64).eps * case.get("max_abs_cost", 0.0)
    scale = abs(opt) if opt else 1.0
    for key in ("auction", "auto", "auction32", "hungarian", "pot"):
        r = case.get(key)
        if r is None or "cost" not in r or opt is None:
            continue
        r["rel_err"] = (r["cost"] - opt) / scale
        if "lower_bound" in r:
            # The solver's own certificate: its reported cost minus its bound.
            r["gap"] = (r["cost_reported"] - r["lower_bound"]) / scale
            r["lb_ok"] = bool(r["lower_bound"] <= opt + rounding)
    for key in ("auction", "auto"):
        a = case.get(key)
        if a is None or "cost" not in a:
            continue
        if opt is None:
            problems.append(f"{case['id']}: no scipy optimum to check {key} against")
        else:
            if a["cost"] - opt > 1e-9 * abs(opt) + rounding:
                problems.append(f"{case['id']}: {key} cost {a['cost']!r} exceeds scipy's "
                                f"optimum {opt!r} by {a['rel_err']:.2e} relative (> 1e-9)")
            if not a["lb_ok"]:
                problems.append(f"{case['id']}: {key} lower_bound {a['lower_bound']!r} "
                                f"exceeds scipy's optimum {opt!r}")
        if not a["valid_permutation"]:
            problems.append(f"{case['id']}: {key} returned no permutation")
        if "scipy" in case:
            a["ratio"] = a["time"] / case["scipy"]["time"]
    h = case.get("hungarian")
    if h is not None and "rel_err" in h and h["rel_err"] > 1e-9 + rounding / scale:
        problems.append(f"{case['id']}: hungarian cost exceeds scipy's by {h['rel_err']:.1e}")
    return problems


def case_rows(cases: list[dict], float32: bool) -> tuple[list[str], list[list[str]]]:
    header = ["case", "n", "d", "diag min", "scipy (s)", "POT emd2 (s)", "hungarian (s)",
              "auction (s)", "auction/scipy", "(cost-opt)/opt", "gap/opt", "LB<=opt",
              "certified", "rounds", "auto (s)", "auto/scipy"]
    if float32:
        header += ["f32 auction (s)", "f32 (cost-opt)/opt", "f32 gap/opt", "f32 rounds"]
    rows = []
    for c in cases:
        a = c.get("auction", {})
        row = [c["label"], str(c["n"]), str(c["d"]), f"{100 * c['diag_min']:.0f}%",
               _solver_cell(c.get("scipy")), _solver_cell(c.get("pot")),
               _solver_cell(c.get("hungarian")), _solver_cell(a or None),
               f"{a['ratio']:.2f}" if "ratio" in a else "-",
               fmt_e(a.get("rel_err")), fmt_e(a.get("gap")),
               {True: "yes", False: "**NO**"}.get(a.get("lb_ok"), "-"),
               {True: "yes", False: "no"}.get(a.get("certified_candidate"), "-"),
               str(a.get("rounds", "-")) + ("" if a.get("converged", True) else " (capped)")]
        auto = c.get("auto", {})
        row += [_solver_cell(auto or None), f"{auto['ratio']:.2f}" if "ratio" in auto else "-"]
        if float32:
            b = c.get("auction32", {})
            row += [_solver_cell(b or None), fmt_e(b.get("rel_err")), fmt_e(b.get("gap")),
                    str(b.get("rounds", "-")) + ("" if b.get("converged", True)
                                                 else " (not conv.)")]
        rows.append(row)
    return header, rows


def headlines(cases: list[dict]) -> list[str]:
    out = []
    for key in ("auction", "auto"):
        for group, what in (("zoo", "zoo matrices"), ("syn", "synthetic hard cases")):
            for n in sorted({c["n"] for c in cases if c["group"] == group}):
                ratios = [c[key]["ratio"] for c in cases
                          if c["group"] == group and c["n"] == n and "ratio" in c.get(key, {})]
                if ratios:
                    g = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
                    out.append(f"{what}, n={n}: {key}/scipy time ratio: geometric mean "
                               f"{g:.2f}, min {min(ratios):.2f}, max {max(ratios):.2f} "
                               f"({len(ratios)} cases)")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: n in {256, 512}, 2 layers of resnet18, 4 "
                        "synthetic cases, no signatures unless --signatures (then resnet18 "
                        "at n=512)")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="matrix sizes (default 512 2048; 4096 is opt-in: 128 MB per matrix)")
    p.add_argument("--models", nargs="*", default=None, choices=ZOO_MODELS,
                   help=f"zoo models (default {' '.join(ZOO_MODELS)})")
    p.add_argument("--synthetic", nargs="*", default=None, choices=SYNTHETIC,
                   help=f"synthetic cases (default all: {' '.join(SYNTHETIC)})")
    p.add_argument("--layers-per-model", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64, help="input side of the convnets")
    p.add_argument("--vit-size", type=int, default=64,
                   help="input side of vit_b_16 (built with image_size=; 64 px = 16 patches)")
    p.add_argument("--chunk", type=int, default=256, help="images per forward call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="folder of the cached cases")
    p.add_argument("--rebuild", action="store_true", help="rebuild cached cases")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS,
                   help="solver processes to run (scipy is the reference: keep it)")
    p.add_argument("--no-hungarian", action="store_true")
    p.add_argument("--no-float32", action="store_true", help="skip the float32 auction columns")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--stat", choices=("min", "median"), default="min",
                   help="what the tables report of the repeats (default the best)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds per measurement: repeats stop beyond it; POT, hungarian and "
                        "signature solvers predicted to take longer are skipped")
    p.add_argument("--hungarian-max-n", type=int, default=2048)
    p.add_argument("--pot-max-n", type=int, default=4096)
    p.add_argument("--signatures", action=argparse.BooleanOptionalAction, default=None,
                   help="also score whole resnet18 / resnet50 signatures with each solver "
                        "(default on, off with --quick)")
    p.add_argument("--signature-n", type=int, default=None, help="default 2048 (quick: 512)")
    p.add_argument("--signature-models", nargs="+", default=None, choices=ZOO_MODELS)
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument("--cases", default=None, help="regex: only the cases whose id matches")
    p.add_argument("--json", help="save the raw numbers here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n = args.n or [256, 512]
        args.synthetic = (["rank4", "dead", "duplicated", "dead16"] if args.synthetic is None
                          else args.synthetic)
        args.models = ["resnet18"] if args.models is None else args.models
        args.layers_per_model = min(args.layers_per_model, 2)
        args.repeats = min(args.repeats, 2)
        args.signature_n = args.signature_n or 512
        args.signature_models = args.signature_models or ["resnet18"]
    args.n = args.n or [512, 2048]
    args.models = list(ZOO_MODELS) if args.models is None else args.models
    args.synthetic = list(SYNTHETIC) if args.synthetic is None else args.synthetic
    args.signature_n = args.signature_n or 2048
    args.signatures = not args.quick if args.signatures is None else args.signatures
    args.signature_models = args.signature_models or list(SIGNATURE_MODELS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.worker_config))
        return 0
    t_start = time.perf_counter()
    info = machine()
    info["uptime_start"] = _uptime()
    print(f"Machine: {info['cpu']}, {info['cores']} cores ({info['cores_available']} available)")
    print(f"Software: Python {info['python']}, jax {info['jax']}, numpy {info['numpy']}, "
          f"scipy {info['scipy']}, POT {info['POT']}, optax {info['optax']}")
    print(f"Date: {info['date']}\nStart: {info['uptime_start']}", flush=True)

    # 1. The corpus (built or read from the cache, in its own process).
    phase = CpuSample().__enter__()
    build_cfg = {"corpus": args.corpus, "rebuild": args.rebuild, "n": args.n,
                 "synthetic": args.synthetic, "models": args.models, "seed": args.seed,
                 "layers_per_model": args.layers_per_model, "image_size": args.image_size,
                 "vit_size": args.vit_size, "chunk": args.chunk}
    metas, error = run_worker("build", build_cfg, args.worker_timeout)
    if error:
        print(f"corpus build failed: {error}", file=sys.stderr)
        if not metas:
            return 2
    if args.cases:
        metas = [m for m in metas if re.search(args.cases, m["id"])]
    metas.sort(key=lambda m: (m["n"], m["group"] != "zoo", m["id"]))
    cases = {m["id"]: dict(m) for m in metas}
    for m in cases.values():
        with np.load(_case_path(args.corpus, m["id"])) as f:
            m["max_abs_cost"] = float(np.max(np.abs(f["cost"])))
    built = [m for m in metas if m.get("fresh")]
    phase.__exit__()
    print(f"corpus: {len(cases)} cases in {args.corpus} ({phase})", flush=True)
    timings = {"corpus": phase.wall}
    phases = {"corpus": str(phase)}

    # 2. Each solver in its own process.
    solver_cfg = {"corpus": args.corpus, "repeats": args.repeats, "budget": args.budget,
                  "stat": args.stat,
                  "cases": [{"id": m["id"], "n": m["n"], "family": m["family"]} for m in metas],
                  "pot_max_n": args.pot_max_n, "hungarian_max_n": args.hungarian_max_n,
                  "float32": not args.no_float32,
                  "jax_solvers": ["auction"] + ([] if args.no_hungarian else ["hungarian"])}
    compile_times: list[dict] = []
    failures = {}
    for solver in args.solvers:
        with CpuSample() as phase:
            lines, error = run_worker(solver, solver_cfg, args.worker_timeout)
        if error:
            failures[solver] = error
        for line in lines:
            if "compile" in line:
                compile_times.append(line["compile"])
            elif line.get("id") in cases:
                cases[line["id"]].update({k: v for k, v in line.items() if k != "id"})
        timings[solver], phases[solver] = phase.wall, str(phase)
        print(f"{solver}: {len(lines)} results ({phase})", flush=True)

    problems = []
    for c in cases.values():
        problems += analyse(c)

    # 3. Whole signatures.
    signatures = []
    if args.signatures:
        for model in args.signature_models:
            sig_cfg = {"model": model, "n": args.signature_n, "image_size": args.image_size,
                       "chunk": args.chunk, "repeats": args.repeats, "budget": args.budget,
                       "stat": args.stat,
                       "solvers": [s for s in SIGNATURE_SOLVERS
                                   if not (s == "hungarian" and args.no_hungarian)]}
            with CpuSample() as phase:
                lines, error = run_worker("signature", sig_cfg, args.worker_timeout)
            done = [ln["signature"] for ln in lines if "signature" in ln]
            partial = [ln["progress"] for ln in lines if "progress" in ln]
            if done:
                signatures.append(done[-1])
            elif partial:
                signatures.append(dict(partial[-1], error=error))
            else:
                signatures.append({"model": model, "n": args.signature_n, "error": error})
            timings[f"signature {model}"] = phase.wall
            phases[f"signature {model}"] = str(phase)
            print(f"signature {model}: {phase}", flush=True)

    info["uptime_end"] = _uptime()
    elapsed = time.perf_counter() - t_start

    # 4. Report.
    ordered = list(cases.values())
    float32 = not args.no_float32
    print(f"\n## Assignment corpus ({info['date']}, {info['cpu']}, {info['cores']} cores, "
          f"jax {info['jax']})\n")
    print(f"load at start: {info['uptime_start']}\nload at end:   {info['uptime_end']}\n")
    header, rows = case_rows(ordered, float32)
    print(markdown_table(header, rows))
    print(f"\ntimes: warm, {'best' if args.stat == 'min' else 'median'} of up to "
          f"{args.repeats} calls (s); opt = scipy's optimum on the float64 matrix; "
          "gap = cost - lower_bound (the auction's certificate); diag min = rows whose "
          "minimum is on the diagonal; f32 = the auction on the matrix rounded to float32, "
          "its matching costed on the float64 matrix")
    syn = sorted({c["family"][4:] for c in ordered if c["group"] == "syn"},
                 key=SYNTHETIC.index)
    if syn:
        print("synthetic cases: " + "; ".join(f"{k}: {SYNTHETIC_DOC[k]}" for k in syn))
    if compile_times:
        print("\ncompile times (s, ahead of time, excluded above):\n")
        print(markdown_table(
            ["solver", "dtype", "n", "compile (s)"],
            [[c["solver"], c["dtype"], str(c["n"]), fmt_t(c["time"])] for c in compile_times]))
    pot_bad = [c["label"] + f" n={c['n']}" for c in ordered
               if "pot" in c and "rel_err" in c["pot"] and abs(c["pot"]["rel_err"]) > 1e-9]
    if pot_bad:
        print(f"\nPOT emd2 off scipy's optimum by > 1e-9 relative on: {', '.join(pot_bad)}")
    for line in headlines(ordered):
        print(line)
    if signatures:
        print(f"\n## Whole signatures: score_layers (float32), n={args.signature_n}, "
              f"{args.image_size} px\n")
        rows = []
        for s in signatures:
            for solver in SIGNATURE_SOLVERS:
                r = s.get("solvers", {}).get(solver)
                if r is None:
                    continue
                if "skipped" in r:
                    rows.append([s["model"], str(s.get("layers", "-")), solver,
                                 f"skip ({r['skipped']})"] + ["-"] * 6)
                    continue
                certified = (f"{r['certified_candidate']}/{s['layers']}, "
                             f"{r['max_rounds']}" if solver == "auction" else "-")
                rows.append([s["model"], str(s["layers"]), solver, fmt_t(r.get("time")),
                             fmt_t(r.get("first")), fmt_t(r.get("assign")),
                             fmt_t(r.get("assign_compile")), certified,
                             fmt_e(r.get("max_rel_cost_vs_scipy")),
                             fmt_e(r.get("max_score_diff_vs_scipy"))])
            if s.get("error"):
                rows.append([s["model"], str(s.get("layers", "-")), "(worker)", s["error"]]
                            + ["-"] * 6)
            if "forward_s" in s:
                print(f"{s['model']}: {s['layers']} layers, reduced dims {s['dims']}, forward "
                      f"of {s['n']} images (in chunks of {args.chunk}, incl. compile) "
                      f"{s['forward_s']:.1f} s")
        print()
        print(markdown_table(["model", "layers", "solver", "score_layers warm (s)",
                              "first call (s)", "assignment alone (s)",
                              "its compile (s)", "certified, max rounds",
                              "max (cost-opt)/opt", "max |score - scipy's|"], rows))
        print("score_layers: the whole scoring of the captured layers (fits + one batched "
              "assignment); assignment alone: linear_assignment on the stacked (L, n, n) "
              "float32 cost matrices, jitted; opt = the scipy solver's matching cost; first "
              "call: the fits compile with the first solver, later solvers reuse them")
    print(f"\nruntime: {elapsed:.0f} s")
    for k, v in phases.items():
        print(f"  {k}: {v}")
    unconverged = [f"{c['label']} n={c['n']} ({key}, {c[key]['rounds']} rounds)"
                   for c in ordered for key in ("auction", "auction32")
                   if key in c and not c[key].get("converged", True)]
    if unconverged:
        print("NOT CONVERGED (a capped run; the matching's true gap is reported): "
              + "; ".join(unconverged))
    if built:
        fwd = {f"{m['model']} ({m['forward_images']} images, {m['image_size']} px)":
               m["forward_s"] for m in built if "forward_s" in m}
        print(f"corpus: {len(built)} of {len(ordered)} cases built this run, cost matrices "
              f"{sum(m['build_s'] for m in built):.1f} s"
              + ("; forward passes (incl. compile): "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in fwd.items()) if fwd else ""))
    if failures:
        print(f"worker failures: {failures}")
    if args.json:
        target = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            json.dump({"machine": info, "args": vars(args), "cases": ordered,
                       "compile": compile_times, "signatures": signatures,
                       "problems": problems, "failures": failures, "timings": timings,
                       "phases": phases,
                       "elapsed_s": elapsed}, f, indent=1)
    if problems:
        bar = "!" * 78
        print(f"\n{bar}\n!! WRONG OR UNCERTIFIED AUCTION RESULTS ({len(problems)}):")
        for p in problems:
            print(f"!!   {p}")
        print(bar, flush=True)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
