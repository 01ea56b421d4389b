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

The auction solver. A matching ``s`` and prices ``p`` (one per column) give the dual
bound ``LB(p) = sum_i min_j (C_ij + p_j) - sum_j p_j <= optimum``, and
``cost(s) - LB(p) = sum_i [C_is(i) + p_s(i) - min_j (C_ij + p_j)]``, a sum of
non-negative slacks. The solver stops as soon as that gap is within the tolerance.

1. Candidate: the identity matching, which is optimal or nearly so for the cost
   matrices of the affinity score (the affine map was fitted to carry ``x_i`` near
   ``y_i``). Prices: shortest-path potentials of the identity's exchange graph
   (Bellman-Ford relaxations ``v_j <- min(v_j, min_i v_i + C_ij - C_ii)``, ``p = -v``).
   They converge, and certify the identity with a zero gap, exactly when the identity
   is optimal; one relaxation already certifies it when every row's minimum is on the
   diagonal.
2. Repair: rows whose slack exceeds ``eps`` are released and bid for columns in an
   auction (Bertsekas), warm-started from those prices, with ``eps`` divided by
   ``scale_factor`` after every phase. Only the free rows bid, a block of at most
   ``block_rows`` at a time, so a round costs ``O(block_rows * n)``, not ``O(n^2)``.
   Every phase ends with all rows within ``eps`` of their best column, so the gap is at
   most ``n * eps``; the last phase's ``eps`` is the tolerance over ``n``.
3. Termination: the rounds are capped (``max_rounds``). A capped run completes its
   matching with the free columns and reports its true gap with ``converged=False``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from affjax import _checks

ASSIGNMENT_SOLVERS: tuple[str, ...] = (
    "auto", "auction", "identity_or_scipy", "scipy", "hungarian"
)


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


# --- the auction ----------------------------------------------------------------------


class _Auction(NamedTuple):
    prices: jax.Array  # (n,) price of each column
    row_to_col: jax.Array  # (n,) int32, -1 for a free row
    col_to_row: jax.Array  # (n,) int32, -1 for a free column
    slack: jax.Array  # (n,) each row's slack at the end of the last phase
    tol: jax.Array  # the gap allowed for the current matching
    eps: jax.Array
    rounds: jax.Array
    done: jax.Array


def _slacks(c: jax.Array, prices: jax.Array, row_to_col: jax.Array) -> jax.Array:
    """``C_is(i) + p_s(i) - min_j (C_ij + p_j)`` per row: non-negative, 0 on the best column."""
    n = c.shape[0]
    rows = jnp.arange(n)
    best = jnp.min(c + prices[None, :], axis=1)
    return jnp.maximum(c[rows, row_to_col] + prices[row_to_col] - best, 0.0)


def _identity_potentials(c: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array]:
    """Prices under which the identity is optimal, when it is (see the module docstring).

    Returns the prices and whether the relaxations reached their fixed point.
    """
    diag = jnp.diagonal(c)
    # Relaxing along rows of the transpose: a contiguous reduction.
    c_t = c.T

    def relax(state):
        v, _, k = state
        new = jnp.minimum(v, jnp.min(c_t + (v - diag)[None, :], axis=1))
        return new, jnp.any(new < v), k + 1

    def more(state):
        _, changed, k = state
        return changed & (k < iterations)

    v, changed, _ = jax.lax.while_loop(
        more, relax, (jnp.zeros_like(diag), jnp.array(True), jnp.array(0))
    )
    return -v, ~changed


def _bid_round(c: jax.Array, state: _Auction, block: int) -> _Auction:
    """One round: up to ``block`` free rows bid for their best column; highest bid wins."""
    n = c.shape[0]
    # The first free rows, by top_k: nonzero compiles slowly on XLA:CPU.
    key, rows = jax.lax.top_k(jnp.where(state.row_to_col < 0, -jnp.arange(n), -n), block)
    valid = key > -n
    rows = jnp.where(valid, rows, n)
    values = c[jnp.minimum(rows, n - 1)] + state.prices[None, :]
    columns = jnp.arange(n, dtype=jnp.int32)[None, :]
    # Plain min reductions: a variadic argmin is slow on XLA:CPU.
    best = jnp.min(values, axis=1)
    best_col = jnp.min(jnp.where(values == best[:, None], columns, n), axis=1)
    second = jnp.min(jnp.where(columns == best_col[:, None], jnp.inf, values), axis=1)
    # The bid makes the best column worse than the second by eps: the bidder then
    # holds a column within eps of its best.
    bid = jnp.where(valid, state.prices[best_col] + (second - best) + state.eps, -jnp.inf)
    top = jnp.full((n,), -jnp.inf, c.dtype).at[best_col].max(bid)
    wins = valid & (bid == top[best_col])
    winner = jnp.full((n,), n, jnp.int32).at[best_col].min(
        jnp.where(wins, rows, n).astype(jnp.int32)
    )
    taken = winner < n
    previous = jnp.where(taken, state.col_to_row, -1)
    row_to_col = state.row_to_col.at[jnp.where(previous >= 0, previous, n)].set(-1, mode="drop")
    row_to_col = row_to_col.at[jnp.where(taken, winner, n)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop"
    )
    return state._replace(
        prices=jnp.where(taken, top, state.prices),
        row_to_col=row_to_col,
        col_to_row=jnp.where(taken, winner, state.col_to_row),
        rounds=state.rounds + 1,
    )


