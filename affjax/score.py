r"""The affinity score (Bouniot et al., CVPR 2025).

For pre-activations ``x`` and post-activations ``y`` (rows paired, shape
``(n, d)``):

1. ``C_x``, ``C_y``: covariance estimates plus ``ridge * I``.
2. ``A``: the Bures map, the symmetric PSD solution of ``A C_x A = C_y``;
   ``A = 0`` when the output is dead (``trace C_y <= 2 * ridge * d``).
3. ``W2^2 = min_perm (1/n) sum_i |m_y + A (x_i - m_x) - y_perm(i)|^2``.
4. ``rho_aff = 1 - sqrt(W2^2 / (2 trace C_y))``, in ``[0, 1]``, and 1 exactly
   when ``y`` is a PSD affine image of ``x``.

Wide layers (``d > 2n``): both covariances are a matrix of rank ``< 2n`` plus a
multiple of the identity, so the map leaves the span ``S`` of the centred
samples invariant and the samples have no component outside it. Everything is
computed in an orthonormal basis of ``S``: ``O(n^2 d + n^3)`` instead of
``O(d^3)``, with the same numbers. The basis is held constant under
differentiation; this loses nothing, since the score is invariant under
orthogonal maps that fix ``S``, so its derivative along directions leaving
``S`` is zero.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from affjax import _checks
from affjax import linalg
from affjax import transport
from affjax.assignment import linear_assignment
from affjax.covariance import COVARIANCES
from affjax.covariance import covariance_parts
from affjax.transport import safe_sqrt

PATHS: tuple[str, ...] = ("auto", "dense", "span")


class AffinityResult(NamedTuple):
    """Everything :func:`affinity` computes.

    Attributes:
      score: the affinity score ``rho_aff``, scalar.
      w2: exact empirical W2 between ``{T(x_i)}`` and ``{y_j}`` (not squared);
        with ``solver="sinkhorn"``, the entropic estimate.
      bures_w2: closed-form W2 between ``N(m_x, C_x)`` and ``N(m_y, C_y)``.
      A: ``(d, d)`` symmetric PSD matrix of the map ``T(x) = A x + b``. On
        directions no centred sample reaches (d >= n) it is ``sqrt(c_y / c_x)``
        in float64; in float32 the pseudo-inverse cutoff drops some or all of
        them (about 0 there). The score does not depend on that block
        (``docs/numerics.md``, "The map off the samples' span").
        Gradients: on the span path (wide layers, ``d > 2n``) the span's basis is
        held fixed, so derivatives of ``A`` and ``b`` are *not* those of the map
        (the score, ``w2`` and ``bures_w2`` are exact there); pass
        ``path="dense"`` to differentiate ``A`` or ``b``.
      b: ``(d,)`` offset of the map, ``m_y - A m_x`` (gradients: as for ``A``).
      trace_cov_y: ``trace C_y`` (regularised or shrunk), the score's scale.
      permutation: int32 ``(n,)``, ``T(x_i)`` is matched to ``y[permutation[i]]``;
        all ``-1`` for ``solver="sinkhorn"``.
      dead: bool scalar, whether the dead-output rule set ``A = 0``.

    Float fields are in the input dtype. A NamedTuple, hence a pytree: it
    passes through ``jax.jit`` and ``jax.vmap`` (leading batch axes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (64, 2), jnp.float32)
      >>> r = affinity(x, 3.0 * x)
      >>> r.A.shape, r.b.shape, r.permutation.shape, r.permutation.dtype
      ((2, 2), (2,), (64,), dtype('int32'))
      >>> round(float(r.score), 3), bool(r.dead)
      (1.0, False)
    """

    score: jax.Array
    w2: jax.Array
    bures_w2: jax.Array
    A: jax.Array
    b: jax.Array
    trace_cov_y: jax.Array
    permutation: jax.Array
    dead: jax.Array


def check_options(
    covariance: str, solver: str, path: str = "auto", ridge: float = 0.0,
    sinkhorn_epsilon: float = 1e-2,
) -> None:
    """Raise ``ValueError`` naming an unknown option, a negative ridge or a bad epsilon.

    Args:
      covariance: a name in ``affjax.covariance.COVARIANCES``.
      solver: a name in ``affjax.transport.SOLVERS``.
      path: a name in ``PATHS``.
      ridge: a finite real number ``>= 0`` (NaN and infinity are rejected).
      sinkhorn_epsilon: a finite real number ``> 0`` (checked for every solver).

    Returns:
      ``None``; raises on the first bad option.

    Example:
      >>> check_options("empirical", "auto", ridge=1e-6)
      >>> check_options("emprical", "auto")
      Traceback (most recent call last):
      ...
      ValueError: unknown covariance 'emprical'; expected one of ('empirical', 'ledoit_wolf')
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"unknown covariance {covariance!r}; expected one of {COVARIANCES}")
    if solver not in transport.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {transport.SOLVERS}")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if not _is_real_number(ridge) or not 0 <= ridge < np.inf:
        raise ValueError(f"ridge must be a finite real number >= 0, got {ridge!r}")
    if not _is_real_number(sinkhorn_epsilon) or not 0 < sinkhorn_epsilon < np.inf:
        raise ValueError(f"sinkhorn_epsilon must be a finite real number > 0, got "
                         f"{sinkhorn_epsilon!r}")


