"""Independent float64 NumPy/SciPy/POT reference for the affinity score.

A literal implementation of the affinity score of METHOD.md section 1 (the "published
pipeline" form), meant only as ground truth for tests. It deliberately does not import jax or
affjax (POT may import jax on its own as an optional backend; nothing here uses it: all
arrays are NumPy float64).

    T(x) = x @ A + b,  A = C_y^(1/2) pinv((C_y^(1/2) C_x C_y^(1/2))^(1/2)) C_y^(1/2),
    b = m_y - m_x @ A,  rho_aff = 1 - sqrt(W2^2(T x, y) / (2 tr C_y)).
"""

from __future__ import annotations

import numpy as np
import ot
import scipy.linalg
import scipy.optimize
from sklearn.covariance import LedoitWolf

__all__ = [
    "affinity_score_reference",
    "bures_map",
    "empirical_cov",
    "ledoit_wolf_cov",
    "sqrtm_psd",
    "w2_squared",
]

EMD_NUM_ITER_MAX = 10_000_000


def _as_2d_float64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"expected shape (n,) or (n, d), got {x.shape}")
    return x


def empirical_cov(x, ridge: float = 1e-6) -> np.ndarray:
    """Unbiased sample covariance (ddof=1) plus ``ridge * I``; x has shape (n, d)."""
    x = _as_2d_float64(x)
    d = x.shape[1]
    c = np.atleast_2d(np.cov(x, rowvar=False, ddof=1))
    return c + ridge * np.eye(d)


def ledoit_wolf_cov(x, ridge: float = 1e-6) -> np.ndarray:
    """scikit-learn's Ledoit-Wolf estimate (divides by n) plus ``ridge * I``."""
    x = _as_2d_float64(x)
    d = x.shape[1]
    c = LedoitWolf().fit(x).covariance_
    return np.asarray(c, dtype=np.float64) + ridge * np.eye(d)


def sqrtm_psd(m) -> np.ndarray:
    """Symmetric PSD square root via ``scipy.linalg.eigh``; negative eigenvalues clipped to 0."""
    m = np.asarray(m, dtype=np.float64)
    m = 0.5 * (m + m.T)
    w, v = scipy.linalg.eigh(m)
    w = np.clip(w, 0.0, None)
    r = (v * np.sqrt(w)) @ v.T
    return 0.5 * (r + r.T)


def _pinv_hermitian(m) -> np.ndarray:
    """Pseudo-inverse of a symmetric matrix, cutoff ``dim * eps`` times the largest |eigenvalue|."""
    m = np.asarray(m, dtype=np.float64)
    rtol = m.shape[0] * np.finfo(np.float64).eps
    return np.linalg.pinv(m, rtol=rtol, hermitian=True)


def bures_map(cx, cy) -> np.ndarray:
    """Symmetric matrix A of the Gaussian OT map N(., C_x) -> N(., C_y), published form.

    ``A = C_y^(1/2) pinv((C_y^(1/2) C_x C_y^(1/2))^(1/2)) C_y^(1/2)``, symmetrised.
    """
    cx = np.asarray(cx, dtype=np.float64)
    cy = np.asarray(cy, dtype=np.float64)
    cy_half = sqrtm_psd(cy)
    inner = cy_half @ cx @ cy_half
    inner_half = sqrtm_psd(inner)
    a = cy_half @ _pinv_hermitian(inner_half) @ cy_half
    return 0.5 * (a + a.T)


def _sq_dists_exact(a: np.ndarray, b: np.ndarray, rows, cols) -> np.ndarray:
    """``||a[rows] - b[cols]||^2`` computed from differences (no cancellation)."""
    return ((a[rows] - b[cols]) ** 2).sum(axis=1)


