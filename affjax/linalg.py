"""Spectral functions of symmetric positive semi-definite matrices.

``psd_sqrt`` and ``psd_inv_sqrt`` are computed from one ``eigh``;
``gram_inv_sqrt`` takes a factor ``F`` of ``M = F^T F`` and works from the
singular values of ``F``, which carry twice the relative precision of the
eigenvalues of ``M`` (the route the affinity score takes in float32). All carry
a custom JVP built from the Daleckii-Krein formula, so their derivatives stay
finite at repeated eigenvalues, where the derivative of ``eigh`` itself divides
by zero. ``psd_sqrt`` and ``psd_inv_sqrt`` act on the last two axes and
broadcast over leading ones.

Every LAPACK call of the score goes through the helpers below
(``_eigh``, ``thin_svd``, ``_qr_r``, ``qr_reduced``, ...; the factors ``gram_cholesky`` and
``qr_lower_factor`` use them), whose ``vmap`` is a loop on CPU (``docs/signatures.md``,
"Batched LAPACK on CPU").

Reference: R. Bhatia, *Matrix Analysis*, Springer 1997, Thm. V.3.3
(derivative of a spectral function).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from affjax import _checks


def _loop_on_cpu(fn):
    """``fn`` of one matrix, whose ``vmap`` (and leading axes) loop on CPU.

    Under ``vmap`` on CPU the calls run one at a time in a ``lax.map``; elsewhere
    they batch as usual (cuSOLVER's batched kernels on GPU). The score calls these
    on values it does not differentiate (custom JVP rules compute their primal
    outputs with them), so first derivatives never batch a LAPACK call either.
    ``custom_vmap`` has no reverse-mode rule; the JVP below, JAX's own, is what
    second derivatives use (its batched kernels are the exception to the loop).
    """
    looped = jax.custom_batching.custom_vmap(fn)

    @looped.def_vmap
    def _rule(axis_size, in_batched, m):
        del axis_size
        if not in_batched[0]:  # the forward-mode rule of custom_vmap asks for these too
            out = fn(m)
            return out, jax.tree.map(lambda _: False, out)
        if jax.default_backend() == "cpu":
            out = jax.lax.map(looped, m)  # looped: an outer vmap of the body loops too
        else:
            out = jax.vmap(fn)(m)
        return out, jax.tree.map(lambda _: True, out)

    differentiable = jax.custom_jvp(looped)
    differentiable.defjvp(lambda primals, tangents: jax.jvp(fn, primals, tangents))

    @functools.wraps(fn)
    def call(m: jax.Array):
        lead = m.shape[:-2]
        if not lead:
            return differentiable(m)
        out = jax.vmap(differentiable)(m.reshape((-1, *m.shape[-2:])))
        return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)

    return call


@_loop_on_cpu
def _eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh``: eigenvalues (ascending) and eigenvectors."""
    return jnp.linalg.eigh(m)


@_loop_on_cpu
def thin_svd(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin ``jnp.linalg.svd`` (``full_matrices=False``): ``u, s, vt`` (a loop over a batch on CPU).

    Example:
      >>> import jax.numpy as jnp
      >>> u, s, vt = thin_svd(jnp.array([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]]))
      >>> u.shape, vt.shape, [round(float(v), 4) for v in s]
      ((3, 2), (2, 2), [4.0, 3.0])
    """
    return jnp.linalg.svd(m, full_matrices=False)


@_loop_on_cpu
def _qr_r(m: jax.Array) -> jax.Array:
    """The triangular factor of ``jnp.linalg.qr`` (``mode="r"``)."""
    return jnp.linalg.qr(m, mode="r")


@_loop_on_cpu
def qr_reduced(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.qr(m, mode="reduced")``: ``q, r`` (a loop over a batch on CPU).

    Example:
      >>> import jax.numpy as jnp
      >>> q, r = qr_reduced(jnp.array([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]]))
      >>> q.shape, r.shape, abs(round(float(r[0, 0]), 4))
      ((3, 2), (2, 2), 5.0)
    """
    return jnp.linalg.qr(m, mode="reduced")


@_loop_on_cpu
def _cholesky(m: jax.Array) -> jax.Array:
    """Lower Cholesky factor (NaN where ``m`` is not numerically positive definite)."""
    return jnp.linalg.cholesky(m)


@_loop_on_cpu
def _lower_triangular_inverse(low: jax.Array) -> jax.Array:
    """``L^{-1}`` of a lower triangular ``L``."""
    eye = jnp.eye(low.shape[-1], dtype=low.dtype)
    return jax.lax.linalg.triangular_solve(low, eye, left_side=True, lower=True)


def _lower_factor_tangent(f: jax.Array, df: jax.Array, low: jax.Array) -> jax.Array:
    """Tangent of a lower triangular ``L`` with ``L L^T = F^T F``, for ``dF``.

    ``dL = L Phi(L^{-1} dM L^{-T})`` with ``dM = dF^T F + F^T dF`` and ``Phi``
    the lower triangle with half the diagonal; it holds for any fixed signs of
    ``L``'s diagonal (QR's factor as well as Cholesky's). ``L^{-1}`` is formed
    once, so the tangent is matrix products: no triangular solve, which would be
    a batched LAPACK call under ``vmap``. A broken-down factor (NaN, which the
    caller discards) counts as ``I`` here, so that the zero cotangent of the
    discarded branch does not meet a NaN.
    """
    eye = jnp.eye(low.shape[-1], dtype=low.dtype)
    low = jnp.where(jnp.all(jnp.isfinite(low)), low, eye)
    low_inv = _lower_triangular_inverse(low)
    ft_df = f.T @ df
    inner = low_inv @ (ft_df + ft_df.T) @ low_inv.T
    return low @ (jnp.tril(inner, -1) + 0.5 * jnp.diag(jnp.diag(inner)))


@jax.custom_jvp
def gram_cholesky(f: jax.Array) -> jax.Array:
    """Cholesky factor of the Gram matrix ``F^T F``.

    Args:
      f: ``(m, k)`` factor, float.

    Returns:
      ``(k, k)`` lower triangular ``L`` with ``L L^T = F^T F`` and a positive
      diagonal; NaN where rounding makes the formed ``F^T F`` indefinite (then
      use :func:`qr_lower_factor`). Under ``vmap`` on CPU the factorizations run
      one at a time (see the module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.array([[2.0, 0.0], [0.0, 3.0], [0.0, 4.0]], jnp.float32)
      >>> gram_cholesky(f).tolist()   # F^T F = diag(4, 25)
      [[2.0, 0.0], [0.0, 5.0]]
    """
    return _cholesky(f.T @ f)


@gram_cholesky.defjvp
def _gram_cholesky_jvp(primals, tangents):
    (f,), (df,) = primals, tangents
    low = gram_cholesky(f)
    return low, _lower_factor_tangent(f, df, low)


@jax.custom_jvp
def qr_lower_factor(f: jax.Array) -> jax.Array:
    """Lower triangular factor of ``F^T F`` from the QR decomposition of ``F``.

    Backward stable for ``F^T F`` without forming it, so it works where
    :func:`gram_cholesky` breaks down (rank-deficient ``F`` in float32).

    Args:
      f: ``(m, k)`` factor, float, ``m >= k``.

    Returns:
      ``(k, k)`` lower triangular ``L = R^T`` (``F = Q R``) with
      ``L L^T = F^T F``; its diagonal may have either sign.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.array([[2.0, 0.0], [0.0, 3.0], [0.0, 4.0]], jnp.float32)
      >>> low = qr_lower_factor(f)
      >>> jnp.abs(low).round(5).tolist(), (low @ low.T).round(4).tolist()
      ([[2.0, 0.0], [0.0, 5.0]], [[4.0, 0.0], [0.0, 25.0]])
    """
    return _qr_r(f).T


@qr_lower_factor.defjvp
def _qr_lower_factor_jvp(primals, tangents):
    (f,), (df,) = primals, tangents
    low = qr_lower_factor(f)
    return low, _lower_factor_tangent(f, df, low)


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


def _inv_sqrt_divided_differences(s: jax.Array, keep: jax.Array) -> jax.Array:
    """Daleckii-Krein matrix of the pseudo-inverse square root, from ``s = sqrt(l)``.

    Kept pairs: the divided difference of ``l^-1/2``, ``-1 / (s_i s_j (s_i + s_j))`` (no
    gap division). A kept ``l_i`` against a dropped one (the pseudo-inverse's 0):
    ``(l_i^-1/2 - 0) / (l_i - 0) = 1 / s_i^3``, the range turning while the rank stays
    (the gradient at a singular ``C_x`` with ridge 0 needs it; docs/numerics.md). Dropped pairs:
    0; perturbations that raise the rank have no derivative (the pseudo-inverse jumps).
    ``s`` must be finite and nonzero where not kept (the callers' "safe" values).
    """
    si, sj = s[..., :, None], s[..., None, :]
    ki, kj = keep[..., :, None], keep[..., None, :]
    return jnp.where(ki & kj, -1.0 / (si * sj * (si + sj)),
                     jnp.where(ki, 1.0 / si**3, jnp.where(kj, 1.0 / sj**3, 0.0)))


def _kept_sqrt(w: jax.Array, rtol: float) -> tuple[jax.Array, jax.Array]:
    """Square roots of the eigenvalues above the pseudo-inverse cutoff."""
    cutoff = rtol * jnp.max(w, axis=-1, keepdims=True)
    keep = w > cutoff
    return jnp.where(keep, jnp.sqrt(jnp.where(keep, w, 1.0)), 0.0), keep


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _inv_sqrt(m: jax.Array, rtol: float) -> jax.Array:
    w, v = _eigh(_sym(m))
    s, keep = _kept_sqrt(w, rtol)
    return _rebuild(v, jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0))


