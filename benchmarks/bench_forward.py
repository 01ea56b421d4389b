"""Forward pass of the zoo's tier-1 models against torchvision's, on the same CPU.

For each model and input side, two fresh subprocesses (in one process XLA's and torch's
thread pools fight over the cores):

* ``jax``: ``affjax.models.create(name)`` (random weights), ``jax.jit(model.apply)`` compiled
  ahead of time (the compile time is reported apart, not in the forward time), one warm call,
  then timed calls, each ended by ``block_until_ready()``.
* ``torch``: ``torchvision.models.get_model(name, weights=None).eval()`` under
  ``torch.no_grad()``, one warm call, then timed calls.

Same batch, float32, random N(0, 1) images (NHWC for JAX, NCHW for torch). The table gives
the median of the timed calls (ms per batch), the ratio jax / torch, JAX's compile time, the
1-minute load average, and ``bg cores``: the CPU other processes used while the cell ran (its
largest value over the cell's processes; timings are noisy where it is not near 0). Before
each process the script waits (``--wait-idle``) for the machine to go quiet.
With ``--xla-baseline`` a third process times the JAX model with every convolution left to
XLA (``AFFJAX_CONV=xla``: the zoo before the per-shape formulations of
``affjax.models.layers.conv2d``). AlexNet needs inputs of at least 63 px (its cells at 32 px
are skipped). Run from the repository root:

    python benchmarks/bench_forward.py                               # tier 1, 32/64/224 px
    python benchmarks/bench_forward.py --models resnet18 vgg11 --sizes 32 64 --batch 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TIER1 = ["alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
         "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
         "resnext101_64x4d"]
MIN_SIZE = {"alexnet": 63}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed_calls(call, repeats: int, budget: float) -> tuple[list[float], list[float]]:
    """Wall and process CPU times of up to ``repeats`` calls; stops after ``budget`` seconds
    (at least 2 calls)."""
    wall, cpu = [], []
    stop = time.perf_counter() + budget
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if len(wall) >= 2 and time.perf_counter() > stop:
            break
    return wall, cpu


def worker_jax(name: str, size: int, batch: int, repeats: int, budget: float) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    from affjax import models

    model, variables = models.create(name)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    t = time.perf_counter()
    compiled = jax.jit(model.apply).lower(variables, x).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled(variables, x).block_until_ready()
    first_s = time.perf_counter() - t
    times, cpu = _timed_calls(lambda: compiled(variables, x).block_until_ready(), repeats,
                              budget)
    return dict(compile_s=compile_s, first_s=first_s, times=times, cpu_times=cpu,
                version=f"jax {jax.__version__} ({len(os.sched_getaffinity(0))} cpus)")


def worker_torch(name: str, size: int, batch: int, repeats: int, budget: float) -> dict:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        t = time.perf_counter()
        model(x)
        first_s = time.perf_counter() - t
        times, cpu = _timed_calls(lambda: model(x), repeats, budget)
    return dict(compile_s=0.0, first_s=first_s, times=times, cpu_times=cpu,
                version=f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def _busy_seconds() -> float | None:
    """CPU seconds all processes have used (``/proc/stat``; None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def wait_for_idle(max_wait: float, threshold: float = 0.3) -> float | None:
    """Wait up to ``max_wait`` s until other processes use under ``threshold`` cores.

    Returns the cores they used in the last 1 s sample (None without ``/proc/stat``).
    """
    stop = time.perf_counter() + max_wait
    while True:
        b0, t0 = _busy_seconds(), time.perf_counter()
        time.sleep(1.0)
        b1, t1 = _busy_seconds(), time.perf_counter()
        if b0 is None or b1 is None:
            return None
        other = (b1 - b0) / (t1 - t0)
        if other < threshold or t1 >= stop:
            return other


def run_worker(side: str, name: str, size: int, a: argparse.Namespace) -> dict:
    """One side of one cell in a fresh process; ``bg`` is the cores other processes used."""
    if a.wait_idle > 0:
        wait_for_idle(a.wait_idle)
    env = dict(os.environ)
    if side == "xla":
        env["AFFJAX_CONV"] = "xla"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "torch" if side == "torch"
           else "jax", "--models", name, "--sizes", str(size), "--batch", str(a.batch),
           "--repeats", str(a.repeats), "--budget", str(a.budget)]
    load = os.getloadavg()[0]
    b0, c0, t0 = _busy_seconds(), _children_cpu(), time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout,
                           preexec_fn=(lambda: os.sched_setaffinity(0, a.cpus)) if a.cpus
                           else None)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout {a.timeout}s", load=load, bg=None)
    b1, c1, t1 = _busy_seconds(), _children_cpu(), time.perf_counter()
    bg = None if b0 is None or b1 is None else max((b1 - b0) - (c1 - c0), 0.0) / (t1 - t0)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]), load=max(load, os.getloadavg()[0]), bg=bg)
    return dict(error=(p.stderr.strip().splitlines() or ["no output"])[-1][:200], load=load,
                bg=bg)


