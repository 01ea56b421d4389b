"""affinity / affinity_score against the float64 reference, in float64 and float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from cases import KINDS
from cases import make_case
from reference import affinity_score_reference

import affjax
from affjax.covariance import COVARIANCES
from affjax.layer_scoring import ASSIGNMENT_SOLVERS
from affjax.transport import EXACT_SOLVERS

SHAPES = [(300, 1), (400, 7), (256, 64), (100, 150), (40, 300)]  # includes d > n, d > 2n


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_float64_matches_reference(kind, n, d, covariance):
    x, y = make_case(kind, n, d, seed=n + d)
    ref = affinity_score_reference(x, y, covariance=covariance, w2="lsa")
    res = affjax.affinity(x, y, covariance=covariance)
    assert res.score.dtype == jnp.float64
    assert abs(float(res.score) - ref["score"]) < 1e-5
    assert abs(float(res.w2) ** 2 - ref["w2_squared"]) < 1e-5 * max(1.0, ref["w2_squared"])
    assert abs(float(res.trace_cov_y) - ref["trace_cov_y"]) < 1e-8 * ref["trace_cov_y"]
    assert bool(res.dead) == ref["dead"]
    np.testing.assert_allclose(float(res.bures_w2), ref["bures_w2"], rtol=1e-5, atol=1e-6)
    if kind not in ("constant_input_cols", "low_rank") and d <= n:
        # A is unique where C_x is well conditioned; elsewhere only A's action on the data is.
        np.testing.assert_allclose(np.asarray(res.A), ref["A"], atol=1e-6 * np.abs(ref["A"]).max())
    mapped = x @ np.asarray(res.A) + np.asarray(res.b)
    np.testing.assert_allclose(mapped, x @ ref["A"] + ref["b"], atol=1e-5 * (1 + np.abs(y).max()))


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, d", [(300, 1), (512, 64), (600, 300)])
def test_float32_within_1e3_when_n_at_least_2d(kind, n, d, covariance):
    x, y = make_case(kind, n, d, seed=7, scale=10.0)
    ref = affinity_score_reference(x, y, covariance=covariance, w2="lsa")
    score = affjax.affinity_score(x.astype(np.float32), y.astype(np.float32),
                                  covariance=covariance)
    assert score.dtype == jnp.float32
    assert abs(float(score) - ref["score"]) < 1e-3


@pytest.mark.parametrize("kind", ["relu", "dead_units", "low_rank"])
def test_float32_wide_layers_measured(kind):
    # d > n: no bound is promised in float32, docs/numerics.md records the measured error;
    # this keeps it from regressing (measured at most a few 1e-6).
    x, y = make_case(kind, 48, 640, seed=3, scale=10.0)
    ref = affinity_score_reference(x, y, w2="lsa")
    score = affjax.affinity_score(x.astype(np.float32), y.astype(np.float32))
    assert abs(float(score) - ref["score"]) < 1e-4


def test_large_float64_and_float32():
    # The top of the promised range: n = 4096, d = 2048 (float32 bound applies, n >= 2d).
    x, y = make_case("relu", 4096, 2048, seed=11)
    ref = affinity_score_reference(x, y, w2="lsa")
    assert abs(float(affjax.affinity_score(x, y)) - ref["score"]) < 1e-5
    s32 = affjax.affinity_score(x.astype(np.float32), y.astype(np.float32))
    assert abs(float(s32) - ref["score"]) < 1e-3


def test_w2_matches_pot_emd2():
    x, y = make_case("tanh", 200, 5, seed=1)
    res = affjax.affinity(x, y)
    mapped = x @ np.asarray(res.A) + np.asarray(res.b)
    w = ot.unif(200)
    emd = ot.emd2(w, w, ot.dist(mapped, y), numItermax=10_000_000)
    assert abs(float(res.w2) ** 2 - emd) < 1e-9 * max(1.0, emd)
    assert abs(float(affjax.exact_w2(mapped, y)) ** 2 - emd) < 1e-9 * max(1.0, emd)


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("kind", ["relu", "dead_units", "psd_affine", "low_rank", "all_dead"])
@pytest.mark.parametrize("n, d", [(30, 100), (50, 101), (64, 128)])
def test_span_path_equals_dense_path(kind, n, d, covariance):
    x, y = make_case(kind, n, d, seed=5)
    dense = affjax.affinity(x, y, covariance=covariance, path="dense")
    span = affjax.affinity(x, y, covariance=covariance, path="span")
    assert abs(float(dense.score) - float(span.score)) < 1e-8
    assert abs(float(dense.bures_w2) - float(span.bures_w2)) < 1e-6 * (1 + float(dense.bures_w2))
    # Same map on the data (A itself may differ outside the span of the samples).
    np.testing.assert_allclose(x @ np.asarray(span.A), x @ np.asarray(dense.A),
                               atol=1e-6 * (1 + np.abs(y).max()))


@pytest.mark.parametrize("path", ["dense", "span"])
@pytest.mark.parametrize("n, d", [(20, 30), (10, 30)])  # d <= 2n and d > 2n
def test_map_off_the_samples_span(n, d, path):
    # docs/numerics.md "The map off the samples' span": y = 2x + 1 gives A = 2 on the span
    # of the centred samples in any dtype; off it A = sqrt(c_y / c_x) = 1 (ridge over ridge)
    # in float64, while in float32 the pseudo-inverse cutoff removes those directions (on
    # the dense path A is about 0 there). The mapped samples never depend on that block.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    q, _ = np.linalg.qr((x - x.mean(0)).T)
    q = q[:, : n - 1]  # n centred samples span n - 1 dimensions
    off = np.eye(d) - q @ q.T
    maps = {}
    for dtype in (np.float64, np.float32):
        res = affjax.affinity(x.astype(dtype), (2.0 * x + 1.0).astype(dtype), path=path)
        a = np.asarray(res.A, np.float64)
        np.testing.assert_allclose(q.T @ a @ q, 2.0 * np.eye(n - 1), atol=1e-3)
        assert abs(float(res.score) - 1.0) < 1e-5
        maps[dtype] = a
    np.testing.assert_allclose(off @ maps[np.float64] @ off, off, atol=1e-6)
    if path == "dense":
        np.testing.assert_allclose(off @ maps[np.float32] @ off, 0.0, atol=1e-3)
    xc = x - x.mean(0)
    np.testing.assert_allclose(xc @ maps[np.float32], xc @ maps[np.float64], atol=1e-3)


def test_ridge_zero_wide_uses_pseudo_inverse():
    # METHOD.md: with d > n and no ridge the inner matrix is singular; the pseudo-inverse gives
    # a score in [0, 1] (an inverse would give a large negative one).
    x, y = make_case("relu", 40, 90, seed=2)
    ref = affinity_score_reference(x, y, ridge=0.0, w2="lsa")
    for path in ("dense", "span"):
        score = float(affjax.affinity_score(x, y, ridge=0.0, path=path))
        assert 0.0 <= score <= 1.0
        assert abs(score - ref["score"]) < 1e-5


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("n, d, path", [(60, 5, "span"), (10, 30, "auto"), (8, 40, "span")])
def test_ridge_zero_map_on_the_span_path(n, d, path, covariance):
    # Off the span the map was sqrt(0 / 0): every entry of A and b NaN with ridge = 0 (the
    # score was right). The published pseudo-inverse gives 0 there.
    x, y = make_case("tanh", n, d, seed=5)
    got = affjax.affinity(x, y, ridge=0.0, path=path, covariance=covariance)
    ref = affinity_score_reference(x, y, ridge=0.0, covariance=covariance, w2="lsa")
    np.testing.assert_allclose(np.asarray(got.A), ref["A"], atol=1e-7)
    np.testing.assert_allclose(np.asarray(got.b), ref["b"], atol=1e-7)
    assert abs(float(got.score) - ref["score"]) < 1e-6


def test_psd_affine_map_scores_one_and_recovers_the_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 5))
    p = rng.normal(size=(5, 5))
    p = p @ p.T + 0.5 * np.eye(5)
    res = affjax.affinity(x, x @ p + 2.0, ridge=0.0)
    assert abs(float(res.score) - 1.0) < 1e-9
    np.testing.assert_allclose(np.asarray(res.A), p, atol=1e-9)
    np.testing.assert_allclose(np.asarray(res.b), 2.0, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(res.permutation), np.arange(500))


@pytest.mark.parametrize("solver", ASSIGNMENT_SOLVERS)
def test_exact_solvers_agree(solver):
    x, y = make_case("tanh", 128, 3, seed=4)
    base = affjax.affinity(x, y, solver="scipy")
    res = affjax.affinity(x, y, solver=solver)
    assert abs(float(res.score) - float(base.score)) < 1e-12
    sort_x, sort_y = x[:, :1], y[:, :1]
    one_d = [float(affjax.affinity_score(sort_x, sort_y, solver=s))
             for s in EXACT_SOLVERS]
    np.testing.assert_allclose(one_d, one_d[0], atol=1e-12)


def test_sinkhorn_is_close_and_biased_low():
    x, y = make_case("relu", 256, 8, seed=6)
    exact = float(affjax.affinity_score(x, y))
    entropic = float(affjax.affinity_score(x, y, solver="sinkhorn"))
    # Entropic plans cost more than the optimal one: the score can only drop.
    assert entropic <= exact + 1e-9
    assert exact - entropic < 0.05


def test_jit_and_vmap():
    xs = np.stack([make_case("relu", 64, 4, seed=s)[0] for s in range(3)])
    ys = np.maximum(xs, 0)
    loop = np.array([float(affjax.affinity_score(a, b)) for a, b in zip(xs, ys, strict=True)])
    for solver in ASSIGNMENT_SOLVERS:
        f = jax.vmap(lambda a, b, s=solver: affjax.affinity_score(a, b, solver=s))
        np.testing.assert_allclose(np.asarray(f(xs, ys)), loop, atol=1e-12)
        np.testing.assert_allclose(np.asarray(jax.jit(f)(xs, ys)), loop, atol=1e-12)
    results = jax.vmap(affjax.affinity)(xs, ys)
    assert results.A.shape == (3, 4, 4)
    np.testing.assert_allclose(np.asarray(results.score), loop, atol=1e-12)


def test_nan_input_gives_nan_and_check_raises():
    x, y = make_case("relu", 50, 3)
    x[7, 1] = np.nan
    assert np.isnan(float(affjax.affinity_score(x, y)))
    assert np.isnan(float(affjax.affinity_score(x[:, 1], y[:, 1])))
    with pytest.raises(ValueError, match=r"x has 1 non-finite values.*row 7"):
        affjax.affinity_score(x, y, check=True)
    y[3, 0] = np.inf
    with pytest.raises(ValueError, match="y has 1 non-finite"):
        affjax.affinity_score(np.nan_to_num(x), y, check=True)


def test_check_raises_when_float32_overflows():
    # Finite float32 inputs near 1e19 square to inf in the covariances: NaN, and check=True
    # said nothing about it.
    x, _ = make_case("relu", 200, 5)
    x = x.astype(np.float32)
    big = x * np.float32(1e19)
    assert np.isnan(float(affjax.affinity_score(big, np.maximum(big, 0))))
    for fn in (affjax.affinity_score, lambda a, b, **k: affjax.affinity(a, b, **k).score):
        with pytest.raises(ValueError, match=r"overflow float32.*float64"):
            fn(big, np.maximum(big, 0), check=True)
    fine = x * np.float32(1e15)  # still representable: same score as at scale 1
    np.testing.assert_allclose(
        float(affjax.affinity_score(fine, np.maximum(fine, 0), check=True)),
        float(affjax.affinity_score(x, np.maximum(x, 0))), atol=1e-4)


def test_check_under_jit_explains():
    x, y = make_case("relu", 20, 2)
    with pytest.raises(ValueError, match="needs concrete arrays"):
        jax.jit(lambda a, b: affjax.affinity_score(a, b, check=True))(x, y)


@pytest.mark.parametrize(
    "x, y, error, match",
    [
        (np.zeros((5, 2)), np.zeros((5, 3)), ValueError, r"same shape.*\(5, 2\).*\(5, 3\)"),
        (np.zeros((5, 2)), np.zeros((6, 2)), ValueError, r"same shape.*\(6, 2\)"),
        (np.zeros((1, 2)), np.zeros((1, 2)), ValueError, "at least 2 samples"),
        (np.zeros((5, 0)), np.zeros((5, 0)), ValueError, r"at least 1 feature.*\(5, 0\)"),
        (np.zeros((4, 2, 2)), np.zeros((4, 2, 2)), ValueError, r"shape \(n, d\).*\(4, 2, 2\)"),
        (np.zeros(()), np.zeros(()), ValueError, r"shape \(n, d\)"),
        (np.zeros((5, 2), np.int32), np.zeros((5, 2)), TypeError, "x must be a floating.*int32"),
        (np.zeros((5, 2)), np.zeros((5, 2), bool), TypeError, "y must be a floating.*bool"),
    ],
)
def test_bad_input(x, y, error, match):
    with pytest.raises(error, match=match):
        affjax.affinity_score(x, y)
    with pytest.raises(error, match=match):
        affjax.affinity(x, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"covariance": "shrunk"}, "unknown covariance 'shrunk'"),
        ({"solver": "lp"}, "unknown solver 'lp'"),
        ({"solver": "sort"}, "'sort' needs 1-D points, got d=2"),
        ({"path": "sparse"}, "unknown path 'sparse'"),
        ({"ridge": -1.0}, "ridge must be a finite real number >= 0"),
    ],
)
def test_bad_options(kwargs, match):
    x, y = make_case("relu", 10, 2)
    with pytest.raises(ValueError, match=match):
        affjax.affinity_score(x, y, **kwargs)


def test_dtypes():
    x, y = make_case("relu", 50, 3)
    assert affjax.affinity_score(x.astype(np.float32), y.astype(np.float32)).dtype == jnp.float32
    assert affjax.affinity_score(x, y).dtype == jnp.float64
    half = affjax.affinity_score(x.astype(np.float16), y.astype(np.float16))
    assert half.dtype == jnp.float32
    assert abs(float(half) - float(affjax.affinity_score(x, y))) < 5e-3
    # bfloat16 is not an np.floating subtype; it is accepted all the same, as a JAX array or
    # a NumPy (ml_dtypes) array, and scored in float32 like the data rounded to it.
    xb, yb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    want = affjax.affinity_score(xb.astype(jnp.float32), yb.astype(jnp.float32))
    for a, b in ((xb, yb), (np.asarray(xb), np.asarray(yb))):
        got = affjax.affinity_score(a, b)
        assert got.dtype == jnp.float32
        assert float(got) == float(want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dead_but_varying_output_matches_reference(dtype):
    # tr C_y <= 2 ridge d although y is not constant: A = 0, every matching costs the same and
    # the assignment is skipped; the score must still be the matched definition's (about 0.62).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 30))
    y = 0.5 + 1e-3 * np.tanh(x)  # per-unit variance about 4e-7, below the ridge 1e-6
    ref = affinity_score_reference(x, y, w2="lsa")
    assert ref["dead"] and 0.5 < ref["score"] < 0.8
    res = affjax.affinity(x.astype(dtype), y.astype(dtype))
    assert bool(res.dead)
    tol = 1e-6 if dtype == np.float64 else 1e-3
    assert abs(float(res.score) - ref["score"]) < tol
    assert abs(float(res.w2) ** 2 - ref["w2_squared"]) < tol * ref["w2_squared"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("value", [1.1, 0.7, 3e5])
@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_constant_nonzero_output_scores_one(dtype, value, ridge):
    # A float sum of n equal values is not n times the value; centring must still give exact
    # zeros, or rounding noise poses as a (tiny) covariance: with ridge 0 it scored 0.06.
    x = np.random.default_rng(0).standard_normal((37, 3)).astype(dtype)
    y = np.full_like(x, value)
    res = affjax.affinity(x, y, ridge=ridge)
    assert float(res.score) == 1.0
    assert float(res.trace_cov_y) == pytest.approx(ridge * 3, rel=1e-6, abs=1e-30)
    np.testing.assert_array_equal(np.asarray(res.b), np.full(3, value, dtype))


def test_cholesky_hint_counts_the_coordinates_the_score_uses():
    # 16 samples in 4 dimensions: even on the span path the basis keeps 4 coordinates, which
    # 15 centred samples fill, so no eigenvalue of C_y is known and Cholesky is not ruled out.
    from affjax.score import cholesky_hopeless_for

    y = jax.nn.relu(30.0 * jax.random.normal(jax.random.key(0), (16, 4), jnp.float32))
    for path in ("auto", "dense", "span"):
        assert not bool(cholesky_hopeless_for(y, path=path))
    wide = jax.nn.relu(30.0 * jax.random.normal(jax.random.key(0), (16, 40), jnp.float32))
    for path in ("auto", "dense", "span"):
        assert bool(cholesky_hopeless_for(wide, path=path))
    np.testing.assert_allclose(float(affjax.affinity_score(y, y, path="span")),
                               float(affjax.affinity_score(y, y, path="dense")), atol=1e-5)


def test_constant_output_with_zero_ridge_keeps_the_closed_form():
    # C_y = 0: the map is A = 0 (dead), and the Bures distance is |m_x - m_y|^2 + tr C_x.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4))
    y = np.full((30, 4), 0.25)
    res = affjax.affinity(x, y, ridge=0.0)
    expected = np.sum((x.mean(0) - 0.25) ** 2) + np.trace(np.cov(x.T))
    assert float(res.score) == 1.0 and bool(res.dead)
    assert float(res.bures_w2) ** 2 == pytest.approx(expected, rel=1e-10)
    grad = jax.grad(lambda x: affjax.affinity_score(x, jnp.tanh(0.0 * x) + 0.25, ridge=0.0))(
        jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(grad)))
