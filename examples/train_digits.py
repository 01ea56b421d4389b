"""Train a small CNN and an MLP on scikit-learn's digits, with and without the regularizer.

The digits data (1797 8x8 images, 10 classes) ships with scikit-learn: nothing downloads.
For each model and each setting the script trains from the same initialisation and reports
train/test accuracy, the per-layer non-linearity signature on the test set before and after
training, the mean affinity score of the training batches along the way, and the step time
with and without the regularizer term.

Settings (``--settings``):

* ``none``: cross-entropy only (the step does not capture activations at all);
* ``affine``: ``+ mean_nonlinearity(weight=+w)``, penalising non-linearity;
* ``nonlinear``: ``+ mean_nonlinearity(weight=-w)``, rewarding it;
* ``target``: ``+ target_penalty(target=t, weight=w_t)``, every layer towards score ``t``.

Run from the repository root::

    PYTHONPATH=. python examples/train_digits.py            # a few minutes on 2 CPU cores
    PYTHONPATH=. python examples/train_digits.py --quick    # well under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import affjax
from affjax import regularizers

SETTINGS: tuple[str, ...] = ("none", "affine", "nonlinear", "target")


class MLP(nn.Module):
    """64 -> 64 -> 64 -> 10, ReLU."""

    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.width, name="dense0")(h))
        h = nn.relu(nn.Dense(self.width, name="dense1")(h))
        return nn.Dense(10, name="head")(h)


class CNN(nn.Module):
    """conv 3x3 (16) -> conv 3x3 (32) -> 2x2 average pool -> dense 64 -> 10, ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Conv(16, (3, 3), name="conv0")(x))
        h = nn.relu(nn.Conv(32, (3, 3), name="conv1")(h))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = nn.relu(nn.Dense(64, name="dense0")(h.reshape(h.shape[0], -1)))
        return nn.Dense(10, name="head")(h)


MODELS = {"mlp": MLP, "cnn": CNN}


@dataclasses.dataclass
class Config:
    """Training options (the command-line flags)."""

    models: tuple[str, ...] = ("mlp", "cnn")
    settings: tuple[str, ...] = SETTINGS
    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight: float = 1.0  # |weight| of mean_nonlinearity for "affine" / "nonlinear"
    target: float = 0.5
    target_weight: float = 10.0
    solver: str = "auto"
    seed: int = 0
    timing_repeats: int = 20


def load_data(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits as NHWC float32 in [0, 1], a stratified 75/25 train/test split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int32), test_size=0.25, random_state=seed,
        stratify=digits.target)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _term_weights(setting: str, cfg: Config) -> tuple[float, float, float]:
    """(mean-non-linearity weight, target weight, target) of a setting."""
    if setting == "affine":
        return cfg.weight, 0.0, cfg.target
    if setting == "nonlinear":
        return -cfg.weight, 0.0, cfg.target
    if setting == "target":
        return 0.0, cfg.target_weight, cfg.target
    return 0.0, 0.0, cfg.target


def make_steps(model: nn.Module, optimizer: optax.GradientTransformation, solver: str):
    """Jitted train steps: ``plain`` (cross-entropy) and ``regularized`` (plus the terms).

    The term weights and the target are arguments of ``regularized``, so every setting
    shares one compilation.
    """

    def cross_entropy(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def plain_loss(params, x, labels):
        return cross_entropy(model.apply({"params": params}, x), labels), jnp.zeros(())

    def regularized_loss(params, x, labels, nl_weight, target_weight, target):
        # One forward pass gives both the logits and the scores.
        logits, scores = regularizers.output_and_scores(
            model, {"params": params}, x, solver=solver)
        loss = (cross_entropy(logits, labels)
                + regularizers.mean_nonlinearity_from_scores(scores, weight=nl_weight)
                + regularizers.target_penalty_from_scores(scores, target=target,
                                                          weight=target_weight))
        return loss, jnp.mean(scores)

    def make(loss_fn):
        @jax.jit
        def step(params, opt_state, x, labels, *term_args):
            (loss, mean_score), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, x, labels, *term_args)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, mean_score

        return step

    return make(plain_loss), make(regularized_loss)


def accuracy(model: nn.Module, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y))


