"""Optimal transport pieces of the affinity score.

* The Gaussian (Bures) optimal transport map between two covariances, and the
  closed-form Bures-Wasserstein distance.
* The exact squared 2-Wasserstein distance between two uniform point clouds of
  equal size: with uniform weights the optimal plan is a permutation, so it is
  an assignment problem (Birkhoff-von Neumann). The solvers, and what ``"auto"``
  picks, are in :mod:`affjax.solvers`.

Gradients: the exact solvers return a permutation that is held fixed, and the
matched cost is differentiated (envelope theorem): the gradient exists almost
everywhere, wherever the optimal matching is unique.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from affjax import _checks
from affjax.assignment import AssignmentResult
from affjax.linalg import gram_cholesky
from affjax.linalg import gram_inv_sqrt_and_trace_sqrt
from affjax.linalg import psd_sqrt
from affjax.linalg import qr_lower_factor
from affjax.solvers import EXACT_SOLVERS  # noqa: F401 (public here)
from affjax.solvers import SOLVERS  # noqa: F401 (public here)
from affjax.solvers import SortedMatching
from affjax.solvers import get_solver
from affjax.solvers import resolve_solver  # noqa: F401 (public here)
from affjax.solvers import sinkhorn_w2_squared  # noqa: F401 (public here)
from affjax.solvers import squared_distances  # noqa: F401 (public here)

# --- Gaussian (Bures) transport -------------------------------------------------


FACTORS: tuple[str, ...] = ("auto", "cholesky", "qr")


def gram_largest_eigenvalue(factor: jax.Array, *, iterations: int = 8) -> jax.Array:
    """A lower estimate of the largest eigenvalue of ``F^T F``, from ``F`` alone.

    The Rayleigh quotient after a few power iterations on ``F^T F``, applied as
    ``F^T (F v)`` (``O(m k)`` per step, no Gram matrix). It never exceeds the
    largest eigenvalue and is usually within a few percent of it.

    Args:
      factor: ``(m, k)`` array, float.
      iterations: power iterations.

    Returns:
      A scalar in the factor's dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.diag(jnp.array([3.0, 1.0, 0.5], jnp.float32))   # F^T F = diag(9, 1, 0.25)
      >>> round(float(gram_largest_eigenvalue(f)), 2)
      9.0
    """
    k = factor.shape[-1]
    v0 = jnp.full((k,), 1.0 / k**0.5, factor.dtype)

    def step(_, v):
        w = factor.T @ (factor @ v)
        norm = jnp.linalg.norm(w)
        return jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)

    v = jax.lax.fori_loop(0, iterations, step, v0)
    return jnp.sum((factor @ v) ** 2)


def cholesky_hopeless(
    smallest_eigenvalue: ArrayLike, largest_eigenvalue: ArrayLike, dtype: jnp.dtype
) -> jax.Array:
    """Whether float Cholesky of a Gram matrix ``F^T F`` is bound to break down.

    True when a known eigenvalue (``smallest_eigenvalue``) is below ``eps`` times
    the largest: forming the Gram matrix in ``dtype`` perturbs its eigenvalues by
    about that much, and Cholesky then meets a non-positive pivot (the float32
    threshold is in ``docs/numerics.md``, "Algorithm"). The usual case: a float32
    covariance with ridge 1e-6 whose samples span fewer dimensions than it has
    (d >= n, every wide layer), where the ridge is an eigenvalue, and whose largest
    eigenvalue exceeds 10. Such factors go straight to QR instead of trying Cholesky
    first.

    Args:
      smallest_eigenvalue: a known eigenvalue of ``F^T F`` (scalar).
      largest_eigenvalue: its largest eigenvalue, or a lower estimate of it
        (:func:`gram_largest_eigenvalue`): an underestimate only makes the answer
        False where it could have been True, and Cholesky is then tried.
      dtype: the dtype the Gram matrix is formed in.

    Returns:
      A bool scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(cholesky_hopeless(1e-6, 100.0, jnp.float32))
      True
      >>> bool(cholesky_hopeless(1e-6, 0.1, jnp.float32))
      False
    """
    eps = float(jnp.finfo(dtype).eps)
    return jnp.asarray(smallest_eigenvalue) < eps * jnp.asarray(largest_eigenvalue)


def _lower_factor(
    factor: jax.Array, method: str = "auto", hopeless: jax.Array | None = None
) -> jax.Array:
    """``R`` with ``R R^T = F^T F``: Cholesky, or QR of ``F`` when Cholesky fails.

    Both are backward stable for ``F^T F`` to the same order; Cholesky is several
    times cheaper but breaks down (NaN) when rounding makes the Gram matrix
    indefinite, which a ridge of 1e-6 does not prevent in float32. ``method``
    ``"cholesky"`` or ``"qr"`` forces one: under ``vmap`` the ``"auto"`` choice
    becomes a select that runs both, so batched callers (signatures) try
    ``"cholesky"`` on the whole batch and redo it with ``"qr"`` only if needed.
    ``hopeless`` (a bool scalar, see :func:`cholesky_hopeless`): with ``"auto"``,
    skip the Cholesky attempt where it is known to fail.
    """
    if method not in FACTORS:
        raise ValueError(f"factor method must be one of {FACTORS}, got {method!r}")

    def qr():
        return qr_lower_factor(factor)

    if method == "qr":
        return qr()

    def cholesky_or_qr():
        chol = gram_cholesky(factor)
        if method == "cholesky":
            return chol
        return jax.lax.cond(jnp.all(jnp.isfinite(chol)), lambda: chol, qr)

    if method == "cholesky" or hopeless is None:
        return cholesky_or_qr()
    return jax.lax.cond(hopeless, qr, cholesky_or_qr)


def bures_from_factors(
    factor_x: jax.Array,
    factor_y: jax.Array,
    *,
    rtol: float | None = None,
    factor: str = "auto",
    smallest_eigenvalue_y: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Bures map and ``trace (C_y^1/2 C_x C_y^1/2)^1/2`` from covariance factors.

    With ``C_x = F_x^T F_x`` and ``C_y = F_y^T F_y`` (any number of rows), take
    a lower factor ``C_y = R R^T``: Cholesky of ``F_y^T F_y``, or ``qr(F_y).R^T``
    where rounding makes that Gram matrix numerically indefinite. Then
    ``A = R (R^T C_x R)^{-1/2} R^T`` is the symmetric PSD solution of
    ``A C_x A = C_y``: the same matrix as the published
    ``C_y^1/2 (C_y^1/2 C_x C_y^1/2)^{-1/2} C_y^1/2``, since ``R^T C_x R`` and
    ``C_y^1/2 C_x C_y^1/2`` are similar. ``(R^T C_x R)^{-1/2}`` comes from the
    SVD of ``F_x R``: one decomposition per map, and no Gram matrix whose small
    eigenvalues float32 would lose.

    Args:
      factor_x, factor_y: ``(m_x, k)`` and ``(m_y, k)`` factors.
      rtol: singular values of ``F_x R`` at or below ``rtol * max`` count as
        zero (the pseudo-inverse); default ``4 * sqrt(k) * eps(dtype)``, the
        rounding level of ``F_x R`` as computed (see ``docs/numerics.md``).
      factor: how ``R`` is computed: ``"auto"`` (Cholesky, QR where it fails),
        ``"cholesky"`` (NaN where it fails) or ``"qr"``.
      smallest_eigenvalue_y: an eigenvalue of ``C_y`` known to the caller (the
        ridge, when the samples span fewer than ``k`` dimensions). With
        ``factor="auto"``, Cholesky is not tried where rounding makes it fail
        for sure (see :func:`cholesky_hopeless`). The result is the same.

    Returns:
      ``(A, trace_sqrt)``: ``(k, k)`` and a scalar, in the factors' dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> f_x = jnp.eye(2, dtype=jnp.float32)          # C_x = I
      >>> f_y = 2.0 * jnp.eye(2, dtype=jnp.float32)    # C_y = 4 I
      >>> a, trace_sqrt = bures_from_factors(f_x, f_y)
      >>> a.dtype, a.round(4).tolist(), round(float(trace_sqrt), 4)
      (dtype('float32'), [[2.0, 0.0], [0.0, 2.0]], 4.0)
    """
    hopeless = (  # only "auto" chooses, so only it needs the power iteration
        None if smallest_eigenvalue_y is None or factor != "auto"
        else cholesky_hopeless(
            smallest_eigenvalue_y, gram_largest_eigenvalue(factor_y), factor_y.dtype
        )
    )
    return bures_from_lower_factor(factor_x, _lower_factor(factor_y, factor, hopeless), rtol=rtol)


