"""Non-linearity signatures: the affinity score of every activation call of a model.

``signature_scores`` is the pure, jittable core (scores only);
``signature`` adds names and kinds; ``signature_over_batches`` averages over a
stream of batches. Layers whose reduced shapes agree are scored together by one
vmapped, jitted call, sharded over ``jax.local_devices()`` when there are several.
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

from affjax.capture import Layer  # noqa: F401  (re-export: affjax.signature.Layer)
from affjax.capture import LayerSelection
from affjax.capture import capture_layers
from affjax.layer_scoring import score_layers
from affjax.options import ScoreOptions
from affjax.signature_type import Signature


def signature_scores(
    model: Any,
    variables: Any,
    x: Any,
    *,
    return_output: bool = False,
    **kwargs: Any,
) -> jax.Array | tuple[Any, jax.Array]:
    """The non-linearity signature of a Flax model on a batch, as an array.

    Pure: jittable (``jax.jit(lambda v, x: signature_scores(model, v, x))``) and
    differentiable with respect to ``variables`` (exact solvers hold the
    optimal matching fixed).

    Args:
      model: a ``flax.linen.Module``, or an ``nnx.Module`` with ``variables=None``.
      variables: linen variables (``{"params": ..., "batch_stats": ...}``).
      x: a batch of inputs, batch axis first (at least 2 samples).
      return_output: also return the model's output from the same forward pass
        (for a loss that needs both, see :mod:`affjax.regularizers`).
      **kwargs: the signature's keywords, converted once where they enter:
      options: how each layer is scored, a :class:`affjax.ScoreOptions`; default
        the published settings. Its fields are accepted as keywords too, instead of
        ``options`` (not with it): ``covariance``, ``ridge``, ``solver``, ``path``,
        ``sinkhorn_epsilon``, as in :func:`affjax.affinity_score`.
      select: the layers to score, a :class:`affjax.LayerSelection`; default all. Its
        fields are accepted as keywords too, instead of ``select`` (not with it):
        ``include``, ``exclude``: ``fnmatch`` patterns on layer names
        (``["*block1*"]``, or one pattern as a string); ``kinds``, ``exclude_kinds``:
        activation kinds to keep or drop (``["relu"]`` or ``"relu"``).
      tokens: rank-3 reduction, ``"mean_features"`` (published) or ``"mean_tokens"``.
      functions: also capture ``nn.relu(x)``-style calls (see :mod:`affjax.capture`).
      devices: devices to shard the layer-parallel scoring over; default all of this
        process's (``jax.local_devices()``).
      The other keywords go to ``model.apply`` (e.g. ``train=False``).

    Returns:
      ``(L,)`` scores in forward-pass order; with ``return_output``,
      ``(output, scores)``, ``output`` as ``model.apply`` returns it (``(y,
      updated)`` with ``mutable``).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from affjax import ScoreOptions
      >>> class MLP(nn.Module):   # nn.gelu called at run time is captured
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(1)(nn.gelu(nn.Dense(16)(x)))
      >>> x = jax.random.normal(jax.random.key(0), (256, 4), jnp.float32)
      >>> model = MLP(); variables = model.init(jax.random.key(1), x)
      >>> options = ScoreOptions(ridge=1e-5)
      >>> scores = jax.jit(lambda v, x: signature_scores(model, v, x, options=options))(
      ...     variables, x)
      >>> scores.shape, scores.dtype
      ((1,), dtype('float32'))
    """
    request = _Request.pop_from(kwargs)
    # Only with return_output: the pass then stands for the model's own call (an NNX
    # model's state updates are written back); a signature alone leaves the model as it was.
    captured = capture_layers(model, variables, x, tokens=request.tokens,
                              functions=request.functions, return_output=return_output,
                              **request.apply_kwargs)
    layers, output = captured if return_output else (captured, None)
    scores = request.score(layers)
    return (output, scores) if return_output else scores


@dataclasses.dataclass(frozen=True, eq=False)
class _Request:
    """The keywords of a signature call (see :func:`signature_scores`), converted once."""

    options: ScoreOptions
    select: LayerSelection
    tokens: str
    functions: bool
    devices: Sequence[Any] | None
    apply_kwargs: dict[str, Any]

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> _Request:
        options = ScoreOptions.pop_from(kwargs.pop("options", None), kwargs)
        select = LayerSelection.pop_from(kwargs.pop("select", None), kwargs)
        return cls(options, select, kwargs.pop("tokens", "mean_features"),
                   kwargs.pop("functions", True), kwargs.pop("devices", None), kwargs)

    def score(self, layers: list[Layer]) -> jax.Array:
        """The selected layers' scores."""
        return score_layers(self.select.apply(layers), options=self.options,
                            devices=self.devices)


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
    **kwargs: Any,
) -> Signature:
    """The signature of a model on one batch, with names (see :func:`signature_scores`).

    Args:
      model, variables, x: as in :func:`signature_scores`.
      **kwargs: as in :func:`signature_scores` (``options``, ``select``, ``tokens``,
        ``functions``, ``devices``, their keywords, and ``model.apply``'s).

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
    return _signature(model, variables, x, _Request.pop_from(kwargs))


def _signature(model: Any, variables: Any, x: Any, request: _Request) -> Signature:
    capture = _compiled_capture(model, request.tokens, request.functions, request.apply_kwargs)
    layers = capture(variables, x) if capture is not None else capture_layers(
        model, variables, x, tokens=request.tokens, functions=request.functions,
        **request.apply_kwargs)
    layers = request.select.apply(layers)
    scores = score_layers(layers, options=request.options, devices=request.devices)
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
      **kwargs: as in :func:`signature` (``options`` or ``covariance``, ...,
        ``select`` or ``include``, ...), converted once for all batches.

    Returns:
      :class:`Signature` with ``scores`` the mean, ``std`` and ``batch_scores``
      (``(B, L)``). ``std`` is the population standard deviation (``ddof=0``).

    Raises:
      ValueError: no batches, batches whose activation calls differ, or a
        batch :func:`signature` rejects (the message starts with its index;
        drop a last batch of one sample).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> class MLP(nnx.Module):   # NNX: variables=None
      ...     def __init__(self, rngs):
      ...         self.hidden, self.out = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.out(nnx.relu(self.hidden(x)))
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> batches = [jax.random.normal(k, (32, 3), jnp.float32) for k in keys]
      >>> sig = signature_over_batches(MLP(nnx.Rngs(0)), None, batches, progress=False)
      >>> sig.batch_scores.shape, sig.std.shape
      ((3, 1), (1,))
    """
    request = _Request.pop_from(kwargs)
    rows, first = [], None
    start = time.perf_counter()
    for b, batch in enumerate(batches):
        try:
            sig = _signature(model, variables, batch, request)
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
