"""Spectral functions of symmetric positive semi-definite matrices.

``psd_sqrt`` and ``psd_inv_sqrt`` are computed from one ``eigh``;
``gram_inv_sqrt`` takes a factor ``F`` of ``M = F^T F`` and works from the
singular values of ``F``, which carry twice the relative precision of the
eigenvalues of ``M`` (the route the affinity score takes in float32). All carry
a custom JVP built from the Daleckii-Krein formula, so their derivatives stay
finite at repeated eigenvalues, where the derivative of ``eigh`` itself divides
by zero. ``psd_sqrt`` and ``psd_inv_sqrt`` act on the last two axes and
broadcast over leading ones.

Reference: R. Bhatia, *Matrix Analysis*, Springer 1997, Thm. V.3.3
(derivative of a spectral function).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def _sym(m: jax.Array) -> jax.Array:
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def _default_rtol(m: jax.Array) -> float:
    # Rank decisions at rounding level, as numpy.linalg.matrix_rank makes them.
    return m.shape[-1] * float(jnp.finfo(m.dtype).eps)


def _rebuild(v: jax.Array, f: jax.Array) -> jax.Array:
    return jnp.einsum("...ij,...j,...kj->...ik", v, f, v)


def _conjugate_tangent(v: jax.Array, dm: jax.Array, dd: jax.Array) -> jax.Array:
    """V (F o (V^T dM V)) V^T: the Daleckii-Krein form of a spectral JVP."""
    vt_dm_v = jnp.swapaxes(v, -1, -2) @ _sym(dm) @ v
    return v @ (dd * vt_dm_v) @ jnp.swapaxes(v, -1, -2)


def _kept_sqrt(w: jax.Array, rtol: float) -> tuple[jax.Array, jax.Array]:
    """Square roots of the eigenvalues above the pseudo-inverse cutoff."""
    cutoff = rtol * jnp.max(w, axis=-1, keepdims=True)
    keep = w > cutoff
    return jnp.where(keep, jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0), keep


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _inv_sqrt(m: jax.Array, rtol: float) -> jax.Array:
    w, v = jnp.linalg.eigh(_sym(m))
    s, keep = _kept_sqrt(w, rtol)
    return _rebuild(v, jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0))


@_inv_sqrt.defjvp
def _inv_sqrt_jvp(rtol, primals, tangents):
    (m,), (dm,) = primals, tangents
    w, v = jnp.linalg.eigh(_sym(m))
    s, keep = _kept_sqrt(w, rtol)
    safe = jnp.where(keep, s, 1.0)
    out = _rebuild(v, jnp.where(keep, 1.0 / safe, 0.0))
    si, sj = safe[..., :, None], safe[..., None, :]
    both = keep[..., :, None] & keep[..., None, :]
    # Divided difference of t -> t^(-1/2): -1 / (si sj (si + sj)); no gap division.
    dd = jnp.where(both, -1.0 / (si * sj * (si + sj)), 0.0)
    return out, _conjugate_tangent(v, dm, dd)


@jax.custom_jvp
def _sqrt(m: jax.Array) -> jax.Array:
    w, v = jnp.linalg.eigh(_sym(m))
    return _rebuild(v, jnp.sqrt(jnp.maximum(w, 0.0)))


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    w, v = jnp.linalg.eigh(_sym(m))
    s = jnp.sqrt(jnp.maximum(w, 0.0))
    denom = s[..., :, None] + s[..., None, :]
    # Divided difference of sqrt: 1 / (si + sj). Zero where both eigenvalues are
    # zero, the one-sided derivative there being infinite.
    dd = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    return _rebuild(v, s), _conjugate_tangent(v, dm, dd)


def psd_sqrt(m: ArrayLike) -> jax.Array:
    r"""Principal square root of a symmetric PSD matrix.

    Args:
        m: array of shape ``(..., d, d)``, symmetric positive semi-definite, float.
            Only its symmetric part is used; negative eigenvalues (rounding) are
            clipped to zero.

    Returns:
        ``S`` of the same shape and dtype with ``S @ S = m`` and ``S`` PSD.

    The JVP uses the divided differences ``1 / (sqrt(l_i) + sqrt(l_j))``, finite
    at repeated eigenvalues; where both eigenvalues are zero the (infinite)
    derivative is set to zero.

    Example:
        >>> import jax.numpy as jnp
        >>> s = psd_sqrt(jnp.diag(jnp.array([4.0, 9.0], dtype=jnp.float32)))
        >>> s.dtype, s.round(5).tolist()
        (dtype('float32'), [[2.0, 0.0], [0.0, 3.0]])
    """
    return _sqrt(jnp.asarray(m))


def psd_inv_sqrt(m: ArrayLike, *, rtol: float | None = None) -> jax.Array:
    r"""Pseudo-inverse square root ``(m^{1/2})^+`` of a symmetric PSD matrix.

    Eigenvalues ``l_i <= rtol * max(l)`` are treated as zero and contribute
    nothing, as a pseudo-inverse does. This matters when ``m`` is singular up to
    rounding (wide layers, dead units): inverting those eigenvalues instead
    amplifies rounding noise without bound.

    Args:
        m: array of shape ``(..., d, d)``, symmetric PSD, float.
        rtol: relative cutoff on the eigenvalues; default ``d * eps(dtype)``.

    Returns:
        Array of the same shape and dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> r = psd_inv_sqrt(jnp.diag(jnp.array([4.0, 0.0], dtype=jnp.float32)))
        >>> r.dtype, r.round(5).tolist()   # the zero eigenvalue stays zero
        (dtype('float32'), [[0.5, 0.0], [0.0, 0.0]])
    """
    m = jnp.asarray(m)
    return _inv_sqrt(m, _default_rtol(m) if rtol is None else float(rtol))


def _gram_spectrum(f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values (descending) and right singular vectors (columns) of ``f``."""
    r = jnp.linalg.qr(f, mode="r") if f.shape[-2] > f.shape[-1] else f
    _, s, vt = jnp.linalg.svd(r, full_matrices=False)
    return s, jnp.swapaxes(vt, -1, -2)