def w2_squared(a, b, method: str = "emd") -> float:
    """Exact squared 2-Wasserstein distance between uniform empirical measures of rows.

    Squared Euclidean ground cost; ``a`` and ``b`` have shape (n, d) (or (n,)), equal n.
    ``method``:

    - "emd": POT's exact network-simplex LP (``ot.emd`` on ``ot.dist(a, b)``, squared
      Euclidean); the objective is then evaluated at the returned plan with squared distances
      computed from differences, so that a zero distance is exactly zero (``ot.dist`` uses
      ``|a|^2 + |b|^2 - 2 a.b`` and its cancellation error would show as ~1e-8 in the score).
    - "lsa": Hungarian assignment (``scipy.optimize.linear_sum_assignment``), then
      ``sum((a - b[perm]) ** 2) / n``.
    - "sort": sorted matching, d == 1 only.
    """
    a = _as_2d_float64(a)
    b = _as_2d_float64(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    n = a.shape[0]
    if method == "emd":
        w = ot.unif(n)
        cost = ot.dist(a, b, metric="sqeuclidean")
        plan = ot.emd(w, w, cost, numItermax=EMD_NUM_ITER_MAX)
        rows, cols = np.nonzero(plan)
        return float((plan[rows, cols] * _sq_dists_exact(a, b, rows, cols)).sum())
    if method == "lsa":
        cost = ot.dist(a, b, metric="sqeuclidean")
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        perm = cols[np.argsort(rows)]
        return float(((a - b[perm]) ** 2).sum() / n)
    if method == "sort":
        if a.shape[1] != 1:
            raise ValueError("method='sort' requires d == 1")
        return float(((np.sort(a[:, 0]) - np.sort(b[:, 0])) ** 2).sum() / n)
    raise ValueError(f"unknown method {method!r}")


def affinity_score_reference(
    x, y, covariance: str = "empirical", ridge: float = 1e-6, w2: str = "emd"
) -> dict:
    """Affinity score rho_aff of METHOD.md section 1, float64 ground truth.

    Returns a dict with ``score``, ``w2_squared``, ``A`` (symmetric, T(x) = x @ A + b), ``b``,
    ``trace_cov_y``, ``bures_w2`` (closed-form Bures-Wasserstein distance between the two
    Gaussians), plus ``dead``, ``mean_x``, ``mean_y``, ``cov_x``, ``cov_y``.
    """
    x = _as_2d_float64(x)
    y = _as_2d_float64(y)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
    d = x.shape[1]
    if covariance == "empirical":
        cov = empirical_cov
    elif covariance in ("ledoit_wolf", "ledoit-wolf", "lw"):
        cov = ledoit_wolf_cov
    else:
        raise ValueError(f"unknown covariance {covariance!r}")
    mx = x.mean(axis=0)
    my = y.mean(axis=0)
    cx = cov(x, ridge)
    cy = cov(y, ridge)
    tr_cy = float(np.trace(cy))

    dead = tr_cy <= 2.0 * ridge * d
    a_mat = np.zeros((d, d)) if dead else bures_map(cx, cy)
    b_vec = my - mx @ a_mat
    tx = x @ a_mat + b_vec

    w2sq = w2_squared(tx, y, method=w2)
    score = 1.0 - np.sqrt(max(w2sq, 0.0) / (2.0 * tr_cy))

    cy_half = sqrtm_psd(cy)
    w_inner = np.clip(scipy.linalg.eigvalsh(cy_half @ cx @ cy_half), 0.0, None)
    bw2 = float(((mx - my) ** 2).sum() + np.trace(cx) + tr_cy - 2.0 * np.sqrt(w_inner).sum())

    return {
        "score": float(score),
        "w2_squared": w2sq,
        "A": a_mat,
        "b": b_vec,
        "trace_cov_y": tr_cy,
        "bures_w2": float(np.sqrt(max(0.0, bw2))),
        "dead": bool(dead),
        "mean_x": mx,
        "mean_y": my,
        "cov_x": cx,
        "cov_y": cy,
    }
