"""The affine map of the score (steps 1-2 of :mod:`affjax.score`).

:func:`fit_map` estimates both covariances, fits the Bures map ``A`` and returns the
mapped samples ``T(x_i) - m_y`` beside the targets ``y_j - m_y``, in the coordinates
the score works in: the dense ``d`` coordinates, or for wide layers (``d > 2n``) an
orthonormal basis of the span of the centred samples.

The basis is held fixed under differentiation: the score is invariant under
orthogonal maps that fix the span, so its first derivative along directions leaving
the span is zero. Second derivatives on the span path are refused (``path="dense"``
gives them).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from affjax import linalg
from affjax import transport
from affjax.covariance import covariance_parts
from affjax.transport import safe_sqrt


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