def _gram_parts(f: jax.Array, rtol: float):
    s, v = _gram_spectrum(f)
    keep = s > rtol * s[..., :1]
    safe = jnp.where(keep, s, 1.0)
    inv = jnp.where(keep, 1.0 / safe, 0.0)
    return s, v, keep, safe, _rebuild(v, inv), jnp.sum(jnp.where(keep, s, 0.0), axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def gram_inv_sqrt_and_trace_sqrt(f: jax.Array, rtol: float) -> tuple[jax.Array, jax.Array]:
    """``((F^T F)^{1/2})^+`` and ``trace (F^T F)^{1/2}``, from the SVD of ``F``.

    Singular values ``s_i <= rtol * max(s)`` are treated as zero.
    """
    return _gram_parts(f, rtol)[4:]


@gram_inv_sqrt_and_trace_sqrt.defjvp
def _gram_jvp(rtol, primals, tangents):
    (f,), (df,) = primals, tangents
    s, v, keep, safe, out, trace = _gram_parts(f, rtol)
    ft_df = jnp.swapaxes(f, -1, -2) @ df
    dm = ft_df + jnp.swapaxes(ft_df, -1, -2)  # d(F^T F)
    si, sj = safe[..., :, None], safe[..., None, :]
    both = keep[..., :, None] & keep[..., None, :]
    dd = jnp.where(both, -1.0 / (si * sj * (si + sj)), 0.0)
    # d sum(sqrt(l_i)) = sum(v_i^T dM v_i / (2 sqrt(l_i))) over kept l_i = s_i^2.
    diag = jnp.einsum("...ji,...jk,...ki->...i", v, dm, v)
    dtrace = jnp.sum(jnp.where(keep, diag / (2.0 * safe), 0.0), axis=-1)
    return (out, trace), (_conjugate_tangent(v, dm, dd), dtrace)


def gram_inv_sqrt(f: ArrayLike, *, rtol: float | None = None) -> jax.Array:
    r"""Pseudo-inverse square root of ``M = F^T F``, given the factor ``F``.

    Computed from the singular values ``s`` of ``F`` (``M`` has eigenvalues
    ``s^2``), so small eigenvalues of ``M`` keep about twice the relative
    precision that ``eigh(M)`` gives them: in float32 this is the difference
    between a 1e-2 and a 1e-4 error in the affinity score (docs/numerics.md).

    Args:
      f: ``(..., m, k)`` factor, any ``m``.
      rtol: singular values ``<= rtol * max(s)`` count as zero; default
        ``4 * sqrt(k) * eps(dtype)``, about the rounding level of a computed
        factor.

    Returns:
      ``(..., k, k)`` symmetric PSD array.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=jnp.float32)
      >>> r = gram_inv_sqrt(f)   # (f^T f)^{-1/2}, pseudo-inverse on the null direction
      >>> r.shape, r.dtype, r.round(5).tolist()
      ((2, 2), dtype('float32'), [[0.5, 0.0], [0.0, 0.0]])
    """
    f = jnp.asarray(f)
    if rtol is None:
        rtol = 4.0 * f.shape[-1] ** 0.5 * float(jnp.finfo(f.dtype).eps)
    return gram_inv_sqrt_and_trace_sqrt(f, rtol)[0]
