"""Step time of a training step with and without the affinity regularizer, and solver bias.

For the digits MLP and CNN of ``examples/train_digits.py`` at two batch sizes, one run times,
side by side and interleaved (round robin, median of ``--repeats``):

* ``plain``: cross-entropy only, no capture;
* ``scipy`` / ``hungarian`` / ``sinkhorn``: cross-entropy + ``mean_nonlinearity`` computed
  with that solver, logits and scores from one forward pass (``output_and_scores``);
* ``2-pass``: the same with ``solver="scipy"``, but the logits from a separate
  ``model.apply`` (what calling ``target_penalty``/``mean_nonlinearity`` next to the task
  loss costs).

Then, at the initial parameters, the bias of each solver against the exact score (host
assignment, ``scipy``): the largest per-layer score difference, and the cosine and relative
norm difference between the term's gradient and the exact one.

Timings on a machine shared with other work are noisy: both the median and the minimum
are printed, with the load average. Run from the repository root; on 2 CPU cores at a load
average of 8 the run with ``--sinkhorn-batch-sizes 64 256`` took 8.5 minutes, about 3 of
them for sinkhorn at batch 256, which the default leaves out::

    PYTHONPATH=. python benchmarks/bench_regularizer.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from affjax import regularizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_digits  # noqa: E402  (the models and data of the example)

SOLVERS = ("scipy", "hungarian", "sinkhorn")


def make_step(model, optimizer, kind: str):
    """A jitted train step: ``plain``, ``2-pass`` or a solver name."""

    def cross_entropy(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def loss_fn(params, x, labels):
        variables = {"params": params}
        if kind == "plain":
            return cross_entropy(model.apply(variables, x), labels)
        if kind == "2-pass":
            return cross_entropy(model.apply(variables, x), labels) + (
                regularizers.mean_nonlinearity(model, variables, x, weight=1.0, solver="scipy"))
        logits, scores = regularizers.output_and_scores(model, variables, x, solver=kind)
        return cross_entropy(logits, labels) + regularizers.mean_nonlinearity_from_scores(
            scores, weight=1.0)

    @jax.jit
    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def time_steps(model, params, x, y, kinds, repeats, sinkhorn_repeats):
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    steps, compile_s = {}, {}
    for kind in kinds:
        steps[kind] = make_step(model, optimizer, kind)
        start = time.perf_counter()
        jax.block_until_ready(steps[kind](params, opt_state, x, y))
        compile_s[kind] = time.perf_counter() - start
    times = {kind: [] for kind in kinds}
    for r in range(repeats):
        for kind in kinds:
            if kind == "sinkhorn" and r >= sinkhorn_repeats:
                continue
            start = time.perf_counter()
            jax.block_until_ready(steps[kind](params, opt_state, x, y))
            times[kind].append(time.perf_counter() - start)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()}, compile_s)


def solver_bias(model, params, x, solvers):
    """Score and gradient differences of each solver against the exact host solver."""

    def term(flat, solver):
        _, scores = regularizers.output_and_scores(model, {"params": unravel(flat)}, x,
                                                   solver=solver)
        return regularizers.mean_nonlinearity_from_scores(scores), scores

    flat, unravel = ravel_pytree(params)
    out = {}
    for solver in ("scipy", *solvers):
        grad_fn = jax.jit(jax.grad(lambda f, s=solver: term(f, s), has_aux=True))
        grad, scores = grad_fn(flat)
        out[solver] = (np.asarray(scores, np.float64), np.asarray(grad, np.float64))
    exact_scores, exact_grad = out["scipy"]
    rows = {}
    for solver in solvers:
        scores, grad = out[solver]
        rows[solver] = {
            "max_abs_score_diff": float(np.max(np.abs(scores - exact_scores))),
            "mean_score_diff": float(np.mean(scores - exact_scores)),
            "grad_cosine": float(grad @ exact_grad
                                 / (np.linalg.norm(grad) * np.linalg.norm(exact_grad))),
            "grad_rel_diff": float(np.linalg.norm(grad - exact_grad)
                                   / np.linalg.norm(exact_grad)),
        }
    return rows, exact_scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"],
                        choices=list(train_digits.MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sinkhorn-models", nargs="*", default=["mlp"],
                        help="models whose sinkhorn step is timed (seconds per step)")
    parser.add_argument("--sinkhorn-batch-sizes", nargs="*", type=int, default=[64],
                        help="batch sizes at which sinkhorn is timed (32 s per step at 256)")
    parser.add_argument("--sinkhorn-repeats", type=int, default=2)
    args = parser.parse_args(argv)

    data = train_digits.load_data(0)
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.1f}; median of {args.repeats} interleaved warm steps "
          f"({args.sinkhorn_repeats} for sinkhorn)")
    results, bias = [], []
    start = time.perf_counter()
    for name in args.models:
        model = train_digits.MODELS[name]()
        params = model.init(jax.random.key(0), data["x_train"][:2])["params"]
        for batch in args.batch_sizes:
            kinds = ["plain", "scipy", "hungarian", "2-pass"]
            if name in args.sinkhorn_models and batch in args.sinkhorn_batch_sizes:
                kinds.append("sinkhorn")
            x, y = data["x_train"][:batch], data["y_train"][:batch]
            med, best, compile_s = time_steps(model, params, x, y, kinds, args.repeats,
                                              args.sinkhorn_repeats)
            results.append((name, batch, med, best, compile_s))
            print(f"  {name} batch {batch} ({time.perf_counter() - start:.0f} s): median ms "
                  + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in med.items()) + "; min ms "
                  + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in best.items()),
                  file=sys.stderr, flush=True)
            solvers = ["hungarian"] + (["sinkhorn"] if "sinkhorn" in kinds else [])
            rows, exact = solver_bias(model, params, x, solvers)
            bias.append((name, batch, rows, exact))

    cols = ["plain", "scipy", "hungarian", "2-pass", "sinkhorn"]
    head = f"{'model':<5} {'batch':>5} " + " ".join(f"{c + ' ms':>13}" for c in cols)
    head += f" {'scipy/plain':>11} {'hung./plain':>11} {'2-pass/1-pass':>13}"
    for label, index in (("median", 2), ("minimum", 3)):
        print(f"\nstep time (ms, {label}) with the term computed by each solver, and ratios")
        print(head)
        print("-" * len(head))
        for row in results:
            name, batch, t = row[0], row[1], row[index]
            cells = " ".join(f"{1e3 * t[c]:>13.2f}" if c in t else f"{'-':>13}" for c in cols)
            print(f"{name:<5} {batch:>5} {cells} {t['scipy'] / t['plain']:>11.2f} "
                  f"{t['hungarian'] / t['plain']:>11.2f} {t['2-pass'] / t['scipy']:>13.2f}")
    print("\ncompile + first step (s)")
    for name, batch, _, _, compile_s in results:
        print(f"{name:<5} {batch:>5} " + " ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))

    print("\nbias against the exact score (scipy), initial parameters")
    head = (f"{'model':<5} {'batch':>5} {'solver':<9} {'exact mean score':>16} "
            f"{'max |d score|':>13} {'mean d score':>12} {'grad cosine':>11} "
            f"{'grad rel diff':>13}")
    print(head)
    print("-" * len(head))
    for name, batch, rows, exact in bias:
        for solver, r in rows.items():
            print(f"{name:<5} {batch:>5} {solver:<9} {np.mean(exact):>16.4f} "
                  f"{r['max_abs_score_diff']:>13.2e} {r['mean_score_diff']:>12.2e} "
                  f"{r['grad_cosine']:>11.6f} {r['grad_rel_diff']:>13.2e}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s, load average at end "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
