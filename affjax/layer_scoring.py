"""Scoring many layers at once: fit every map, then one batched assignment.

The entry point is :func:`score_layers`: it checks the captured layers, groups them by
reduced shape and returns one score per layer. Layers of one reduced shape form a stack
``(g, n, d)``. Each stack's maps are fitted in one compiled call (:func:`stack_fits`).
This module owns the whole Cholesky-or-QR policy of the batched path: :func:`stack_fits`
goes straight to QR where some layer's Cholesky is known to fail, and otherwise redoes a
stack with QR only if some layer's Cholesky factor broke down. Every layer's exact W2 is
an ``(n, n)`` assignment and every stack of a signature has the same ``n``, so the cost
matrices of all stacks go to ONE :func:`affjax.linear_assignment` call: with the
``"auction"`` solver, nothing leaves the device; with ``"scipy"``, one host round trip
serves every layer; with ``"identity_or_scipy"`` (``"auto"`` on CPU), only the layers
whose identity matching is not certified on device call SciPy.

Where the layers of a stack run: a ``lax.map`` loop on CPU, a ``vmap`` elsewhere; see
``docs/signatures.md``, "Batched LAPACK on CPU", for why.

Placement: a tuple of devices (each stage jitted; with several devices the layer axis is
split over them with ``shard_map``), or, inside a caller's ``jit``, the mesh its inputs
are sharded over (a mesh of our own would mix two meshes in one program). The default
tuple is ``jax.local_devices()``: this process's devices, which are all of ``jax.devices()``
when JAX runs one process; under ``jax.distributed`` every process scores its own layers
on its own devices (``docs/distributed.md``).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from affjax import _compat
from affjax import solvers
from affjax.affine_map import cholesky_hopeless_for
from affjax.affine_map import fit_map
from affjax.assignment import ASSIGNMENT_SOLVERS as _NAMES
from affjax.assignment import AssignmentSolver
from affjax.capture import Layer
from affjax.covariance import covariance_parts
from affjax.options import ScoreOptions
from affjax.score import score_from_w2

# The solvers whose matchings of a whole signature are one batched call.
ASSIGNMENT_SOLVERS: tuple[str, ...] = tuple(name for name in _NAMES if name != "auto")


class StackFit(NamedTuple):
    """The fitted maps of a stack of layers, leading axis ``g`` (see :class:`affjax.score.Fit`).

    Attributes:
      mapped, target: ``(g, n, k)``.
      trace_cov_y: ``(g,)``.
      dead, valid: ``(g,)`` bool.
    """

    mapped: jax.Array
    target: jax.Array
    trace_cov_y: jax.Array
    dead: jax.Array
    valid: jax.Array


def _over_layers(fn: Callable, arrays: tuple, sequential: bool) -> Any:
    if sequential:
        return jax.lax.map(lambda a: fn(*a), arrays)
    return jax.vmap(fn)(*arrays)


def stack_fits(
    xs: jax.Array, ys: jax.Array, *, options: ScoreOptions, sequential: bool
) -> StackFit:
    """The maps of a stack of same-shape layers: ``(g, n, d)`` inputs and outputs.

    The batched path's Cholesky-or-QR policy, all of it: the score's own choice is a
    ``cond``, which ``vmap`` turns into a select that runs both factorisations. So a
    stack goes straight to QR where some layer's Cholesky is known to fail
    (:func:`affjax.score.cholesky_hopeless_for`); otherwise Cholesky runs on the whole
    stack and the stack is redone with QR only if some layer's factor broke down.

    Args:
      xs, ys: ``(g, n, d)`` float arrays.
      options: the score's options (covariance, ridge and path are used here).
      sequential: a ``lax.map`` loop over the layers instead of ``vmap`` (CPU).

    Returns:
      A :class:`StackFit`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> xs = jax.random.normal(jax.random.key(0), (3, 32, 4), jnp.float32)
      >>> f = stack_fits(xs, jnp.tanh(xs), options=ScoreOptions(), sequential=True)
      >>> f.mapped.shape, f.valid.tolist()
      ((3, 32, 4), [True, True, True])
    """

    own = {"covariance": options.covariance, "ridge": options.ridge}

    def fits(factor: str) -> StackFit:
        def one(x, y, cov_y):
            f = fit_map(x, y, **own, path=options.path, factor=factor, cov_y=cov_y)
            return StackFit(f.mapped, f.target, f.trace_cov_y, f.dead, f.valid)

        return _over_layers(one, (xs, ys, cov_ys), sequential)

    with jax.default_matmul_precision("highest"):
        # Each layer's C_y once, for the policy and for the fit.
        cov_ys = jax.vmap(functools.partial(covariance_parts, **own))(ys)
        hopeless = jnp.any(jax.vmap(functools.partial(
            cholesky_hopeless_for, **own, path=options.path))(ys, cov_y=cov_ys))

        def cholesky_first() -> StackFit:
            first = fits("cholesky")
            return jax.lax.cond(jnp.all(first.valid), lambda: first, lambda: fits("qr"))

        return jax.lax.cond(hopeless, lambda: fits("qr"), cholesky_first)


def stack_costs(fit: StackFit, *, sequential: bool) -> jax.Array:
    """The ``(g, n, n)`` cost matrices of a stack's W2 (:func:`affjax.solvers.assignment_cost`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> xs = jax.random.normal(jax.random.key(0), (2, 16, 3), jnp.float32)
      >>> f = stack_fits(xs, xs, options=ScoreOptions(), sequential=False)
      >>> stack_costs(f, sequential=False).shape
      (2, 16, 16)
    """
    with jax.default_matmul_precision("highest"):
        return _over_layers(solvers.assignment_cost, (fit.mapped, fit.target, fit.dead),
                            sequential)


def scores_from_matchings(
    fit: StackFit, permutations: jax.Array, solved: jax.Array
) -> jax.Array:
    """``(g,)`` scores of a stack from its optimal matchings ``(g, n)``.

    ``solved``: ``(g,)`` bool, each matching certified (a layer whose matching is not
    scores NaN; see :func:`affjax.score.score_from_w2`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> xs = jax.random.normal(jax.random.key(0), (2, 16, 3), jnp.float32)
      >>> f = stack_fits(xs, 2.0 * xs, options=ScoreOptions(), sequential=False)
      >>> perms = jnp.tile(jnp.arange(16), (2, 1))
      >>> scores_from_matchings(f, perms, jnp.array([True, True])).round(4).tolist()
      [1.0, 1.0]
    """
    w2_sq = jax.vmap(solvers.matched_w2_squared)(fit.mapped, fit.target, permutations)
    return _scores(fit, w2_sq, solved)


def _scores(fit: StackFit, w2_sq: jax.Array, solved: jax.Array) -> jax.Array:
    # A layer with non-finite inputs or a broken factor is NaN whatever its matching.
    return jax.vmap(score_from_w2)(w2_sq, fit.trace_cov_y, fit.valid, solved | ~fit.valid)


def _solve(costs: jax.Array, solver: AssignmentSolver) -> tuple[jax.Array, jax.Array]:
    result = solver.match(costs)
    return result.permutation, result.converged


def stacked_scores(
    xs: jax.Array, ys: jax.Array, *, options: ScoreOptions, sequential: bool
) -> jax.Array:
    """Scores of one stack of same-shape layers, ``(g, n, d)`` -> ``(g,)``.

    Args:
      xs, ys: ``(g, n, d)``.
      options: the score's options.
      sequential: see :func:`stack_fits`.

    Returns:
      ``(g,)`` scores, equal to :func:`affjax.affinity_score` of each layer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> xs = jax.random.normal(jax.random.key(0), (2, 64, 2), jnp.float32)
      >>> s = stacked_scores(xs, 2.0 * xs + 1.0, options=ScoreOptions(), sequential=True)
      >>> s.round(4).tolist()
      [1.0, 1.0]
    """
    g, n, d = xs.shape
    solver = _solver(options, n, d)
    fit = stack_fits(xs, ys, options=options, sequential=sequential)
    if isinstance(solver, solvers.Matching):
        return scores_from_matchings(fit, *_solve(stack_costs(fit, sequential=sequential),
                                                  solver.assignment))
    with jax.default_matmul_precision("highest"):
        w2_sq, _, solved = _over_layers(
            lambda m, t, dead: solver.transport(m, t, dead=dead),
            (fit.mapped, fit.target, fit.dead), sequential)
        return _scores(fit, w2_sq, solved)


def _solver(options: ScoreOptions, n: int, d: int) -> solvers.Solver:
    return solvers.get_solver(options.solver, n, d, sinkhorn_epsilon=options.sinkhorn_epsilon)


# --- placement ----------------------------------------------------------------------


def _shard_layers(fn: Callable, mesh: Any, arity: int) -> Callable:
    """``fn`` of ``arity`` stacked arrays with the layer axis split over ``mesh``'s axes.

    Each device handles its own layers: no collective, so the varying-value check has
    nothing to protect, and it rejects the solvers' loops (constant initial carries).
    """
    spec = PartitionSpec(tuple(mesh.axis_names))
    return _compat.shard_map(fn, mesh=mesh, in_specs=(spec,) * arity, out_specs=spec)


@functools.cache
def layer_mesh(devices: tuple) -> Mesh:
    """A one-axis mesh (``"layers"``) over ``devices``.

    Example:
      >>> import jax
      >>> layer_mesh(tuple(jax.devices()[:1])).axis_names
      ('layers',)
    """
    return Mesh(np.asarray(devices), ("layers",))


def _is_cpu(placement: Any) -> bool:
    if isinstance(placement, tuple):
        return all(dev.platform == "cpu" for dev in placement)
    return jax.default_backend() == "cpu"


@functools.cache
def _placed(stage: str, options: Any, placement: Any) -> Callable:
    """The jitted (or, inside a caller's jit, sharded) function of one stage.

    ``stage``: ``"scores"`` (a whole stack, ``options`` a :class:`ScoreOptions`),
    ``"fits"`` (maps and costs of a stack, likewise) or ``"assign"`` (the batched
    assignment, ``options`` an :class:`affjax.assignment.AssignmentSolver`).
    """
    sequential = _is_cpu(placement)
    if stage == "scores":
        fn = functools.partial(stacked_scores, options=options, sequential=sequential)
    elif stage == "fits":
        def fn(xs, ys):
            fit = stack_fits(xs, ys, options=options, sequential=sequential)
            return fit, stack_costs(fit, sequential=sequential)
    else:
        fn = functools.partial(_solve, solver=options)
    arity = 1 if stage == "assign" else 2
    if not isinstance(placement, tuple):
        return _shard_layers(fn, placement, arity)
    if len(placement) > 1:
        fn = _shard_layers(fn, layer_mesh(placement), arity)
    return jax.jit(fn)


def group_scorer(options: ScoreOptions, placement: Any) -> Callable:
    """A scorer of one stack, ``(xs, ys) -> (g,)``, its layer axis split over ``placement``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> fn = group_scorer(ScoreOptions(), tuple(jax.devices()[:1]))
      >>> xs = jax.random.normal(jax.random.key(0), (2, 32, 3), jnp.float32)
      >>> fn(xs, jnp.tanh(xs)).shape
      (2,)
    """
    return _placed("scores", options, placement)


def device_tuple(devices: Any) -> tuple:
    """``devices`` (a device or a sequence of them) as a checked tuple.

    The devices must belong to this process (``jax.local_devices()``): under
    ``jax.distributed`` the layers are host-local arrays, which another process's devices
    cannot be fed with.

    Example:
      >>> import jax
      >>> device_tuple(jax.devices()[0]) == (jax.devices()[0],)
      True
    """
    devices = tuple([devices] if isinstance(devices, jax.Device) else devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"devices must be a non-empty sequence of jax devices (see "
                         f"jax.devices()), got {devices!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices lists a device more than once: {list(devices)!r}")
    foreign = [d for d in devices if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(
            f"devices {foreign!r} belong to other processes (process {jax.process_index()} of "
            f"{jax.process_count()}): the layers are this process's arrays, so they are scored "
            f"on this process's devices, jax.local_devices() = {jax.local_devices()!r}. Pass "
            "devices=None (the default) or some of jax.local_devices(); each process scores "
            "its own batches (docs/distributed.md).")
    return devices


def _placement(devices: tuple | None, example: jax.Array) -> Any:
    if devices is not None:
        return devices
    placement = tuple(jax.local_devices())  # all of jax.devices() with one process
    if isinstance(example, jax.core.Tracer):
        # Inside the caller's jit the caller decides the placement: with inputs sharded
        # over a mesh the layers are split over that mesh; otherwise they stay where the
        # program runs (a mesh of our own could clash with inputs committed to a device).
        mesh = getattr(getattr(jax.typeof(example), "sharding", None), "mesh", None)
        return mesh if mesh is not None and mesh.size > 1 else placement[:1]
    return placement


def _run(stage: str, options: Any, placement: Any, *arrays: jax.Array) -> Any:
    """One stage on stacked ``arrays`` (layer axis first), padded to split evenly."""
    size = len(placement) if isinstance(placement, tuple) else placement.size
    g = arrays[0].shape[0]
    pad = (-g) % size
    if pad:  # equal slices per device
        arrays = tuple(jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) for a in arrays)
    if isinstance(placement, tuple) and size > 1 and not isinstance(arrays[0], jax.core.Tracer):
        # An array committed to one device, or sharded over another mesh, goes onto the
        # stage's mesh first (jit would refuse the mismatch).
        sharding = NamedSharding(layer_mesh(placement), PartitionSpec("layers"))
        arrays = tuple(jax.device_put(a, sharding) for a in arrays)
    out = _placed(stage, options, placement)(*arrays)
    return jax.tree.map(lambda a: a[:g], out)


def _settle(out: Any) -> Any:
    """Eager: wait for a stage before the next is dispatched (see the module docstring)."""
    leaves = jax.tree.leaves(out)
    if leaves and not isinstance(leaves[0], jax.core.Tracer):
        jax.block_until_ready(out)
    return out


def score_stacks(
    stacks: Sequence[tuple[jax.Array, jax.Array]],
    *,
    options: ScoreOptions,
    devices: tuple | None,
) -> list[jax.Array]:
    """Scores of several stacks that share ``n``, their assignments solved in one call.

    Args:
      stacks: ``(xs, ys)`` pairs, each ``(g_i, n, d_i)``, float, one dtype.
      options: the score's options.
      devices: from :func:`device_tuple`, or ``None`` for every local device (or the
        caller's mesh inside its ``jit``).

    Returns:
      One ``(g_i,)`` array of scores per stack.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> xs = jax.random.normal(jax.random.key(0), (2, 32, 3), jnp.float32)
      >>> a, b = score_stacks([(xs, jnp.tanh(xs)), (xs[:, :, :2], 2.0 * xs[:, :, :2])],
      ...                     options=ScoreOptions(), devices=None)
      >>> a.shape, b.round(4).tolist()
      ((2,), [1.0, 1.0])
    """
    n = stacks[0][0].shape[1]
    placement = _placement(devices, stacks[0][0])
    # The fits use only these fields: one compiled fit per shape whatever the solver.
    fit_options = ScoreOptions(covariance=options.covariance, ridge=options.ridge,
                               path=options.path)
    out: list[Any] = [None] * len(stacks)
    fitted: list[tuple[int, StackFit, jax.Array]] = []
    assignment_solver: AssignmentSolver | None = None
    carry: Any = ()
    for i, (xs, ys) in enumerate(stacks):
        # One stack after the other, so that the stacks' LAPACK calls never compete for
        # XLA:CPU's thread pool (docs/signatures.md, "Batched LAPACK on CPU"): eager, each
        # stage is waited for.
        if isinstance(xs, jax.core.Tracer):
            xs, ys, carry = jax.lax.optimization_barrier((xs, ys, carry))
        solver = _solver(options, n, xs.shape[2])
        if isinstance(solver, solvers.Matching):
            assignment_solver = solver.assignment
            fit, costs = _settle(_run("fits", fit_options, placement, xs, ys))
            fitted.append((i, fit, costs))
            carry = costs
        else:
            out[i] = _settle(_run("scores", options, placement, xs, ys))
            carry = out[i]
    if fitted:
        costs = jnp.concatenate([c for _, _, c in fitted]) if len(fitted) > 1 else fitted[0][2]
        permutations, solved = _run("assign", assignment_solver, placement, costs)
        start = 0
        for i, fit, c in fitted:
            g = c.shape[0]
            out[i] = scores_from_matchings(fit, permutations[start:start + g],
                                           solved[start:start + g])
            start += g
    return out


def score_layers(
    layers: Sequence[Layer],
    *,
    options: ScoreOptions | None = None,
    devices: Sequence[Any] | None = None,
    **option_kwargs: Any,
) -> jax.Array:
    """Affinity scores of captured layers, grouped by shape.

    Layers with equal reduced shapes are stacked and scored by one jitted call
    (compiled once per shape, reused across batches): ``vmap`` over the layers
    on accelerators, a ``lax.map`` loop inside the compiled call on CPU
    (``docs/signatures.md``, "Batched LAPACK on CPU"). With several devices the
    stacked layer axis is sharded across them.

    Args:
      layers: from :func:`affjax.capture.capture_layers`.
      options: a :class:`affjax.ScoreOptions`; or its fields as keywords
        (``covariance``, ``ridge``, ``solver``, ``path``, ``sinkhorn_epsilon``, as in
        :func:`affjax.affinity_score`), not both.
      devices: devices to shard over, this process's own; default
        ``jax.local_devices()`` (all of ``jax.devices()`` when JAX runs one process).

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
    options = ScoreOptions.pop_from(options, option_kwargs)
    if option_kwargs:
        raise TypeError(f"score_layers got unexpected keywords {sorted(option_kwargs)}")
    if devices is not None:  # once: a generator would be used up by the first group
        devices = device_tuple(devices)
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
    outs = score_stacks(stacks, options=options, devices=devices)
    scores = jnp.zeros((len(layers),), dtype)
    for idx, out in zip(groups.values(), outs, strict=True):
        if not isinstance(out, jax.core.Tracer):
            out = jax.device_put(out, scores.sharding)  # back to where the others are
        scores = scores.at[jnp.asarray(idx)].set(out)
    return scores