@_inv_sqrt.defjvp
def _inv_sqrt_jvp(rtol, primals, tangents):
    (m,), (dm,) = primals, tangents
    w, v = _eigh(_sym(m))
    s, keep = _kept_sqrt(w, rtol)
    safe = jnp.where(keep, s, 1.0)
    out = _rebuild(v, jnp.where(keep, 1.0 / safe, 0.0))
    return out, _conjugate_tangent(v, dm, _inv_sqrt_divided_differences(safe, keep))


@jax.custom_jvp
def _sqrt(m: jax.Array) -> jax.Array:
    w, v = _eigh(_sym(m))
    return _rebuild(v, jnp.sqrt(jnp.maximum(w, 0.0)))


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    w, v = _eigh(_sym(m))
    s = jnp.sqrt(jnp.maximum(w, 0.0))
    si, sj = s[..., :, None], s[..., None, :]
    denom = si + sj
    # Divided difference of sqrt: 1 / (si + sj), with no gap division. Zero where both
    # eigenvalues are zero, the one-sided derivative there being infinite.
    dd = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    # Clipped negative eigenvalues (indefinite input): f = 0 there, so the divided
    # difference with a nonnegative l_j is (0 - s_j) / (l_i - l_j), and 0 between two
    # negative ones. Equal to the above where the negative one is at rounding level.
    neg_i, neg_j = w[..., :, None] < 0, w[..., None, :] < 0
    gap = w[..., :, None] - w[..., None, :]
    mixed = jnp.where(gap != 0, (si - sj) / jnp.where(gap != 0, gap, 1.0), 0.0)
    dd = jnp.where(neg_i & neg_j, 0.0, jnp.where(neg_i | neg_j, mixed, dd))
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
    derivative is set to zero. It is the derivative of the clipped function for
    indefinite input too (``(0 - sqrt(l_j)) / (l_i - l_j)`` against a negative
    ``l_i``).

    Example:
        >>> import jax.numpy as jnp
        >>> s = psd_sqrt(jnp.diag(jnp.array([4.0, 9.0], dtype=jnp.float32)))
        >>> s.dtype, s.round(5).tolist()
        (dtype('float32'), [[2.0, 0.0], [0.0, 3.0]])
    """
    return _sqrt(_checks.square_matrix("m", m))


def psd_inv_sqrt(m: ArrayLike, *, rtol: float | None = None) -> jax.Array:
    r"""Pseudo-inverse square root ``(m^{1/2})^+`` of a symmetric PSD matrix.

    Eigenvalues ``l_i <= rtol * max(l)`` are treated as zero and contribute
    nothing, as a pseudo-inverse does. This matters when ``m`` is singular up to
    rounding (wide layers, dead units): inverting those eigenvalues instead
    amplifies rounding noise without bound.

    The JVP is the derivative along perturbations that keep the rank (the kept
    eigenvectors may turn into the dropped ones' space; pairs of dropped
    eigenvalues contribute nothing). Perturbations that raise the rank have no
    derivative: the pseudo-inverse jumps. It is the derivative for PSD input,
    not for a matrix with clearly negative eigenvalues.

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
    m = _checks.square_matrix("m", m)
    return _inv_sqrt(m, _default_rtol(m) if rtol is None else float(rtol))


