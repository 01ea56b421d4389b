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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from affjax import _checks
from affjax import solvers
from affjax.affine_map import Fit  # noqa: F401 (public here)
from affjax.affine_map import cholesky_hopeless_for  # noqa: F401 (public here)
from affjax.affine_map import fit_map
from affjax.options import PATHS  # noqa: F401 (public here)
from affjax.options import ScoreOptions
from affjax.options import check_options  # noqa: F401 (public here)
from affjax.solvers import assignment_cost  # noqa: F401 (public here)
from affjax.solvers import matched_w2_squared  # noqa: F401 (public here)
from affjax.transport import safe_sqrt


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


def _validate(x: ArrayLike, y: ArrayLike) -> tuple[jax.Array, jax.Array]:
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


def _compute(x: jax.Array, y: jax.Array, options: ScoreOptions,
             factor: str = "auto") -> AffinityResult:
    n, d = x.shape
    fit = fit_map(x, y, covariance=options.covariance, ridge=options.ridge, path=options.path,
                  factor=factor)
    # The solver follows the points' own dimension d (errors name it), not the span's k.
    solver = solvers.get_solver(options.solver, n, d, sinkhorn_epsilon=options.sinkhorn_epsilon)
    w2_sq, perm, solved = solver.transport(fit.mapped, fit.target, dead=fit.dead)
    score = score_from_w2(w2_sq, fit.trace_cov_y, fit.valid, solved | ~fit.valid)

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


@functools.partial(jax.jit, static_argnames="options")
def _affinity_jit(x: jax.Array, y: jax.Array, *, options: ScoreOptions) -> AffinityResult:
    with jax.default_matmul_precision("highest"):  # TPUs default to bfloat16 passes
        return _compute(x, y, options)


@functools.partial(jax.jit, static_argnames="options")
def _score_jit(x: jax.Array, y: jax.Array, *, options: ScoreOptions) -> jax.Array:
    # Separate from _affinity_jit so the dense (d, d) map of the span path is
    # never built when only the score is asked for.
    with jax.default_matmul_precision("highest"):
        return _compute(x, y, options).score


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
    x, y = _validate(x, y)
    options = ScoreOptions(covariance=covariance, ridge=ridge, solver=solver, path=path,
                           sinkhorn_epsilon=sinkhorn_epsilon)
    if check:
        _check_finite(x, y)
    result = _affinity_jit(x, y, options=options)
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
    x, y = _validate(x, y)
    options = ScoreOptions(covariance=covariance, ridge=ridge, solver=solver, path=path,
                           sinkhorn_epsilon=sinkhorn_epsilon)
    if check:
        _check_finite(x, y)
    score = _score_jit(x, y, options=options)
    if check:
        _check_finite_result(score, x, y)
    return score
