"""Activation modules, function interception and reduction: the capture of each call.

See :mod:`affjax.capture` for what is captured and how.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import tracers as flax_tracers
from flax.nnx.bridge import ToNNX

from affjax import _checks

COLLECTION = "intermediates"
SOW_NAME = "affjax_activation"
CAPTURED_FUNCTIONS: tuple[str, ...] = (
    "relu", "relu6", "gelu", "silu", "swish", "sigmoid", "tanh", "hard_swish", "hard_silu",
    "hard_sigmoid", "hard_tanh", "elu", "selu", "celu", "leaky_relu", "softplus", "mish",
    "soft_sign", "squareplus", "sparse_plus", "log_sigmoid",
)
TOKEN_MODES: tuple[str, ...] = ("mean_features", "mean_tokens")


def activation_kind(fn: Callable) -> str:
    """A readable name for an activation callable (``relu``, ``gelu``, ...).

    Unwraps ``functools.partial``; falls back to the type's name for callable
    objects without ``__name__``.

    Args:
      fn: the activation callable.

    Returns:
      The name, a string.

    Example:
      >>> import functools, jax
      >>> exact_gelu = functools.partial(jax.nn.gelu, approximate=False)
      >>> activation_kind(jax.nn.relu), activation_kind(exact_gelu)
      ('relu', 'gelu')
    """
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def reduce_activation(v: jax.Array, *, tokens: str = "mean_features", where: str = "") -> jax.Array:
    """Reduce an activation tensor to a ``(samples, features)`` matrix.

    Args:
      v: ``(N, D)``, ``(N, T, D)`` or ``(N, H, W, C)``.
      tokens: for rank 3, ``"mean_features"`` averages over the last axis and
        keeps the T tokens as features (the published pipeline, so the paper's
        transformer numbers reproduce); ``"mean_tokens"`` averages over tokens
        and keeps the D channels.
      where: the layer's name, for the error message.

    Returns:
      ``(N, F)`` array in the dtype of ``v`` (float32 for float16/bfloat16);
      rank 4 averages over the two spatial axes and keeps the C channels.

    Raises:
      ValueError: other ranks, naming ``where`` and the shape.

    Example:
      >>> import jax.numpy as jnp
      >>> v = jnp.ones((8, 5, 3), jnp.float32)          # (N, T, D)
      >>> reduce_activation(v).shape, reduce_activation(v, tokens="mean_tokens").shape
      ((8, 5), (8, 3))
      >>> reduce_activation(jnp.ones((8, 4, 4, 16), jnp.float32)).shape
      (8, 16)
    """
    if jnp.issubdtype(v.dtype, jnp.floating):
        # Half precision is averaged in float32, where the score computes it anyway: the
        # means keep float32 precision, not bfloat16's 8 bits (docs/numerics.md).
        v = _checks.linalg_dtype(v)
    if v.ndim == 2:
        return v
    if v.ndim == 3:
        return jnp.mean(v, axis=1 if tokens == "mean_tokens" else 2)
    if v.ndim == 4:
        return jnp.mean(v, axis=(1, 2))
    raise ValueError(
        f"activation {where or '?'} has shape {v.shape}; signatures need (N, D), (N, T, D) or "
        "(N, H, W, C) tensors with the batch first"
    )


@dataclasses.dataclass
class Call:
    """One captured activation call.

    Attributes:
      index: position of the call in the forward pass.
      key: module path (linen), the module's ``capture_id`` (NNX), or ``None``
        when the values were recorded directly.
      kind: activation name (``relu``, ...).
      values: the reduced ``(x, fn(x))`` pair, each ``(N, F)``, when kept directly.
      function: whether it was a plain function call rather than an
        :class:`Activation` module.
      unsown: whether it ran inside a linen module that could not sow (its
        ``"intermediates"`` collection was not mutable, as inside ``nn.scan`` or
        ``nn.vmap`` without it in ``variable_axes``); ``values`` are then kept
        directly but belong to that transform's trace.
      nested: whether it ran inside a JAX transform that no Flax collection
        carries out of (``jax.jit``/``lax.scan`` inside a linen module, or any
        transform around a plain function call outside one); nothing is kept.
      trace: JAX's opaque trace state when the call was recorded (another than the
        capture's inside any transform, Flax's lifted ones included).
    """

    index: int
    key: Any  # module path (linen), capture_id of the module (NNX), or None (direct)
    kind: str
    values: tuple[jax.Array, jax.Array] | None = None
    function: bool = False  # a plain function call rather than an Activation module
    # Made inside a linen module whose "intermediates" collection was not mutable: a lifted
    # transform (nn.scan, nn.vmap) that does not pass it out. ``values`` then belong to
    # that transform's trace and must not be used outside it.
    unsown: bool = False
    # Made inside a JAX transform that the capture cannot see out of (jax.jit or lax.scan
    # inside a linen module, or around a plain function call); no values are kept.
    nested: bool = False
    trace: Any = None  # the JAX trace state the call was recorded in


@dataclasses.dataclass
class CaptureContext:
    """The record of one capture, as :func:`capturing` yields it.

    Attributes:
      tokens: how rank-3 activations are reduced (see :func:`reduce_activation`).
      calls: the captured :class:`Call` objects, in call order.
      inside: > 0 while an :class:`Activation` module runs its function, so that
        the ``jax.nn`` function it wraps is not recorded twice.
      on_full_tensors: called as ``on_full_tensors(x, y)`` with the full
        pre/post-activation tensors of each recorded call, in call order, before
        they are reduced (for statistics of whole activation maps); or ``None``.
      trace: JAX's opaque trace state when the capture started (values recorded
        in another trace cannot leave it).

    Example:
      >>> ctx = CaptureContext()
      >>> ctx.claim(("Dense_0",), "relu").index, len(ctx.calls)
      (0, 1)
    """

    tokens: str = "mean_features"
    calls: list[Call] = dataclasses.field(default_factory=list)
    inside: int = 0  # > 0 while an Activation module runs its function
    trace: Any = None  # the JAX trace state the capture started in
    on_full_tensors: Callable[[jax.Array, jax.Array], None] | None = None
    # NNX: module path of each NnxActivation by capture_id, so errors name the layer.
    nnx_paths: dict[int, str] = dataclasses.field(default_factory=dict)

    def claim(self, key: Any, kind: str, function: bool = False) -> Call:
        """Append and return a new :class:`Call` for this capture."""
        call = Call(len(self.calls), key, kind, function=function,
                    trace=flax_tracers.current_trace())
        self.calls.append(call)
        return call


_CONTEXT: contextvars.ContextVar[CaptureContext | None] = contextvars.ContextVar(
    "affjax_capture", default=None
)


def _reduced_pair(
    ctx: CaptureContext, x: jax.Array, y: jax.Array, where: str
) -> tuple[jax.Array, jax.Array]:
    if ctx.on_full_tensors is not None:
        ctx.on_full_tensors(x, y)
    return (reduce_activation(x, tokens=ctx.tokens, where=where),
            reduce_activation(y, tokens=ctx.tokens, where=where))


def _apply_and_record(fn: Callable, x: jax.Array, kind: str, record: Callable) -> jax.Array:
    ctx = _CONTEXT.get()
    if ctx is None:
        return fn(x)
    ctx.inside += 1
    try:
        y = fn(x)
    finally:
        ctx.inside -= 1
    record(ctx, x, y, kind)
    return y


class Activation(nn.Module):
    """An elementwise activation whose input and output the signature captures.

    ``Activation(jax.nn.relu)`` returns ``relu(x)``; a model built with it is an
    ordinary Flax model. During :func:`affjax.signature` each call sows the
    reduced ``(x, fn(x))`` into the ``"intermediates"`` collection.

    Attributes:
      fn: the elementwise callable.

    Example:
      >>> import flax.linen as nn, jax
      >>> import jax.numpy as jnp
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(3)(Activation(jax.nn.relu)(nn.Dense(8)(x)))
      >>> x = jnp.ones((4, 2), jnp.float32)
      >>> variables = MLP().init(jax.random.key(0), x)
      >>> MLP().apply(variables, x).shape   # outside a capture: a plain relu
      (4, 3)
    """

    fn: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _apply_and_record(self.fn, x, activation_kind(self.fn), _linen_record(self))


def _linen_record(module: nn.Module) -> Callable:
    def record(ctx: CaptureContext, x: jax.Array, y: jax.Array, kind: str) -> None:
        path = tuple(module.scope.path)
        if _in_raw_transform(module):
            ctx.claim(path, kind).nested = True
            return
        values = _reduced_pair(ctx, x, y, "/".join(path) or "<top>")
        if module.sow(COLLECTION, SOW_NAME, values):
            ctx.claim(path, kind)
        else:  # collection not mutable: keep the values directly
            call = ctx.claim(path, kind)
            call.values, call.unsown = values, True
    return record


_NNX_IDS = itertools.count()


class NnxActivation(nnx.Module):
    """The ``flax.nnx`` counterpart of :class:`Activation`.

    Each call sows the reduced ``(x, fn(x))`` as ``nnx.Intermediate`` under
    ``affjax_activation`` during a signature capture; outside one it is just
    ``fn(x)``, same shape and dtype.

    Args:
      fn: the elementwise callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> act = NnxActivation(jax.nn.relu)
      >>> act(jnp.array([-1.0, 2.0], jnp.float32)).tolist()
      [0.0, 2.0]
      >>> from affjax import signature
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.dense, self.act = nnx.Linear(3, 8, rngs=rngs), NnxActivation(jax.nn.relu)
      ...     def __call__(self, x):
      ...         return self.act(self.dense(x))
      >>> x = jax.random.normal(jax.random.key(0), (32, 3), jnp.float32)
      >>> sig = signature(MLP(nnx.Rngs(0)), None, x)   # NNX: variables=None
      >>> sig.kinds, sig.dims
      (['relu'], [8])
    """

    def __init__(self, fn: Callable[[jax.Array], jax.Array]):
        self.fn = fn
        # Static, so it survives the graph copies nnx.jit/nnx.remat call inside (``id``
        # would not): the signature matches each call with its sown values by it.
        self.capture_id = next(_NNX_IDS)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _apply_and_record(self.fn, x, activation_kind(self.fn), self._record)

    def _record(self, ctx: CaptureContext, x: jax.Array, y: jax.Array, kind: str) -> None:
        where = ctx.nnx_paths.get(self.capture_id)
        values = _reduced_pair(ctx, x, y, f"{where} ({kind})" if where else kind)
        self.sow(nnx.Intermediate, SOW_NAME, values)
        ctx.claim(self.capture_id, kind)


def _in_raw_transform(module: nn.Module) -> bool:
    # Flax's lifted transforms (nn.jit, nn.remat, nn.scan) open a new scope inside the
    # transform, so a scope traced elsewhere means a raw jax.jit/lax.scan in the module,
    # out of which a sown value cannot travel. (Flax records this state but does not check
    # it, so the capture does.)
    return flax_tracers.current_trace() != module.scope.trace_level


def fresh_capture_ids(model: nnx.Module) -> dict[int, str]:
    """Give every :class:`NnxActivation` in ``model`` a new ``capture_id``; return their paths.

    The ids are static attributes, part of the graph definition that ``nnx.jit`` and
    ``nnx.remat`` key their trace caches on. New ids make those transforms trace their
    bodies again inside this capture, where the calls are recorded; with the old ids a
    trace cached earlier would run without the calls being seen. Every other module gets
    the capture stamp for the same reason (its plain activation-function calls), kept
    from one successful capture to the next. Call it on a copy of the user's model (the
    signature does), so that the user's own caches are untouched.

    Args:
      model: an ``nnx.Module``.

    Returns:
      The module path of each :class:`NnxActivation`, by its new ``capture_id``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> class Two(nnx.Module):
      ...     def __init__(self):
      ...         self.a = NnxActivation(jax.nn.relu)
      ...         self.b = self.a           # one module reached twice: one id
      >>> m = Two(); old = m.a.capture_id
      >>> paths = fresh_capture_ids(m)
      >>> m.a.capture_id != old, list(paths.values())
      (True, ['a'])
    """
    paths: dict[int, str] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, NnxActivation) and node.capture_id not in paths:
            node.capture_id = next(_NNX_IDS)
            paths[node.capture_id] = "/".join(str(p) for p in path)
        elif isinstance(node, nnx.Module) and not isinstance(node, NnxActivation | ToNNX):
            # The other modules get the current capture stamp: traces that the user's own
            # calls cached (no stamp) hold no recording wrappers, so a module calling
            # nnx.gelu inside an nnx.jit helper must trace again here for the call to be
            # seen (and reported). Not bridge.ToNNX: it reads attributes as linen variables.
            try:
                node._affjax_capture_stamp = _STAMP[0]
            except Exception:  # a module that refuses new attributes keeps its cache
                pass
    return paths


# The stamp of :func:`fresh_capture_ids`. It stays while captures succeed, so nnx.jit
# helpers without activations compile once for all of them; a capture that fails renews
# it (:func:`renew_capture_stamp`): a trace it cached may hold calls that were reported
# as errors and would be silent when reused.
_STAMP = [next(_NNX_IDS)]


def renew_capture_stamp() -> None:
    """Start a new capture stamp (after a failed capture, see :func:`fresh_capture_ids`).

    The modules that :func:`fresh_capture_ids` stamps from then on trace their ``nnx.jit``
    helpers again, so that no trace cached by the failed capture is reused.

    Example:
      >>> renew_capture_stamp()   # after a capture of an nnx.Module raised
    """
    _STAMP[0] = next(_NNX_IDS)


def _function_wrapper(fn: Callable, kind: str) -> Callable:
    def wrapper(x, *args, **kwargs):
        ctx = _CONTEXT.get()
        y = fn(x, *args, **kwargs)
        if ctx is None or ctx.inside or not isinstance(x, jax.Array):
            return y
        if x.ndim < 2:
            if (isinstance(x, jax.core.Tracer) and type(x).__name__ == "BatchTracer"
                    and flax_tracers.current_trace() != ctx.trace):
                # One sample of a per-sample vmap inside the model: a layer that the
                # signature cannot see whole. An error, not a silent gap. (A vmap around
                # the whole capture, over an ensemble of variables, batches the vector
                # itself: skipped below like any vector.)
                ctx.claim(None, kind, function=True).nested = True
                return y
            # A scalar or vector: a parameter transform (softplus of a scale) or a
            # per-sample scalar head, not a layer of features; an error here would block
            # the whole signature. (An Activation module on such a tensor is an error.)
            return y
        from flax.linen.module import _context as linen_context

        stack = linen_context.module_stack
        module = stack[-1] if stack else None
        if module is not None and module.scope is not None:
            path = tuple(module.scope.path)
            if _in_raw_transform(module):
                ctx.claim(path, kind, function=True).nested = True
                return y
            values = _reduced_pair(ctx, x, y, "/".join(path + (kind,)))
            if module.sow(COLLECTION, SOW_NAME, values):
                ctx.claim(path, kind, function=True)
                return y
            call = ctx.claim(path, kind, function=True)
            call.values, call.unsown = values, True
            return y
        if flax_tracers.current_trace() != ctx.trace:
            ctx.claim(None, kind, function=True).nested = True
            return y
        values = _reduced_pair(ctx, x, y, kind)
        ctx.claim(None, kind, function=True).values = values
        return y

    wrapper.__name__ = kind
    wrapper.__wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def capturing(
    *,
    tokens: str = "mean_features",
    functions: bool = True,
    on_full_tensors: Callable[[jax.Array, jax.Array], None] | None = None,
) -> Iterator[CaptureContext]:
    """Context in which activation calls are recorded (used by the signature).

    While it is open, the activation functions named in ``CAPTURED_FUNCTIONS``
    of ``jax.nn``, ``flax.linen`` and ``flax.nnx`` are replaced by recording
    wrappers (when ``functions``), and :class:`Activation` /
    :class:`NnxActivation` calls are recorded. Not thread-safe (it patches
    module attributes) and not nestable.

    Args:
      tokens: ``"mean_features"`` or ``"mean_tokens"``, see
        :func:`reduce_activation`.
      functions: also record plain ``jax.nn.relu(...)``-style calls.
      on_full_tensors: see :class:`CaptureContext`.

    Yields:
      The :class:`CaptureContext` that collects the calls.

    Raises:
      ValueError: unknown ``tokens``. RuntimeError: a capture already open.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> with capturing() as ctx:
      ...     y = jax.nn.gelu(jnp.ones((4, 3), jnp.float32))
      >>> [(call.kind, call.values[0].shape) for call in ctx.calls]
      [('gelu', (4, 3))]
    """
    if tokens not in TOKEN_MODES:
        raise ValueError(f"unknown tokens mode {tokens!r}; expected one of {TOKEN_MODES}")
    if _CONTEXT.get() is not None:
        raise RuntimeError("a signature capture is already running (nested captures)")
    ctx = CaptureContext(tokens=tokens, on_full_tensors=on_full_tensors,
                         trace=flax_tracers.current_trace())
    token = _CONTEXT.set(ctx)
    patched: list[tuple[Any, str, Any]] = []
    try:
        if functions:
            for namespace in (jax.nn, nn, nnx):
                for name in CAPTURED_FUNCTIONS:
                    original = getattr(namespace, name, None)
                    if original is None:
                        continue
                    patched.append((namespace, name, original))
                    setattr(namespace, name, _function_wrapper(original, name))
        yield ctx
    finally:
        for namespace, name, original in reversed(patched):
            setattr(namespace, name, original)
        _CONTEXT.reset(token)