def _signature_dict(sig: affjax.Signature) -> dict[str, Any]:
    return {"names": sig.names, "kinds": sig.kinds, "dims": sig.dims,
            "scores": [float(s) for s in sig.scores]}


def measure_step_times(plain, regularized, params, opt_state, x, y, term_args, repeats):
    """Median warm step times (s) of both steps on one batch, interleaved."""
    times: dict[str, list[float]] = {"plain": [], "regularized": []}
    for fn, _name, args in ((plain, "plain", ()), (regularized, "regularized", term_args)):
        jax.block_until_ready(fn(params, opt_state, x, y, *args))  # compile / warm up
    for _ in range(repeats):
        for fn, name, args in ((plain, "plain", ()), (regularized, "regularized", term_args)):
            start = time.perf_counter()
            jax.block_until_ready(fn(params, opt_state, x, y, *args))
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run_model(name: str, cfg: Config, data: dict[str, np.ndarray],
              log: Any = sys.stdout) -> dict[str, Any]:
    """Train one model in every setting from the same initialisation."""
    model = MODELS[name]()
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    params0 = model.init(jax.random.key(cfg.seed), x_train[:2])["params"]
    optimizer = optax.adam(cfg.learning_rate)
    plain, regularized = make_steps(model, optimizer, cfg.solver)
    n_batches = len(x_train) // cfg.batch_size
    sig_kwargs = {"solver": cfg.solver}
    before = affjax.signature(model, {"params": params0}, x_test, **sig_kwargs)
    result: dict[str, Any] = {"model": name, "signature_before": _signature_dict(before),
                              "settings": {}}
    for setting in cfg.settings:
        nl_weight, target_weight, target = _term_weights(setting, cfg)
        term_args = (jnp.float32(nl_weight), jnp.float32(target_weight), jnp.float32(target))
        params, opt_state = params0, optimizer.init(params0)
        rng = np.random.default_rng(cfg.seed)
        history, step_times = [], []
        start = time.perf_counter()
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(x_train))
            for b in range(n_batches):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                t0 = time.perf_counter()
                if setting == "none":
                    params, opt_state, loss, _ = plain(params, opt_state, x_train[idx],
                                                       y_train[idx])
                else:
                    params, opt_state, loss, mean_score = regularized(
                        params, opt_state, x_train[idx], y_train[idx], *term_args)
                    history.append(float(mean_score))
                loss = float(loss)  # waits for the step
                if epoch or b:  # the first step compiles
                    step_times.append(time.perf_counter() - t0)
            print(f"  {name} {setting:<9} epoch {epoch + 1:>2}/{cfg.epochs} loss {loss:.4f}",
                  file=log, flush=True)
        after = affjax.signature(model, {"params": params}, x_test, **sig_kwargs)
        result["settings"][setting] = {
            "train_accuracy": accuracy(model, params, x_train, y_train),
            "test_accuracy": accuracy(model, params, x_test, y_test),
            "signature_after": _signature_dict(after),
            "mean_score_after": float(np.mean(after.scores)),
            "train_batch_mean_score": history,
            "median_step_s": statistics.median(step_times) if step_times else float("nan"),
            "wall_s": time.perf_counter() - start,
        }
    # Overhead of the term on one batch, both steps interleaved from the initial parameters.
    nl_weight, target_weight, target = _term_weights("affine", cfg)
    result["step_time"] = measure_step_times(
        plain, regularized, params0, optimizer.init(params0), x_train[:cfg.batch_size],
        y_train[:cfg.batch_size],
        (jnp.float32(nl_weight), jnp.float32(target_weight), jnp.float32(target)),
        cfg.timing_repeats)
    result["mean_score_before"] = float(np.mean(before.scores))
    return result


def run(cfg: Config, log: Any = sys.stdout) -> dict[str, Any]:
    """Train every model in every setting; returns the numbers the tables print."""
    for setting in cfg.settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; expected some of {SETTINGS}")
    for name in cfg.models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected some of {tuple(MODELS)}")
    data = load_data(cfg.seed)
    start = time.perf_counter()
    results = [run_model(name, cfg, data, log) for name in cfg.models]
    return {"config": dataclasses.asdict(cfg), "models": results,
            "backend": jax.default_backend(), "wall_s": time.perf_counter() - start}


