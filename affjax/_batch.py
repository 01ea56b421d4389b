"""One batch of a run: the forward pass (over slices), the scores, the metrics, timed by stage.

Private to :mod:`affjax.runner`, which calls :func:`batch_signature` once per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any

import numpy as np

from affjax import results
from affjax.options import ScoreOptions

# Forward passes run over slices of this many images: the activation maps of a published
# 2048-image batch at 224 x 224 do not fit in memory at once (docs/cli.md). Exact, since the
# zoo's inference is per sample.
DEFAULT_FORWARD_CHUNK = 256


@functools.lru_cache(maxsize=8)
def _jitted_capture(model: Any, metrics: bool) -> Any:
    """One compiled forward pass per model: the reduced pairs, plus full-tensor sparsity.

    The published sparsity is measured on the full activation tensors: with ``metrics``,
    through the capture's ``on_full_tensors`` hook, one call per layer in forward order.
    """
    import jax
    import jax.numpy as jnp

    from affjax.metrics import sparsity
    from affjax.signature import capture_layers

    def run(variables, x):
        if not metrics:
            return capture_layers(model, variables, x), None
        recorded = []

        def on_full_tensors(a, b):
            recorded.append(jnp.stack([sparsity(a), sparsity(b)]))

        layers = capture_layers(model, variables, x, on_full_tensors=on_full_tensors)
        if len(recorded) != len(layers):
            raise RuntimeError(f"sparsity hook saw {len(recorded)} calls for {len(layers)} "
                               "layers")
        return layers, jnp.stack(recorded)

    return jax.jit(run)


def chunked_capture(capture: Any, variables: Any, images: Any, chunk: int) -> tuple:
    """``capture`` over slices of ``chunk`` images, the reduced pairs joined along samples.

    Exact for models whose inference treats samples independently (the zoo's). Full-tensor
    sparsities are averaged weighted by slice size. Each slice finishes before the next
    starts, so only one slice's activation maps are ever alive.
    """
    import jax
    import jax.numpy as jnp

    n = images.shape[0]
    if chunk >= n:
        return jax.block_until_ready(capture(variables, images))
    parts, weights = [], []
    for start in range(0, n, chunk):
        part = images[start:start + chunk]
        parts.append(jax.block_until_ready(capture(variables, part)))
        weights.append(part.shape[0] / n)
    layers = [
        dataclasses.replace(layer, x=jnp.concatenate([p[0][i].x for p in parts]),
                            y=jnp.concatenate([p[0][i].y for p in parts]))
        for i, layer in enumerate(parts[0][0])
    ]
    sparsities = None
    if parts[0][1] is not None:
        sparsities = sum(w * p[1] for w, p in zip(weights, parts, strict=True))
    return layers, sparsities


class StageClock:
    """Seconds spent in each stage of one batch (``affjax.results.STAGES``).

    ``with clock("forward"): ...`` adds the block's wall time to that stage. A stage ends
    when its results are on the host, so asynchronous work is counted where it runs.
    """

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(results.STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Any:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def batch_signature(model: Any, variables: Any, images: Any, *, options: ScoreOptions,
                     metrics: bool, forward_chunk: int = DEFAULT_FORWARD_CHUNK,
                     clock: StageClock | None = None) -> list[dict]:
    """Scores (and metrics) of every activation call on one batch, one dict per layer.

    ``clock`` receives the time of the forward pass, the scoring and the metrics.
    """
    from affjax.metrics import layer_metrics
    from affjax.signature import score_layers

    clock = clock or StageClock()
    try:
        capture = _jitted_capture(model, metrics)
    except TypeError:  # an unhashable module: compile without the cache
        capture = _jitted_capture.__wrapped__(model, metrics)
    # The forward passes finish before scoring starts: the scoring's LAPACK calls never run
    # beside another XLA:CPU executable (docs/signatures.md, "Batched LAPACK on CPU").
    with clock("forward"):
        layers, sparsities = chunked_capture(capture, variables, images, forward_chunk)
    with clock("score"):
        scores = np.asarray(score_layers(layers, options=options), np.float64)
    rows = []
    with clock("metrics"):
        for i, layer in enumerate(layers):
            row = {"name": layer.name, "kind": layer.kind, "dim": int(layer.x.shape[1]),
                   "score": float(scores[i])}
            if metrics:
                full = (sparsities[i, 0], sparsities[i, 1])
                row["metrics"] = layer_metrics(layer.x, layer.y, full_sparsity=full)
            rows.append(row)
    return rows
