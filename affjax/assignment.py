"""Linear assignment: the optimal matching of a square cost matrix, with a certificate.

``linear_assignment(cost)`` returns the permutation ``s`` minimising
``sum_i cost[i, s(i)]``, its cost, and a lower bound on the optimum from dual
potentials, so that ``lower_bound <= optimum <= cost`` can be read off every result.

Solvers:

``"auction"``           on device, jittable and vmappable, no host callback. Certifies
                        a candidate first, then repairs it by an epsilon-scaling
                        auction (below).
``"identity_or_scipy"`` the same certificate of the identity on device (steps 1 and 2
                        below, step 2 skipped when swapping two rows' columns lowers
                        the cost); SciPy on the host for the matrices it does not certify.
``"scipy"``             ``scipy.optimize.linear_sum_assignment`` on the host through
                        ``jax.pure_callback`` (exact; one round trip per call).
``"hungarian"``         ``optax.assignment.hungarian_algorithm``, exact, on device.
``"auto"``              ``"auction"`` on an accelerator, ``"identity_or_scipy"`` on CPU,
                        where the host is the device and SciPy beats the auction on the
                        matrices the certificate leaves (``docs/assignment.md``).

The auction's algorithm is described in ``affjax/_matching.py``; ``docs/assignment.md``
has the measurements behind ``"auto"``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from affjax import _checks
from affjax import _matching
from affjax._matching import hungarian_permutation  # noqa: F401 (public here)
from affjax._matching import scipy_permutation  # noqa: F401 (public here)


class AssignmentResult(NamedTuple):
    """Output of :func:`linear_assignment`; leading batch axes as the cost's.

    Attributes:
      permutation: int32 ``(..., n)``: row ``i`` is matched to column ``permutation[i]``.
      cost: the matching's total cost ``sum_i cost[i, permutation[i]]``, in the cost's
        dtype. Differentiable with respect to the cost matrix with the matching held
        fixed (envelope theorem).
      lower_bound: a dual bound, ``lower_bound <= optimum <= cost`` up to the rounding
        of the sums. Equal to ``cost`` for ``"scipy"`` and ``"hungarian"`` (exact by
        construction). NaN when the cost matrix is not finite. Not differentiated.
      converged: bool, the gap ``cost - lower_bound`` is within the tolerance (always
        True for the exact solvers, False for a non-finite cost matrix).
      rounds: int32, auction rounds run (0 when the candidate was certified, and for
        the solvers without an auction).
      certified_candidate: bool, the identity matching was certified on device, without
        an auction or a SciPy call (always False for ``"scipy"`` and ``"hungarian"``).
    """

    permutation: jax.Array
    cost: jax.Array
    lower_bound: jax.Array
    converged: jax.Array
    rounds: jax.Array
    certified_candidate: jax.Array


def default_rtol(dtype: jnp.dtype) -> float:
    """The default relative tolerance of the auction: 1e-9 in float64, 1e-6 in float32.

    Example:
      >>> import jax.numpy as jnp
      >>> default_rtol(jnp.float32)
      1e-06
    """
    return 1e-9 if jnp.finfo(dtype).bits >= 64 else 1e-6


def default_max_rounds(n: int) -> int:
    """The auction's default cap on bidding rounds for ``n`` rows: ``100 n + 10000``.

    Far above what the score's cost matrices need (none of ``benchmarks/bench_assignment.py``'s
    corpus comes near it); many exactly equal columns (duplicated output points with
    the identity not optimal) make the auction raise their prices in small steps, and
    take the most rounds.

    Example:
      >>> default_max_rounds(2048)
      214800
    """
    return 100 * n + 10_000


# --- the solvers, registered by name -------------------------------------------------


def _matched_cost(cost: jax.Array, permutation: jax.Array) -> jax.Array:
    """``sum_i cost[i, permutation[i]]``, differentiable in ``cost`` (matching fixed)."""
    rows = jnp.arange(cost.shape[-1])
    return jnp.sum(cost[rows, jax.lax.stop_gradient(permutation)])


def _result(cost: jax.Array, m: _matching.Matching) -> AssignmentResult:
    """One matrix's :class:`AssignmentResult`; a non-finite matrix is never converged."""
    finite = jnp.all(jnp.isfinite(cost))
    total = _matched_cost(cost, m.permutation)
    return AssignmentResult(
        permutation=m.permutation,
        cost=total,
        lower_bound=jnp.where(finite, jax.lax.stop_gradient(total) - m.gap, jnp.nan),
        converged=m.converged & finite,
        rounds=m.rounds,
        certified_candidate=m.certified_candidate & finite,
    )