def _ms(med: dict, side: str) -> str:
    return f"{med[side]:8.0f}" if side in med else f"{'error':>8}"


def _ratio(med: dict, side: str) -> str:
    return f"{med[side] / med['torch']:9.2f}" if side in med and "torch" in med else f"{'-':>9}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=TIER1, help="default: the 19 tier-1 models")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 224])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median)")
    p.add_argument("--budget", type=float, default=15.0,
                   help="stop timing a cell after this many seconds (at least 2 calls)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--xla-baseline", action="store_true",
                   help="also time the JAX model with XLA's convolution everywhere")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each process wait up to this many seconds for other processes "
                        "to use under 0.3 cores (0: do not wait)")
    p.add_argument("--cpus", type=int, nargs="+",
                   help="pin both sides to these CPU ids (both size their thread pools to them)")
    p.add_argument("--metric", choices=["wall", "cpu"], default="wall",
                   help="the table's time: wall clock, or CPU time of the process (all its "
                        "threads; with --cpus on one CPU, insensitive to other processes)")
    p.add_argument("--json", help="write every cell's raw numbers here")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        fn = worker_jax if a.worker == "jax" else worker_torch
        out = fn(a.models[0], a.sizes[0], a.batch, a.repeats, a.budget)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    sides = ["jax", "torch"] + (["xla"] if a.xla_baseline else [])
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_name()}, "
          f"{os.cpu_count()} cores{f' (pinned to {a.cpus})' if a.cpus else ''}, "
          f"Python {platform.python_version()}, batch {a.batch}, {a.metric} time, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    head = (f"| {'model':<18} | {'px':>3} | {'jax ms':>8} | {'torch ms':>8} | {'jax/torch':>9} | "
            f"{'compile s':>9} |")
    if a.xla_baseline:
        head += f" {'xla-conv ms':>11} | {'xla/torch':>9} |"
    head += f" {'load':>4} | {'bg cores':>8} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", flush=True)
    rows, versions = [], set()
    for name in a.models:
        for size in a.sizes:
            if size < MIN_SIZE.get(name, 0):
                print(f"| {name:<18} | {size:>3} | {'n/a: input below the minimum size':>41} |")
                continue
            cell = {side: run_worker(side, name, size, a) for side in sides}
            rows.append(dict(model=name, size=size, batch=a.batch, **cell))
            key = "cpu_times" if a.metric == "cpu" else "times"
            med = {side: statistics.median(r[key]) * 1e3 for side, r in cell.items() if key in r}
            versions.update(r["version"] for r in cell.values() if "version" in r)
            comp = cell["jax"].get("compile_s")
            line = (f"| {name:<18} | {size:>3} | {_ms(med, 'jax')} | {_ms(med, 'torch')} | "
                    f"{_ratio(med, 'jax')} | {'-' if comp is None else f'{comp:.1f}':>9} |")
            if a.xla_baseline:
                line += f" {_ms(med, 'xla'):>11} | {_ratio(med, 'xla')} |"
            bgs = [r["bg"] for r in cell.values() if r.get("bg") is not None]
            line += (f" {max(r['load'] for r in cell.values()):4.1f} |"
                     f" {f'{max(bgs):.2f}' if bgs else '-':>8} |")
            print(line, flush=True)
            for side, r in cell.items():
                if "error" in r:
                    print(f"#   {side}: {r['error']}", flush=True)
    print(f"# {', '.join(sorted(versions))}; load at end {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