def format_report(out: dict[str, Any]) -> str:
    """Accuracy, signature and step-time tables as text."""
    lines = []
    cfg = out["config"]
    lines.append(f"solver={cfg['solver']} epochs={cfg['epochs']} batch={cfg['batch_size']} "
                 f"weight={cfg['weight']} target={cfg['target']} (weight {cfg['target_weight']})"
                 f" backend={out['backend']}")
    for res in out["models"]:
        lines.append("")
        lines.append(f"== {res['model']} ==")
        head = f"{'setting':<10} {'train acc':>9} {'test acc':>9} {'mean score':>10} {'step ms':>8}"
        lines.append(head)
        lines.append("-" * len(head))
        lines.append(f"{'(init)':<10} {'':>9} {'':>9} {res['mean_score_before']:>10.4f} {'':>8}")
        for setting, r in res["settings"].items():
            lines.append(f"{setting:<10} {r['train_accuracy']:>9.4f} {r['test_accuracy']:>9.4f} "
                         f"{r['mean_score_after']:>10.4f} {1e3 * r['median_step_s']:>8.2f}")
        lines.append("")
        names = res["signature_before"]["names"]
        width = max(len("layer"), *(len(n) for n in names))
        head = f"{'layer':<{width}} {'dim':>4} {'init':>7} " + " ".join(
            f"{s:>9}" for s in res["settings"])
        lines.append("signature on the test set, before (init) and after training:")
        lines.append(head)
        lines.append("-" * len(head))
        for i, n in enumerate(names):
            row = f"{n:<{width}} {res['signature_before']['dims'][i]:>4} "
            row += f"{res['signature_before']['scores'][i]:>7.4f} "
            row += " ".join(f"{r['signature_after']['scores'][i]:>9.4f}"
                            for r in res["settings"].values())
            lines.append(row)
        st = res["step_time"]
        lines.append("")
        lines.append(f"step time, batch {cfg['batch_size']} (median of {cfg['timing_repeats']}, "
                     f"interleaved): without term {1e3 * st['plain']:.2f} ms, with term "
                     f"{1e3 * st['regularized']:.2f} ms, ratio "
                     f"{st['regularized'] / st['plain']:.2f}x")
    lines.append("")
    lines.append(f"total {out['wall_s']:.1f} s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(Config.models), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(Config.settings),
                        choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--batch-size", type=int, default=Config.batch_size)
    parser.add_argument("--learning-rate", type=float, default=Config.learning_rate)
    parser.add_argument("--weight", type=float, default=Config.weight,
                        help="|weight| of the mean non-linearity term (affine / nonlinear)")
    parser.add_argument("--target", type=float, default=Config.target)
    parser.add_argument("--target-weight", type=float, default=Config.target_weight)
    parser.add_argument("--solver", default=Config.solver,
                        choices=["auto", "scipy", "hungarian", "sinkhorn"])
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--quick", action="store_true",
                        help="3 epochs, settings none/affine/nonlinear, 5 timing repeats")
    parser.add_argument("--json", help="save the results to this path")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2 (a covariance needs 2 samples), "
                     f"got {args.batch_size}")
    if not 0.0 <= args.target <= 1.0:
        parser.error(f"--target must lie in [0, 1], got {args.target}")
    cfg = Config(models=tuple(args.models), settings=tuple(args.settings), epochs=args.epochs,
                 batch_size=args.batch_size, learning_rate=args.learning_rate,
                 weight=args.weight, target=args.target, target_weight=args.target_weight,
                 solver=args.solver, seed=args.seed)
    if args.quick:
        cfg = quick_config(cfg)
    return cfg, args.json


def quick_config(cfg: Config | None = None) -> Config:
    """The ``--quick`` settings (notebook, CI): 3 epochs, three settings, 5 timing repeats."""
    cfg = cfg or Config()
    settings = tuple(s for s in cfg.settings if s != "target") or cfg.settings
    return dataclasses.replace(cfg, epochs=3, settings=settings, timing_repeats=5)


def main(argv: Sequence[str] | None = None) -> None:
    cfg, json_path = parse_args(argv)
    out = run(cfg, log=sys.stderr)
    print(format_report(out))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
