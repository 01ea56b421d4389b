"""Per-shape timing of the convolution formulations of ``affjax.models.layers.conv2d``.

XLA's CPU convolution is slow on small maps (a 3x3 convolution on 2x2 maps runs at about
2 GFLOP/s) and for depthwise and narrow grouped convolutions, so on CPU the zoo writes some
convolutions as taps + one matrix product (``im2col``) or as broadcast multiply-adds per tap
and input channel of a group (``taps``); ``layers.conv_formulation`` holds the rule. This
script collects the distinct convolution shapes of some zoo models at some input sizes
(abstract trace, no compute), times every formulation that applies to each shape (jitted,
warm, best of a few calls) and prints them next to the rule's choice, so the rule's
crossovers can be checked on a new machine. Run from the repository root:

    python benchmarks/bench_conv.py --models resnet18 resnet50 --sizes 32 64 224 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from affjax import models  # noqa: E402
from affjax.models import layers  # noqa: E402


def conv_shapes(name: str, size: int, batch: int) -> list[dict]:
    """Every convolution call of ``name`` at ``size`` px: input/kernel shapes and settings."""
    found = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, layers.Conv) and context.method_name == "__call__":
            x = args[0]
            cin = x.shape[-1]
            found.append(dict(x=tuple(x.shape), kernel=(*module.kernel_size,
                                                        cin // module.feature_group_count,
                                                        module.features),
                              strides=tuple(module.strides), padding=tuple(module.padding),
                              dilation=tuple(module.kernel_dilation),
                              groups=module.feature_group_count))
        return next_fun(*args, **kwargs)

    model = models.get_spec(name).build(num_classes=1000)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return found


def time_call(fn, *args, repeats: int, budget: float) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    stop = time.perf_counter() + budget
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > stop:
            break
    return best


def applicable(shape: dict) -> list[str]:
    out = ["xla"]
    if shape["groups"] == 1:
        out.append("im2col")
    else:
        out.append("taps")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnext50_32x4d"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 224])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per cell")
    p.add_argument("--max-out", type=int, default=1 << 30,
                   help="skip shapes whose output map has more pixels than this")
    p.add_argument("--grouped-only", action="store_true", help="only grouped convolutions")
    p.add_argument("--shape", action="append", default=[], metavar="H,C,O,K,S,P,G",
                   help="time this square convolution instead of the models' (repeatable): "
                        "map side, in channels, out channels, kernel, stride, padding, groups")
    p.add_argument("--json", help="save the rows here")
    a = p.parse_args(argv)
    print(f"# jax {jax.__version__} backend {jax.default_backend()} "
          f"load {os.getloadavg()[0]:.2f} batch {a.batch}", flush=True)
    seen: dict[tuple, set] = {}
    for spec in a.shape:
        h, c, o, k, st, pd, g = (int(v) for v in spec.split(","))
        seen[((a.batch, h, h, c), (k, k, c // g, o), (st, st), ((pd, pd), (pd, pd)), (1, 1),
              g)] = {"--shape"}
    for name in [] if a.shape else a.models:
        for size in a.sizes:
            for s in conv_shapes(name, size, a.batch):
                key = (s["x"], s["kernel"], s["strides"], s["padding"], s["dilation"],
                       s["groups"])
                seen.setdefault(key, set()).add(f"{name}@{size}")
    rows = []
    rng = np.random.default_rng(0)
    hdr = (f"{'input':>20} {'kernel':>18} {'s':>1} {'p':>1} {'g':>4} {'out':>5} {'GFLOP':>7} "
           f"{'xla ms':>9} {'im2col ms':>9} {'taps ms':>9} {'rule':>9} {'best':>9} "
           f"{'rule/best':>9}")
    print(hdr)
    for key in sorted(seen, key=lambda k: (k[0][1], k[1])):
        xs, ks, st, pad, dil, g = key
        kw = dict(strides=st, padding=pad, dilation=dil, groups=g)
        ho = layers._conv_out_size(xs[1], pad[0], ks[0], st[0], dil[0])
        wo = layers._conv_out_size(xs[2], pad[1], ks[1], st[1], dil[1])
        if ho * wo > a.max_out or a.grouped_only and g == 1:
            continue
        flops = 2 * xs[0] * ho * wo * ks[0] * ks[1] * ks[2] * ks[3] / 1e9
        x = jnp.asarray(rng.standard_normal(xs, np.float32))
        k = jnp.asarray(rng.standard_normal(ks, np.float32))
        times = {}
        for f in applicable(dict(x=xs, kernel=ks, groups=g)):
            fn = jax.jit(lambda x, k, f=f, kw=kw: layers.conv2d(x, k, formulation=f, **kw))
            times[f] = time_call(fn, x, k, repeats=a.repeats, budget=a.budget)
        rule = layers.conv_formulation(xs, ks, **kw, backend="cpu")
        best = min(times, key=times.get)
        def cell(f, times=times):
            return f"{times[f] * 1e3:9.2f}" if f in times else f"{'-':>9}"

        print(f"{str(xs):>20} {str(ks):>18} {st[0]:>1} {pad[0][0]:>1} {g:>4} "
              f"{ho:>2}x{wo:<2} {flops:7.3f} {cell('xla')} {cell('im2col')} {cell('taps')} "
              f"{rule:>9} {best:>9} {times[rule] / times[best]:9.2f}", flush=True)
        rows.append(dict(x=xs, kernel=ks, strides=st, padding=pad, groups=g, out=(ho, wo),
                         gflop=flops, times=times, rule=rule, best=best,
                         used_by=sorted(seen[key])))
    print(f"# load at end {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