_SMALL_BLOCK = 8


def _bid(c: jax.Array, state: _Auction, block: int) -> _Auction:
    """A round of :func:`_bid_round`, on a small block when only a few rows are free.

    After the first rounds of a phase only a few rows bid: a round over ``block``
    rows would spend most of its work on padding.
    """
    if block <= _SMALL_BLOCK:
        return _bid_round(c, state, block)
    few = jnp.sum(state.row_to_col < 0) <= _SMALL_BLOCK
    return jax.lax.cond(
        few, lambda s: _bid_round(c, s, _SMALL_BLOCK), lambda s: _bid_round(c, s, block), state
    )


def _release(state: _Auction) -> _Auction:
    """Frees the rows whose slack exceeds the phase's ``eps`` (and their columns)."""
    n = state.slack.shape[0]
    keep = (state.row_to_col >= 0) & (state.slack <= state.eps)
    row_to_col = jnp.where(keep, state.row_to_col, -1)
    col_to_row = jnp.full((n,), -1, jnp.int32).at[jnp.where(keep, row_to_col, n)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop"
    )
    return state._replace(row_to_col=row_to_col, col_to_row=col_to_row)


def _complete(row_to_col: jax.Array, col_to_row: jax.Array) -> jax.Array:
    """Matches the free rows to the free columns in order (a capped run's matching)."""
    n = row_to_col.shape[0]
    free_rows = jnp.argsort(row_to_col >= 0, stable=True)
    free_cols = jnp.argsort(col_to_row >= 0, stable=True).astype(jnp.int32)
    free = jnp.arange(n) < jnp.sum(row_to_col < 0)
    return row_to_col.at[jnp.where(free, free_rows, n)].set(free_cols, mode="drop")