def _is_real_number(v: object) -> bool:
    # Python or NumPy scalars; these options are static (compile-time) values.
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _validate(x: ArrayLike, y: ArrayLike, covariance: str, solver: str, path: str, ridge: float,
              sinkhorn_epsilon: float):
    x = _checks.point_cloud("x", x, integers=False)
    y = _checks.point_cloud("y", y, integers=False)
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape (n, d) with paired rows, got x {x.shape} "
            f"and y {y.shape}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples (rows), got x and y of shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"need at least 1 feature (column), got x and y of shape {x.shape}")
    check_options(covariance, solver, path, ridge, sinkhorn_epsilon)
    dtype = jnp.result_type(x.dtype, y.dtype)
    if jnp.finfo(dtype).bits < 32:  # eigh has no half-precision kernels
        dtype = jnp.float32
    return x.astype(dtype), y.astype(dtype)


def _check_finite(x: jax.Array, y: jax.Array) -> None:
    try:
        arrays = {"x": np.asarray(x), "y": np.asarray(y)}
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "check=True inspects values and needs concrete arrays; call it outside "
            "jax.jit/vmap/grad, or use check=False and test the result with jnp.isnan"
        ) from None
    for name, arr in arrays.items():
        bad = ~np.isfinite(arr)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite values (NaN or Inf) in "
                f"{rows.size} of its {arr.shape[0]} rows, first at row {int(rows[0])}"
            )


def _check_finite_result(score: jax.Array, x: jax.Array, y: jax.Array) -> None:
    """``ValueError`` when finite inputs gave a NaN score, saying why."""
    if np.all(np.isfinite(np.asarray(score))):
        return
    largest = max(float(np.max(np.abs(np.asarray(a)))) for a in (x, y))
    n, d = x.shape
    if (largest * 2.0) ** 2 * n * d < float(jnp.finfo(x.dtype).max):
        raise ValueError(
            "the score is NaN for finite inputs that cannot overflow: the 'auction' "
            "assignment reached its round cap without certifying its matching (see "
            "affjax.linear_assignment); use solver='scipy' for this layer"
        )
    raise ValueError(
        f"the score is NaN for finite inputs: values up to {largest:.3g} overflow "
        f"{x.dtype} in the covariances and distances (their squares must stay below "
        f"{float(jnp.finfo(x.dtype).max):.3g}); rescale x and y or compute in float64 "
        "(jax_enable_x64)"
    )


