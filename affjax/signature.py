"""Non-linearity signatures: the affinity score of every activation call of a model.

``signature_scores`` is the pure, jittable core (scores only);
``signature`` adds names and kinds; ``signature_over_batches`` averages over a
stream of batches. Layers whose reduced shapes agree are scored together by one
vmapped, jitted call, sharded over ``jax.devices()`` when there are several.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax import _compat
from affjax import capture as _capture
from affjax import layer_scoring as _layer_scoring
from affjax import score as _score
from affjax.signature_type import Signature


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["x", "y"], meta_fields=["name", "kind"]
)
@dataclasses.dataclass(frozen=True)
class Layer:
    """A captured activation call, reduced to ``(samples, features)`` matrices.

    A pytree (``x``, ``y`` are leaves), so ``jax.jit(capture_layers)`` can return it.

    Attributes:
      name: module path and call index, e.g. ``"Activation_0:0"``.
      kind: activation name (``relu``, ``tanh``, ...).
      x: ``(N, F)`` reduced input of the call, in the model's dtype.
      y: ``(N, F)`` reduced output of the call.
    """

    name: str
    kind: str
    x: jax.Array
    y: jax.Array


def _strip_collection(variables: Any) -> Any:
    if hasattr(variables, "items"):
        return {k: v for k, v in variables.items() if k != _capture.COLLECTION}
    return variables


def _without_own_entries(state: Any, keep_collection: bool) -> Any:
    """``state`` from ``model.apply`` without the capture's entries.

    The capture sows into Flax's ``intermediates`` collection. A caller that asked for that
    collection itself (``mutable`` naming it or ``True``, or ``capture_intermediates``) gets
    it back without the capture's entries; otherwise it is dropped.
    """
    if not keep_collection:
        return _strip_collection(state)

    def prune(node):
        if not hasattr(node, "items"):
            return node
        kept = {k: prune(v) for k, v in node.items() if k != _capture.SOW_NAME}
        return {k: v for k, v in kept.items() if not (hasattr(v, "items") and not v)}

    out = dict(state)
    if _capture.COLLECTION in out:
        out[_capture.COLLECTION] = prune(out[_capture.COLLECTION])
    return out


def _linen_values(state: Any, path: tuple[str, ...]) -> tuple:
    node = state.get(_capture.COLLECTION, {})
    for part in path:
        node = node.get(part, {})
    return node.get(_capture.SOW_NAME, ())


def capture_layers(
    model: Any,
    variables: Any,
    x: Any,
    *,
    tokens: str = "mean_features",
    functions: bool = True,
    return_output: bool = False,
    on_full_tensors: Callable[[jax.Array, jax.Array], None] | None = None,
    **apply_kwargs: Any,
) -> list[Layer] | tuple[list[Layer], Any]:
    """Run the model once and return its activation calls in forward order.

    Args:
      model: a ``flax.linen.Module`` (with ``variables``) or a ``flax.nnx.Module``
        (``variables`` must be ``None``; the model is called directly).
      variables: the linen variables, or ``None`` for NNX.
      x: the model input; the first axis is the batch.
      tokens: reduction of rank-3 tensors, see :func:`affjax.capture.reduce_activation`.
      functions: also capture activation functions called by attribute
        (``nn.relu(x)``), see :mod:`affjax.capture`.
      return_output: also return what the model returned, from the same pass.
      on_full_tensors: called as ``on_full_tensors(x, y)`` with the full,
        unreduced pre/post-activation tensors of each captured call, in forward
        order (one call per returned layer), while the model is traced; for
        statistics of whole activation maps, such as the published sparsity.
      **apply_kwargs: passed to ``model.apply`` (linen) or ``model(...)`` (NNX).

    Returns:
      A list of :class:`Layer` (an error if the model calls no activation); with
      ``return_output``, ``(layers, output)``, where ``output`` is what
      ``model.apply(variables, x, **apply_kwargs)`` returns: ``(y, updated)`` when
      ``mutable`` (a name, names or ``True``) or ``capture_intermediates`` is given,
      without the capture's own entries.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from affjax import Activation
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(1)(Activation(jnp.tanh)(nn.Dense(8)(x)))
      >>> x = jax.random.normal(jax.random.key(0), (32, 3), jnp.float32)
      >>> model = MLP(); variables = model.init(jax.random.key(1), x)
      >>> layers = capture_layers(model, variables, x)
      >>> [(layer.kind, layer.x.shape, layer.x.dtype) for layer in layers]
      [('tanh', (32, 8), dtype('float32'))]
    """
    try:
        return _capture_layers(model, variables, x, tokens=tokens, functions=functions,
                               return_output=return_output, on_full_tensors=on_full_tensors,
                               **apply_kwargs)
    except BaseException:
        if isinstance(model, nnx.Module):
            # Traces cached by this capture may hold calls it reported; see
            # affjax.capture.fresh_capture_ids.
            _capture.renew_capture_stamp()
        raise


def _capture_layers(model, variables, x, *, tokens, functions, return_output, on_full_tensors,
                    **apply_kwargs):
    is_nnx = isinstance(model, nnx.Module)
    if is_nnx and variables is not None:
        raise TypeError("an nnx.Module carries its own state: pass variables=None")
    if is_nnx:
        _compat.require_nnx_capture()
        # A copy: its fresh capture ids make nnx.jit/nnx.remat inside the model trace
        # again here, so that their calls are recorded (see capture.fresh_capture_ids).
        # A signature leaves the user's model as it was (BatchNorm statistics and RNG
        # counts of a train-mode pass are not written back: it is pure); with
        # return_output the pass stands for the model's own call, so its state updates
        # are written back, as model(x) would make them.
        users_model, model = model, nnx.clone(model)
        paths = _capture.fresh_capture_ids(model)
    with _capture.capturing(tokens=tokens, functions=functions,
                            on_full_tensors=on_full_tensors) as ctx:
        if is_nnx:
            ctx.nnx_paths.update(paths)
            try:
                output, nnx_state = nnx.capture(model, nnx.Intermediate)(x, **apply_kwargs)
            except TypeError as e:
                # nnx.cond / nnx.fori_loop / nnx.scan around an NnxActivation: the sown
                # values change the state's structure inside the control flow, which JAX
                # reports as a pytree mismatch naming Flax's internal "__captures__".
                if "__captures__" not in str(e):
                    raise
                raise RuntimeError(_lifted_message(
                    "an NnxActivation", "could not store its values: it runs inside NNX "
                    "control flow (nnx.cond, nnx.switch, nnx.fori_loop, nnx.while_loop)"
                )) from e
            except ValueError as e:
                if "Cannot infer collection name" not in str(e):
                    raise
                # Flax's bridge.ToNNX reads the capture's nnx.Intermediate as a linen variable.
                raise RuntimeError(
                    "the model holds a linen module through flax.nnx.bridge.ToNNX, which "
                    "Flax's nnx.capture (the signature's capture) cannot run. Write that part "
                    "as NNX modules, or take the signature of the linen module on its own"
                ) from e
        else:
            asked = apply_kwargs.pop("mutable", False)
            # Flax's mutable: False, True (every collection), a name, or a list of names.
            if asked is True:
                mutable = True
                keep = True
            else:
                names = [asked] if isinstance(asked, str) else list(asked or [])
                mutable = [_capture.COLLECTION, *names]
                keep = _capture.COLLECTION in names
            intermediates = bool(apply_kwargs.get("capture_intermediates", False))
            try:
                output, state = model.apply(_strip_collection(variables), x, mutable=mutable,
                                            **apply_kwargs)
            except TypeError as e:
                # nn.cond / nn.switch: an Activation sows in one branch only, and JAX
                # reports the branches' differing outputs as a pytree mismatch.
                if f"['{_capture.COLLECTION}']" not in str(e) or "branch" not in str(e):
                    raise
                raise RuntimeError(_lifted_message(
                    "an Activation", "could not store its values: it runs inside linen "
                    "control flow (nn.cond, nn.switch)"
                )) from e
            if asked or intermediates:  # model.apply would return (y, state) too
                output = (output, _without_own_entries(state, keep or intermediates))
    if is_nnx:
        layers = _assemble(ctx, model, nnx_state=nnx_state)
        if return_output:
            _write_back_updates(users_model, model)
    else:
        layers = _assemble(ctx, None, linen_state=state)
    return (layers, output) if return_output else layers


def _write_back_updates(users_model: Any, copy: Any) -> None:
    """Give ``users_model`` the state its ``copy`` assigned or created while it ran.

    Only that: writing every variable back would also "mutate" the parameters of a
    model closed over by ``jax.jit``/``jax.grad``, which NNX refuses even where the call
    changed nothing (eval mode). A clone shares its arrays with the original, so
    identity tells what the pass assigned; plain array attributes count, and so do
    variables the call created.
    """
    def value(v: Any) -> Any:
        return v.get_value() if isinstance(v, nnx.Variable) else v

    def flat(model: Any) -> list:
        return list(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Intermediate))))

    before = dict(flat(users_model))
    changed = [(path, v) for path, v in flat(copy)
               if path not in before or value(v) is not value(before[path])]
    if changed:
        nnx.update(users_model, nnx.from_flat_state(changed))


def _stale(v: Any) -> bool:
    """Whether ``v`` is a tracer that escaped a transform which has finished.

    Such a tracer fails in any operation of the current trace; a tiny one (dead code
    under ``jit``) tells, so that the error can say what to change.
    """
    if not isinstance(v, jax.core.Tracer):
        return False
    try:
        jax.lax.neg(v)
    except jax.errors.UnexpectedTracerError:
        return True
    return False


def _nested_message(where: str, index: int) -> str:
    return (
        f"activation {where} (call {index} of the forward pass) ran inside a JAX transform "
        "(jax.jit, jax.checkpoint, lax.scan, fori_loop, a per-sample vmap, ...) whose values "
        "cannot leave it, so the signature cannot read them. Call it outside that transform, or "
        "make it a module that the transform carries: affjax.NnxActivation(fn) as an "
        "attribute (nnx.jit and nnx.remat are fine), or affjax.Activation(fn) in a linen "
        "module under Flax's own nn.jit or nn.remat"
    )


def _lifted_message(where: str, what: str) -> str:
    return (
        f"activation {where!r} {what}: it runs inside a lifted transform (nn.scan, nn.vmap, "
        "nnx.scan, ...), where one traced body stands for many calls, and the signature does "
        "not support that. Unroll those layers (call them in a Python loop; nn.remat and "
        "nn.jit are fine), or score the tensors yourself with affjax.affinity_score"
    )


def _assemble(
    ctx: _capture.CaptureContext, nnx_model: Any = None, *, linen_state: Any = None,
    nnx_state: Any = None,
) -> list[Layer]:
    """Match the recorded calls (global order) with their sown values (per module order)."""
    sown: dict[Any, list] = {}
    paths: dict[Any, str] = {}
    if nnx_model is not None:
        flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx_state)}
        for path, node in nnx.iter_graph(nnx_model):
            entry = flat.get(tuple(path) + (_capture.SOW_NAME,))
            if isinstance(node, _capture.NnxActivation) and entry is not None:
                if node.capture_id in sown:
                    raise RuntimeError(
                        f"NnxActivation modules at {paths[node.capture_id]!r} and "
                        f"{'/'.join(str(p) for p in path)!r} share one capture_id, which "
                        "affjax.capture.fresh_capture_ids(model) should have prevented"
                    )
                sown[node.capture_id] = list(entry.get_value())
                paths[node.capture_id] = "/".join(str(p) for p in path)
    counts: dict[str, int] = defaultdict(int)
    layers = []
    for call in ctx.calls:
        if call.nested or call.unsown:
            # Both are linen paths (or None outside modules); a function call adds its kind.
            parts = (*(call.key or ()), call.kind) if call.function else call.key
            where = "/".join(parts) or call.kind
            if call.nested:
                raise RuntimeError(_nested_message(repr(where), call.index))
            raise RuntimeError(_lifted_message(where, "cannot store its values"))
        if call.values is not None:  # recorded directly, outside any linen module
            values, path = call.values, ""
        else:
            if call.key not in sown and nnx_model is not None:
                raise RuntimeError(
                    f"an NnxActivation ({call.kind}) was called but its values are not in the "
                    "model's state: it must be an attribute of the model (not created during "
                    "the call), and not inside nnx.scan or nnx.vmap, which the signature does "
                    "not support; unroll those layers"
                )
            if nnx_model is None and isinstance(call.key, int):  # an NNX id in a linen model
                raise RuntimeError(
                    f"an NnxActivation ({call.kind}) ran inside a linen model (an NNX module "
                    "wrapped by flax.nnx.bridge.to_linen), where the signature cannot find its "
                    "values. Inside the bridged module call the function itself "
                    "(nnx.gelu(x)), or use affjax.Activation in the linen model"
                )
            if call.key not in sown:
                sown[call.key] = list(_linen_values(linen_state, call.key))
                paths[call.key] = "/".join(call.key)
            if not sown[call.key]:
                raise RuntimeError(_lifted_message(
                    paths[call.key] or call.kind, "was called but its captured values are missing"
                ))
            values, path = sown[call.key].pop(0), paths[call.key]
        base = "/".join(p for p in (path, call.kind if call.function else "") if p) or call.kind
        name = f"{base}:{counts[base]}"
        counts[base] += 1
        x_red, y_red = values
        if _stale(x_red) or _stale(y_red):
            raise RuntimeError(_nested_message(repr(name), call.index))
        if x_red.ndim != 2:
            raise RuntimeError(_lifted_message(name, f"produced values of shape {x_red.shape}"))
        layers.append(Layer(name, call.kind, x_red, y_red))
    left = [paths[k] for k, v in sown.items() if v and nnx_model is not None]
    if left:
        raise RuntimeError(
            f"NnxActivation modules at {left} stored values for calls that the capture did not "
            "see (a trace that JAX had cached before the capture ran their bodies); the "
            "signature would miss those layers. Please report this with the model's code"
        )
    if not layers:
        raise ValueError(
            "no activation found in the forward pass. Wrap activations in affjax.Activation(fn) "
            "(linen) or affjax.NnxActivation(fn) (NNX), or call them by attribute at run time "
            "(nn.relu(x), jax.nn.gelu(x)); functions bound at import time (from jax.nn import "
            "relu) and jnp primitives (jnp.tanh, jnp.maximum) cannot be captured"
        )
    return layers


def _select(
    layers: list[Layer],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    kinds: Sequence[str] | None,
    exclude_kinds: Sequence[str] | None,
) -> list[Layer]:
    # One name may be given as a plain string (include="layer1*", kinds="relu").
    include, exclude, kinds, exclude_kinds = (
        [v] if isinstance(v, str) else list(v or []) for v in (include, exclude, kinds,
                                                                exclude_kinds))
    names = [layer.name for layer in layers]
    present_kinds = sorted({layer.kind for layer in layers})
    for pattern in include + exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"selection pattern {pattern!r} matches no activation; names are "
                f"{names[:8]}{' ...' if len(names) > 8 else ''}"
            )
    for kind in kinds + exclude_kinds:
        if kind not in present_kinds:
            raise ValueError(
                f"activation kind {kind!r} not in this model; kinds are {present_kinds}"
            )
    out = []
    for layer in layers:
        if include and not any(fnmatch.fnmatchcase(layer.name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(layer.name, p) for p in exclude):
            continue
        if kinds and layer.kind not in kinds:
            continue
        if exclude_kinds and layer.kind in exclude_kinds:
            continue
        out.append(layer)
    if not out:
        raise ValueError("the selection leaves no activation to score")
    return out


def score_layers(
    layers: Sequence[Layer],
    *,
    covariance: str = "empirical",
    ridge: float = 1e-6,
    solver: str = "auto",
    sinkhorn_epsilon: float = 1e-2,
    devices: Sequence[Any] | None = None,
) -> jax.Array:
    """Affinity scores of captured layers, grouped by shape.

    Layers with equal reduced shapes are stacked and scored by one jitted call
    (compiled once per shape, reused across batches): ``vmap`` over the layers
    on accelerators, a ``lax.map`` loop inside the compiled call on CPU
    (``docs/signatures.md``, "Batched LAPACK on CPU"). With several devices the
    stacked layer axis is sharded across them.

    Args:
      layers: from :func:`capture_layers`.
      covariance, ridge, solver, sinkhorn_epsilon: as in :func:`affjax.affinity_score`.
      devices: devices to shard over; default ``jax.devices()``.

    Returns:
      ``(L,)`` array in the layers' dtype (float32 for half precision).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (64, 2), jnp.float32)
      >>> layers = [Layer("affine", "identity", x, 2.0 * x + 1.0),
      ...           Layer("relu", "relu", x, jax.nn.relu(x))]
      >>> s = score_layers(layers)
      >>> s.shape, s.dtype, round(float(s[0]), 3), bool(s[1] < 1.0)
      ((2,), dtype('float32'), 1.0, True)
    """
    _score.check_options(covariance, solver, ridge=ridge, sinkhorn_epsilon=sinkhorn_epsilon)
    if devices is not None:  # once: a generator would be used up by the first group
        devices = _layer_scoring.device_tuple(devices)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        if layer.x.shape[0] < 2:
            raise ValueError(
                f"a signature needs a batch of at least 2 samples, got {layer.x.shape[0]}"
            )
        if layer.x.shape != layer.y.shape:
            raise ValueError(
                f"activation {layer.name} ({layer.kind}) changes the shape of its input, "
                f"{layer.x.shape} -> {layer.y.shape} after reduction: the affinity score "
                "pairs each pre-activation with its post-activation, so an Activation must "
                "be elementwise")
        for side, v in (("input", layer.x), ("output", layer.y)):
            if not jnp.issubdtype(v.dtype, jnp.floating):
                raise TypeError(f"activation {layer.name} ({layer.kind}) has a {v.dtype} "
                                f"{side}: the score needs floating-point activations")
        groups[layer.x.shape].append(i)
    dtype = jnp.result_type(*(v.dtype for layer in layers for v in (layer.x, layer.y)))
    if jnp.finfo(dtype).bits < 32:
        dtype = jnp.float32
    stacks = [(jnp.stack([layers[i].x for i in idx]).astype(dtype),
               jnp.stack([layers[i].y for i in idx]).astype(dtype)) for idx in groups.values()]
    outs = _layer_scoring.score_stacks(
        stacks, covariance=covariance, ridge=float(ridge), solver=solver,
        sinkhorn_epsilon=sinkhorn_epsilon, devices=devices)
    scores = jnp.zeros((len(layers),), dtype)
    for idx, out in zip(groups.values(), outs, strict=True):
        if not isinstance(out, jax.core.Tracer):
            out = jax.device_put(out, scores.sharding)  # back to where the others are
        scores = scores.at[jnp.asarray(idx)].set(out)
    return scores


def signature_scores(
    model: Any,
    variables: Any,
    x: Any,
    *,
    covariance: str = "empirical",
    ridge: float = 1e-6,
    solver: str = "auto",
    sinkhorn_epsilon: float = 1e-2,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
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
      include, exclude: ``fnmatch`` patterns on layer names (``["*block1*"]``, or
        one pattern as a string).
      kinds, exclude_kinds: activation kinds to keep or drop (``["relu"]`` or
        ``"relu"``).
      tokens: rank-3 reduction, ``"mean_features"`` (published) or ``"mean_tokens"``.
      functions: also capture ``nn.relu(x)``-style calls (see :mod:`affjax.capture`).
      devices: devices to shard the layer-parallel scoring over; default all.
      return_output: also return the model's output from the same forward pass
        (for a loss that needs both, see :mod:`affjax.regularizers`).
      **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

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
    # Only with return_output: the pass then stands for the model's own call (an NNX
    # model's state updates are written back); a signature alone leaves the model as it was.
    captured = capture_layers(model, variables, x, tokens=tokens, functions=functions,
                              return_output=return_output, **apply_kwargs)
    layers, output = captured if return_output else (captured, None)
    layers = _select(layers, include, exclude, kinds, exclude_kinds)
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
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
    tokens: str = "mean_features",
    functions: bool = True,
    devices: Sequence[Any] | None = None,
    **apply_kwargs: Any,
) -> Signature:
    """The signature of a model on one batch, with names (see :func:`signature_scores`).

    Args:
      model, variables, x: as in :func:`signature_scores`.
      covariance, ridge, solver, sinkhorn_epsilon, include, exclude, kinds,
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
    capture = _compiled_capture(model, tokens, functions, apply_kwargs)
    layers = capture(variables, x) if capture is not None else capture_layers(
        model, variables, x, tokens=tokens, functions=functions, **apply_kwargs)
    layers = _select(layers, include, exclude, kinds, exclude_kinds)
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
      **kwargs: options of :func:`signature` (``covariance``, ``include``, ...).

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