def _auction(
    c: jax.Array, rtol: float, *, block: int, max_rounds: int, potential_iterations: int,
    scale_factor: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Potentials for the identity, then the auction if they do not certify it.

    Returns ``(permutation, gap, converged, rounds, certified_candidate)``.
    """
    n = c.shape[0]
    rows = jnp.arange(n)
    prices, _ = _identity_potentials(c, potential_iterations)
    # Gaps below the rounding of the slacks cannot be resolved: part of the tolerance.
    # (A Python float: a NumPy scalar would promote the prices to float64 under NumPy 1.)
    floor = 4.0 * float(jnp.finfo(c.dtype).eps) * (jnp.max(jnp.abs(c)) + jnp.max(jnp.abs(prices)))

    def measured(state: _Auction) -> _Auction:
        """The state with the slacks and the tolerance of its (complete) matching."""
        matched = jnp.sum(c[rows, state.row_to_col])
        return state._replace(slack=_slacks(c, state.prices, state.row_to_col),
                              tol=jnp.maximum(rtol * jnp.abs(matched), n * floor))

    identity = rows.astype(jnp.int32)
    zero = jnp.zeros((), c.dtype)
    state = measured(_Auction(prices, identity, identity, jnp.zeros_like(prices), zero, zero,
                              jnp.array(0, jnp.int32), jnp.array(False)))
    certified = jnp.sum(state.slack) <= state.tol
    state = state._replace(
        eps=jnp.maximum(jnp.max(state.slack) / scale_factor, floor), done=certified)

    def phase(state: _Auction) -> _Auction:
        state = jax.lax.while_loop(
            lambda s: jnp.any(s.row_to_col < 0) & (s.rounds < max_rounds),
            lambda s: _bid(c, s, block),
            _release(state),
        )
        capped = jnp.any(state.row_to_col < 0)
        state = measured(state._replace(row_to_col=_complete(state.row_to_col,
                                                             state.col_to_row)))
        eps_min = jnp.maximum(state.tol / n, floor)
        # A phase at eps_min ends with every row within eps_min of its best column, so
        # its gap is at most n * eps_min <= tol (up to rounding): the last phase.
        last = (jnp.sum(state.slack) <= state.tol) | (state.eps <= eps_min) | capped
        return state._replace(eps=jnp.maximum(state.eps / scale_factor, eps_min), done=last)

    state = jax.lax.while_loop(lambda s: ~s.done, phase, state)
    gap = jnp.sum(state.slack)
    return state.row_to_col, gap, gap <= state.tol, state.rounds, certified


def _row_minima_certify(c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(row_min, finite, easy)``: each row's minimum; the matrix is finite; the identity
    is certified by one pass.

    Every row's minimum on the diagonal makes the identity optimal (the row minima are
    then a dual solution with zero gap). ``easy`` is also True for a non-finite matrix,
    whose result is NaN whatever the matching.
    """
    row_min = jnp.min(c, axis=1)  # NaN propagates
    finite = jnp.all(jnp.isfinite(row_min) & jnp.isfinite(jnp.max(c, axis=1)))
    return row_min, finite, jnp.all(jnp.diagonal(c) <= row_min) | ~finite


def _auction_one(
    cost: jax.Array, *, rtol: float, block: int, max_rounds: int, potential_iterations: int,
    scale_factor: float,
) -> AssignmentResult:
    n = cost.shape[0]
    identity = jnp.arange(n, dtype=jnp.int32)
    c = jax.lax.stop_gradient(cost)
    _, finite, easy = _row_minima_certify(c)

    def certified():
        return (identity, jnp.zeros((), c.dtype), jnp.array(True), jnp.array(0, jnp.int32),
                jnp.array(True))

    def solve():
        return _auction(c, rtol, block=block, max_rounds=max_rounds,
                        potential_iterations=potential_iterations, scale_factor=scale_factor)

    if n == 1:
        permutation, gap, converged, rounds, candidate = certified()
    else:
        permutation, gap, converged, rounds, candidate = jax.lax.cond(easy, certified, solve)
    total = _matched_cost(cost, permutation)
    return AssignmentResult(
        permutation=permutation,
        cost=total,
        lower_bound=jnp.where(finite, jax.lax.stop_gradient(total) - gap, jnp.nan),
        converged=converged & finite,
        rounds=rounds,
        certified_candidate=candidate & finite,
    )


_SWAP_ROWS = 64


def _identity_or_scipy_one(cost: jax.Array, *, potential_iterations: int) -> AssignmentResult:
    """The identity where the row minima or the potentials certify it, else SciPy."""
    n = cost.shape[0]
    identity = jnp.arange(n, dtype=jnp.int32)
    c = jax.lax.stop_gradient(cost)
    row_min, finite, easy = _row_minima_certify(c)

    def by_identity():
        return identity, jnp.array(True)

    def by_scipy():
        return scipy_permutation(c), jnp.array(False)

    def by_potentials():
        # The potentials certify exactly when they reach their fixed point (module
        # docstring); the SciPy call is then skipped.
        _, fixed = _identity_potentials(c, potential_iterations)
        return jax.lax.cond(fixed, by_identity, by_scipy)

    def not_easy():
        # A swap of two rows' columns that lowers the cost disproves the identity; the
        # potentials would only run to their cap. Such a swap involves a row whose minimum
        # is off the diagonal: the first _SWAP_ROWS of those are tried. (It routes, never
        # decides a result: a swap found by rounding alone sends an optimal identity to
        # SciPy.)
        diag = jnp.diagonal(c)
        off = diag > row_min
        key, rows = jax.lax.top_k(jnp.where(off, -jnp.arange(n), -n), min(n, _SWAP_ROWS))
        gain = c[rows, :] + c[:, rows].T - diag[rows][:, None] - diag[None, :]
        swap = jnp.any((key > -n)[:, None] & (gain < 0))
        return jax.lax.cond(swap, by_scipy, by_potentials)

    if n == 1:
        permutation, certified = by_identity()
    else:
        permutation, certified = jax.lax.cond(easy, by_identity, not_easy)
    total = _matched_cost(cost, permutation)
    return AssignmentResult(
        permutation=permutation,
        cost=total,
        lower_bound=jnp.where(finite, jax.lax.stop_gradient(total), jnp.nan),
        converged=finite,
        rounds=jnp.array(0, jnp.int32),
        certified_candidate=certified & finite,
    )


def _matched_cost(cost: jax.Array, permutation: jax.Array) -> jax.Array:
    """``sum_i cost[i, permutation[i]]``, differentiable in ``cost`` (matching fixed)."""
    rows = jnp.arange(cost.shape[-1])
    return jnp.sum(cost[rows, jax.lax.stop_gradient(permutation)])


# --- exact reference solvers --------------------------------------------------------


def _scipy_host(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    cost = np.asarray(cost)
    batch_shape, n = cost.shape[:-2], cost.shape[-1]
    flat = cost.reshape((-1, n, n))
    out = np.empty((flat.shape[0], n), np.int32)
    for k, c in enumerate(flat):
        if not np.all(np.isfinite(c)):
            # Non-finite costs give a NaN result anyway; any matching will do.
            out[k] = np.arange(n)
            continue
        rows, cols = linear_sum_assignment(c)
        out[k, rows] = cols
    return out.reshape(batch_shape + (n,))


def scipy_permutation(cost: jax.Array) -> jax.Array:
    """``scipy.optimize.linear_sum_assignment`` through a host callback, batched.

    Args:
      cost: ``(..., n, n)`` float array.

    Returns:
      int32 ``(..., n)``; the identity for a matrix that is not finite.

    Example:
      >>> import jax.numpy as jnp
      >>> scipy_permutation(jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
      [1, 0]
    """
    n = cost.shape[-1]
    return jax.pure_callback(
        _scipy_host,
        jax.ShapeDtypeStruct(cost.shape[:-2] + (n,), jnp.int32),
        cost,
        vmap_method="broadcast_all",
    )


def hungarian_permutation(cost: jax.Array) -> jax.Array:
    """optax's on-device Hungarian algorithm for one ``(n, n)`` matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> hungarian_permutation(jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
      [1, 0]
    """
    from optax.assignment import hungarian_algorithm

    rows, cols = hungarian_algorithm(cost)
    return jnp.zeros(cost.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))


def _exact_result(cost: jax.Array, permutation: jax.Array) -> AssignmentResult:
    finite = jnp.all(jnp.isfinite(cost), axis=(-2, -1))
    total = jax.vmap(_matched_cost)(cost.reshape((-1,) + cost.shape[-2:]),
                                    permutation.reshape((-1, cost.shape[-1])))
    total = total.reshape(cost.shape[:-2])
    zeros = jnp.zeros(cost.shape[:-2], jnp.int32)
    return AssignmentResult(
        permutation=permutation,
        cost=total,
        lower_bound=jnp.where(finite, jax.lax.stop_gradient(total), jnp.nan),
        converged=finite,
        rounds=zeros,
        certified_candidate=jnp.zeros(cost.shape[:-2], bool),
    )


# --- the public entry point -----------------------------------------------------------


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
      An :class:`AssignmentResult`. With a batch, one matching per matrix: the batch is
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
    n = cost.shape[-1]
    if n == 0:
        raise ValueError("cost must have at least one row, got shape " f"{cost.shape}")
    cost = _checks.linalg_dtype(cost)
    solver = resolve_assignment_solver(solver)
    if solver != "auction":
        for name, value in (("rtol", rtol), ("max_rounds", max_rounds),
                            ("block_rows", block_rows)):
            if value is not None:
                raise ValueError(f"{name} is an option of solver='auction', not {solver!r}")
    if solver == "scipy":
        return _exact_result(cost, scipy_permutation(jax.lax.stop_gradient(cost)))
    if solver == "hungarian":
        flat = jax.lax.stop_gradient(cost).reshape((-1, n, n))
        perm = jax.vmap(hungarian_permutation)(flat).reshape(cost.shape[:-1])
        return _exact_result(cost, perm)
    potential_iterations = _positive("potential_iterations", potential_iterations, int)
    if solver == "identity_or_scipy":
        return _solve(cost, _identity_or_scipy_one, potential_iterations=potential_iterations)
    rtol = default_rtol(cost.dtype) if rtol is None else _positive("rtol", rtol, float)
    max_rounds = (default_max_rounds(n) if max_rounds is None
                  else _positive("max_rounds", max_rounds, int))
    block = _default_block(n) if block_rows is None else _positive("block_rows", block_rows, int)
    scale_factor = _positive("scale_factor", scale_factor, float)
    if scale_factor <= 1:
        raise ValueError(f"scale_factor must be > 1, got {scale_factor!r}")
    return _solve(cost, _auction_one, rtol=rtol, block=min(block, n), max_rounds=max_rounds,
                  potential_iterations=potential_iterations, scale_factor=scale_factor)


@functools.partial(jax.jit, static_argnums=1, static_argnames=(
    "rtol", "block", "max_rounds", "potential_iterations", "scale_factor"))
def _solve(cost: jax.Array, one: Callable[..., AssignmentResult], **options) -> AssignmentResult:
    """``one(matrix, **options)`` on a matrix or on each matrix of a batch, compiled once.

    A loop on CPU: each matrix takes only its own branches and stops on its own (a
    vmapped ``cond`` or ``while_loop`` runs every branch and waits for the slowest).
    """
    one = functools.partial(one, **options)
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
