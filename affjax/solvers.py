"""The W2 solvers of the score, registered by name.

A :class:`Solver` is a frozen, hashable configuration with one method,
:meth:`Solver.transport`: the squared W2 between two equal-size point clouds, the
matching behind it and whether that matching is certified. :func:`get_solver` turns a
name into the solver for ``n`` points in ``d`` dimensions, resolving ``"auto"``:

``"sort"``      d == 1 only: the sorted matching, on device.
``"auction"``, ``"identity_or_scipy"``, ``"scipy"``, ``"hungarian"``
                the assignment solvers of :mod:`affjax.assignment` on the cost matrix
                ``|x_i - y_j|^2`` (:class:`Matching`).
``"sinkhorn"``  entropic OT (OTT-JAX), on device and smooth but biased upward: it
                returns ``<P_eps, C>`` for the entropic plan.
``"auto"``      ``"sort"`` when d == 1, else :func:`affjax.assignment.resolve_assignment_solver`
                (the auction on an accelerator, ``"identity_or_scipy"`` on CPU).

Gradients: the exact solvers hold their matching fixed and differentiate the matched
cost (envelope theorem).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from affjax import _checks
from affjax import assignment


class Transport(NamedTuple):
    """What a :class:`Solver` returns.

    Attributes:
      w2_squared: ``(1/n) sum_i |x_i - y_perm(i)|^2`` (the entropic plan's cost for
        ``"sinkhorn"``), differentiable with the matching held fixed.
      permutation: int32 ``(n,)``; all ``-1`` for ``"sinkhorn"``.
      converged: bool, the matching is certified optimal (True for ``"sinkhorn"``).
    """

    w2_squared: jax.Array
    permutation: jax.Array
    converged: jax.Array


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """``(n, m)`` matrix of ``|x_i - y_j|^2`` for rows of ``x`` and ``y``.

    Args:
      x, y: ``(n, d)`` and ``(m, d)`` arrays, float.

    Returns:
      ``(n, m)`` array in the input dtype. Computed as ``|x|^2 + |y|^2 - 2 x.y``
      (one matrix product) after shifting both clouds by their joint mean (the
      distances do not change, but far from the origin the expansion would cancel
      catastrophically); nearby points still lose relative precision; values are
      clipped at zero.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0]], jnp.float32)
      >>> squared_distances(x, jnp.array([[0.0, 2.0]], jnp.float32)).tolist()
      [[4.0], [5.0]]
    """
    # The shift keeps the expansion from cancelling far from the origin (float32 costs would
    # rank the matchings wrongly there).
    shift = 0.5 * (jnp.mean(x, axis=0) + jnp.mean(y, axis=0))
    x, y = x - shift, y - shift
    sq = jnp.sum(x**2, axis=1)[:, None] + jnp.sum(y**2, axis=1)[None, :] - 2.0 * x @ y.T
    return jnp.maximum(sq, 0.0)


class Solver:
    """A W2 solver: :meth:`transport` of two point clouds.

    Subclasses set ``name`` (their key in :data:`SOLVERS`) and ``exact``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0]])
      >>> solver = get_solver("auto", *x.shape)
      >>> solver.exact, float(solver.transport(x, x[::-1]).w2_squared)
      (True, 0.0)
    """

    name: ClassVar[str]
    exact: ClassVar[bool] = True

    def transport(self, x: jax.Array, y: jax.Array, *, dead: jax.Array | bool = False
                  ) -> Transport:
        """The W2 of float ``(n, d)`` clouds ``x``, ``y``.

        ``dead``: every matching costs the same (the score's dead output, which maps
        every ``x_i`` to one point): :class:`Matching` then takes the identity.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SortedMatching(Solver):
    """The optimal matching of 1-D points: both sorted.

    Example:
      >>> import jax.numpy as jnp
      >>> t = SortedMatching().transport(jnp.array([[0.0], [3.0]]), jnp.array([[4.0], [1.0]]))
      >>> t.permutation.tolist(), float(t.w2_squared)
      ([1, 0], 1.0)
    """

    name: ClassVar[str] = "sort"

    def transport(self, x, y, *, dead=False):
        rank_of_x = jnp.argsort(jnp.argsort(jax.lax.stop_gradient(x[:, 0])))
        permutation = jnp.argsort(jax.lax.stop_gradient(y[:, 0]))[rank_of_x].astype(jnp.int32)
        w2_sq = jnp.mean((x[:, 0] - y[permutation, 0]) ** 2)
        return Transport(w2_sq, permutation, jnp.isfinite(w2_sq))