@jax.custom_jvp
def _span_coordinates(
    xc: jax.Array, yc: jax.Array, basis: jax.Array, coords: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``xc @ basis`` and ``yc @ basis``, read off the QR ``[xc; yc]^T = basis @ coords``.

    The columns of the triangular factor are the samples' coordinates, so the
    value needs no product, and ``basis`` (LAPACK's ``orgqr``, as costly as the
    QR itself) is only formed where it is used: in the derivative (the basis
    held constant) and in the full map of :func:`affinity`.
    """
    n = xc.shape[0]
    return coords[:, :n].T, coords[:, n:].T


@_span_coordinates.defjvp
def _span_coordinates_jvp(primals, tangents):
    xc, yc, basis, coords = primals
    dxc, dyc = tangents[:2]
    if basis.shape[1] < basis.shape[0]:
        basis = _first_order_basis(basis, xc, yc)
    return _span_coordinates(xc, yc, basis, coords), (dxc @ basis, dyc @ basis)


@jax.custom_jvp
def _first_order_basis(basis: jax.Array, xc: jax.Array, yc: jax.Array) -> jax.Array:
    """``basis``; differentiating it (a second derivative of the score) is an error.

    Holding the span's basis fixed is exact for first derivatives: a sample moving out
    of the span changes the covariances only at second order. For second derivatives
    that term is missing, so they are refused rather than silently wrong
    (docs/numerics.md, "Gradients").
    """
    del xc, yc
    return basis


@_first_order_basis.defjvp
def _first_order_basis_jvp(primals, tangents):
    del primals, tangents
    raise NotImplementedError(
        "second derivatives (jax.hessian, jax.jacfwd(jax.grad(...)), ...) of the score on "
        "the span path (d > 2n with path='auto', or path='span') are not supported: the "
        "basis of the samples' span is held fixed, which is exact for first derivatives "
        "only. Pass path='dense' for second derivatives"
    )


def _uses_span(n: int, d: int, path: str) -> bool:
    return path == "span" or (path == "auto" and d > 2 * n)


def _coordinates(n: int, d: int, path: str) -> int:
    """How many coordinates the score works in: the span's basis keeps ``min(d, 2n)``."""
    return min(d, 2 * n) if _uses_span(n, d, path) else d


def _shift_is_eigenvalue(n: int, k: int) -> bool:
    # n centred samples span at most n - 1 of the k coordinates; the covariance is the
    # shift times I on the rest.
    return n - 1 < k


def cholesky_hopeless_for(
    y: jax.Array, *, covariance: str = "empirical", ridge: float = 1e-6, path: str = "auto"
) -> jax.Array:
    """Whether the score of ``y`` would find Cholesky of ``C_y`` broken down.

    Batched callers (signatures under ``vmap``) use it to go straight to QR for a
    whole group; see :func:`affjax.transport.cholesky_hopeless`.

    Args:
      y: ``(n, d)`` post-activation samples.
      covariance, ridge, path: as in :func:`affinity`.

    Returns:
      A bool scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y = jax.nn.relu(30.0 * jax.random.normal(jax.random.key(0), (16, 40), jnp.float32))
      >>> bool(cholesky_hopeless_for(y))         # 16 samples in 40 dimensions, l_max ~ 1e3
      True
      >>> bool(cholesky_hopeless_for(y / 30.0))  # l_max ~ 1: the ridge is resolved
      False
      >>> bool(cholesky_hopeless_for(y[:, :4]))  # 16 samples in 4: no known eigenvalue
      False
    """
    n, d = y.shape
    if not _shift_is_eigenvalue(n, _coordinates(n, d, path)):
        return jnp.asarray(False)  # no eigenvalue is known
    cy = covariance_parts(y, covariance=covariance, ridge=ridge)
    # The largest eigenvalue is the same in the basis of the span.
    largest = cy.alpha * transport.gram_largest_eigenvalue(cy.centered) + cy.shift
    return transport.cholesky_hopeless(cy.shift, largest, y.dtype)


class Fit(NamedTuple):
    """The fitted map of one score and the two point clouds the exact W2 compares.

    Produced by :func:`fit_map`; :func:`assignment_cost`, an assignment solver,
    :func:`matched_w2_squared` and :func:`score_from_w2` finish the score. Batched
    callers (signatures) fit every layer first and solve all the assignments in one
    call.

    Attributes:
      mapped: ``(n, k)``: ``T(x_i) - m_y`` in the working coordinates (``k = d``, or
        the span's ``min(d, 2n)``).
      target: ``(n, k)``: ``y_j - m_y`` in the same coordinates.
      trace_cov_y: ``trace C_y``.
      dead: bool, the dead-output rule set ``A = 0``.
      valid: bool, finite inputs and a factor of ``C_y`` that did not break down.
      a_k, trace_sqrt, trace_cov_x, cov_x, cov_y, basis: what :func:`affinity`
        reports besides the score (``basis`` is ``None`` on the dense path).
    """

    mapped: jax.Array
    target: jax.Array
    trace_cov_y: jax.Array
    dead: jax.Array
    valid: jax.Array
    a_k: jax.Array
    trace_sqrt: jax.Array
    trace_cov_x: jax.Array
    cov_x: Any
    cov_y: Any
    basis: jax.Array | None


def fit_map(
    x: jax.Array, y: jax.Array, *, covariance: str, ridge: float, path: str = "auto",
    factor: str = "auto",
) -> Fit:
    """Covariances, the Bures map and the mapped samples of one score (steps 1-2).

    Args:
      x, y: ``(n, d)`` float arrays, checked (see :func:`affinity`).
      covariance, ridge, path: as in :func:`affinity`.
      factor: how the lower factor of ``C_y`` is computed: ``"auto"`` (Cholesky, QR
        where it breaks down or is known to), ``"cholesky"`` (a breakdown is reported
        in ``valid`` and computed from ``R = I``) or ``"qr"``.

    Returns:
      A :class:`Fit`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (64, 3), jnp.float32)
      >>> f = fit_map(x, 2.0 * x, covariance="empirical", ridge=1e-6)
      >>> f.mapped.shape, bool(f.dead), bool(f.valid)
      ((64, 3), False, True)
    """
    n, d = x.shape
    dtype = x.dtype
    cx = covariance_parts(x, covariance=covariance, ridge=ridge)
    cy = covariance_parts(y, covariance=covariance, ridge=ridge)

    if _uses_span(n, d, path):
        # Orthonormal basis Q (d, 2n) of a space holding every centred sample.
        stacked = jax.lax.stop_gradient(jnp.concatenate([cx.centered, cy.centered], axis=0))
        basis, coords = linalg.qr_reduced(stacked.T)
        a, b = _span_coordinates(cx.centered, cy.centered, basis, coords)
    else:
        basis = None
        a, b = cx.centered, cy.centered
    k = a.shape[1]
    eye = jnp.eye(k, dtype=dtype)
    trace_cov_x, trace_cov_y = cx.trace(), cy.trace()
    dead = trace_cov_y <= 2 * ridge * d
    # C = alpha a^T a + shift I = F^T F with F = [sqrt(alpha) a; sqrt(shift) I].
    factor_x = jnp.concatenate([safe_sqrt(cx.alpha) * a, safe_sqrt(cx.shift) * eye])
    factor_y = jnp.concatenate([safe_sqrt(cy.alpha) * b, safe_sqrt(cy.shift) * eye])
    # C_y = 0 (a constant output with ridge = 0; dead, so A = 0 is used): the map and
    # trace_sqrt (= 0) are computed from C_y = I instead, so that the singular factor puts
    # no NaN into the gradient through the discarded values.
    zero_cov_y = trace_cov_y <= 0
    factor_y = jnp.where(zero_cov_y, jnp.concatenate([jnp.zeros_like(b), eye]), factor_y)
    # Fewer centred samples than coordinates: the shift is an eigenvalue of C_y, and
    # where float rounding hides it the Cholesky attempt is skipped.
    known_eigenvalue = cy.shift if _shift_is_eigenvalue(n, k) else None
    if factor == "cholesky":
        # Callers that force Cholesky (grouped layers) redo a broken-down factor with QR. The
        # score is NaN then, but computed from R = I: otherwise every derivative downstream
        # of the NaN factor would be NaN, and the zero cotangent of the discarded result
        # would still carry it into the gradient (0 * NaN).
        r = linalg.gram_cholesky(factor_y)
        factor_ok = jnp.all(jnp.isfinite(r))
        r = jnp.where(factor_ok, r, eye)
        a_k, trace_sqrt = transport.bures_from_lower_factor(factor_x, r)
    else:
        factor_ok = True
        a_k, trace_sqrt = transport.bures_from_factors(
            factor_x, factor_y, factor=factor, smallest_eigenvalue_y=known_eigenvalue
        )
    a_k = jnp.where(dead, 0.0, a_k)
    return Fit(
        mapped=a @ a_k,
        target=b,
        trace_cov_y=trace_cov_y,
        dead=dead,
        valid=jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y)) & factor_ok,
        a_k=a_k,
        trace_sqrt=jnp.where(zero_cov_y, 0.0, trace_sqrt),
        trace_cov_x=trace_cov_x,
        cov_x=cx,
        cov_y=cy,
        basis=basis,
    )


