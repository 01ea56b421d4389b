"""linear_assignment against SciPy: optimality, certificates, batching, degenerate and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import affjax
from affjax import _matching
from affjax import assignment
from affjax.transport import squared_distances

SOLVERS = tuple(s for s in assignment.ASSIGNMENT_SOLVERS if s != "auto")
# The solvers with the on-device certificate of the identity.
CERTIFYING = ("auction", "identity_or_scipy")


def _optimum(c: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(c)
    return float(np.asarray(c, np.float64)[rows, cols].sum())


def _check_certified(c: np.ndarray, r: assignment.AssignmentResult, rtol: float) -> None:
    """A permutation whose cost is the optimum within rtol, bracketed by the certificate."""
    c64 = np.asarray(c, np.float64)
    n = c64.shape[0]
    perm = np.asarray(r.permutation)
    assert perm.dtype == np.int32 and sorted(perm.tolist()) == list(range(n))
    opt = _optimum(c64)
    cost = float(c64[np.arange(n), perm].sum())
    # The sums themselves round: allow n * eps of the matched entries' magnitude.
    rounding = 4 * n * np.finfo(np.asarray(r.cost).dtype).eps * float(np.abs(c64).max())
    assert cost <= opt + rtol * abs(opt) + rounding, (cost, opt)
    assert abs(float(r.cost) - cost) <= rounding + 1e-12 * abs(cost)
    assert float(r.lower_bound) <= opt + rounding, (float(r.lower_bound), opt)
    assert float(r.lower_bound) <= float(r.cost)
    assert bool(r.converged)


def _score_costs(n: int, d: int, seed: int, kind: str) -> np.ndarray:
    """Cost matrices of the score's exact W2 (the affine map fitted by affjax.affinity)."""
    rng = np.random.default_rng(seed)
    if kind == "rank4":
        x = rng.normal(size=(n, 4)) @ rng.normal(size=(4, d))
        y = np.maximum(x, 0)
    elif kind == "dead":
        x = rng.normal(size=(n, d))
        y = np.maximum(x - 1.5, 0)
    elif kind == "clustered":
        centres = 3 * rng.normal(size=(6, d))
        x = centres[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, d))
        y = np.asarray(jax.nn.gelu(x))
    else:
        x = rng.normal(size=(n, d))
        y = np.tanh(x)
    r = affjax.affinity(x, y, solver="scipy")
    mapped = x @ np.asarray(r.A).T + np.asarray(r.b)
    return np.asarray(squared_distances(jnp.asarray(mapped), jnp.asarray(y)))


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("n", [2, 3, 5, 17, 64, 200])
def test_random_matrices_match_scipy(n, x64):
    dtype = np.float64 if x64 else np.float32
    rtol = assignment.default_rtol(dtype)
    rng = np.random.default_rng(n)
    for c in (rng.random((n, n)), rng.normal(size=(n, n)) * 1e3,
              rng.integers(0, 4, (n, n)).astype(float),  # many ties
              rng.exponential(size=(n, 1)) + rng.exponential(size=(1, n))):  # all ties
        c = c.astype(dtype)
        _check_certified(c, affjax.linear_assignment(c, solver="auction"), rtol)


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["rank4", "dead", "clustered", "tanh"])
def test_score_cost_matrices_match_scipy(kind, x64):
    c = _score_costs(256, 16, 0, kind)
    dtype = np.float64 if x64 else np.float32
    c = c.astype(dtype)
    for solver in CERTIFYING:
        r = affjax.linear_assignment(c, solver=solver)
        _check_certified(c, r, assignment.default_rtol(dtype))


def test_a_large_matrix_matches_scipy():
    rng = np.random.default_rng(7)
    c = rng.random((1024, 1024))
    _check_certified(c, affjax.linear_assignment(c, solver="auction"), 1e-9)