def _exact(permutation: jax.Array, dtype: jnp.dtype) -> _matching.Matching:
    return _matching.Matching(permutation, jnp.zeros((), dtype), jnp.array(True),
                              jnp.array(0, jnp.int32), jnp.array(False))


class AssignmentSolver:
    """A solver of :func:`linear_assignment`: a frozen, hashable configuration.

    Subclasses set ``name`` (their key in :data:`ASSIGNMENT_SOLVERS`) and implement
    :meth:`match`; :func:`assignment_solver` builds one from its name.

    Example:
      >>> import jax.numpy as jnp
      >>> solver = assignment_solver("auto")
      >>> isinstance(solver, AssignmentSolver), solver.name in ASSIGNMENT_SOLVERS
      (True, True)
      >>> solver.match(jnp.array([[1.0, 0.0], [0.0, 1.0]])).permutation.tolist()
      [1, 0]
    """

    name: ClassVar[str]

    def match(self, cost: jax.Array) -> AssignmentResult:
        """The matching of a float ``(n, n)`` cost matrix or ``(B, n, n)`` batch."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Auction(AssignmentSolver):
    """The certified on-device auction (options as in :func:`linear_assignment`).

    Example:
      >>> import jax.numpy as jnp
      >>> r = Auction(rtol=1e-9).match(jnp.array([[1.0, 0.0], [0.0, 1.0]]))
      >>> r.permutation.tolist(), bool(r.converged)
      ([1, 0], True)
    """

    name: ClassVar[str] = "auction"
    rtol: float | None = None
    max_rounds: int | None = None
    block_rows: int | None = None
    potential_iterations: int = 64
    scale_factor: float = 5.0

    def __post_init__(self) -> None:
        for field, kind in (("rtol", float), ("max_rounds", int), ("block_rows", int),
                            ("potential_iterations", int), ("scale_factor", float)):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, _positive(field, getattr(self, field), kind))
        if self.scale_factor <= 1:
            raise ValueError(f"scale_factor must be > 1, got {self.scale_factor!r}")

    def match(self, cost: jax.Array) -> AssignmentResult:
        n = cost.shape[-1]
        block = _default_block(n) if self.block_rows is None else self.block_rows
        return _solve(
            cost, _matching.auction,
            rtol=default_rtol(cost.dtype) if self.rtol is None else self.rtol,
            block=min(block, n),
            max_rounds=default_max_rounds(n) if self.max_rounds is None else self.max_rounds,
            potential_iterations=self.potential_iterations, scale_factor=self.scale_factor)


@dataclasses.dataclass(frozen=True)
class IdentityOrScipy(AssignmentSolver):
    """The identity where the auction's certificate proves it, SciPy for the rest.

    Example:
      >>> import jax.numpy as jnp
      >>> r = IdentityOrScipy().match(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
      >>> r.permutation.tolist(), bool(r.certified_candidate)
      ([0, 1], True)
    """

    name: ClassVar[str] = "identity_or_scipy"
    potential_iterations: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "potential_iterations",
                           _positive("potential_iterations", self.potential_iterations, int))

    def match(self, cost: jax.Array) -> AssignmentResult:
        return _solve(cost, _matching.identity_or_scipy,
                      potential_iterations=self.potential_iterations)


@dataclasses.dataclass(frozen=True)
class Scipy(AssignmentSolver):
    """``scipy.optimize.linear_sum_assignment`` on the host, one callback per batch.

    Example:
      >>> import jax.numpy as jnp
      >>> Scipy().match(jnp.array([[1.0, 0.0], [0.0, 1.0]])).permutation.tolist()
      [1, 0]
    """

    name: ClassVar[str] = "scipy"

    def match(self, cost: jax.Array) -> AssignmentResult:
        permutation = _matching.scipy_permutation(jax.lax.stop_gradient(cost))
        return _per_matrix(cost, permutation)


@dataclasses.dataclass(frozen=True)
class Hungarian(AssignmentSolver):
    """optax's Hungarian algorithm, exact, on device.

    Example:
      >>> import jax.numpy as jnp
      >>> Hungarian().match(jnp.array([[1.0, 0.0], [0.0, 1.0]])).permutation.tolist()
      [1, 0]
    """

    name: ClassVar[str] = "hungarian"

    def match(self, cost: jax.Array) -> AssignmentResult:
        n = cost.shape[-1]
        flat = jax.lax.stop_gradient(cost).reshape((-1, n, n))
        permutation = jax.vmap(_matching.hungarian_permutation)(flat)
        return _per_matrix(cost, permutation.reshape(cost.shape[:-1]))


def _per_matrix(cost: jax.Array, permutation: jax.Array) -> AssignmentResult:
    n = cost.shape[-1]
    one = lambda c, p: _result(c, _exact(p, c.dtype))  # noqa: E731
    out = jax.vmap(one)(cost.reshape((-1, n, n)), permutation.reshape((-1, n)))
    return jax.tree.map(lambda a: a.reshape(cost.shape[:-2] + a.shape[1:]), out)


_REGISTRY: dict[str, type[AssignmentSolver]] = {
    cls.name: cls for cls in (Auction, IdentityOrScipy, Scipy, Hungarian)
}
ASSIGNMENT_SOLVERS: tuple[str, ...] = ("auto", *_REGISTRY)
_AUCTION_ONLY = ("rtol", "max_rounds", "block_rows")


def resolve_assignment_solver(solver: str) -> str:
    """The concrete solver ``solver`` names on the default backend.

    ``"auto"`` is ``"identity_or_scipy"`` on CPU and ``"auction"`` elsewhere.

    Example:
      >>> import jax
      >>> resolve_assignment_solver("auto") == (
      ...     "identity_or_scipy" if jax.default_backend() == "cpu" else "auction")
      True
    """
    if solver not in ASSIGNMENT_SOLVERS:
        raise ValueError(
            f"unknown assignment solver {solver!r}; expected one of {ASSIGNMENT_SOLVERS}"
        )
    if solver != "auto":
        return solver
    return "identity_or_scipy" if jax.default_backend() == "cpu" else "auction"


def assignment_solver(name: str = "auto", **options: Any) -> AssignmentSolver:
    """The solver that ``name`` stands for on the default backend, configured.

    Args:
      name: one of :data:`ASSIGNMENT_SOLVERS` (``"auto"``: see
        :func:`resolve_assignment_solver`).
      **options: the solver's fields (:class:`Auction`'s ``rtol``, ...). An auction
        option that is not ``None`` for another solver is an error; the others are
        dropped where the solver has no such field.

    Example:
      >>> assignment_solver("scipy")
      Scipy()
      >>> assignment_solver("scipy", rtol=1e-3)
      Traceback (most recent call last):
      ...
      ValueError: rtol is an option of solver='auction', not 'scipy'
    """
    cls = _REGISTRY[resolve_assignment_solver(name)]
    fields = {f.name for f in dataclasses.fields(cls)}
    for option, value in options.items():
        if option in _AUCTION_ONLY and value is not None and option not in fields:
            raise ValueError(f"{option} is an option of solver='auction', not {cls.name!r}")
    return cls(**{k: v for k, v in options.items() if k in fields})


def _default_block(n: int) -> int:
    # One core walks the few free rows; an accelerator takes every free row at once.
    return min(n, 64) if jax.default_backend() == "cpu" else n


def linear_assignment(
    cost: ArrayLike,
    *,
    solver: str = "auto",
    rtol: float | None = None,
    max_rounds: int | None = None,
    block_rows: int | None = None,
    potential_iterations: int = 64,
    scale_factor: float = 5.0,
) -> AssignmentResult:
    """The minimum-cost perfect matching of a square cost matrix, or of a batch of them.

    Args:
      cost: ``(n, n)`` or ``(B, n, n)`` real array (integers and half precision are
        solved in float: the default float and float32).
      solver: ``"auto"``, ``"auction"``, ``"identity_or_scipy"``, ``"scipy"`` or
        ``"hungarian"`` (module docstring).
      rtol: auction only: stop when ``cost - lower_bound <= rtol * |cost|`` (plus the
        rounding of the sums, about ``n * eps`` of the matrix's range). Default
        :func:`default_rtol`: 1e-9 in float64; 1e-6 in float32, where the bound is
        relative to the float32 matrix, itself rounded to ``eps = 1.2e-7``.
      max_rounds: auction only: cap on the bidding rounds (default
        :func:`default_max_rounds`). A capped run returns a complete matching, its true
        gap and ``converged=False``; the score functions then give NaN.
      block_rows: auction only: most rows bidding in one round (default 64 on CPU, all
        free rows on an accelerator).
      potential_iterations: ``"auction"`` and ``"identity_or_scipy"``: cap on the
        relaxations that certify the identity.
      scale_factor: auction only: ``eps`` is divided by this after every phase.

    Returns:
      An :class:`AssignmentResult` (see :func:`assignment_solver` for the solver as an
      object). With a batch, one matching per matrix: the batch is
      a loop on CPU (each matrix stops on its own) and a ``vmap`` on accelerators.

    Example:
      >>> import jax.numpy as jnp
      >>> c = jnp.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
      >>> r = linear_assignment(c)
      >>> r.permutation.tolist(), float(r.cost), bool(r.converged)
      ([1, 0, 2], 5.0, True)
      >>> bool(4.9999 < r.lower_bound <= r.cost)   # certified to the default rtol
      True
    """
    cost = _checks.real_array("cost", cost)
    if cost.ndim not in (2, 3) or cost.shape[-1] != cost.shape[-2]:
        raise ValueError(
            f"cost must be a square matrix (n, n) or a batch (B, n, n), got shape {cost.shape}"
        )
    if cost.shape[-1] == 0:
        raise ValueError(f"cost must have at least one row, got shape {cost.shape}")
    solver_ = assignment_solver(solver, rtol=rtol, max_rounds=max_rounds, block_rows=block_rows,
                                potential_iterations=potential_iterations,
                                scale_factor=scale_factor)
    return solver_.match(_checks.linalg_dtype(cost))


@functools.partial(jax.jit, static_argnums=1, static_argnames=(
    "rtol", "block", "max_rounds", "potential_iterations", "scale_factor"))
def _solve(cost: jax.Array, kernel: Callable[..., _matching.Matching],
           **options: Any) -> AssignmentResult:
    """``kernel`` on a matrix or on each matrix of a batch, compiled once.

    A loop on CPU: each matrix takes only its own branches and stops on its own (a
    vmapped ``cond`` or ``while_loop`` runs every branch and waits for the slowest).
    """
    def one(c: jax.Array) -> AssignmentResult:
        return _result(c, kernel(jax.lax.stop_gradient(c), **options))

    if cost.ndim == 2:
        return one(cost)
    if jax.default_backend() == "cpu":
        return jax.lax.map(one, cost)
    return jax.vmap(one)(cost)


def _positive(name: str, value: object, kind: type) -> float | int:
    """``value`` as ``kind`` if it is a finite number > 0, else a ``ValueError`` naming it."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value) == int(value)
    if not ok or not 0 < float(value) < np.inf:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number > 0, "
                         f"got {value!r}")
    return kind(value)
