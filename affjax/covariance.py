"""Covariance estimators with a ridge, as the affinity score uses them.

Every estimator here has the form ``C = alpha * Xc^T Xc + c * I`` with ``Xc``
the centred samples. The score relies on that form: it lets wide layers
(``d > n``) be handled in the span of the samples (see ``affjax.score``).
"""

from __future__ import annotations

from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from affjax import _checks

CovarianceName = Literal["empirical", "ledoit_wolf"]
COVARIANCES: tuple[str, ...] = ("empirical", "ledoit_wolf")


class LowRankPlusIdentity(NamedTuple):
    """A covariance ``alpha * centered^T centered + shift * I``.

    Attributes:
      centered: the centred samples, shape ``(n, d)``.
      mean: the sample mean, shape ``(d,)``.
      alpha: scalar weight of the sample term.
      shift: scalar multiple of the identity (ridge, plus shrinkage target).

    Keeping the factors instead of the ``(d, d)`` matrix is what lets wide
    layers (``d > n``) be scored in the span of the samples.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 1.0], [2.0, 1.0]], dtype=jnp.float32)
      >>> parts = covariance_parts(x, ridge=0.5)
      >>> parts.centered.shape, parts.dense().dtype
      ((2, 2), dtype('float32'))
      >>> parts.dense().tolist(), float(parts.trace())
      ([[2.5, 0.0], [0.0, 0.5]], 3.0)
    """

    centered: jax.Array
    mean: jax.Array
    alpha: jax.Array
    shift: jax.Array

    def dense(self) -> jax.Array:
        """The ``(d, d)`` matrix."""
        d = self.centered.shape[-1]
        gram = self.centered.T @ self.centered
        return self.alpha * gram + self.shift * jnp.eye(d, dtype=gram.dtype)

    def trace(self) -> jax.Array:
        """Trace of the matrix, without forming it."""
        d = self.centered.shape[-1]
        return self.alpha * jnp.sum(self.centered**2) + self.shift * d