@dataclasses.dataclass(frozen=True)
class Matching(Solver):
    """An assignment solver on the squared-distance cost matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> from affjax.assignment import Scipy
      >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0]])
      >>> t = Matching(Scipy()).transport(x, x[::-1] + 1.0)
      >>> t.permutation.tolist(), float(t.w2_squared)
      ([1, 0], 2.0)
    """

    assignment: assignment.AssignmentSolver = dataclasses.field(
        default_factory=assignment.assignment_solver)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.assignment.name

    def transport(self, x, y, *, dead=False):
        matching = self.assignment.match(assignment_cost(x, y, dead))
        return Transport(matched_w2_squared(x, y, matching.permutation), matching.permutation,
                         matching.converged)


def assignment_cost(x: jax.Array, y: jax.Array, dead: jax.Array | bool = False) -> jax.Array:
    """The ``(n, n)`` cost matrix of the exact W2: ``|x_i - y_j|^2``, a constant.

    Zero for a dead output (``dead``): the score's map then sends every ``x_i`` to one
    point, every matching costs the same, and the identity is taken.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [1.0]])
      >>> assignment_cost(x, x + 1.0).tolist()
      [[1.0, 4.0], [0.0, 1.0]]
    """
    cost = squared_distances(jax.lax.stop_gradient(x), jax.lax.stop_gradient(y))
    return jnp.where(dead, 0.0, cost)


def matched_w2_squared(x: jax.Array, y: jax.Array, permutation: jax.Array) -> jax.Array:
    """``(1/n) sum_i |x_i - y_perm(i)|^2``, differentiable with the matching fixed.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [1.0]])
      >>> float(matched_w2_squared(x, x + 1.0, jnp.array([0, 1])))
      1.0
    """
    return jnp.mean(jnp.sum((x - y[permutation]) ** 2, axis=1))


@dataclasses.dataclass(frozen=True)
class Entropic(Solver):
    """Sinkhorn's plan at ``epsilon`` times the mean cost (held constant for gradients).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [1.0]], jnp.float32)
      >>> round(float(Entropic(1e-2).transport(x, x + 1.0).w2_squared), 3)
      1.0
    """

    name: ClassVar[str] = "sinkhorn"
    exact: ClassVar[bool] = False
    epsilon: float = 1e-2

    def transport(self, x, y, *, dead=False):
        # The regularisation level follows the data but is a constant for gradients. All
        # costs zero (a dead layer, x = y as sets): any epsilon gives the exact 0.
        scale = jax.lax.stop_gradient(jnp.mean(squared_distances(x, y)))
        epsilon = self.epsilon * jnp.where(scale > 0, scale, 1.0)
        return Transport(sinkhorn_w2_squared(x, y, epsilon=epsilon),
                         jnp.full((x.shape[0],), -1, jnp.int32), jnp.array(True))


SOLVERS: tuple[str, ...] = (
    "auto", "sort", *assignment.ASSIGNMENT_SOLVERS[1:], "sinkhorn")
EXACT_SOLVERS: tuple[str, ...] = ("sort", *assignment.ASSIGNMENT_SOLVERS[1:])


def resolve_solver(solver: str, n: int, d: int) -> str:
    """The concrete solver name that ``solver`` stands for, ``n`` points in ``d`` dims.

    Example:
      >>> resolve_solver("auto", 128, 1)
      'sort'
      >>> resolve_solver("auto", 128, 8) in ("identity_or_scipy", "auction")
      True
    """
    del n  # every solver takes every size
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if solver == "sort" and d != 1:
        raise ValueError(f"solver 'sort' needs 1-D points, got d={d}")
    if solver != "auto":
        return solver
    return "sort" if d == 1 else assignment.resolve_assignment_solver("auto")


