"""Companion measures of an activation call, and dynamic time warping of signatures.

The published pipeline computed these beside the affinity score of each activation call, for
comparison (definitions in ``/work/shared/METHOD.md`` §2, reproduced here in code):

* :func:`linear_cka`: linear centred kernel alignment between the reduced input and output;
* :func:`sparsity`: fraction of entries with ``|v| <= 1e-3`` (the published pipeline took it
  over the *full* activation tensors, before the spatial reduction);
* :func:`histogram_entropy`: per sample, the entropy of a histogram with as many bins as
  features spanning that sample's range, plus ``log(bins)``; averaged over the batch;
* :func:`difference_norm`: Frobenius norm of ``input - output`` (reduced matrices);
* :func:`linear_fit_r2`: R² of a least-squares affine fit from input to output, fitted and
  scored on the same batch (scikit-learn's ``LinearRegression().fit(x, y).score(x, y)``).

:func:`dtw_distance` compares signatures of different lengths.

All array functions are jittable and take ``(n, d)`` matrices (samples first); they compute in
the inputs' floating dtype (float32 unless float64 is enabled and given).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from affjax import linalg

SPARSITY_THRESHOLD = 1e-3


def _as_float(v: ArrayLike, what: str) -> jax.Array:
    v = jnp.asarray(v)
    if v.dtype == jnp.bool_ or jnp.issubdtype(v.dtype, jnp.complexfloating):
        raise TypeError(f"{what} needs real numbers, got dtype {v.dtype}")
    # Integers and half precision (float16, bfloat16) are measured in float32: LAPACK has no
    # half-precision kernels, and fourth powers of half-precision values overflow.
    if not jnp.issubdtype(v.dtype, jnp.floating) or jnp.finfo(v.dtype).bits < 32:
        v = v.astype(jnp.float32)
    return v


def _check_pair(x: jax.Array, y: jax.Array, what: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{what} needs two (samples, features) matrices with the same number of rows, got "
            f"shapes {x.shape} and {y.shape}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{what} needs at least 2 samples, got shapes {x.shape} and {y.shape}")


def _centered(v: jax.Array) -> jax.Array:
    # A constant column is exactly zero once centred, whatever its value: its mean in floating
    # point need not equal the value, and the rounding left over would count as variation.
    constant = v.max(axis=0) == v.min(axis=0)
    return jnp.where(constant, 0.0, v - v.mean(0)).astype(v.dtype)


def _unit_scale(v: jax.Array, axis: int | None = None) -> jax.Array:
    # Divides by the largest magnitude (along ``axis``), so that products of several factors
    # neither overflow nor underflow; an all-zero slice is left as is.
    top = jnp.max(jnp.abs(v), axis=axis, keepdims=axis is not None)
    return v / jnp.where(top > 0, top, 1)


def linear_cka(x: ArrayLike, y: ArrayLike) -> jax.Array:
    """Linear centred kernel alignment between two representations of the same samples.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc``, ``Yc`` column-centred,
    which equals the published Gram-matrix form ``<HKH, HLH> / (|HKH| |HLH|)``, ``K = X X^T``.

    Args:
      x: ``(n, d1)`` float array.
      y: ``(n, d2)`` float array.

    Returns:
      Scalar in [0, 1] (up to rounding); ``nan`` when ``x`` or ``y`` is constant over the
      samples (0 / 0, as in the published pipeline).

    Raises:
      ValueError: not two matrices with the same number of rows, or fewer than 2 samples.
      TypeError: bool or complex input.

    Example:
      >>> x = jnp.array([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0]], jnp.float32)
      >>> round(float(linear_cka(x, 2.0 * x)), 5)
      1.0
    """
    x, y = _as_float(x, "linear_cka"), _as_float(y, "linear_cka")
    _check_pair(x, y, "linear_cka")
    # CKA does not depend on the scale of x or y; unit scale keeps the fourth powers in range.
    xc = _unit_scale(_centered(x))
    yc = _unit_scale(_centered(y))
    n = x.shape[0]
    if n < max(x.shape[1], y.shape[1]):  # sample space is smaller
        k, l_ = xc @ xc.T, yc @ yc.T
        return jnp.sum(k * l_) / (jnp.linalg.norm(k) * jnp.linalg.norm(l_))
    cross = jnp.sum((yc.T @ xc) ** 2)
    return cross / (jnp.linalg.norm(xc.T @ xc) * jnp.linalg.norm(yc.T @ yc))


def sparsity(v: ArrayLike, *, threshold: float = SPARSITY_THRESHOLD) -> jax.Array:
    """Fraction of the entries of ``v`` (any shape) with ``|v| <= threshold``.

    Args:
      v: float array of any shape.
      threshold: absolute threshold, default ``SPARSITY_THRESHOLD``.

    Returns:
      Scalar in ``[0, 1]``, in the dtype of ``v``.

    Example:
      >>> float(sparsity(jnp.array([0.0, 1e-4, -2.0, 3.0])))
      0.5
    """
    v = _as_float(v, "sparsity")
    return jnp.mean((jnp.abs(v) <= threshold).astype(v.dtype))


def histogram_entropy(v: ArrayLike) -> jax.Array:
    """Mean over samples of the histogram entropy of each sample's features, plus ``log(bins)``.

    For each row of ``v`` (``d`` features): ``d`` equal bins between the row's min and max
    (the max falls in the last bin), ``p`` the bin frequencies, entropy ``-sum p log p`` (natural
    log, empty bins skipped), plus ``log(d)``. A constant row puts everything in one bin
    (entropy ``log d``). The result lies in ``[log d, 2 log d]``.

    Args:
      v: ``(n, d)`` float array.

    Returns:
      Scalar, the mean over the n rows; ``nan`` if ``v`` holds a NaN or an infinity (a
      histogram of those has no bins).

    Numerical caveat: a value within rounding of a bin edge can land in either neighbouring bin
    depending on how the edge is computed (NumPy, torch and this function differ there).

    Example:
      >>> import math
      >>> v = jnp.array([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]], jnp.float32)
      >>> # row 1: one value per bin, entropy log 4; row 2 constant: entropy 0
      >>> round(float(histogram_entropy(v)), 5) == round(math.log(4) / 2 + math.log(4), 5)
      True
    """
    v = _as_float(v, "histogram_entropy")
    if v.ndim != 2 or 0 in v.shape:
        raise ValueError(
            f"histogram_entropy needs a non-empty (samples, features) matrix, got {v.shape}")
    bins = v.shape[1]
    lo = v.min(axis=1, keepdims=True)
    hi = v.max(axis=1, keepdims=True)
    span = hi - lo
    safe = jnp.where(span > 0, span, 1)
    idx = jnp.floor((v - lo) / safe * bins).astype(jnp.int32)
    idx = jnp.clip(jnp.where(span > 0, idx, 0), 0, bins - 1)
    counts = jax.vmap(lambda row: jnp.bincount(row, length=bins))(idx).astype(v.dtype)
    p = counts / bins
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0)
    entropy = jnp.mean(-plogp.sum(axis=1)) + jnp.log(jnp.asarray(bins, v.dtype))
    return jnp.where(jnp.all(jnp.isfinite(v)), entropy, jnp.nan)


def difference_norm(x: ArrayLike, y: ArrayLike) -> jax.Array:
    """Frobenius norm of ``x - y`` (usually ``(n, d)`` matrices; any equal shapes).

    Args:
      x, y: float arrays of the same shape.

    Returns:
      Scalar in the input dtype.

    Raises:
      ValueError: shapes that differ.

    Example:
      >>> float(difference_norm(jnp.zeros((2, 2), jnp.float32), jnp.full((2, 2), 0.5, jnp.float32)))
      1.0
    """
    x, y = _as_float(x, "difference_norm"), _as_float(y, "difference_norm")
    if x.shape != y.shape:
        raise ValueError(f"difference_norm needs equal shapes, got {x.shape} and {y.shape}")
    return jnp.linalg.norm(x - y)


def linear_fit_r2(x: ArrayLike, y: ArrayLike) -> jax.Array:
    """R² of the least-squares affine fit ``y ≈ x B + c``, fitted and scored on the same samples.

    Averaged uniformly over the output columns, with scikit-learn's conventions for a constant
    output column (R² = 1 if fitted exactly, else 0). With ``d >= n - 1`` the minimum-norm fit
    interpolates and R² is 1.

    Args:
      x: ``(n, d1)`` float array.
      y: ``(n, d2)`` float array.

    Returns:
      Scalar, at most 1.

    Raises:
      ValueError: not two matrices with the same number of rows, or fewer than 2 samples.

    Numerical caveat: in float32 the fit of nearly collinear inputs loses digits; the relative
    error of R² is about ``cond(x) * 1e-7``.

    Example:
      >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0]], jnp.float32)
      >>> round(float(linear_fit_r2(x, 2.0 * x + 1.0)), 5)    # affine: exact fit
      1.0
      >>> round(float(linear_fit_r2(x, (x - 1.5) ** 2)), 5)   # symmetric: no linear part
      0.0
    """
    x, y = _as_float(x, "linear_fit_r2"), _as_float(y, "linear_fit_r2")
    _check_pair(x, y, "linear_fit_r2")
    # R^2 does not change when x is scaled or a column of y is: unit scales keep the squares
    # in range. (One scale for all of x, so that the relative SVD cutoff sees the same x.)
    xc = _unit_scale(_centered(x))
    yc = _unit_scale(_centered(y), axis=0)
    # Least squares by the thin SVD (jnp.linalg.lstsq's cutoff), looped under vmap on CPU.
    u, s, vt = linalg.thin_svd(xc)
    keep = s > float(jnp.finfo(s.dtype).eps) * max(xc.shape) * s[..., :1]
    inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    coef = vt.T @ (inv[:, None] * (u.T @ yc))
    residual = jnp.sum((yc - xc @ coef) ** 2, axis=0)
    total = jnp.sum(yc**2, axis=0)
    r2 = jnp.where(total > 0, 1 - residual / jnp.where(total > 0, total, 1),
                   jnp.where(residual > 0, 0.0, 1.0))
    return jnp.mean(r2)


def layer_metrics(
    x: ArrayLike, y: ArrayLike, *, full_sparsity: tuple[ArrayLike, ArrayLike] | None = None
) -> dict[str, float]:
    """All companion measures of one activation call, as Python floats.

    Args:
      x, y: the reduced ``(n, d)`` input and output of the call.
      full_sparsity: ``(sparsity before, sparsity after)`` measured on the full tensors (the
        published definition); if ``None`` sparsity is taken on ``x`` and ``y``.

    Returns:
      ``{"cka", "sparsity_before", "sparsity_after", "entropy_before", "entropy_after",
      "norm_diff", "r2"}``. ``cka`` is ``nan`` for a constant input or output.

    Example:
      >>> x = jnp.array([[-1.0, 2.0], [-0.5, -0.5], [1.0, 1.0]], jnp.float32)
      >>> m = layer_metrics(x, jax.nn.relu(x))
      >>> sorted(m) == sorted(METRIC_NAMES), m["sparsity_after"]
      (True, 0.5)
    """
    x, y = _as_float(x, "layer_metrics"), _as_float(y, "layer_metrics")
    _check_pair(x, y, "layer_metrics")
    before, after = full_sparsity if full_sparsity is not None else (sparsity(x), sparsity(y))
    cka, ent_x, ent_y, norm, r2 = (float(v) for v in _reduced_metrics(x, y))
    return {
        "cka": cka,
        "sparsity_before": float(before),
        "sparsity_after": float(after),
        "entropy_before": ent_x,
        "entropy_after": ent_y,
        "norm_diff": norm,
        "r2": r2,
    }


@jax.jit
def _reduced_metrics(x: jax.Array, y: jax.Array) -> jax.Array:
    """The measures on the reduced pair, as one compiled call (one per shape)."""
    return jnp.stack([linear_cka(x, y), histogram_entropy(x), histogram_entropy(y),
                      difference_norm(x, y), linear_fit_r2(x, y)])


METRIC_NAMES: tuple[str, ...] = ("cka", "sparsity_before", "sparsity_after", "entropy_before",
                                 "entropy_after", "norm_diff", "r2")


def dtw_distance(a: ArrayLike, b: ArrayLike) -> float:
    """Dynamic time warping distance between two sequences of scalars (e.g. two signatures).

    ``D[i, j] = |a_i - b_j| + min(D[i-1, j], D[i, j-1], D[i-1, j-1])``, ``D[0, 0] = |a_0 - b_0|``;
    the distance is ``D[m-1, n-1]``: the least total absolute difference along a monotone
    path that matches every element of both sequences. Symmetric, zero for equal sequences,
    defined for different lengths. Computed in float64 NumPy, one anti-diagonal at a time
    (``O(m n)`` work, ``m + n`` vectorised steps).

    Args:
      a: ``(m,)`` sequence.
      b: ``(n,)`` sequence.

    Returns:
      A Python float.

    Example:
      >>> dtw_distance([0.0, 1.0, 1.0, 2.0], [0.0, 1.0, 2.0])
      0.0
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"dtw_distance needs non-empty sequences, got lengths {a.size}, {b.size}")
    m, n = a.size, b.size
    cost = np.abs(a[:, None] - b[None, :])
    acc = np.full((m + 1, n + 1), np.inf)
    acc[0, 0] = 0.0
    # Cells (i, j) with i + j = k (1-based i, j) depend only on diagonals k - 1 and k - 2.
    for k in range(2, m + n + 1):
        i = np.arange(max(1, k - n), min(m, k - 1) + 1)
        j = k - i
        best = np.minimum(np.minimum(acc[i - 1, j], acc[i, j - 1]), acc[i - 1, j - 1])
        acc[i, j] = cost[i - 1, j - 1] + best
    return float(acc[m, n])


def dtw_matrix(sequences: list[ArrayLike]) -> np.ndarray:
    """Symmetric ``(k, k)`` float64 matrix of :func:`dtw_distance` between all pairs.

    Args:
      sequences: ``k`` one-dimensional sequences, lengths may differ.

    Returns:
      ``(k, k)`` float64 NumPy array, zero diagonal. ``k (k - 1) / 2``
      distance computations.

    Example:
      >>> dtw_matrix([[0.0, 1.0], [0.0, 1.0, 1.0], [2.0]]).tolist()
      [[0.0, 0.0, 3.0], [0.0, 0.0, 4.0], [3.0, 4.0, 0.0]]
    """
    k = len(sequences)
    out = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = dtw_distance(sequences[i], sequences[j])
    return out