def bures_from_lower_factor(
    factor_x: jax.Array, r: jax.Array, *, rtol: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """:func:`bures_from_factors` given the lower factor ``R`` of ``C_y = R R^T`` itself.

    Args:
      factor_x: ``(m_x, k)`` factor, ``C_x = F_x^T F_x``.
      r: ``(k, k)`` lower triangular, ``C_y = R R^T`` (any signs on the diagonal).
      rtol: as in :func:`bures_from_factors`.

    Returns:
      ``(A, trace_sqrt)`` as in :func:`bures_from_factors`.

    Example:
      >>> import jax.numpy as jnp
      >>> a, trace_sqrt = bures_from_lower_factor(jnp.eye(2), 3.0 * jnp.eye(2))   # C_y = 9 I
      >>> a.round(4).tolist(), round(float(trace_sqrt), 4)
      ([[3.0, 0.0], [0.0, 3.0]], 6.0)
    """
    if rtol is None:
        rtol = 4.0 * r.shape[-1] ** 0.5 * float(jnp.finfo(r.dtype).eps)
    inv_sqrt, trace_sqrt = gram_inv_sqrt_and_trace_sqrt(factor_x @ r, rtol)
    a = r @ inv_sqrt @ jnp.swapaxes(r, -1, -2)
    return 0.5 * (a + jnp.swapaxes(a, -1, -2)), trace_sqrt


def _covariance_pair(cov_x: ArrayLike, cov_y: ArrayLike) -> tuple[jax.Array, jax.Array]:
    cov_x = _checks.square_matrix("cov_x", cov_x)
    cov_y = _checks.square_matrix("cov_y", cov_y)
    if cov_x.ndim != 2 or cov_y.ndim != 2:
        raise ValueError(
            f"bures_map and bures_w2 take one pair of (d, d) covariances, got {cov_x.shape} and "
            f"{cov_y.shape}; for a stack of pairs use jax.vmap"
        )
    if cov_x.shape != cov_y.shape:
        raise ValueError(
            f"cov_x and cov_y must have the same shape (d, d), got {cov_x.shape} and {cov_y.shape}"
        )
    return cov_x, cov_y


def _dense_bures(cov_x: ArrayLike, cov_y: ArrayLike, rtol: float | None):
    return bures_from_factors(psd_sqrt(cov_x), psd_sqrt(cov_y), rtol=rtol)


def bures_map(cov_x: ArrayLike, cov_y: ArrayLike, *, rtol: float | None = None) -> jax.Array:
    r"""Matrix of the optimal transport map between centred Gaussians.

    Returns the symmetric PSD ``A`` with ``A C_x A = C_y``; the map from
    ``N(m_x, C_x)`` to ``N(m_y, C_y)`` is ``T(x) = m_y + A (x - m_x)``.

    Args:
      cov_x: ``(d, d)`` source covariance, symmetric PSD.
      cov_y: ``(d, d)`` target covariance, symmetric PSD.
      rtol: pseudo-inverse cutoff, see :func:`bures_from_factors`.

    Returns:
      ``(d, d)`` array in the input dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> a = bures_map(jnp.eye(2, dtype=jnp.float32), 4.0 * jnp.eye(2, dtype=jnp.float32))
      >>> a.shape, a.dtype, a.round(4).tolist()
      ((2, 2), dtype('float32'), [[2.0, 0.0], [0.0, 2.0]])
    """
    cov_x, cov_y = _covariance_pair(cov_x, cov_y)
    return _dense_bures(cov_x, cov_y, rtol)[0]


def bures_w2(
    mean_x: ArrayLike,
    cov_x: ArrayLike,
    mean_y: ArrayLike,
    cov_y: ArrayLike,
    *,
    rtol: float | None = None,
) -> jax.Array:
    r"""Closed-form 2-Wasserstein distance between two Gaussians.

    ``W2^2 = |m_x - m_y|^2 + tr C_x + tr C_y - 2 tr (C_y^1/2 C_x C_y^1/2)^1/2``.

    Args:
      mean_x, mean_y: ``(d,)`` means.
      cov_x, cov_y: ``(d, d)`` covariances (``cov_y`` positive definite).
      rtol: as in :func:`bures_map`.

    Returns:
      The distance (not squared), a scalar in the input dtype. The squared
      value is a difference of traces and loses relative precision when the
      two Gaussians are close (about ``sqrt(eps * tr C)`` absolute); a
      slightly negative squared value from rounding gives 0.

    Example:
      >>> import jax.numpy as jnp
      >>> eye = jnp.eye(2, dtype=jnp.float32)
      >>> w = bures_w2(jnp.zeros(2, jnp.float32), eye, jnp.array([3.0, 0.0], jnp.float32), 4 * eye)
      >>> round(float(w), 4)   # sqrt(3^2 + 2 * (2 - 1)^2)
      3.3166
    """
    cov_x, cov_y = _covariance_pair(cov_x, cov_y)
    mean_x, mean_y = _checks.real_array("mean_x", mean_x), _checks.real_array("mean_y", mean_y)
    for name, mean in (("mean_x", mean_x), ("mean_y", mean_y)):
        if mean.shape != cov_x.shape[:-1]:
            raise ValueError(
                f"{name} must have shape {cov_x.shape[:-1]} to go with covariances of shape "
                f"{cov_x.shape}, got {mean.shape}"
            )
    _, trace_sqrt = _dense_bures(cov_x, cov_y, rtol)
    sq = jnp.sum((mean_x - mean_y) ** 2) + jnp.trace(cov_x) + jnp.trace(cov_y) - 2 * trace_sqrt
    return safe_sqrt(sq)


def safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` whose derivative at 0 is 0 instead of infinite; NaN stays NaN.

    Args:
      x: array of any shape, float.

    Returns:
      Array of the same shape and dtype. Negative inputs (rounding below zero)
      give 0 and a zero gradient.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> safe_sqrt(jnp.array([4.0, -1e-7, 0.0], jnp.float32)).tolist()
      [2.0, 0.0, 0.0]
      >>> float(jax.grad(safe_sqrt)(jnp.float32(0.0)))
      0.0
    """
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), jnp.where(jnp.isnan(x), x, 0.0))


# --- Exact empirical W2 ---------------------------------------------------------


def _exact_pair(what: str, x: ArrayLike, y: ArrayLike) -> tuple[jax.Array, jax.Array]:
    x, y = _checks.point_cloud("x", x), _checks.point_cloud("y", y)
    _checks.same_shape(what, x, y)
    # Integer squares overflow (int32 from |x| ~ 5e4) into a silent wrong distance, and
    # float16 costs overflow at 65504: both are computed in float (float32 for half).
    dtype = jnp.result_type(_checks.linalg_float(x.dtype), _checks.linalg_float(y.dtype))
    return x.astype(dtype), y.astype(dtype)


def optimal_assignment(x: ArrayLike, y: ArrayLike, *, solver: str = "auto") -> AssignmentResult:
    """The optimal matching of two equal-size point clouds with its certificate.

    The cost is the squared Euclidean distance ``|x_i - y_j|^2``
    (:func:`squared_distances`), solved by :func:`affjax.linear_assignment`.

    Args:
      x, y: ``(n, d)`` point clouds.
      solver: ``"auto"``, ``"auction"``, ``"identity_or_scipy"``, ``"scipy"`` or
        ``"hungarian"`` (``"sort"``, d == 1: the sorted matching, whose certificate is
        exact).

    Returns:
      An :class:`affjax.AssignmentResult`: ``x[i]`` is matched to ``y[permutation[i]]``,
      ``cost`` is the sum of the matched squared distances. Inputs are treated as
      constants.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [5.0, 5.0]], jnp.float32)
      >>> r = optimal_assignment(x, x[::-1] + 0.5)
      >>> r.permutation.tolist(), float(r.cost), bool(r.converged)
      ([1, 0], 1.0, True)
    """
    x, y = _exact_pair("optimal_assignment", x, y)
    x, y = jax.lax.stop_gradient(x), jax.lax.stop_gradient(y)
    n, d = x.shape
    solver_ = get_solver(solver, n, d)
    if not solver_.exact:
        raise ValueError(f"solver {solver!r} gives a plan, not a permutation")
    if isinstance(solver_, SortedMatching):
        permutation = solver_.transport(x, y).permutation
        cost = jnp.sum((x[:, 0] - y[permutation, 0]) ** 2)
        finite = jnp.isfinite(cost)
        return AssignmentResult(
            permutation=permutation, cost=cost, lower_bound=jnp.where(finite, cost, jnp.nan),
            converged=finite, rounds=jnp.zeros((), jnp.int32),
            certified_candidate=jnp.zeros((), bool))
    return solver_.assignment.match(squared_distances(x, y))


def optimal_permutation(x: ArrayLike, y: ArrayLike, *, solver: str = "auto") -> jax.Array:
    """The optimal matching of two equal-size point clouds, squared Euclidean cost.

    Args:
      x, y: ``(n, d)`` point clouds.
      solver: ``"auto"``, ``"sort"`` (d == 1), ``"auction"``, ``"identity_or_scipy"``,
        ``"scipy"`` or ``"hungarian"``.

    Returns:
      ``perm``, int32 of shape ``(n,)``: ``x[i]`` is matched to ``y[perm[i]]``.
      Not differentiable (integer); inputs are treated as constants. With ties
      in the cost, any of the optimal matchings may come back.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [5.0, 5.0]], jnp.float32)
      >>> y = jnp.array([[5.0, 4.0], [0.0, 1.0]], jnp.float32)
      >>> perm = optimal_permutation(x, y, solver="scipy")
      >>> perm.dtype, perm.tolist()
      (dtype('int32'), [1, 0])
    """
    return optimal_assignment(x, y, solver=solver).permutation


def w2_squared(
    x: ArrayLike, y: ArrayLike, *, solver: str = "auto", sinkhorn_epsilon: float = 1e-2
) -> jax.Array:
    r"""Squared 2-Wasserstein distance between uniform point clouds.

    ``W2^2 = min_perm (1/n) sum_i |x_i - y_perm(i)|^2``, which equals the
    optimal transport linear program (``ot.emd2``) for uniform weights.

    Args:
      x, y: ``(n, d)`` point clouds (a 1-D array is read as ``d = 1``).
      solver: see the module docstring; NaN if ``"auction"`` reaches its round cap
        without certifying its matching. ``"sinkhorn"`` returns the transport
        cost of the entropic plan at ``epsilon = sinkhorn_epsilon * mean cost``,
        about the exact value and usually above it (see
        :func:`sinkhorn_w2_squared`); ``epsilon`` is held constant under
        differentiation.
      sinkhorn_epsilon: relative entropic regularisation for ``"sinkhorn"``.

    Returns:
      A scalar in the input dtype. Differentiable with the matching held fixed.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0]], jnp.float32)
      >>> float(w2_squared(x, x[::-1] + 1.0, solver="scipy"))   # every point moves by (1, 1)
      2.0
    """
    x, y = _exact_pair("w2_squared", x, y)
    n, d = x.shape
    solver_ = get_solver(solver, n, d, sinkhorn_epsilon=_epsilon(sinkhorn_epsilon))
    w2_sq, _, converged = solver_.transport(x, y)
    # A capped auction whose matching is not certified gives NaN, never a number off
    # by its gap; non-finite inputs keep their own non-finite result.
    return jnp.where(converged | ~jnp.isfinite(w2_sq), w2_sq, jnp.nan)


def _epsilon(value: float) -> float:
    if not _checks.is_real_number(value) or not 0 < value < np.inf:
        raise ValueError(f"sinkhorn_epsilon must be a finite number > 0, got {value!r}")
    return float(value)


def exact_w2(x: ArrayLike, y: ArrayLike, *, solver: str = "auto") -> jax.Array:
    """Exact 2-Wasserstein distance between two equal-size uniform point clouds.

    Args:
      x, y: ``(n, d)`` point clouds, or ``(n,)``.
      solver: an exact solver: ``"auto"``, ``"sort"``, ``"auction"``,
        ``"identity_or_scipy"``, ``"scipy"``, ``"hungarian"``.

    Returns:
      ``W2`` (not squared), a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> w = exact_w2(jnp.array([0.0, 1.0], jnp.float32), jnp.array([1.0, 2.0], jnp.float32))
      >>> w.dtype, float(w)
      (dtype('float32'), 1.0)
    """
    if solver == "sinkhorn":
        raise ValueError("exact_w2 takes an exact solver; use w2_squared(solver='sinkhorn')")
    x, y = _exact_pair("exact_w2", x, y)
    return safe_sqrt(w2_squared(x, y, solver=solver))
