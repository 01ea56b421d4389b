"""The option and solver objects: every registered name, against POT's exact W2 and SciPy.

One table drives each test (``SOLVERS``, ``ASSIGNMENT_SOLVERS``, ``COVARIANCES``), as
optax's tests loop over their optimizers: a solver added to a registry is tested here
without a new line.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
from reference import affinity_score_reference
from scipy.optimize import linear_sum_assignment

import affjax
from affjax import assignment
from affjax import solvers
from affjax.capture import Layer
from affjax.covariance import COVARIANCES
from affjax.layer_scoring import score_layers
from affjax.options import ScoreOptions

CONCRETE_ASSIGNMENT = tuple(s for s in assignment.ASSIGNMENT_SOLVERS if s != "auto")


def _clouds(n: int, d: int, seed: int, dtype=jnp.float64) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return jnp.asarray(x, dtype), jnp.asarray(np.tanh(x) + 0.1 * rng.normal(size=(n, d)), dtype)


def _pot_w2_squared(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = ot.unif(x.shape[0])
    return float(ot.emd2(w, w, ot.dist(x, y)))


@pytest.mark.parametrize("name", solvers.SOLVERS)
@pytest.mark.parametrize("d", [1, 3])
def test_every_solver_name_gives_a_solver_whose_w2_matches_pot(name, d):
    if name == "sort" and d != 1:
        with pytest.raises(ValueError, match="1-D points"):
            solvers.get_solver(name, 40, d)
        return
    x, y = _clouds(40, d, seed=d)
    solver = solvers.get_solver(name, 40, d)
    assert isinstance(solver, solvers.Solver)
    assert solver.name == solvers.resolve_solver(name, 40, d)
    assert hash(solver) == hash(solvers.get_solver(name, 40, d))  # a static jit argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.x = 1
    w2_sq, permutation, converged = jax.jit(lambda a, b: solver.transport(a, b))(x, y)
    expected = _pot_w2_squared(x, y)
    if solver.exact:
        assert abs(float(w2_sq) - expected) < 1e-10 * max(1.0, expected)
        assert bool(converged)
        perm = np.asarray(permutation)
        assert sorted(perm.tolist()) == list(range(40))
    else:  # entropic: above the optimum, by the bias of its epsilon
        assert expected - 1e-6 < float(w2_sq) < expected * 1.2
        assert np.all(np.asarray(permutation) == -1)


@pytest.mark.parametrize("name", CONCRETE_ASSIGNMENT)
def test_every_assignment_solver_object_matches_scipy_on_a_batch(name):
    rng = np.random.default_rng(3)
    costs = rng.random((3, 24, 24))
    solver = assignment.assignment_solver(name)
    assert solver.name == name and isinstance(solver, assignment.AssignmentSolver)
    result = solver.match(jnp.asarray(costs))
    for k in range(3):
        rows, cols = linear_sum_assignment(costs[k])
        optimum = costs[k][rows, cols].sum()
        perm = np.asarray(result.permutation[k])
        assert abs(costs[k][np.arange(24), perm].sum() - optimum) < 1e-9
        assert abs(float(result.cost[k]) - optimum) < 1e-9
        assert float(result.lower_bound[k]) <= optimum + 1e-9
    np.testing.assert_array_equal(np.asarray(result.converged), True)


def test_auto_assignment_solver_is_the_backend_rule():
    expected = "identity_or_scipy" if jax.default_backend() == "cpu" else "auction"
    assert assignment.assignment_solver("auto").name == expected
    assert solvers.get_solver("auto", 64, 8) == solvers.Matching(
        assignment.assignment_solver(expected))


def test_assignment_solver_options_are_checked_where_they_enter():
    assert assignment.assignment_solver("auction", rtol=1e-3).rtol == 1e-3
    with pytest.raises(ValueError, match="rtol is an option of solver='auction', not 'scipy'"):
        assignment.assignment_solver("scipy", rtol=1e-3)
    with pytest.raises(ValueError, match="scale_factor must be > 1"):
        assignment.Auction(scale_factor=1.0)
    with pytest.raises(ValueError, match="max_rounds must be a whole number > 0"):
        assignment.Auction(max_rounds=2.5)
    with pytest.raises(ValueError, match="unknown assignment solver 'munkres'"):
        assignment.assignment_solver("munkres")


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("name", solvers.EXACT_SOLVERS)
def test_options_object_and_keywords_give_the_reference_score(covariance, name):
    d = 1 if name == "sort" else 3
    x, y = _clouds(64, d, seed=11)
    options = ScoreOptions(covariance=covariance, solver=name)
    reference = affinity_score_reference(np.asarray(x), np.asarray(y), covariance=covariance)
    expected = reference["score"]
    by_keywords = float(affjax.affinity_score(x, y, covariance=covariance, solver=name))
    assert abs(by_keywords - expected) < 1e-9
    assert float(affjax.affinity_score(x, y, **dataclasses.asdict(options))) == by_keywords
    layers = [Layer("a", "tanh", x, y)]
    assert float(score_layers(layers, options=options)[0]) == pytest.approx(
        by_keywords, abs=1e-12)


def test_score_options_are_checked_once_and_hashable():
    a, b = ScoreOptions(ridge=1), ScoreOptions(ridge=1.0)
    assert a == b and hash(a) == hash(b) and isinstance(a.ridge, float)
    for bad, message in (({"covariance": "emprical"}, "unknown covariance 'emprical'"),
                         ({"solver": "sorted"}, "unknown solver 'sorted'"),
                         ({"path": "wide"}, "unknown path 'wide'"),
                         ({"ridge": -1.0}, "ridge must be a finite real number >= 0"),
                         ({"ridge": True}, "ridge must be a finite real number >= 0"),
                         ({"sinkhorn_epsilon": float("nan")}, "sinkhorn_epsilon must be")):
        with pytest.raises(ValueError, match=message):
            ScoreOptions(**bad)
    with pytest.raises(TypeError, match="unknown option 'solvr'"):
        affjax.affinity_score(jnp.ones((4, 2)), jnp.ones((4, 2)), solvr="scipy")


def test_options_are_given_as_an_object_or_as_keywords_not_both():
    x = jax.random.normal(jax.random.key(0), (32, 3))
    layers = [Layer("a", "tanh", x, jnp.tanh(x))]
    with pytest.raises(ValueError, match="either as options= or as solver=, not both"):
        score_layers(layers, options=ScoreOptions(), solver="scipy")
    with pytest.raises(TypeError, match="options must be an affjax.ScoreOptions"):
        score_layers(layers, options={"solver": "scipy"})
    with pytest.raises(TypeError, match="unexpected keywords"):
        score_layers(layers, ridg=1e-6)


def test_the_command_line_offers_exactly_the_registered_names():
    # The command keeps its choices literal (its --help needs no solver import): they
    # must stay the registries' names.
    import argparse

    from affjax import cli

    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices = {a.dest: tuple(a.choices) for a in commands.choices["signature"]._actions
               if a.choices}
    assert choices["solver"] == assignment.ASSIGNMENT_SOLVERS
    assert choices["covariance"] == COVARIANCES