def assignment_cost(mapped: jax.Array, target: jax.Array, dead: jax.Array) -> jax.Array:
    """The ``(n, n)`` cost matrix of the score's exact W2: ``|T(x_i) - y_j|^2``.

    Args:
      mapped, target, dead: the fields of a :class:`Fit`.

    Returns:
      ``(n, n)``, treated as a constant (the matching is held fixed under
      differentiation). Zero for a dead output: ``A = 0`` maps every ``x_i`` to
      ``m_y``, so every matching costs the same, and the identity is taken.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (8, 2), jnp.float32)
      >>> f = fit_map(x, x, covariance="empirical", ridge=1e-6)
      >>> assignment_cost(f.mapped, f.target, f.dead).shape
      (8, 8)
    """
    cost = transport.squared_distances(
        jax.lax.stop_gradient(mapped), jax.lax.stop_gradient(target))
    return jnp.where(dead, 0.0, cost)


def matched_w2_squared(mapped: jax.Array, target: jax.Array, permutation: jax.Array) -> jax.Array:
    """``(1/n) sum_i |T(x_i) - y_perm(i)|^2``, differentiable with the matching fixed.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (8, 2), jnp.float32)
      >>> f = fit_map(x, x, covariance="empirical", ridge=1e-6)
      >>> round(float(matched_w2_squared(f.mapped, f.target, jnp.arange(8))), 6)
      0.0
    """
    return jnp.mean(jnp.sum((mapped - target[permutation]) ** 2, axis=1))