@pytest.mark.parametrize("solver", CERTIFYING)
def test_identity_is_certified_without_an_auction(solver, monkeypatch):
    c = _score_costs(128, 8, 1, "tanh")
    calls = []
    host = _matching._scipy_host
    monkeypatch.setattr(_matching, "_scipy_host", lambda c: calls.append(1) or host(c))
    r = affjax.linear_assignment(c, solver=solver)
    assert bool(r.certified_candidate) and int(r.rounds) == 0
    assert np.asarray(r.permutation).tolist() == list(range(128))
    assert float(r.lower_bound) == float(r.cost)
    assert not calls
    # Off the identity: the same matrix with its columns shuffled needs the auction, or
    # SciPy (and SciPy only then).
    perm = np.random.default_rng(0).permutation(128)
    r2 = affjax.linear_assignment(c[:, perm], solver=solver)
    assert not bool(r2.certified_candidate) and (int(r2.rounds) > 0) == (solver == "auction")
    np.testing.assert_array_equal(perm[np.asarray(r2.permutation)], np.arange(128))
    assert len(calls) == (solver == "identity_or_scipy")


def test_identity_or_scipy_calls_scipy_only_for_the_uncertified_matrices(monkeypatch):
    c = _score_costs(64, 4, 2, "tanh")
    rng = np.random.default_rng(1)
    shuffled = c[:, rng.permutation(64)]
    batch = np.stack([c, shuffled, c, shuffled[::-1]])
    seen = []
    host = _matching._scipy_host
    monkeypatch.setattr(_matching, "_scipy_host",
                        lambda m: seen.append(np.asarray(m).shape) or host(m))
    r = affjax.linear_assignment(batch, solver="identity_or_scipy")
    assert seen == [(64, 64), (64, 64)]
    assert np.asarray(r.certified_candidate).tolist() == [True, False, True, False]
    for k in range(4):
        _check_certified(batch[k], jax.tree.map(lambda a, k=k: a[k], r), 1e-12)


@pytest.mark.parametrize("backend, expected", [("cpu", "identity_or_scipy"),
                                               ("gpu", "auction"), ("tpu", "auction")])