def _center(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Shifted by the first sample: identical rows centre to exact zeros (a float sum of n
    # equal values is not n times the value), so a constant output has covariance 0, and
    # large offsets cancel before the sum rather than after it.
    first = jax.lax.stop_gradient(x[:1])
    offset = jnp.mean(x - first, axis=0)
    return x - first - offset, first[0] + offset


def _samples(x: ArrayLike, estimate: str) -> jax.Array:
    arr = _checks.point_cloud("x", x)
    minimum = 2 if estimate == "empirical" else 1  # the empirical one divides by n - 1
    if arr.shape[0] < minimum:
        raise ValueError(
            f"the {estimate} covariance needs at least {minimum} samples (rows), got x of "
            f"shape {arr.shape}"
        )
    return arr


def ledoit_wolf_shrinkage(x: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""Ledoit-Wolf shrinkage intensity and target scale.

    The same estimator as ``sklearn.covariance.ledoit_wolf_shrinkage`` on
    centred data: the shrunk covariance is ``(1 - s) S + s * mu * I`` with
    ``S = Xc^T Xc / n`` and ``mu = trace(S) / d``.

    Args:
      x: samples in rows, shape ``(n, d)`` (or ``(n,)``: d = 1), float.

    Returns:
      ``(s, mu)``, scalars of the input dtype. ``s = 0`` when ``d == 1``.
      ``s`` lies in ``[0, 1]``; it is ``0`` when the samples are already
      isotropic-looking and grows towards ``1`` when ``d`` is large
      compared to ``n``.

    Cost is ``O(n d min(n, d))``: the squared Frobenius norm of ``Xc^T Xc``
    is taken from the smaller of the two Gram matrices.

    Reference: O. Ledoit and M. Wolf, "A well-conditioned estimator for
    large-dimensional covariance matrices", J. Multivar. Anal. 88 (2004).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], jnp.float32)
      >>> s, mu = ledoit_wolf_shrinkage(x)   # already isotropic: no shrinkage
      >>> round(float(s), 6), round(float(mu), 6)
      (0.0, 1.0)
    """
    xc, _ = _center(_samples(x, "ledoit_wolf"))
    n, d = xc.shape
    total = jnp.sum(xc**2) / n  # trace of S
    mu = total / d
    if d == 1:
        return jnp.zeros((), xc.dtype), mu
    gram = xc @ xc.T if n < d else xc.T @ xc
    delta_ = jnp.sum(gram**2) / n**2  # ||S||_F^2
    beta_ = jnp.sum(jnp.sum(xc**2, axis=1) ** 2)
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * total + d * mu**2) / d
    beta = jnp.minimum(beta, delta)
    shrinkage = jnp.where(beta == 0, 0.0, beta / jnp.where(delta == 0, 1.0, delta))
    # beta is a mean of squared norms (>= 0), taken here as a difference of two sums that
    # cancel exactly when every centred sample has the same outer product (n = 2): float
    # rounding can leave it slightly negative, and a negative shrinkage can make the
    # shift s * mu + ridge, an eigenvalue of the estimate, negative.
    shrinkage = jnp.clip(shrinkage, 0.0, 1.0)
    return shrinkage.astype(xc.dtype), mu


def covariance_parts(
    x: ArrayLike, *, covariance: str = "empirical", ridge: float = 1e-6
) -> LowRankPlusIdentity:
    """The covariance estimate of ``x`` in low-rank-plus-identity form.

    Args:
      x: samples in rows, shape ``(n, d)`` (or ``(n,)``: d = 1), float.
      covariance: ``"empirical"`` (unbiased, divides by ``n - 1``) or
        ``"ledoit_wolf"`` (scikit-learn's ``LedoitWolf``, divides by ``n``).
      ridge: added to the diagonal.

    Returns:
      A :class:`LowRankPlusIdentity` in the dtype of ``x``; ``.dense()``
      forms the ``(d, d)`` matrix.

    Raises:
      ValueError: an unknown ``covariance`` name, a rank other than 1 or 2, or
        fewer than 2 samples for ``"empirical"`` (1 for ``"ledoit_wolf"``).
      TypeError: a dtype that is not real.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [2.0]], dtype=jnp.float32)
      >>> covariance_parts(x, covariance="empirical", ridge=0.0).dense().tolist()
      [[2.0]]
      >>> covariance_parts(x, covariance="ledoit_wolf", ridge=0.0).dense().tolist()
      [[1.0]]
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"unknown covariance {covariance!r}; expected one of {COVARIANCES}")
    xc, mean = _center(_samples(x, covariance))
    n = xc.shape[0]
    dtype = xc.dtype
    if covariance == "empirical":
        alpha = jnp.asarray(1.0 / (n - 1), dtype)
        shift = jnp.asarray(ridge, dtype)
    else:  # "ledoit_wolf"
        s, mu = ledoit_wolf_shrinkage(xc)
        alpha = (1.0 - s) / n
        shift = s * mu + ridge
    return LowRankPlusIdentity(xc, mean, alpha.astype(dtype), shift.astype(dtype))


def empirical_covariance(x: ArrayLike, *, ridge: float = 1e-6) -> jax.Array:
    """Unbiased sample covariance plus ``ridge * I``.

    Args:
      x: samples in rows, shape ``(n, d)`` (or ``(n,)``: d = 1), float.
      ridge: added to the diagonal.

    Returns:
      Array ``(d, d)`` in the dtype of ``x``; equals ``np.cov(x.T) + ridge * I``.

    Example:
      >>> import jax.numpy as jnp
      >>> cov = empirical_covariance(jnp.array([[0.0], [2.0]], jnp.float32), ridge=0.0)
      >>> cov.shape, cov.dtype, cov.tolist()
      ((1, 1), dtype('float32'), [[2.0]])
    """
    return covariance_parts(x, covariance="empirical", ridge=ridge).dense()


def ledoit_wolf_covariance(x: ArrayLike, *, ridge: float = 1e-6) -> jax.Array:
    """Ledoit-Wolf shrunk covariance plus ``ridge * I``.

    Matches ``sklearn.covariance.LedoitWolf().fit(x).covariance_ + ridge * I``.

    Args:
      x: samples in rows, shape ``(n, d)`` (or ``(n,)``: d = 1), float.
      ridge: added to the diagonal.

    Returns:
      Array ``(d, d)`` in the dtype of ``x``. It divides by ``n`` (as
      scikit-learn does), not ``n - 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], jnp.float32)
      >>> cov = ledoit_wolf_covariance(x, ridge=0.0)
      >>> cov.shape, cov.dtype, cov.round(6).tolist()
      ((2, 2), dtype('float32'), [[1.0, 0.0], [0.0, 1.0]])
    """
    return covariance_parts(x, covariance="ledoit_wolf", ridge=ridge).dense()