def score_from_w2(
    w2_sq: jax.Array, trace_cov_y: jax.Array, valid: jax.Array = True, solved: jax.Array = True
) -> jax.Array:
    """``1 - sqrt(W2^2 / (2 trace C_y))`` (step 4), NaN unless ``valid`` and ``solved``.

    Args:
      w2_sq: the exact (or entropic) squared W2.
      trace_cov_y, valid: the fields of a :class:`Fit`.
      solved: the matching behind ``w2_sq`` is certified optimal (an auction that hit
        its round cap is not).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (8, 2), jnp.float32)
      >>> f = fit_map(x, 3.0 * x, covariance="empirical", ridge=1e-6)
      >>> w2_sq = matched_w2_squared(f.mapped, f.target, jnp.arange(8))
      >>> round(float(score_from_w2(w2_sq, f.trace_cov_y)), 4)
      1.0
    """
    # A constant output with ridge = 0 has trace C_y = 0; its dead map is exact (W2 = 0): 1.
    # The safe denominator keeps the unused branch's gradient finite.
    positive = trace_cov_y > 0
    denom = jnp.where(positive, 2.0 * trace_cov_y, 1.0)
    ratio = jnp.clip(jnp.where(positive, w2_sq / denom, 0.0), 0.0, 1.0)
    return jnp.where(valid & solved, 1.0 - safe_sqrt(ratio), jnp.nan)


