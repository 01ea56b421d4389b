"""The capture of a model's forward pass: its activation calls as :class:`Layer` objects.

:func:`capture_layers` runs the model once inside :func:`affjax.capture.capturing` and
matches each recorded call with the values it sowed (linen's ``"intermediates"``, NNX's
``nnx.Intermediate``), in forward order. Where a call's values cannot be read (a lifted
or raw JAX transform around it), the error names the layer and what to change.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.nnx.bridge import ToNNX

from affjax import _compat
from affjax.capture._activations import COLLECTION
from affjax.capture._activations import SOW_NAME
from affjax.capture._activations import CaptureContext
from affjax.capture._activations import NnxActivation
from affjax.capture._activations import capturing
from affjax.capture._activations import fresh_capture_ids
from affjax.capture._activations import renew_capture_stamp


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
        return {k: v for k, v in variables.items() if k != COLLECTION}
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
        kept = {k: prune(v) for k, v in node.items() if k != SOW_NAME}
        return {k: v for k, v in kept.items() if not (hasattr(v, "items") and not v)}

    out = dict(state)
    if COLLECTION in out:
        out[COLLECTION] = prune(out[COLLECTION])
    return out


def _linen_values(state: Any, path: tuple[str, ...]) -> tuple:
    node = state.get(COLLECTION, {})
    for part in path:
        node = node.get(part, {})
    return node.get(SOW_NAME, ())


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
      >>> model = nn.Sequential([nn.Dense(8), Activation(jnp.tanh), nn.Dense(1)])
      >>> x = jax.random.normal(jax.random.key(0), (32, 3), jnp.float32)
      >>> layers = capture_layers(model, model.init(jax.random.key(1), x), x)
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
            renew_capture_stamp()
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
        paths = fresh_capture_ids(model)
    with capturing(tokens=tokens, functions=functions, on_full_tensors=on_full_tensors) as ctx:
        if is_nnx:
            ctx.nnx_paths.update(paths)
            output, nnx_state = _nnx_pass(ctx, model, x, apply_kwargs)
        else:
            output, state = _linen_pass(ctx, model, variables, x, apply_kwargs)
    if is_nnx:
        layers = _assemble(ctx, model, nnx_state=nnx_state)
        if return_output:
            _write_back_updates(users_model, model)
    else:
        layers = _assemble(ctx, None, linen_state=state)
    return (layers, output) if return_output else layers


def _failed_inside_transform(ctx: CaptureContext) -> bool:
    """Whether the latest recorded call ran inside a transform (the error came from there)."""
    return bool(ctx.calls) and ctx.calls[-1].trace != ctx.trace


def _nnx_pass(ctx: CaptureContext, model: Any, x: Any, apply_kwargs: dict) -> tuple:
    try:
        return nnx.capture(model, nnx.Intermediate)(x, **apply_kwargs)
    except TypeError as e:
        # nnx.cond / nnx.fori_loop / nnx.scan around an NnxActivation: the sown values
        # change the state's structure inside the control flow. JAX raises a plain
        # TypeError; only its text (naming the sown entry) tells it from the model's own.
        if not (_failed_inside_transform(ctx) and repr(SOW_NAME) in str(e)):
            raise
        raise RuntimeError(_lifted_message(
            "an NnxActivation", "could not store its values: it runs inside NNX "
            "control flow (nnx.cond, nnx.switch, nnx.fori_loop, nnx.while_loop)"
        )) from e
    except ValueError as e:
        # Flax's bridge.ToNNX reads the capture's nnx.Intermediate as a linen variable.
        if not any(isinstance(node, ToNNX) for _, node in nnx.iter_graph(model)):
            raise
        raise RuntimeError(
            "the model holds a linen module through flax.nnx.bridge.ToNNX, which "
            "Flax's nnx.capture (the signature's capture) cannot run. Write that part "
            "as NNX modules, or take the signature of the linen module on its own"
        ) from e


def _linen_pass(ctx: CaptureContext, model: Any, variables: Any, x: Any,
                apply_kwargs: dict) -> tuple:
    apply_kwargs = dict(apply_kwargs)
    asked = apply_kwargs.pop("mutable", False)
    # Flax's mutable: False, True (every collection), a name, or a list of names.
    if asked is True:
        mutable = True
        keep = True
    else:
        names = [asked] if isinstance(asked, str) else list(asked or [])
        mutable = [COLLECTION, *names]
        keep = COLLECTION in names
    intermediates = bool(apply_kwargs.get("capture_intermediates", False))
    try:
        output, state = model.apply(_strip_collection(variables), x, mutable=mutable,
                                    **apply_kwargs)
    except TypeError as e:
        # nn.cond / nn.switch: an Activation sows in one branch only. JAX raises a plain
        # TypeError; only its text (the branches' differing collection) tells it apart.
        if not (_failed_inside_transform(ctx) and f"['{COLLECTION}']" in str(e)
                and "branch" in str(e)):
            raise
        raise RuntimeError(_lifted_message(
            "an Activation", "could not store its values: it runs inside linen "
            "control flow (nn.cond, nn.switch)"
        )) from e
    if asked or intermediates:  # model.apply would return (y, state) too
        output = (output, _without_own_entries(state, keep or intermediates))
    return output, state


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


def _nnx_sown(nnx_model: Any, nnx_state: Any) -> tuple[dict[int, list], dict[int, str]]:
    """The values each ``NnxActivation`` sowed, and its module path, by ``capture_id``."""
    sown: dict[int, list] = {}
    paths: dict[int, str] = {}
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx_state)}
    for path, node in nnx.iter_graph(nnx_model):
        entry = flat.get(tuple(path) + (SOW_NAME,))
        if isinstance(node, NnxActivation) and entry is not None:
            if node.capture_id in sown:
                raise RuntimeError(
                    f"NnxActivation modules at {paths[node.capture_id]!r} and "
                    f"{'/'.join(str(p) for p in path)!r} share one capture_id, which "
                    "affjax.capture.fresh_capture_ids(model) should have prevented"
                )
            sown[node.capture_id] = list(entry.get_value())
            paths[node.capture_id] = "/".join(str(p) for p in path)
    return sown, paths


def _assemble(
    ctx: CaptureContext, nnx_model: Any = None, *, linen_state: Any = None,
    nnx_state: Any = None,
) -> list[Layer]:
    """Match the recorded calls (global order) with their sown values (per module order)."""
    sown: dict[Any, list] = {}
    paths: dict[Any, str] = {}
    if nnx_model is not None:
        sown, paths = _nnx_sown(nnx_model, nnx_state)
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