def test_auto_is_the_certificate_and_scipy_on_cpu_and_the_auction_elsewhere(
        monkeypatch, backend, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert assignment.resolve_assignment_solver("auto") == expected
    for n in (2, 64, 1024, 8192):
        assert affjax.transport.resolve_solver("auto", n, 8) == expected
        assert affjax.transport.resolve_solver("auto", n, 1) == "sort"
    assert affjax.transport.resolve_solver("hungarian", 64, 8) == "hungarian"


@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_solvers_agree_and_report_their_cost(solver):
    rng = np.random.default_rng(3)
    c = rng.random((40, 40))
    r = affjax.linear_assignment(c, solver=solver)
    _check_certified(c, r, 1e-9)
    if solver != "auction":
        assert float(r.lower_bound) == float(r.cost)
    assert not bool(r.certified_candidate)  # a random matrix: the identity is not optimal


@pytest.mark.parametrize("solver", CERTIFYING)
def test_batch_jit_and_vmap_equal_one_at_a_time(solver):
    rng = np.random.default_rng(5)
    cs = rng.random((4, 30, 30))
    cs[1] += 10 * np.eye(30)[::-1]  # one matrix certified by its row minima
    solve = jax.tree_util.Partial(affjax.linear_assignment, solver=solver)
    one = [solve(c) for c in cs]
    batched = solve(cs)
    jitted = jax.jit(solve)(cs)
    vmapped = jax.jit(jax.vmap(solve))(cs)
    for out in (batched, jitted, vmapped):
        assert out.permutation.shape == (4, 30)
        for k, r in enumerate(one):
            np.testing.assert_allclose(float(out.cost[k]), float(r.cost), rtol=1e-12)
            _check_certified(cs[k], jax.tree.map(lambda a, k=k: a[k], out), 1e-9)


@pytest.mark.parametrize("solver", CERTIFYING)
def test_cost_gradient_is_the_matching(solver):
    c = jnp.asarray(np.random.default_rng(2).random((6, 6)), jnp.float32)
    r = affjax.linear_assignment(c, solver=solver)
    g = jax.grad(lambda c: affjax.linear_assignment(c, solver=solver).cost)(c)
    expected = np.zeros((6, 6), np.float32)
    expected[np.arange(6), np.asarray(r.permutation)] = 1.0
    np.testing.assert_array_equal(np.asarray(g), expected)


@pytest.mark.parametrize("scale", [1e-300, 1e-30, 1.0, 1e30, 1e300])
def test_tiny_and_huge_scales(scale):
    c = np.random.default_rng(4).random((50, 50)) * scale
    r = affjax.linear_assignment(c, solver="auction")
    assert sorted(np.asarray(r.permutation).tolist()) == list(range(50))
    base = affjax.linear_assignment(c / scale, solver="auction")
    np.testing.assert_array_equal(np.asarray(r.permutation), np.asarray(base.permutation))
    assert bool(r.converged)


@pytest.mark.parametrize("c", [
    np.zeros((7, 7)), np.full((7, 7), 3.5), np.ones((1, 1)), np.eye(2)[::-1],
    np.tile(np.arange(7.0), (7, 1)),  # constant columns: every matching costs the same
], ids=["zeros", "constant", "n1", "n2", "constant-columns"])
def test_degenerate_matrices_terminate_certified(c):
    for solver in CERTIFYING:
        _check_certified(c, affjax.linear_assignment(c, solver=solver), 1e-9)


def test_duplicated_points_and_dead_layer_scores():
    x = np.random.default_rng(0).normal(size=(64, 4))
    x[32:] = x[:32]  # every point twice
    for y in (np.maximum(x, 0), np.zeros_like(x)):
        a = affjax.affinity_score(x, y, solver="auction")
        b = affjax.affinity_score(x, y, solver="scipy")
        np.testing.assert_allclose(float(a), float(b), atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_costs(bad):
    c = np.random.default_rng(0).random((5, 5))
    c[2, 3] = bad
    for solver in SOLVERS:
        r = affjax.linear_assignment(c, solver=solver)
        assert np.isnan(float(r.lower_bound)) and not bool(r.converged), solver
        if solver in CERTIFYING:
            assert np.asarray(r.permutation).tolist() == list(range(5))
    x = np.random.default_rng(1).normal(size=(16, 2))
    y = np.tanh(x)
    y[3, 1] = bad
    assert np.isnan(float(affjax.affinity_score(x, y, solver="auction")))
    with pytest.raises(ValueError, match="non-finite"):
        affjax.affinity_score(x, y, solver="auction", check=True)


def test_a_capped_run_reports_its_true_gap():
    c = np.random.default_rng(9).random((60, 60))
    opt = _optimum(c)
    r = affjax.linear_assignment(c, solver="auction", max_rounds=2)
    perm = np.asarray(r.permutation)
    assert sorted(perm.tolist()) == list(range(60))
    assert not bool(r.converged)
    assert float(r.lower_bound) <= opt <= float(r.cost)
    assert float(r.cost) == pytest.approx(c[np.arange(60), perm].sum(), rel=1e-12)
    # The score of a capped auction is NaN, never a number off by its gap.
    x = jnp.asarray(np.random.default_rng(2).normal(size=(40, 3)))
    fit = affjax.score.fit_map(x, jax.nn.relu(x), covariance="empirical", ridge=1e-6)
    w2 = affjax.score.matched_w2_squared(fit.mapped, fit.target, jnp.arange(40))
    assert np.isnan(float(affjax.score.score_from_w2(w2, fit.trace_cov_y, True, False)))


def test_bad_input_is_named():
    c = np.ones((3, 3))
    with pytest.raises(ValueError, match=r"square matrix \(n, n\) or a batch \(B, n, n\), got "
                                         r"shape \(3, 4\)"):
        affjax.linear_assignment(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        affjax.linear_assignment(np.ones(3))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 2, 2\)"):
        affjax.linear_assignment(np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="at least one row"):
        affjax.linear_assignment(np.ones((0, 0)))
    with pytest.raises(TypeError, match="cost must be a real-valued"):
        affjax.linear_assignment(np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="unknown assignment solver 'lapjv'"):
        affjax.linear_assignment(c, solver="lapjv")
    for kwargs, match in ((dict(rtol=0.0), "rtol must be a number > 0"),
                          (dict(rtol=float("nan")), "rtol must be a number > 0"),
                          (dict(max_rounds=2.5), "max_rounds must be a whole number > 0"),
                          (dict(max_rounds=True), "max_rounds must be a whole number > 0"),
                          (dict(block_rows=0), "block_rows must be a whole number > 0"),
                          (dict(scale_factor=1.0), "scale_factor must be > 1")):
        with pytest.raises(ValueError, match=match):
            affjax.linear_assignment(c, solver="auction", **kwargs)
    with pytest.raises(ValueError, match="rtol is an option of solver='auction', not 'scipy'"):
        affjax.linear_assignment(c, solver="scipy", rtol=1e-3)
    with pytest.raises(ValueError, match="max_rounds is an option of solver='auction', not "
                                         "'identity_or_scipy'"):
        affjax.linear_assignment(c, solver="identity_or_scipy", max_rounds=10)
    with pytest.raises(ValueError, match="potential_iterations must be a whole number > 0"):
        affjax.linear_assignment(c, solver="identity_or_scipy", potential_iterations=0)


def test_integer_and_half_costs_are_solved_in_float():
    c = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    for arr in (c, c.astype(np.float16), jnp.asarray(c, jnp.bfloat16)):
        r = affjax.linear_assignment(arr)
        assert np.asarray(r.permutation).tolist() == [1, 0, 2]
        assert float(r.cost) == 5.0


def test_no_host_callback_in_a_jitted_signature():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = affjax.Activation(jax.nn.relu)(nn.Dense(8)(x))
            x = affjax.Activation(jnp.tanh)(nn.Dense(8)(x))
            return affjax.Activation(jax.nn.gelu)(nn.Dense(4)(x))

    x = jax.random.normal(jax.random.key(0), (64, 3))
    model = MLP()
    v = model.init(jax.random.key(1), x)
    def lowered(fn, backend):
        # What "auto" resolves to, and how batches run, follow the default backend: the
        # program an accelerator would run is lowered here with the backend patched.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(jax, "default_backend", lambda: backend)
            return jax.jit(fn).lower(v, x).as_text()

    for solver, backend, callback in (("auto", "gpu", False), ("auto", "tpu", False),
                                      ("auction", "cpu", False), ("auto", "cpu", True),
                                      ("identity_or_scipy", "cpu", True),
                                      ("scipy", "cpu", True)):
        hlo = lowered(lambda v, x, s=solver: affjax.signature_scores(model, v, x, solver=s),
                      backend)
        assert ("callback" in hlo) == callback, (solver, backend)
    a = affjax.signature_scores(model, v, x, solver="auction")
    for solver in ("scipy", "identity_or_scipy"):
        b = affjax.signature_scores(model, v, x, solver=solver)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # A training step with the regularizer: value and gradient, no callback either.
    from affjax import regularizers

    def step(v, x, solver="auto"):
        return jax.value_and_grad(lambda v: regularizers.target_penalty(
            model, v, x, target=0.5, weight=1.0, solver=solver))(v)

    assert "callback" not in lowered(step, "gpu")
    loss, grads = jax.jit(step, static_argnames="solver")(v, x, solver="auction")
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_check_names_an_uncertified_auction(monkeypatch):
    monkeypatch.setattr(assignment, "default_max_rounds", lambda n: 1)
    x = np.random.default_rng(0).normal(size=(97, 3))  # a shape used nowhere else
    y = np.maximum(x - 0.5, 0.0)
    fit = affjax.score.fit_map(jnp.asarray(x), jnp.asarray(y), covariance="empirical",
                               ridge=1e-6)
    cost = affjax.score.assignment_cost(fit.mapped, fit.target, fit.dead)
    assert not bool(affjax.linear_assignment(cost, solver="auction").converged)  # capped
    assert np.isnan(float(affjax.affinity_score(x, y, solver="auction")))
    with pytest.raises(ValueError, match="'auction' assignment reached its round cap"):
        affjax.affinity_score(x, y, solver="auction", check=True)
