"""Covariances, PSD square roots, Bures map and exact W2 against NumPy/SciPy/scikit-learn/POT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
import scipy.linalg
from reference import bures_map as reference_bures_map
from reference import sqrtm_psd
from sklearn.covariance import LedoitWolf
from sklearn.covariance import ledoit_wolf_shrinkage

import affjax
from affjax.layer_scoring import ASSIGNMENT_SOLVERS

SHAPES = [(50, 1), (40, 6), (20, 35), (300, 17)]


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("jit", [False, True])
def test_empirical_covariance(n, d, jit):
    x = _data(n, d)
    f = jax.jit(affjax.empirical_covariance) if jit else affjax.empirical_covariance
    np.testing.assert_allclose(np.asarray(f(x)), np.atleast_2d(np.cov(x.T)) + 1e-6 * np.eye(d),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("jit", [False, True])
def test_ledoit_wolf_matches_sklearn(n, d, jit):
    x = _data(n, d)
    f = jax.jit(affjax.ledoit_wolf_covariance) if jit else affjax.ledoit_wolf_covariance
    expected = LedoitWolf().fit(x).covariance_ + 1e-6 * np.eye(d)
    np.testing.assert_allclose(np.asarray(f(x)), expected, rtol=1e-9, atol=1e-12)
    s, _ = affjax.ledoit_wolf_shrinkage(x)
    assert abs(float(s) - ledoit_wolf_shrinkage(x)) < 1e-10


def test_ledoit_wolf_float32_and_degenerate():
    x = _data(100, 8).astype(np.float32)
    expected = LedoitWolf().fit(x.astype(np.float64)).covariance_ + 1e-6 * np.eye(8)
    got = affjax.ledoit_wolf_covariance(x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
    # Constant data: sklearn's shrinkage is 0 and the estimate is the ridge alone.
    const = np.ones((10, 3))
    np.testing.assert_allclose(np.asarray(affjax.ledoit_wolf_covariance(const)),
                               1e-6 * np.eye(3), atol=1e-15)


def test_ledoit_wolf_two_samples_float32_stays_positive_definite():
    # With two samples both centred rows have the same outer product, so the estimate of
    # beta is a difference of two equal sums: float32 rounding can leave it negative, and
    # an unclipped negative shrinkage made the shift (an eigenvalue) negative: NaN scores.
    from reference import affinity_score_reference

    from affjax.covariance import covariance_parts

    rng = np.random.default_rng(0)
    for _ in range(40):
        x = rng.normal(size=(2, 2)).astype(np.float32)
        w = rng.normal(size=(2, 2))
        y = (x @ (w @ w.T) + 3.0).astype(np.float32)
        s, mu = affjax.ledoit_wolf_shrinkage(y)
        assert 0.0 <= float(s) <= 1.0
        parts = covariance_parts(y, covariance="ledoit_wolf")
        assert float(parts.shift) >= np.float32(1e-6)  # the ridge, plus s * mu >= 0
        got = float(affjax.affinity_score(x, y, covariance="ledoit_wolf"))
        want = affinity_score_reference(x, y, covariance="ledoit_wolf")["score"]
        assert abs(got - want) < 1e-3, (got, want)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_psd_sqrt_and_inv_sqrt(dtype, tol):
    rng = np.random.default_rng(1)
    b = rng.normal(size=(6, 6))
    m = (b @ b.T + 0.1 * np.eye(6)).astype(dtype)
    s = np.asarray(affjax.psd_sqrt(m))
    assert s.dtype == dtype
    np.testing.assert_allclose(s, scipy.linalg.sqrtm(m.astype(np.float64)).real, rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(np.asarray(affjax.psd_inv_sqrt(m)) @ s, np.eye(6), atol=10 * tol)
    # Batched over a leading axis and under vmap.
    stack = np.stack([m, 2 * m])
    np.testing.assert_allclose(np.asarray(affjax.psd_sqrt(stack))[1], np.sqrt(2) * s, rtol=tol)
    np.testing.assert_allclose(np.asarray(jax.vmap(affjax.psd_sqrt)(stack))[1], np.sqrt(2) * s,
                               rtol=tol)


def test_psd_inv_sqrt_is_a_pseudo_inverse():
    v = np.linalg.qr(np.random.default_rng(2).normal(size=(4, 4)))[0]
    m = (v * np.array([4.0, 1.0, 1e-20, 0.0])) @ v.T
    expected = (v * np.array([0.5, 1.0, 0.0, 0.0])) @ v.T
    np.testing.assert_allclose(np.asarray(affjax.psd_inv_sqrt(m)), expected, atol=1e-12)


@pytest.mark.parametrize("d", [1, 3, 12])
def test_bures_map_and_distance(d):
    rng = np.random.default_rng(d)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cx, cy = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mx, my = rng.normal(size=d), rng.normal(size=d)
    big_a = np.asarray(affjax.bures_map(cx, cy))
    np.testing.assert_allclose(big_a, reference_bures_map(cx, cy), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(big_a @ cx @ big_a, cy, rtol=1e-8, atol=1e-10)
    assert np.linalg.eigvalsh(big_a).min() > 0
    half = sqrtm_psd(cy)
    expected = np.sqrt(np.sum((mx - my) ** 2) + np.trace(cx) + np.trace(cy)
                       - 2 * np.trace(sqrtm_psd(half @ cx @ half)))
    assert abs(float(affjax.bures_w2(mx, cx, my, cy)) - expected) < 1e-8


def test_gram_largest_eigenvalue_is_a_close_lower_estimate():
    from affjax.transport import gram_largest_eigenvalue

    for n, k in [(50, 8), (10, 30), (300, 17)]:
        f = _data(n, k, seed=k)
        exact = np.linalg.eigvalsh(f.T @ f)[-1]
        got = float(gram_largest_eigenvalue(jnp.asarray(f)))
        assert got <= exact * (1 + 1e-12) and got >= 0.9 * exact
    assert float(gram_largest_eigenvalue(jnp.zeros((4, 3)))) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_bures_from_factors_skips_a_hopeless_cholesky_with_the_same_result(dtype):
    from affjax.transport import bures_from_factors
    from affjax.transport import cholesky_hopeless
    from affjax.transport import gram_largest_eigenvalue

    # 10 samples in 30 dimensions plus a 1e-6 ridge: 21 eigenvalues of C_y equal the ridge,
    # 1e-8 of the largest, below float32 rounding (1.2e-7) and far above float64's.
    rng = np.random.default_rng(3)
    n, d, ridge = 10, 30, 1e-6
    xc, yc = (v - v.mean(0) for v in rng.normal(size=(2, n, d)))
    eye = np.sqrt(ridge) * np.eye(d)
    f_x = jnp.asarray(np.concatenate([xc / np.sqrt(n - 1), eye]), dtype)
    f_y = jnp.asarray(np.concatenate([30 * np.maximum(yc, 0) / np.sqrt(n - 1), eye]), dtype)
    largest = float(gram_largest_eigenvalue(f_y))
    assert 1e2 < largest < 1e4
    hopeless = bool(cholesky_hopeless(ridge, largest, dtype))
    assert hopeless == (dtype == jnp.float32)
    if dtype == jnp.float32:  # and Cholesky does break down there
        assert not np.isfinite(np.asarray(jnp.linalg.cholesky(f_y.T @ f_y))).all()
    skipped = bures_from_factors(f_x, f_y, smallest_eigenvalue_y=ridge)
    by_qr = bures_from_factors(f_x, f_y, factor="qr")
    tol = 1e-5 if dtype == jnp.float32 else 1e-6  # float64: Cholesky against QR, cond ~1e9
    for got, want in zip(skipped, by_qr, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)


@pytest.mark.parametrize("solver", ("auto",) + ASSIGNMENT_SOLVERS)
@pytest.mark.parametrize("n, d", [(2, 2), (37, 3), (120, 10)])
def test_exact_w2_matches_emd2(n, d, solver):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5
    w = ot.unif(n)
    expected = ot.emd2(w, w, ot.dist(x, y), numItermax=10_000_000)
    assert abs(float(affjax.exact_w2(x, y, solver=solver)) ** 2 - expected) < 1e-10
    perm = np.asarray(affjax.optimal_permutation(x, y, solver=solver))
    assert sorted(perm) == list(range(n))
    assert abs(np.mean(np.sum((x - y[perm]) ** 2, 1)) - expected) < 1e-10


def test_exact_w2_one_dimensional_sort():
    rng = np.random.default_rng(0)
    x, y = rng.exponential(size=500), rng.normal(size=500)
    expected = np.mean((np.sort(x) - np.sort(y)) ** 2)
    assert abs(float(affjax.exact_w2(x, y)) ** 2 - expected) < 1e-12
    assert abs(float(affjax.exact_w2(x, y, solver="scipy")) ** 2 - expected) < 1e-10
    with pytest.raises(ValueError, match="exact solver"):
        affjax.exact_w2(x, y, solver="sinkhorn")


def test_exact_w2_jit_and_vmap():
    rng = np.random.default_rng(1)
    xs, ys = rng.normal(size=(4, 30, 2)), rng.normal(size=(4, 30, 2))
    loop = [float(affjax.exact_w2(a, b)) for a, b in zip(xs, ys, strict=True)]
    for solver in ASSIGNMENT_SOLVERS:
        f = jax.jit(jax.vmap(lambda a, b, s=solver: affjax.exact_w2(a, b, solver=s)))
        np.testing.assert_allclose(np.asarray(f(xs, ys)), loop, rtol=1e-12)


def test_sinkhorn_bias_is_small_and_positive():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) * 2
    exact = float(affjax.w2_squared(x, y))
    for eps in (1e-2, 1e-3):
        entropic = float(affjax.w2_squared(x, y, solver="sinkhorn", sinkhorn_epsilon=eps))
        assert exact <= entropic < exact * (1 + 10 * eps)


_PTS = np.random.default_rng(0).normal(size=(10, 3))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: affjax.exact_w2(_PTS, _PTS[:7]), ValueError,
         r"exact_w2 needs two point clouds of the same shape.*\(10, 3\).*\(7, 3\)"),
        (lambda: affjax.w2_squared(_PTS, _PTS[:, :2]), ValueError, r"same shape.*\(10, 2\)"),
        (lambda: affjax.optimal_permutation(_PTS, _PTS[:4]), ValueError, r"\(4, 3\)"),
        (lambda: affjax.exact_w2(np.zeros((4, 2, 2)), np.zeros((4, 2, 2))), ValueError,
         r"x must have shape \(n, d\).*\(4, 2, 2\)"),
        (lambda: affjax.exact_w2(_PTS.astype(complex), _PTS), TypeError,
         "x must be a real-valued.*complex"),
        (lambda: affjax.sinkhorn_w2_squared(_PTS, _PTS[:, :2], epsilon=0.1), ValueError,
         r"one dimension d.*\(10, 3\).*\(10, 2\)"),
        (lambda: affjax.bures_map(np.eye(3), np.eye(2)), ValueError,
         r"cov_x and cov_y must have the same shape.*\(3, 3\).*\(2, 2\)"),
        (lambda: affjax.bures_map(np.ones((3, 4)), np.ones((3, 4))), ValueError,
         r"cov_x must be a square matrix.*\(3, 4\)"),
        (lambda: affjax.bures_w2(np.zeros(2), np.eye(3), np.zeros(3), np.eye(3)), ValueError,
         r"mean_x must have shape \(3,\).*got \(2,\)"),
        (lambda: affjax.psd_sqrt(np.ones((3, 4))), ValueError, r"m must be a square.*\(3, 4\)"),
        (lambda: affjax.psd_inv_sqrt(np.ones(3)), ValueError, r"m must be a square.*\(3,\)"),
        (lambda: affjax.psd_sqrt(np.eye(2, dtype=bool)), TypeError,
         "m must be a real-valued.*bool"),
        (lambda: affjax.empirical_covariance(_PTS[:1]), ValueError,
         r"empirical covariance needs at least 2 samples.*\(1, 3\)"),
        (lambda: affjax.ledoit_wolf_covariance(np.ones((4, 2, 2))), ValueError,
         r"x must have shape \(n, d\).*\(4, 2, 2\)"),
        (lambda: affjax.ledoit_wolf_shrinkage(np.ones((0, 2))), ValueError,
         "ledoit_wolf covariance needs at least 1 samples"),
    ],
)
def test_building_blocks_name_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_one_dimensional_samples_are_one_feature():
    x = _PTS[:, 0]
    np.testing.assert_allclose(np.asarray(affjax.empirical_covariance(x)),
                               np.cov(x).reshape(1, 1) + 1e-6, rtol=1e-10)
    expected = LedoitWolf().fit(x[:, None]).covariance_ + 1e-6
    np.testing.assert_allclose(np.asarray(affjax.ledoit_wolf_covariance(x)), expected,
                               rtol=1e-10)


def test_sinkhorn_w2_of_zero_costs_is_zero():
    # All costs zero (a dead layer's mapped samples, equal clouds): the relative epsilon
    # would be 0 and Sinkhorn NaN; the exact value is 0.
    from affjax.transport import w2_squared

    zeros = jnp.zeros((6, 3), jnp.float32)
    assert float(w2_squared(zeros, zeros, solver="sinkhorn")) == 0.0
    ones = jnp.ones((5, 2), jnp.float32)
    assert float(w2_squared(ones, ones, solver="sinkhorn")) == 0.0


def test_bures_rejects_a_stack_of_covariances():
    # The factor path transposes every axis: a (B, d, d) stack gave silently wrong maps.
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 3, 3))
    spd = g @ np.swapaxes(g, -1, -2) + np.eye(3)
    for fn in (affjax.bures_map, lambda a, b: affjax.bures_w2(np.zeros(3), a, np.zeros(3), b)):
        with pytest.raises(ValueError, match=r"one pair of \(d, d\) covariances.*jax.vmap"):
            fn(spd, spd[::-1])
    one = jax.vmap(affjax.bures_map)(jnp.asarray(spd), jnp.asarray(spd[::-1]))
    np.testing.assert_allclose(np.asarray(one[1]), np.asarray(affjax.bures_map(spd[1], spd[1])),
                               rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_exact_w2_is_translation_invariant_in_float32(offset):
    # |x|^2 + |y|^2 - 2 x.y cancelled far from the origin: 0.1675 instead of 0.1008 at 1e3.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x + 0.05 * rng.normal(size=(64, 4))).astype(np.float32)
    w = ot.unif(64)
    expected = ot.emd2(w, w, ot.dist(x.astype(np.float64), y.astype(np.float64)))
    for solver in ASSIGNMENT_SOLVERS:
        got = affjax.w2_squared(jnp.asarray(x + np.float32(offset)),
                                jnp.asarray(y + np.float32(offset)), solver=solver)
        assert abs(float(got) - expected) < 2e-3 * expected


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_sinkhorn_is_translation_invariant_in_float32(offset):
    # OTT expands |x|^2 + |y|^2 - 2 x.y: unshifted, offset 1e3 gave 4.7e19 for 0.24.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x + 0.3 * rng.normal(size=(64, 3))).astype(np.float32)
    near = float(affjax.sinkhorn_w2_squared(x, y, epsilon=0.01))
    far = float(affjax.sinkhorn_w2_squared(x + np.float32(offset), y + np.float32(offset),
                                           epsilon=0.01))
    assert abs(far - near) < 1e-3 * near
    rel = float(affjax.w2_squared(x + np.float32(offset), y + np.float32(offset),
                                  solver="sinkhorn"))
    assert abs(rel - float(affjax.w2_squared(x, y, solver="sinkhorn"))) < 1e-3 * near


def test_exact_w2_of_integer_points_does_not_overflow():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 60_000, size=(8, 2)).astype(np.int32)
    y = rng.integers(0, 60_000, size=(8, 2)).astype(np.int32)
    w = ot.unif(8)
    expected = np.sqrt(ot.emd2(w, w, ot.dist(x.astype(np.float64), y.astype(np.float64))))
    for solver in ("scipy", "hungarian", "auto"):
        assert abs(float(affjax.exact_w2(x, y, solver=solver)) - expected) < 1e-4 * expected
    assert abs(float(affjax.exact_w2(x[:, 0], y[:, 0])) - np.sqrt(np.mean(
        (np.sort(x[:, 0]).astype(np.float64) - np.sort(y[:, 0])) ** 2))) < 1e-2


def test_sinkhorn_epsilon_is_checked_in_the_building_blocks():
    x = np.random.default_rng(5).normal(size=(20, 2))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sinkhorn_epsilon must be a finite number > 0"):
            affjax.w2_squared(x, x + 1, solver="sinkhorn", sinkhorn_epsilon=bad)
        with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
            affjax.sinkhorn_w2_squared(x, x + 1, epsilon=bad)


def test_infinite_ridge_and_sort_on_wide_layers_are_named():
    x = np.random.default_rng(6).normal(size=(10, 50))
    with pytest.raises(ValueError, match="ridge must be a finite real number >= 0, got inf"):
        affjax.affinity_score(x, np.tanh(x), ridge=float("inf"))
    with pytest.raises(ValueError, match="got d=50"):  # not the span's 20 coordinates
        affjax.affinity_score(x, np.tanh(x), solver="sort")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.int32])
def test_building_blocks_take_half_precision_and_integers(dtype):
    # eigh/Cholesky have no half kernels (a raw NotImplementedError before); integers
    # broke psd_inv_sqrt's tolerance and Sinkhorn. All are computed in float32, as the score.
    m = np.array([[4.0, 1.0], [1.0, 3.0]])
    a = jnp.asarray(m, dtype)
    want = scipy.linalg.sqrtm(m).real
    np.testing.assert_allclose(np.asarray(affjax.psd_sqrt(a)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(affjax.psd_inv_sqrt(a)), np.linalg.inv(want), rtol=1e-5)
    expected_dtype = jnp.result_type(float) if dtype == jnp.int32 else jnp.float32
    assert affjax.bures_map(a, a).dtype == expected_dtype
    np.testing.assert_allclose(np.asarray(affjax.bures_map(a, a)), np.eye(2), atol=1e-5)
    pts = jnp.asarray([[0, 0], [3, 1], [1, 2], [2, 2]], dtype)
    exact = float(affjax.w2_squared(pts, pts[::-1] + jnp.asarray(1, dtype)))
    assert np.isfinite(exact)
    entropic = float(affjax.sinkhorn_w2_squared(pts, pts[::-1] + jnp.asarray(1, dtype),
                                                epsilon=1e-2))
    assert abs(entropic - exact) < 0.05 * exact