def _compute(
    x: jax.Array,
    y: jax.Array,
    covariance: str,
    ridge: float,
    solver: str,
    path: str,
    sinkhorn_epsilon: float,
    factor: str = "auto",
) -> AffinityResult:
    n, d = x.shape
    fit = fit_map(x, y, covariance=covariance, ridge=ridge, path=path, factor=factor)
    # The rule looks at the points' own dimension d (errors name it), not the span's k.
    solver = transport.resolve_solver(solver, n, d)
    if solver == "sinkhorn":
        w2_sq = transport.w2_squared(
            fit.mapped, fit.target, solver="sinkhorn", sinkhorn_epsilon=sinkhorn_epsilon
        )
        perm, solved = jnp.full((n,), -1, jnp.int32), True
    else:
        if solver == "sort":
            matching = transport.optimal_assignment(fit.mapped, fit.target, solver="sort")
        else:
            matching = linear_assignment(
                assignment_cost(fit.mapped, fit.target, fit.dead), solver=solver)
        perm, solved = matching.permutation, matching.converged | ~fit.valid
        w2_sq = matched_w2_squared(fit.mapped, fit.target, perm)
    score = score_from_w2(w2_sq, fit.trace_cov_y, fit.valid, solved)

    cx, cy, basis = fit.cov_x, fit.cov_y, fit.basis
    k = fit.a_k.shape[0]
    if basis is None:
        a_full = fit.a_k
        outside = 0.0
    else:
        # Outside S both covariances are multiples of I: A = sqrt(c_y / c_x) I there; 0
        # where either is 0 (ridge = 0: the pseudo-inverse's value, not 0 / 0).
        both = (cx.shift > 0) & (cy.shift > 0) & ~fit.dead
        scale = jnp.where(both, jnp.sqrt(cy.shift / jnp.where(both, cx.shift, 1.0)), 0.0)
        eye = jnp.eye(k, dtype=x.dtype)
        a_full = basis @ (fit.a_k - scale * eye) @ basis.T + scale * jnp.eye(d, dtype=x.dtype)
        outside = (d - k) * jnp.sqrt(cx.shift * cy.shift)
    bures_sq = (
        jnp.sum((cx.mean - cy.mean) ** 2) + fit.trace_cov_x + fit.trace_cov_y
        - 2.0 * (fit.trace_sqrt + outside)
    )
    return AffinityResult(
        score=score,
        w2=safe_sqrt(w2_sq),
        bures_w2=safe_sqrt(bures_sq),
        A=a_full,
        b=cy.mean - a_full @ cx.mean,
        trace_cov_y=fit.trace_cov_y,
        permutation=perm,
        dead=fit.dead,
    )


_STATIC = ("covariance", "ridge", "solver", "path", "sinkhorn_epsilon")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _affinity_jit(x, y, *, covariance, ridge, solver, path, sinkhorn_epsilon) -> AffinityResult:
    with jax.default_matmul_precision("highest"):  # TPUs default to bfloat16 passes
        return _compute(x, y, covariance, ridge, solver, path, sinkhorn_epsilon)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _score_jit(x, y, *, covariance, ridge, solver, path, sinkhorn_epsilon) -> jax.Array:
    # Separate from _affinity_jit so the dense (d, d) map of the span path is
    # never built when only the score is asked for.
    with jax.default_matmul_precision("highest"):
        return _compute(x, y, covariance, ridge, solver, path, sinkhorn_epsilon).score