def _gram_spectrum(f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values (descending) and right singular vectors (columns) of ``f``."""
    m, k = f.shape[-2:]
    if m > k:
        r = _qr_r(f)
    else:
        # Zero rows up to k (F^T F is unchanged) so that the SVD returns all k right
        # singular vectors: the JVP needs the null space's too.
        r = jnp.concatenate([f, jnp.zeros((*f.shape[:-2], k - m, k), f.dtype)], axis=-2)
    _, s, vt = thin_svd(r)
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
    dd = _inv_sqrt_divided_differences(safe, keep)
    # d sum(sqrt(l_i)) = sum(v_i^T dM v_i / (2 sqrt(l_i))) over kept l_i = s_i^2.
    diag = jnp.einsum("...ji,...jk,...ki->...i", v, dm, v)
    dtrace = jnp.sum(jnp.where(keep, diag / (2.0 * safe), 0.0), axis=-1)
    return (out, trace), (_conjugate_tangent(v, dm, dd), dtrace)


def gram_inv_sqrt(f: ArrayLike, *, rtol: float | None = None) -> jax.Array:
    r"""Pseudo-inverse square root of ``M = F^T F``, given the factor ``F``.

    Computed from the singular values ``s`` of ``F`` (``M`` has eigenvalues
    ``s^2``), so small eigenvalues of ``M`` keep about twice the relative
    precision that ``eigh(M)`` gives them (the score's float32 accuracy rests on
    it; docs/numerics.md, "Algorithm").

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
