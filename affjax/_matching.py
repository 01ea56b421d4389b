"""The kernels of :func:`affjax.linear_assignment`'s solvers, one matrix at a time.

Each returns a matching and what certifies it; :mod:`affjax.assignment` validates the
options, batches the matrices and assembles the :class:`affjax.AssignmentResult`.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Matching(NamedTuple):
    """One matrix's matching: ``gap`` bounds its cost above the optimum (0 when exact).

    Attributes:
      permutation: int32 ``(n,)``.
      gap: ``cost - lower_bound``, not differentiated.
      converged: the gap is within the tolerance.
      rounds: int32, auction rounds run.
      certified_candidate: the identity was certified without an auction or SciPy.
    """

    permutation: jax.Array
    gap: jax.Array
    converged: jax.Array
    rounds: jax.Array
    certified_candidate: jax.Array


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


def row_minima_certify(c: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(row_min, finite, easy)``: each row's minimum; the matrix is finite; the identity
    is certified by one pass.

    Every row's minimum on the diagonal makes the identity optimal (the row minima are
    then a dual solution with zero gap). ``easy`` is also True for a non-finite matrix,
    whose result is NaN whatever the matching.
    """
    row_min = jnp.min(c, axis=1)  # NaN propagates
    finite = jnp.all(jnp.isfinite(row_min) & jnp.isfinite(jnp.max(c, axis=1)))
    return row_min, finite, jnp.all(jnp.diagonal(c) <= row_min) | ~finite


def auction(
    c: jax.Array, *, rtol: float, block: int, max_rounds: int, potential_iterations: int,
    scale_factor: float,
) -> Matching:
    """The identity where the row minima certify it, else potentials and the auction."""
    n = c.shape[0]
    _, _, easy = row_minima_certify(c)

    def certified():
        return Matching(jnp.arange(n, dtype=jnp.int32), jnp.zeros((), c.dtype), jnp.array(True),
                        jnp.array(0, jnp.int32), jnp.array(True))

    def solve():
        return Matching(*_auction(c, rtol, block=block, max_rounds=max_rounds,
                                  potential_iterations=potential_iterations,
                                  scale_factor=scale_factor))

    return certified() if n == 1 else jax.lax.cond(easy, certified, solve)


_SWAP_ROWS = 64


def identity_or_scipy(c: jax.Array, *, potential_iterations: int) -> Matching:
    """The identity where the row minima or the potentials certify it, else SciPy."""
    n = c.shape[0]
    row_min, _, easy = row_minima_certify(c)

    def by_identity():
        return jnp.arange(n, dtype=jnp.int32), jnp.array(True)

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

    permutation, certified = by_identity() if n == 1 else jax.lax.cond(easy, by_identity,
                                                                        not_easy)
    return Matching(permutation, jnp.zeros((), c.dtype), jnp.array(True),
                    jnp.array(0, jnp.int32), certified)


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
