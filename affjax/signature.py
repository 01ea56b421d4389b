"""Non-linearity signatures: the affinity score of every activation call of a model.

``signature_scores`` is the pure, jittable core (scores only);
``signature`` adds names and kinds; ``signature_over_batches`` averages over a
stream of batches. Layers whose reduced shapes agree are scored together by one
vmapped, jitted call, sharded over ``jax.devices()`` when there are several.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from affjax import score as _score
from affjax.capture import Layer  # noqa: F401  (re-export: affjax.signature.Layer)
from affjax.capture import LayerSelection
from affjax.capture import capture_layers
from affjax.layer_scoring import score_layers
from affjax.signature_type import Signature


def signature_scores(
    model: Any,
    variables: Any,
    x: Any,
    *,
    covariance: str = "empirical",
    ridge: float = 1e-6,
    solver: str = "auto",
    sinkhorn_epsilon: float = 1e-2,
    select: LayerSelection | None = None,
    tokens: str = "mean_features",
    functions: bool = True,
    devices: Sequence[Any] | None = None,
    return_output: bool = False,
    **apply_kwargs: Any,
) -> jax.Array | tuple[Any, jax.Array]:
    """The non-linearity signature of a Flax model on a batch, as an array.

    Pure: jittable (``jax.jit(lambda v, x: signature_scores(model, v, x))``) and
    differentiable with respect to ``variables`` (exact solvers hold the
    optimal matching fixed).

    Args:
      model: a ``flax.linen.Module``, or an ``nnx.Module`` with ``variables=None``.
      variables: linen variables (``{"params": ..., "batch_stats": ...}``).
      x: a batch of inputs, batch axis first (at least 2 samples).
      covariance, ridge, solver, sinkhorn_epsilon: passed to :func:`affjax.affinity_score`.
      select: the layers to score, a :class:`affjax.LayerSelection`; default all. Its
        fields are accepted as keywords too, instead of ``select`` (not with it):
        ``include``, ``exclude``: ``fnmatch`` patterns on layer names
        (``["*block1*"]``, or one pattern as a string); ``kinds``, ``exclude_kinds``:
        activation kinds to keep or drop (``["relu"]`` or ``"relu"``).
      tokens: rank-3 reduction, ``"mean_features"`` (published) or ``"mean_tokens"``.
      functions: also capture ``nn.relu(x)``-style calls (see :mod:`affjax.capture`).
      devices: devices to shard the layer-parallel scoring over; default all.
      return_output: also return the model's output from the same forward pass
        (for a loss that needs both, see :mod:`affjax.regularizers`).
      **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``), but for the
        selection keywords above.

    Returns:
      ``(L,)`` scores in forward-pass order; with ``return_output``,
      ``(output, scores)``, ``output`` as ``model.apply`` returns it (``(y,
      updated)`` with ``mutable``).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from affjax import Activation
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(1)(Activation(jnp.tanh)(nn.Dense(16)(x)))
      >>> x = jax.random.normal(jax.random.key(0), (256, 4), jnp.float32)
      >>> model = MLP(); variables = model.init(jax.random.key(1), x)
      >>> scores = signature_scores(model, variables, x)
      >>> scores.shape, scores.dtype
      ((1,), dtype('float32'))
    """
    _score.check_options(covariance, solver, ridge=ridge, sinkhorn_epsilon=sinkhorn_epsilon)
    select = LayerSelection.pop_from(select, apply_kwargs)
    # Only with return_output: the pass then stands for the model's own call (an NNX
    # model's state updates are written back); a signature alone leaves the model as it was.
    captured = capture_layers(model, variables, x, tokens=tokens, functions=functions,
                              return_output=return_output, **apply_kwargs)
    layers, output = captured if return_output else (captured, None)
    layers = select.apply(layers)
    scores = score_layers(layers, covariance=covariance, ridge=ridge, solver=solver,
                          sinkhorn_epsilon=sinkhorn_epsilon,
                          devices=devices)
    return (output, scores) if return_output else scores


@functools.lru_cache(maxsize=32)
def _jitted_capture(model: Any, tokens: str, functions: bool, kwargs: tuple) -> Any:
    return jax.jit(functools.partial(capture_layers, model, tokens=tokens, functions=functions,
                                     **dict(kwargs)))


def _compiled_capture(model: Any, tokens: str, functions: bool, apply_kwargs: dict) -> Any:
    """A cached jitted capture for linen models (one compilation per model and shape).

    The capture alone is jitted and the scoring runs as separate jitted calls, one per
    group of equal shapes, so each compiled scorer is shared by every model and batch with
    layers of that shape.
    """
    if isinstance(model, nnx.Module):
        return None
    try:
        return _jitted_capture(model, tokens, functions, tuple(sorted(apply_kwargs.items())))
    except TypeError:  # unhashable model or options: capture eagerly
        return None


def signature(
    model: Any,
    variables: Any,
    x: Any,
    *,
    covariance: str = "empirical",
    ridge: float = 1e-6,
    solver: str = "auto",
    sinkhorn_epsilon: float = 1e-2,
    select: LayerSelection | None = None,
    tokens: str = "mean_features",
    functions: bool = True,
    devices: Sequence[Any] | None = None,
    **apply_kwargs: Any,
) -> Signature:
    """The signature of a model on one batch, with names (see :func:`signature_scores`).

    Args:
      model, variables, x: as in :func:`signature_scores`.
      covariance, ridge, solver, sinkhorn_epsilon, select, include, exclude, kinds,
        exclude_kinds, tokens, functions, devices, **apply_kwargs: as in
        :func:`signature_scores`.

    Returns:
      A :class:`Signature`; ``scores`` is a float64 NumPy copy of the scores
      computed in the model's dtype.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from affjax import Activation
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(1)(Activation(jnp.tanh)(nn.Dense(8)(x)))
      >>> x = jax.random.normal(jax.random.key(0), (64, 3), jnp.float32)
      >>> model = MLP(); variables = model.init(jax.random.key(1), x)
      >>> sig = signature(model, variables, x)
      >>> sig.names, sig.kinds, sig.dims, sig.scores.dtype
      (['Activation_0:0'], ['tanh'], [8], dtype('float64'))
      >>> print(sig)   # a table, one row per activation call
        #  layer           kind    dim    score
      -----------------------------------------
        0  Activation_0:0  tanh      8   0...
    """
    _score.check_options(covariance, solver, ridge=ridge, sinkhorn_epsilon=sinkhorn_epsilon)
    select = LayerSelection.pop_from(select, apply_kwargs)
    capture = _compiled_capture(model, tokens, functions, apply_kwargs)
    layers = capture(variables, x) if capture is not None else capture_layers(
        model, variables, x, tokens=tokens, functions=functions, **apply_kwargs)
    layers = select.apply(layers)
    scores = score_layers(layers, covariance=covariance, ridge=ridge, solver=solver,
                          sinkhorn_epsilon=sinkhorn_epsilon,
                          devices=devices)
    return Signature(names=[layer.name for layer in layers], kinds=[layer.kind for layer in layers],
                     scores=np.asarray(scores, np.float64),
                     dims=[int(layer.x.shape[1]) for layer in layers])


def signature_over_batches(
    model: Any,
    variables: Any,
    batches: Iterable[Any],
    *,
    progress: bool = True,
    **kwargs: Any,
) -> Signature:
    """Per-batch signatures and their mean and standard deviation over batches.

    Args:
      model, variables: as in :func:`signature`.
      batches: an iterable of input batches (each at least 2 samples).
      progress: print a progress line per batch on stderr.
      **kwargs: options of :func:`signature` (``covariance``, ``select``, ``include``,
        ...); a selection is converted to one :class:`affjax.LayerSelection` for all
        batches.

    Returns:
      :class:`Signature` with ``scores`` the mean, ``std`` and ``batch_scores``
      (``(B, L)``). ``std`` is the population standard deviation (``ddof=0``).

    Raises:
      ValueError: no batches, batches whose activation calls differ, or a
        batch :func:`signature` rejects (the message starts with its index;
        drop a last batch of one sample).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from affjax import Activation
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(1)(Activation(jnp.tanh)(nn.Dense(8)(x)))
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> batches = [jax.random.normal(k, (32, 3), jnp.float32) for k in keys]
      >>> model = MLP(); variables = model.init(jax.random.key(1), batches[0])
      >>> sig = signature_over_batches(model, variables, batches, progress=False)
      >>> sig.batch_scores.shape, sig.std.shape
      ((3, 1), (1,))
    """
    kwargs["select"] = LayerSelection.pop_from(kwargs.pop("select", None), kwargs)
    rows, first = [], None
    start = time.perf_counter()
    for b, batch in enumerate(batches):
        try:
            sig = signature(model, variables, batch, **kwargs)
        except ValueError as err:  # say which batch: often a short last batch
            raise ValueError(f"batch {b}: {err}") from err
        if first is None:
            first = sig
        elif sig.names != first.names:
            raise ValueError(f"batch {b} gives different activation calls than batch 0")
        elif list(sig.dims) != list(first.dims):
            # e.g. token tensors of another length, reduced to another number of features
            changed = [f"{n} ({d0} -> {d})" for n, d0, d in
                       zip(sig.names, first.dims, sig.dims, strict=True) if d0 != d][:3]
            raise ValueError(f"batch {b} reduces some activations to other widths than batch "
                             f"0: {', '.join(changed)}; their scores would not be comparable")
        rows.append(sig.scores)
        if progress:
            print(f"\rsignature: batch {b + 1}, {len(sig)} layers, "
                  f"{time.perf_counter() - start:.1f} s", end="", file=sys.stderr, flush=True)
    if progress and rows:
        print(file=sys.stderr)
    if first is None:
        raise ValueError("no batches given")
    table = np.stack(rows)
    return dataclasses.replace(first, scores=table.mean(0), std=table.std(0), batch_scores=table)
