"""Property tests (hypothesis) of the affinity score."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import affjax
from affjax.covariance import COVARIANCES
from affjax.layer_scoring import ASSIGNMENT_SOLVERS

SETTINGS = settings(max_examples=25, deadline=None)
ACTIVATIONS = {
    "relu": lambda v: np.maximum(v, 0),
    "tanh": np.tanh,
    "cube": lambda v: v**3,
    "abs": np.abs,
    "sin": lambda v: np.sin(3 * v),
}


@st.composite
def samples(draw, max_d=6):
    n = draw(st.integers(8, 60))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale + rng.normal(size=d)
    act = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]
    return x, act(x), rng


@SETTINGS
@given(samples(), st.sampled_from(COVARIANCES))
def test_score_in_unit_interval(data, covariance):
    x, y, _ = data
    score = float(affjax.affinity_score(x, y, covariance=covariance))
    assert 0.0 <= score <= 1.0


@SETTINGS
@given(samples())
def test_score_is_one_for_psd_affine_maps(data):
    x, _, rng = data
    d = x.shape[1]
    b = rng.normal(size=(d, d))
    p = b @ b.T + 0.5 * np.eye(d)
    y = x @ p + rng.normal(size=d)
    # Exactly 1 without the ridge; the ridge perturbs A by O(ridge / variance).
    assert abs(float(affjax.affinity_score(x, y, ridge=0.0)) - 1.0) < 1e-7


@SETTINGS
@given(samples(), st.floats(-50, 50), st.floats(-50, 50), st.floats(0.05, 20.0))
def test_invariances(data, shift_x, shift_y, scale_x):
    x, y, _ = data
    base = float(affjax.affinity_score(x, y, ridge=0.0))
    assert abs(float(affjax.affinity_score(x + shift_x, y, ridge=0.0)) - base) < 1e-7
    assert abs(float(affjax.affinity_score(x, y + shift_y, ridge=0.0)) - base) < 1e-7
    assert abs(float(affjax.affinity_score(scale_x * x, y, ridge=0.0)) - base) < 1e-7


@SETTINGS
@given(samples(max_d=1))
def test_sort_path_equals_assignment_path(data):
    x, y, _ = data
    sort = float(affjax.affinity_score(x, y, solver="sort"))
    for solver in ASSIGNMENT_SOLVERS:
        assert abs(float(affjax.affinity_score(x, y, solver=solver)) - sort) < 1e-10


def test_constant_output_without_ridge_scores_one():
    # Found by test_invariances: trace C_y = 0 gave 0 / 0. The dead map is exact there.
    x = -1.3 + 0.05 * np.random.default_rng(0).normal(size=(8, 1))
    y = np.maximum(x, 0.0)
    assert float(affjax.affinity_score(x, y, ridge=0.0)) == 1.0
    assert float(affjax.affinity_score(x + 3.0, y + 2.0, ridge=0.0)) == 1.0
    y2 = np.zeros((8, 3))
    x2 = np.random.default_rng(1).normal(size=(8, 3))
    assert float(affjax.affinity_score(x2, y2, ridge=0.0)) == 1.0
