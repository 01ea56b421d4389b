"""Signature of a ResNet-like Flax model: layer-parallel scoring against the published way.

Side by side in one run, timing the scoring of the same captured activations (random
weights, batch 512; the capture itself runs once, untimed):

* ``grouped``: ``affjax.signature.score_layers``: layers with equal reduced shapes scored by
  one jitted call per group (a ``lax.map`` loop inside it on CPU, ``vmap`` on accelerators).
* ``loop``: one layer at a time with ``affjax.affinity_score`` (a Python loop of jitted
  calls).
* ``published``: one layer at a time by the NumPy/SciPy/POT implementation of
  ``bench_score.published_score`` as the published pipeline did it: covariances, two
  ``eigh`` per layer, ``ot.dist``, and the exact W2 by POT's linear program ``ot.emd2``.
  The speed target (grouped >= 3x) is against this.
* ``numpy``: the same with ``linear_sum_assignment`` in place of ``ot.emd2`` (same optimum):
  a faster NumPy baseline than the published one, reported beside it.

Both NumPy baselines keep the captured float32 (covariances cast back to float32), as
affjax computes.

Also timed: the forward pass alone, and forward + capture + scoring fused in one jitted
``signature_scores``. Printed last, the one-eigh bound: half the NumPy row's ``eigh`` time
(one float32 eigendecomposition per layer) plus its cost matrices and assignments, the least
any exact method with one eigendecomposition per layer does, and so the largest speed-up over
the published way such a method can reach at NumPy's speed.
Reported with each: the peak resident memory of each method (each
runs in its own subprocess). Run from the repository root:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_signature.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np

import affjax
from affjax.signature import capture_layers
from affjax.signature import score_layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_score  # noqa: E402


class BasicBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        relu = affjax.Activation(jax.nn.relu)  # one module, two calls, as in torchvision
        h = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
        h = relu(nn.BatchNorm(use_running_average=True)(h))
        h = nn.Conv(self.features, (3, 3), use_bias=False)(h)
        h = nn.BatchNorm(use_running_average=True)(h)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.BatchNorm(use_running_average=True)(
                nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x))
        return relu(h + x)


class ResNetLike(nn.Module):
    """ResNet-18 layout (4 stages x 2 basic blocks, 64-512 channels) on 32 x 32 inputs."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (3, 3), use_bias=False)(x)
        x = affjax.Activation(jax.nn.relu)(nn.BatchNorm(use_running_average=True)(x))
        for i, width in enumerate((64, 128, 256, 512)):
            x = BasicBlock(width, 1 if i == 0 else 2)(x)
            x = BasicBlock(width)(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def _setup(batch: int):
    model = ResNetLike()
    x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    return model, variables, x


def _timed(fn, repeats: int, out: dict) -> float:
    """Median warm time of ``fn``; the first call (compiling) goes to ``out["first"]``."""
    t0 = time.perf_counter()
    fn()
    out["first"] = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_mode(mode: str, batch: int, repeats: int) -> dict:
    model, variables, x = _setup(batch)
    forward = jax.jit(lambda v, x: model.apply(v, x))
    layers = capture_layers(model, variables, x)
    out: dict = {"mode": mode, "layers": len(layers),
                 "dims": sorted({int(layer.x.shape[1]) for layer in layers})}
    if mode == "forward":
        out["time"] = _timed(lambda: forward(variables, x).block_until_ready(), repeats, out)
    elif mode == "grouped":
        # Scoring only, on tensors captured once (untimed): one jitted call per group of
        # equal shapes (a lax.map loop inside it on CPU, vmap on accelerators).
        captured = jax.block_until_ready(jax.jit(lambda v, x: capture_layers(model, v, x))(
            variables, x))

        def grouped():
            return score_layers(captured).block_until_ready()

        out["time"] = _timed(grouped, repeats, out)
        out["scores"] = np.asarray(grouped()).tolist()
    elif mode == "fused":
        # Forward pass, capture and scoring in one jitted function.
        fused = jax.jit(lambda v, x: affjax.signature_scores(model, v, x))
        out["time"] = _timed(lambda: fused(variables, x).block_until_ready(), repeats, out)
        out["scores"] = np.asarray(fused(variables, x)).tolist()
    elif mode == "loop":
        pairs = jax.block_until_ready(jax.jit(
            lambda v, x: [(lay.x, lay.y) for lay in capture_layers(model, v, x)])(variables, x))

        def loop():
            return [affjax.affinity_score(a, b).block_until_ready() for a, b in pairs]

        out["time"] = _timed(loop, repeats, out)
        out["scores"] = [float(s) for s in loop()]
    elif mode in ("numpy", "published"):
        pairs = jax.jit(lambda v, x: [(lay.x, lay.y) for lay in capture_layers(model, v, x)])(
            variables, x)
        pairs = [(np.asarray(a), np.asarray(b)) for a, b in pairs]
        assignment = "emd2" if mode == "published" else "lsa"

        stage_runs = []

        def baseline():
            stages = bench_score.Stages()
            scores = [bench_score.published_score(a, b, stages=stages, assignment=assignment)
                      ["score"] for a, b in pairs]
            stage_runs.append(stages.t)
            return scores

        out["time"] = _timed(baseline, max(1, repeats // 2), out)
        out["scores"] = baseline()
        out["stages"] = {k: float(np.median([run[k] for run in stage_runs]))
                         for k in stage_runs[0]}
    else:
        raise ValueError(mode)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


MODES = ("forward", "grouped", "loop", "published", "numpy", "fused")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="which rows to run (default: all)")
    parser.add_argument("--mode-timeout", type=float, default=None,
                        help="seconds allowed to each row's process; a row over it is "
                             "reported as such and the others still run")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="save raw numbers to this path")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.batch, args.repeats)))
        return 0

    bench_score.print_machine(bench_score.machine_description())
    results, failed = {}, {}
    for mode in args.modes:
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--batch", str(args.batch),
                 "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=False, timeout=args.mode_timeout,
            )
        except subprocess.TimeoutExpired:
            failed[mode] = f"over {args.mode_timeout:g} s"
            print(f"{mode}: {failed[mode]}", file=sys.stderr)
            continue
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            failed[mode] = f"failed (exit {proc.returncode})"
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]['time']:.3f} s (first call {results[mode]['first']:.3f} s)",
              file=sys.stderr)

    base = results.get("published", {}).get("time")
    ref = next((results[m]["scores"] for m in ("grouped", "loop", "fused") if m in results), None)
    rows = []
    for mode, label in (("grouped", "scoring: affjax grouped (score_layers)"),
                        ("loop", "scoring: affjax per-layer loop of affinity_score"),
                        ("published", "scoring: published way per layer (NumPy, POT ot.emd2)"),
                        ("numpy", "scoring: the same with linear_sum_assignment"),
                        ("forward", "forward pass only (jit)"),
                        ("fused", "forward + capture + scoring (jit of signature_scores)")):
        if mode in failed:
            rows.append([label, failed[mode], "-", "-", "-", "-"])
            continue
        if mode not in results:
            continue
        r = results[mode]
        diff = ("" if "scores" not in r or ref is None
                else f"{np.abs(np.asarray(r['scores']) - np.asarray(ref)).max():.1e}")
        speedup = "-" if base is None else f"{base / r['time']:.2f}x"
        rows.append([label, f"{r['time']:.3f}", f"{r['first']:.3f}", speedup,
                     f"{r['peak_rss_mib']:.0f}", diff])
    layers = next((r for r in results.values()), None)
    if layers is not None:
        print(f"\nResNet-like, batch {args.batch}, 32x32 inputs, {layers['layers']} "
              f"activation calls, reduced dims {layers['dims']}\n")
    print(bench_score.markdown_table(
        ["method", "time (s)", "first call (s)", "speed-up vs published", "peak RSS (MiB)",
         "max |score diff|"], rows))
    print("first call = the untimed warm-up call (compiling, for the jitted rows)")
    if "grouped" in results and base is not None:
        g = results["grouped"]["time"]
        print(f"\nscoring the captured tensors: grouped {g:.3f} s, published way {base:.3f} s: "
              f"{base / g:.2f}x (target >= 3x)")
    if "numpy" in results and base is not None:
        st = results["numpy"]["stages"]
        bound = 0.5 * st["eigh"] + st["cost"] + st["assign"]
        print(f"one-eigh bound: one float32 eigh per layer {0.5 * st['eigh']:.3f} s + cost "
              f"matrices {st['cost']:.3f} s + assignments {st['assign']:.3f} s = {bound:.3f} s, "
              f"so no exact method with one eigendecomposition per layer beats the published "
              f"way by more than {base / bound:.2f}x at NumPy's speed on this machine")
        results["one_eigh_bound"] = {"time": bound, "max_speedup_vs_published": base / bound}
    results["failed"] = failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