def affinity(
    x: ArrayLike,
    y: ArrayLike,
    *,
    covariance: str = "empirical",
    ridge: float = 1e-6,
    solver: str = "auto",
    path: str = "auto",
    sinkhorn_epsilon: float = 1e-2,
    check: bool = False,
) -> AffinityResult:
    r"""The affinity score with the map and distances behind it.

    Args:
      x: pre-activation samples, ``(n, d)`` (rows are samples) or ``(n,)``.
      y: post-activation samples, same shape, ``y[i] = f(x[i])``.
      covariance: ``"empirical"`` (unbiased, ``n - 1``) or ``"ledoit_wolf"``
        (scikit-learn's ``LedoitWolf``); ``ridge * I`` is added to both.
      ridge: diagonal regularisation, default ``1e-6`` as published. ``0`` is
        allowed; the value is then defined, but the gradient is NaN where
        ``C_y`` is singular and the output is not dead (a layer with some dead
        units, or ``d >= n``): the derivative of its factor needs ``C_y^-1``.
        Use a positive ridge to train through the score.
      solver: the W2 solver, see :mod:`affjax.transport`: ``"auto"``,
        ``"sort"``, ``"auction"`` (certified, on device), ``"identity_or_scipy"``,
        ``"scipy"``, ``"hungarian"`` (exact) or ``"sinkhorn"`` (entropic, biased upward, so the
        score is biased downward). The auction's score is NaN in the rare case
        that it reaches its round cap uncertified (``check=True`` raises).
      path: ``"dense"`` works with ``(d, d)`` matrices; ``"span"`` in the span
        of the centred samples (``O(n^2 d)``); ``"auto"`` takes ``"span"`` when
        ``d > 2 n``. Both give the same numbers and first derivatives; second
        derivatives (``jax.hessian``) need ``"dense"`` when ``d > 2 n``.
      sinkhorn_epsilon: entropic regularisation relative to the mean cost, for
        ``solver="sinkhorn"``.
      check: raise ``ValueError`` on NaN/Inf inputs, and on finite outputs so
        large that ``trace C_y`` overflows the dtype (float32 ``y`` above about
        1e19; needs concrete arrays). Otherwise both give a NaN score.

    Returns:
      :class:`AffinityResult`, in the input dtype (float16/bfloat16 are
      computed in float32).

    Numerics: in float32 the score agrees with the float64 definition to within
    1e-3 when ``n >= 2 d`` (``docs/numerics.md``, "Measured accuracy"). Singular
    values of ``F_x R`` (see :func:`affjax.transport.bures_from_factors`) at or below
    ``4 sqrt(k) eps max`` are treated as zero, i.e. eigenvalues of
    ``C_y^1/2 C_x C_y^1/2`` below ``16 k eps^2 max`` (pseudo-inverse).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (512, 3), jnp.float32)
      >>> r = affinity(x, 2.0 * x + 1.0)
      >>> round(float(r.score), 4)
      1.0
    """
    x, y = _validate(x, y, covariance, solver, path, ridge, sinkhorn_epsilon)
    if check:
        _check_finite(x, y)
    result = _affinity_jit(
        x,
        y,
        covariance=covariance,
        ridge=float(ridge),
        solver=solver,
        path=path,
        sinkhorn_epsilon=float(sinkhorn_epsilon),
    )
    if check:
        _check_finite_result(result.score, x, y)
    return result


def affinity_score(
    x: ArrayLike,
    y: ArrayLike,
    *,
    covariance: str = "empirical",
    ridge: float = 1e-6,
    solver: str = "auto",
    path: str = "auto",
    sinkhorn_epsilon: float = 1e-2,
    check: bool = False,
) -> jax.Array:
    r"""Affinity score ``1 - sqrt(W2^2(T x, y) / (2 trace C_y))`` of ``y`` against ``x``.

    How affine the map ``x_i -> y_i`` is: 1 when ``y`` is a PSD affine image of
    ``x``, lower the more non-linear. Pure and jitted; works under ``jax.vmap``
    (leading batch axes) and ``jax.grad`` (the optimal matching held fixed).

    Args:
      x: pre-activation samples, ``(n, d)`` or ``(n,)``, float.
      y: post-activation samples, same shape.
      covariance, ridge, solver, path, sinkhorn_epsilon, check: see
        :func:`affinity`.

    Returns:
      Scalar array in the input dtype.

    Raises:
      TypeError: integer or bool inputs.
      ValueError: shapes that differ, n < 2, rank not 1 or 2, unknown option
        names, negative ridge; non-finite values, or values that overflow the
        dtype, when ``check=True``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.linspace(-1.0, 1.0, 1000, dtype=jnp.float32)
      >>> round(float(affinity_score(x, x**3)), 3)
      0.711
    """
    x, y = _validate(x, y, covariance, solver, path, ridge, sinkhorn_epsilon)
    if check:
        _check_finite(x, y)
    score = _score_jit(
        x,
        y,
        covariance=covariance,
        ridge=float(ridge),
        solver=solver,
        path=path,
        sinkhorn_epsilon=float(sinkhorn_epsilon),
    )
    if check:
        _check_finite_result(score, x, y)
    return score
