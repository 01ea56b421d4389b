"""Tests of the float64 reference implementation (tests/reference.py) against METHOD.md section 3.

The published numbers come from the authors' notebooks; the activation and ReLU-sweep inputs are
drawn with the legacy NumPy RNG exactly as there (seed 987, one continuous stream).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import ot
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference import affinity_score_reference  # noqa: E402
from reference import bures_map  # noqa: E402
from reference import empirical_cov  # noqa: E402
from reference import ledoit_wolf_cov  # noqa: E402
from reference import sqrtm_psd  # noqa: E402
from reference import w2_squared  # noqa: E402

# --- Published numbers (METHOD.md section 3) ------------------------------------------------

POLY_PUBLISHED = {1: 1.000, 3: 0.711, 5: 0.577, 11: 0.400, 21: 0.289, 41: 0.205}
# Exact float64 values of this reference. k = 11 is 0.399456..., i.e. 0.399 at 3 decimals and
# 0.40 at 2; the authors' notebook titles show round(score, 2), so "0.400" is 0.40 padded.
POLY_REFERENCE = {
    1: 1.0,
    3: 0.7112088104566769,
    5: 0.5767206402814042,
    11: 0.39945635202172824,
    21: 0.2889221968642445,
    41: 0.20484369042491657,
}

ACT_PUBLISHED = {"relu": 0.487, "tanh": 0.670, "sigmoid": 0.775}
SWEEP_PUBLISHED = {5: 0.134, 8: 0.526, 11: 0.792, 13: 0.940, 14: 0.993}
# Printed by the authors' notebook (float32 torch pipeline), indices 5, 8, 11, 13, 15.
SWEEP_NOTEBOOK = {5: 0.13387674, 8: 0.52627778, 11: 0.79208457, 13: 0.94012433, 15: 0.99998754}
SWEEP_ONE = [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]


def _relu(x):
    return np.maximum(x, np.zeros((), dtype=x.dtype))


def _sigmoid(x):
    one = np.ones((), dtype=x.dtype)
    return one / (one + np.exp(-x))


ACTS = {"relu": _relu, "tanh": np.tanh, "sigmoid": _sigmoid}


@pytest.fixture(scope="module")
def activation_draws():
    """The authors' RNG stream: 3 normal draws, then the 20-window uniform ReLU sweep."""
    np.random.seed(987)
    acts = [np.random.normal(-1, 2, (1000, 1)).astype(np.float32) for _ in ACTS]
    sweep = [
        np.random.uniform(m - 2, m + 2, (1000, 1)).astype(np.float32)
        for m in np.linspace(-4, 4, 20)
    ]
    return acts, sweep


@pytest.mark.parametrize("k", sorted(POLY_PUBLISHED))
def test_polynomials(k):
    x = np.linspace(-1, 1, 1000)
    score = affinity_score_reference(x, x**k)["score"]
    assert score == pytest.approx(POLY_REFERENCE[k], abs=1e-9)
    assert round(score, 2) == round(POLY_PUBLISHED[k], 2)
    if k == 11:
        assert abs(score - POLY_PUBLISHED[k]) < 6e-4
    else:
        assert round(score, 3) == POLY_PUBLISHED[k]


def test_polynomials_float32_inputs_agree():
    x = np.linspace(-1, 1, 1000)
    x32 = x.astype(np.float32)
    for k in (3, 11, 41):
        s64 = affinity_score_reference(x, x**k, w2="sort")["score"]
        s32 = affinity_score_reference(x32, x32**k, w2="sort")["score"]
        assert s64 == pytest.approx(POLY_REFERENCE[k], abs=1e-12)
        assert s32 == pytest.approx(s64, abs=1e-7)


@pytest.mark.parametrize("y_in_float32", [True, False])
def test_activations(activation_draws, y_in_float32):
    acts, _ = activation_draws
    for (name, f), x in zip(ACTS.items(), acts, strict=True):
        assert x.dtype == np.float32
        y = f(x) if y_in_float32 else f(x.astype(np.float64))
        assert y.dtype == (np.float32 if y_in_float32 else np.float64)
        score = affinity_score_reference(x, y)["score"]
        assert round(score, 3) == ACT_PUBLISHED[name], (name, score)


@pytest.mark.parametrize("y_in_float32", [True, False])
def test_relu_sweep(activation_draws, y_in_float32):
    _, sweep = activation_draws
    scores = []
    for x in sweep:
        y = _relu(x) if y_in_float32 else _relu(x.astype(np.float64))
        scores.append(affinity_score_reference(x, y)["score"])
    for i in SWEEP_ONE:
        assert round(scores[i], 4) == 1.0, (i, scores[i])
    for i, expected in SWEEP_PUBLISHED.items():
        assert round(scores[i], 3) == expected, (i, scores[i])
    for i, printed in SWEEP_NOTEBOOK.items():
        assert scores[i] == pytest.approx(printed, abs=2e-5), (i, scores[i])


def test_relu_sweep_dead_windows(activation_draws):
    _, sweep = activation_draws
    for i in range(5):
        out = affinity_score_reference(sweep[i], _relu(sweep[i]))
        assert out["dead"]
        assert np.all(out["A"] == 0)
        assert out["score"] == 1.0
        assert out["trace_cov_y"] == pytest.approx(1e-6)
    out = affinity_score_reference(sweep[5], _relu(sweep[5]))
    assert not out["dead"]