def get_solver(solver: str, n: int, d: int, *, sinkhorn_epsilon: float = 1e-2) -> Solver:
    """The :class:`Solver` that the name ``solver`` stands for, ``n`` points in ``d`` dims.

    Args:
      solver: one of :data:`SOLVERS`.
      n, d: the clouds' shape (``"auto"`` and ``"sort"`` depend on ``d``).
      sinkhorn_epsilon: the relative regularisation of ``"sinkhorn"``.

    Example:
      >>> get_solver("auto", 64, 1)
      SortedMatching()
      >>> get_solver("scipy", 64, 3)
      Matching(assignment=Scipy())
    """
    name = resolve_solver(solver, n, d)
    if name == "sort":
        return SortedMatching()
    if name == "sinkhorn":
        return Entropic(float(sinkhorn_epsilon))
    return Matching(assignment.assignment_solver(name))


def _check_epsilon(name: str, value: float | jax.Array) -> None:
    """``ValueError`` unless a concrete ``value`` is finite and > 0 (traced: not checked)."""
    if not isinstance(value, jax.core.Tracer) and not 0 < float(np.asarray(value)) < np.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def sinkhorn_w2_squared(
    x: ArrayLike,
    y: ArrayLike,
    *,
    epsilon: float | jax.Array,
    threshold: float = 1e-4,
    max_iterations: int = 2000,
) -> jax.Array:
    """Transport cost ``<P_eps, C>`` of the entropic plan between uniform point clouds.

    Args:
      x, y: ``(n, d)`` and ``(m, d)`` point clouds.
      epsilon: absolute entropic regularisation (OTT-JAX ``Sinkhorn``).
      threshold: stop when the marginals are off by this much (L1, total mass
        1). The default is reachable in float32 and moves the cost less than the
        entropic bias does (``docs/numerics.md``, "Sinkhorn bias"); tighter
        thresholds sit at float32 rounding and run to ``max_iterations``.
      max_iterations: cap on Sinkhorn iterations.

    Returns:
      A scalar, close to and usually above the exact ``W2^2``. A plan with exact
      marginals could not go below it, but Sinkhorn stops with marginals off by up
      to ``threshold``, so with ties in the cost it can fall slightly below
      (``docs/numerics.md``, "Sinkhorn bias"). Gradients are exact for the computed value:
      the Sinkhorn iterations are differentiated by unrolling (OTT-JAX's implicit
      differentiation of the plan is not exact for this quantity).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [1.0]], jnp.float32)
      >>> cost = sinkhorn_w2_squared(x, x + 1.0, epsilon=0.01)
      >>> cost.dtype, round(float(cost), 3)   # exact W2^2 is 1.0
      (dtype('float32'), 1.0)
    """
    from ott.geometry import pointcloud
    from ott.solvers import linear

    x = _checks.linalg_dtype(_checks.point_cloud("x", x))
    y = _checks.linalg_dtype(_checks.point_cloud("y", y))
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"sinkhorn_w2_squared needs points of one dimension d, got x {x.shape} and y {y.shape}"
        )
    _check_epsilon("epsilon", epsilon)
    # OTT expands |x|^2 + |y|^2 - 2 x.y, which cancels far from the origin: the clouds are
    # shifted to their joint mean first. The distances do not depend on the shift.
    shift = jax.lax.stop_gradient(0.5 * (jnp.mean(x, axis=0) + jnp.mean(y, axis=0)))
    geom = pointcloud.PointCloud(x - shift, y - shift, epsilon=epsilon)
    out = linear.solve(geom, threshold=threshold, max_iterations=max_iterations,
                       implicit_diff=None)
    return jnp.sum(out.matrix * geom.cost_matrix)