# --- Internal consistency ----------------------------------------------------------------


def test_ot_dist_default_is_squared_euclidean():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(9, 3))
    direct = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(ot.dist(a, b), direct, atol=1e-12)


def test_w2_lsa_matches_emd():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 2))
    b = rng.normal(size=(200, 2)) * [1.0, 2.0] + [0.5, -1.0]
    emd = w2_squared(a, b, "emd")
    lsa = w2_squared(a, b, "lsa")
    assert emd > 0.1
    assert abs(emd - lsa) < 1e-10


def test_w2_sort_matches_emd_in_1d():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=300), rng.exponential(size=300)
    emd = w2_squared(a, b, "emd")
    assert abs(w2_squared(a, b, "sort") - emd) < 1e-10
    assert abs(w2_squared(a, b, "lsa") - emd) < 1e-10


def _spd_affine(rng, n=500, d=5):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    p = q @ np.diag(rng.uniform(0.5, 3.0, d)) @ q.T
    c = rng.normal(size=d)
    return x, p, c


@pytest.mark.parametrize("w2", ["emd", "lsa"])
def test_psd_affine_image_scores_one(w2):
    x, p, c = _spd_affine(np.random.default_rng(3))
    y = x @ p + c
    # Exactly 1 without ridge (then A = P exactly).
    out = affinity_score_reference(x, y, ridge=0.0, w2=w2)
    assert out["score"] == pytest.approx(1.0, abs=1e-8)
    np.testing.assert_allclose(out["A"], p, atol=1e-10)
    np.testing.assert_allclose(out["b"], c, atol=1e-10)
    # The default ridge adds ridge * I to both covariances, so A = P + O(ridge) and the score
    # is 1 - O(ridge): about 1 - 3e-7 here.
    out = affinity_score_reference(x, y, w2=w2)
    assert 1.0 - 1e-6 < out["score"] <= 1.0


def test_non_psd_linear_map_is_not_affine():
    rng = np.random.default_rng(4)
    x = rng.exponential(size=(300, 3))
    assert affinity_score_reference(x, -x)["score"] < 0.5
    assert affinity_score_reference(x, 2.0 * x)["score"] == pytest.approx(1.0, abs=1e-6)


def test_ledoit_wolf_d_greater_than_n():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 80))
    y = np.maximum(x, 0)
    out = affinity_score_reference(x, y, covariance="ledoit_wolf")
    assert 0.0 <= out["score"] <= 1.0
    assert out["A"].shape == (80, 80)
    assert out["trace_cov_y"] == pytest.approx(np.trace(ledoit_wolf_cov(y, 1e-6)))


def test_pseudo_inverse_keeps_singular_case_in_range():
    # d > n without ridge: the inner matrix is singular; the pseudo-inverse drops its
    # rounding-level eigenvalues (a plain inverse gives a score far below 0 here).
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 80))
    out = affinity_score_reference(x, np.maximum(x, 0), ridge=0.0)
    assert 0.0 <= out["score"] <= 1.0


def test_covariances():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 4))
    xc = x - x.mean(0)
    np.testing.assert_allclose(empirical_cov(x, 0.5), xc.T @ xc / 39 + 0.5 * np.eye(4))
    np.testing.assert_allclose(empirical_cov(x[:, :1], 0.0), [[x[:, 0].var(ddof=1)]])
    assert ledoit_wolf_cov(x, 0.0).shape == (4, 4)


def test_bures_map_and_distance():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(100, 6)) @ rng.normal(size=(6, 6))
    y = np.tanh(x) + 0.1 * rng.normal(size=x.shape)
    out = affinity_score_reference(x, y)
    cx, cy, a = out["cov_x"], out["cov_y"], out["A"]
    np.testing.assert_array_equal(a, a.T)
    assert np.linalg.eigvalsh(a).min() > 0
    np.testing.assert_allclose(a @ cx @ a, cy, atol=1e-10)
    np.testing.assert_allclose(a, bures_map(cx, cy))
    np.testing.assert_allclose(sqrtm_psd(cy) @ sqrtm_psd(cy), cy, atol=1e-12)
    # Gaussian W2: E|T(X) - X|^2 under N(m_x, C_x), and POT's closed form.
    mx, my = out["mean_x"], out["mean_y"]
    e = a - np.eye(6)
    w2_gauss = np.sum((mx @ a + out["b"] - mx) ** 2) + np.trace(e @ cx @ e)
    assert out["bures_w2"] ** 2 == pytest.approx(w2_gauss, rel=1e-10)
    pot = ot.gaussian.bures_wasserstein_distance(mx, my, cx, cy)
    assert out["bures_w2"] == pytest.approx(float(pot), rel=1e-8)
    # Paper property: W2(T x, y) <= sqrt(2 tr C_y), so 0 <= score <= 1.
    assert 0.0 <= out["score"] <= 1.0


def test_shapes_and_dtypes():
    x = np.linspace(-1, 1, 50, dtype=np.float32)
    out = affinity_score_reference(x, x**3)
    assert out["A"].shape == (1, 1) and out["A"].dtype == np.float64
    assert out["b"].shape == (1,)
    out2 = affinity_score_reference(x[:, None], (x**3)[:, None])
    assert out2["score"] == out["score"]
    assert set(out) >= {"score", "w2_squared", "A", "b", "trace_cov_y", "bures_w2"}
