"""The affinity score as a training regularizer: values, gradients, jit, training effect."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

import affjax
from affjax import regularizers
from affjax.layer_scoring import ASSIGNMENT_SOLVERS


class TinyMLP(nn.Module):
    """Two smooth activations (tanh, gelu): finite differences see no kinks."""

    width: int = 4

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(self.width, name="d0")(x))
        h = nn.gelu(nn.Dense(self.width, name="d1")(h))
        return nn.Dense(2, name="out")(h)


def _x(n, d, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (n, d), dtype)


def _init(model, x, seed=1):
    """Parameters in the input's dtype (flax creates float32 parameters by default)."""
    variables = model.init(jax.random.key(seed), x)
    return jax.tree.map(lambda a: a.astype(x.dtype), variables)


def _fd_gradient(fn, flat, h):
    """Central differences of a jitted scalar function of a flat float64 vector.

    h = 1e-5: the score is evaluated to about 1e-14 (eigen/singular value solvers), so a
    smaller step trades truncation error for rounding error.
    """
    eye = np.eye(flat.size)
    return np.array([(float(fn(flat + h * e)) - float(fn(flat - h * e))) / (2 * h) for e in eye])


def _check_fd(term, variables, *, rtol=1e-5, atol=1e-8, h=1e-5):
    flat, unravel = ravel_pytree(variables)
    assert flat.dtype == jnp.float64
    fn = jax.jit(lambda f: term(unravel(f)))
    grad = np.asarray(jax.jit(jax.grad(lambda f: term(unravel(f))))(flat))
    assert np.all(np.isfinite(grad))
    fd = _fd_gradient(fn, flat, h)
    np.testing.assert_allclose(grad, fd, rtol=rtol, atol=atol)
    return grad


# --- values ------------------------------------------------------------------------------


def test_terms_equal_formulas_on_signature_scores():
    x = _x(64, 3)
    model = TinyMLP()
    v = _init(model, x)
    s = np.asarray(affjax.signature_scores(model, v, x), np.float64)
    assert s.shape == (2,) and np.all((s > 0.3) & (s < 1.0))
    pen = regularizers.target_penalty(model, v, x, target=0.5, weight=3.0)
    np.testing.assert_allclose(float(pen), 3.0 * np.mean((s - 0.5) ** 2), rtol=1e-12)
    per_layer = np.array([0.2, 0.9])
    pen = regularizers.target_penalty(model, v, x, target=per_layer, weight=0.5)
    np.testing.assert_allclose(float(pen), 0.5 * np.mean((s - per_layer) ** 2), rtol=1e-12)
    non = regularizers.mean_nonlinearity(model, v, x, weight=-2.0)
    np.testing.assert_allclose(float(non), -2.0 * np.mean(1.0 - s), rtol=1e-12)
    # Selection by name and by kind picks the matching layer's score.
    only_gelu = regularizers.mean_nonlinearity(model, v, x, kinds=["gelu"])
    np.testing.assert_allclose(float(only_gelu), 1.0 - s[1], rtol=1e-12)
    only_tanh = regularizers.target_penalty(model, v, x, target=0.0, include=["tanh*"])
    np.testing.assert_allclose(float(only_tanh), s[0] ** 2, rtol=1e-12)


def test_output_and_scores_is_one_forward_pass_with_apply_output():
    x = _x(48, 3)
    model = TinyMLP()
    v = _init(model, x)
    out, scores = regularizers.output_and_scores(model, v, x, solver="hungarian")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(model.apply(v, x)))
    np.testing.assert_allclose(
        np.asarray(scores), np.asarray(affjax.signature_scores(model, v, x)), atol=1e-12)

    calls = []

    class Counting(nn.Module):
        @nn.compact
        def __call__(self, x):
            calls.append(1)  # runs once per forward pass (trace)
            return TinyMLP(name="inner")(x)

    counting = Counting()
    cv = _init(counting, x)
    calls.clear()
    jax.jit(lambda v, x: regularizers.output_and_scores(counting, v, x))(cv, x)
    assert len(calls) == 1


def test_output_and_scores_with_mutable_batch_stats():
    class BN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.Dense(5)(x)
            h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
            return nn.Dense(2)(nn.relu(h))

    x = _x(40, 3)
    model = BN()
    v = model.init(jax.random.key(0), x, train=False)
    (out, updated), scores = regularizers.output_and_scores(
        model, v, x, train=True, mutable=["batch_stats"])
    ref_out, ref_updated = model.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    assert set(updated) == {"batch_stats"}
    for a, b in zip(jax.tree.leaves(updated), jax.tree.leaves(ref_updated), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert scores.shape == (1,)


@pytest.mark.parametrize("kwargs", [
    {"mutable": True, "train": True},
    {"mutable": "batch_stats", "train": True},
    {"mutable": ["batch_stats", "intermediates"], "train": True},
    {"capture_intermediates": True, "train": False},
    {"capture_intermediates": True, "mutable": ["batch_stats"], "train": True},
])
def test_output_and_scores_returns_exactly_what_apply_returns(kwargs):
    # Every form of Flax's mutable, and capture_intermediates: model.apply returns (y, state);
    # the capture's own entries are not in the state, the model's own sown values are.
    class Sowing(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.BatchNorm(use_running_average=not train)(nn.Dense(5)(x))
            h = affjax.Activation(jnp.tanh)(h)
            self.sow("intermediates", "total", jnp.sum(h))
            return nn.Dense(2)(h)

    x = _x(24, 3)
    model = Sowing()
    v = model.init(jax.random.key(0), x, train=False)
    out, scores = regularizers.output_and_scores(model, v, x, **kwargs)
    ref = model.apply(v, x, **kwargs)
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert scores.shape == (1,)


def test_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.d0 = nnx.Linear(3, 6, rngs=rngs)
            self.act = affjax.NnxActivation(jnp.tanh)
            self.d1 = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.d1(self.act(self.d0(x)))

    x = _x(50, 3)
    net = Net(nnx.Rngs(0))
    out, scores = regularizers.output_and_scores(net, None, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(net(x)), atol=1e-12)
    pen = regularizers.target_penalty(net, None, x, target=1.0)
    np.testing.assert_allclose(float(pen), float((scores[0] - 1.0) ** 2), rtol=1e-12)
    graphdef, state = nnx.split(net)

    def loss(state):
        return regularizers.mean_nonlinearity(nnx.merge(graphdef, state), None, x)

    grads = jax.grad(loss)(state)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_bad_inputs_name_the_problem():
    x = _x(32, 3)
    model = TinyMLP()
    v = _init(model, x)
    with pytest.raises(ValueError, match=r"target must be a scalar or have shape \(2,\)"):
        regularizers.target_penalty(model, v, x, target=jnp.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 1\]"):
        regularizers.target_penalty(model, v, x, target=1.5)
    with pytest.raises(ValueError, match="weight must be a scalar"):
        regularizers.mean_nonlinearity(model, v, x, weight=jnp.ones(2))
    with pytest.raises(ValueError, match="weight must be finite"):
        regularizers.mean_nonlinearity(model, v, x, weight=float("nan"))
    with pytest.raises(ValueError, match="unknown solver 'exact'"):
        regularizers.mean_nonlinearity(model, v, x, solver="exact")
    with pytest.raises(ValueError, match="matches no activation"):
        regularizers.mean_nonlinearity(model, v, x, include=["conv*"])
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module"):
        regularizers.output_and_scores(lambda z: z, v, x)
    with pytest.raises(ValueError, match=r"scores must have shape \(L,\)"):
        regularizers.mean_nonlinearity_from_scores(jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="target must be a real number"):
        regularizers.target_penalty_from_scores(jnp.ones(2), target="0.5")
    with pytest.raises(TypeError, match="a linen model needs its variables"):
        regularizers.target_penalty(model, None, x, target=0.5)
    with pytest.raises(ValueError, match="weight = 1e.40 overflows the scores' dtype float32"):
        regularizers.mean_nonlinearity_from_scores(jnp.ones(2, jnp.float32), weight=1e40)
    with pytest.raises(ValueError, match="ridge must be a finite real number >= 0, got '1e-6'"):
        regularizers.mean_nonlinearity(model, v, x, ridge="1e-6")
    with pytest.raises(ValueError, match="sinkhorn_epsilon must be a finite real number > 0"):
        regularizers.mean_nonlinearity(model, v, x, solver="sinkhorn", sinkhorn_epsilon=0.0)
    with pytest.raises(TypeError, match="takes no return_output: .* use output_and_scores"):
        regularizers.target_penalty(model, v, x, target=0.5, return_output=True)
    with pytest.raises(TypeError, match="output_and_scores always returns"):  # raw TypeError
        regularizers.output_and_scores(model, v, x, return_output=False)
    # A traced target outside [0, 1] cannot raise: NaN, not the 1.73 it gave before.
    penalty = jax.jit(lambda t: regularizers.target_penalty_from_scores(
        jnp.array([0.5, 0.9]), target=t))
    assert np.isnan(float(penalty(2.0))) and np.isnan(float(penalty(-0.1)))
    assert abs(float(penalty(0.7)) - 0.04) < 1e-6
    # One name may be a plain string.
    np.testing.assert_array_equal(
        np.asarray(regularizers.output_and_scores(model, v, x, kinds="tanh")[1]),
        np.asarray(regularizers.output_and_scores(model, v, x, kinds=["tanh"])[1]))


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ASSIGNMENT_SOLVERS)
def test_gradient_matches_central_differences_float64(solver):
    x = _x(16, 3)
    model = TinyMLP()
    v = _init(model, x)

    def term(variables):
        return regularizers.target_penalty(
            model, variables, x, target=jnp.array([0.9, 0.2]), weight=2.0, solver=solver
        ) + regularizers.mean_nonlinearity(model, variables, x, weight=-0.5, solver=solver)

    grad = _check_fd(term, v)
    assert np.abs(grad).max() > 1e-3  # the term does depend on the parameters


def test_gradient_with_task_loss_matches_central_differences():
    x = _x(16, 3)
    labels = jnp.arange(16) % 2
    model = TinyMLP()
    v = _init(model, x)

    def loss(variables):
        logits, scores = regularizers.output_and_scores(model, variables, x, solver="hungarian")
        task = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return task + regularizers.target_penalty_from_scores(scores, target=0.7, weight=5.0)

    _check_fd(loss, v)


def test_sinkhorn_gradient_close_to_central_differences():
    x = _x(12, 3)
    model = TinyMLP()
    v = _init(model, x)

    def term(variables):
        return regularizers.mean_nonlinearity(model, variables, x, solver="sinkhorn")

    flat, unravel = ravel_pytree(v)
    grad = np.asarray(jax.jit(jax.grad(lambda f: term(unravel(f))))(flat))
    fd = _fd_gradient(jax.jit(lambda f: term(unravel(f))), flat, 1e-5)
    # The entropic regularisation follows the data (1% of the mean cost) but is held constant
    # for the gradient (affjax.transport.w2_squared), so the gradient misses d/d epsilon:
    # measured 2.4% of the norm here (cosine 0.9997); the exact solvers match to 1e-5.
    rel = np.linalg.norm(grad - fd) / np.linalg.norm(fd)
    cosine = grad @ fd / (np.linalg.norm(grad) * np.linalg.norm(fd))
    assert rel < 0.04, rel
    assert cosine > 0.999, cosine


class Degenerate(nn.Module):
    """Dense(width) -> activation, twice; kernels and biases set by the test."""

    width: int
    act: str = "relu"

    @nn.compact
    def __call__(self, x):
        fn = getattr(nn, self.act)
        h = fn(nn.Dense(self.width, name="d0")(x))
        h = fn(nn.Dense(self.width, name="d1")(h))
        return nn.Dense(1, name="out")(h)


def _set(variables, layer, kernel=None, bias=None):
    params = jax.tree.map(lambda a: a, variables["params"])
    if kernel is not None:
        params[layer]["kernel"] = kernel
    if bias is not None:
        params[layer]["bias"] = bias
    return {"params": params}


def _grad_term(model, v, x):
    def term(variables):
        return regularizers.target_penalty(model, variables, x, target=0.5, solver="hungarian")

    value, grads = jax.jit(jax.value_and_grad(term))(v)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    return float(value), leaves


def test_no_nan_at_dead_units_and_dead_layers():
    x = _x(32, 4)
    model = Degenerate(width=6)
    v = _init(model, x)
    # Half of d0's units never fire; every unit of d1 is dead (constant zero output).
    bias0 = jnp.concatenate([jnp.full((3,), -100.0), jnp.zeros(3)])
    v = _set(v, "d0", bias=bias0)
    v = _set(v, "d1", bias=jnp.full((6,), -100.0))
    scores = affjax.signature_scores(model, v, x)
    assert float(scores[1]) == 1.0  # dead layer: A = 0, W2 = 0
    value, leaves = _grad_term(model, v, x)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert max(np.abs(g).max() for g in leaves) > 0  # the live layer still has a gradient


@pytest.mark.parametrize("ridge", [1e-6, 0.0])
def test_no_nan_at_constant_outputs(ridge):
    x = _x(32, 4)
    model = Degenerate(width=5, act="tanh")
    v = _init(model, x)
    # A zero kernel makes d0's pre- and post-activations constant over the batch (with
    # ridge 0, C_y = 0: the discarded map of the dead layer must not bring NaN in).
    v = _set(v, "d0", kernel=jnp.zeros((4, 5)), bias=jnp.linspace(-1.0, 1.0, 5))

    def term(variables):
        return regularizers.target_penalty(model, variables, x, target=0.5, ridge=ridge)

    value, grads = jax.jit(jax.value_and_grad(term))(v)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("width", [1, 6])
def test_sinkhorn_on_a_dead_layer_scores_one_with_a_finite_gradient(width):
    x = _x(16, 4)
    model = Degenerate(width=width)
    v = _set(_init(model, x), "d1", bias=jnp.full((width,), -100.0))  # d1 never fires

    def term(variables):
        return regularizers.target_penalty(model, variables, x, target=0.5, solver="sinkhorn")

    scores = affjax.signature_scores(model, v, x, solver="sinkhorn")
    assert float(scores[1]) == 1.0
    value, grads = jax.value_and_grad(term)(v)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_repeated_eigenvalues_gradient_finite_and_matches_fd():
    # Whitened inputs and an orthogonal first layer: the pre-activation covariance is
    # exactly I (all eigenvalues repeated), where the derivative of eigh divides by zero.
    n, d = 24, 4
    z = np.random.default_rng(0).standard_normal((n, d))
    z -= z.mean(0)
    q, _ = np.linalg.qr(z)
    x = jnp.asarray(np.sqrt(n - 1) * q)
    np.testing.assert_allclose(np.cov(np.asarray(x).T), np.eye(d), atol=1e-12)
    model = Degenerate(width=d, act="tanh")
    v = _init(model, x)
    v = _set(v, "d0", kernel=0.5 * jnp.eye(d), bias=jnp.zeros(d))
    v = _set(v, "d1", kernel=0.5 * jnp.eye(d), bias=jnp.zeros(d))

    def term(variables):
        return regularizers.target_penalty(model, variables, x, target=0.5, solver="scipy")

    grad = _check_fd(term, v)
    assert np.abs(grad).max() > 1e-4


def test_wide_layer_d_greater_than_n():
    # d = 40 > 2n = 16: the score works in the span of the samples.
    x = _x(8, 3)
    model = Degenerate(width=40, act="tanh")
    v = _init(model, x)

    def term(variables):
        return regularizers.mean_nonlinearity(model, variables, x, solver="hungarian")

    flat, unravel = ravel_pytree(v)
    grad = np.asarray(jax.jit(jax.grad(lambda f: term(unravel(f))))(flat))
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    # Directional derivatives along random directions (the full FD has 1.9k parameters).
    fn = jax.jit(lambda f: term(unravel(f)))
    rng = np.random.default_rng(1)
    for _ in range(4):
        u = rng.standard_normal(flat.size)
        h = 1e-6
        fd = (float(fn(flat + h * u)) - float(fn(flat - h * u))) / (2 * h)
        np.testing.assert_allclose(grad @ u, fd, rtol=1e-5, atol=1e-8)


# --- training ----------------------------------------------------------------------------


class DigitsMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="d0")(x))
        h = nn.relu(nn.Dense(32, name="d1")(h))
        return nn.Dense(10, name="out")(h)


def _digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(data.target)


def test_jit_does_not_retrace_per_step_and_training_moves_mean_score():
    x_all, y_all = _digits()
    model = DigitsMLP()
    variables0 = model.init(jax.random.key(0), x_all[:2])
    optimizer = optax.adam(3e-3)
    traces = []

    def loss_fn(variables, x, y, weight):
        traces.append(1)  # Python runs only when jax traces
        logits, scores = regularizers.output_and_scores(model, variables, x)  # auto: scipy
        task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return task + regularizers.mean_nonlinearity_from_scores(scores, weight=weight), scores

    @jax.jit
    def step(variables, opt_state, x, y, weight):
        (loss, scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables, x, y, weight)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    eval_x = x_all[-256:]
    eval_scores = jax.jit(lambda v: affjax.signature_scores(model, v, eval_x))
    batch, steps = 128, 60
    final = {}
    for weight in (0.0, 1.0, -1.0):  # the weight is an argument: one compilation for all
        variables, opt_state = variables0, optimizer.init(variables0)
        for i in range(steps):
            start = (i * batch) % (1536 - batch)
            variables, opt_state, loss = step(
                variables, opt_state, x_all[start:start + batch], y_all[start:start + batch],
                jnp.float32(weight))
        assert np.isfinite(float(loss))
        final[weight] = float(jnp.mean(eval_scores(variables)))
    assert len(traces) == 1
    assert step._cache_size() == 1
    # Measured (seed 0, 60 steps, batch 128): mean score on held-out digits 0.904 without
    # the term, 0.973 when penalising non-linearity (weight 1), 0.518 when rewarding it
    # (weight -1). The thresholds are half the measured margins (+0.069, -0.386).
    assert final[1.0] - final[0.0] > 0.035
    assert final[0.0] - final[-1.0] > 0.19


class _PartlyLinear(nn.Module):
    """tanh on 2 of 16 units, identity on the rest: C_y nearly singular in float32."""

    @nn.compact
    def __call__(self, x):
        def act(z):
            return jnp.concatenate([jnp.tanh(z[:, :2]), z[:, 2:]], axis=1)

        h = affjax.Activation(act)(nn.Dense(16, kernel_init=nn.initializers.normal(10.0))(x))
        return nn.Dense(2)(h)


def test_gradient_finite_where_the_grouped_cholesky_breaks_down():
    # Grouped layers try Cholesky first and redo the group with QR where it breaks down; the
    # discarded Cholesky result must not bring NaN into the gradient (it did: 0 * NaN).
    from affjax import score as _score
    from affjax.options import ScoreOptions

    x = jax.random.normal(jax.random.key(0), (64, 3), jnp.float32)
    model = _PartlyLinear()
    v = model.init(jax.random.key(1), x)
    h = x @ v["params"]["Dense_0"]["kernel"] + v["params"]["Dense_0"]["bias"]
    y = jnp.concatenate([jnp.tanh(h[:, :2]), h[:, 2:]], axis=1)
    forced = _score._compute(h, y, ScoreOptions(solver="scipy"), factor="cholesky")
    assert np.isnan(float(forced.score))  # the case this test is about: Cholesky fails here

    def grouped(variables):
        return regularizers.mean_nonlinearity(model, variables, x)

    def per_layer(variables):  # the single-layer score picks Cholesky or QR by itself
        h = x @ variables["params"]["Dense_0"]["kernel"] + variables["params"]["Dense_0"]["bias"]
        y = jnp.concatenate([jnp.tanh(h[:, :2]), h[:, 2:]], axis=1)
        return 1.0 - affjax.affinity_score(h, y)

    value, grads = jax.value_and_grad(grouped)(v)
    ref_value, ref_grads = jax.value_and_grad(per_layer)(v)
    assert float(value) == pytest.approx(float(ref_value), abs=1e-6)
    for g, r in zip(jax.tree.leaves(grads["params"]["Dense_0"]),
                    jax.tree.leaves(ref_grads["params"]["Dense_0"]), strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-3, atol=1e-5)


def test_nnx_output_and_scores_keeps_plain_array_attributes_and_new_variables():
    # Writing back only the variables that existed before lost these two.
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)
            self.act = affjax.NnxActivation(jax.nn.relu)
            self.calls = jnp.zeros(())

        def __call__(self, x):
            self.calls = self.calls + 1
            y = self.act(self.lin(x))
            self.last = nnx.BatchStat(y.mean())
            return y

    x = jax.random.normal(jax.random.key(0), (16, 4))
    model, reference = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
    reference(x)
    regularizers.output_and_scores(model, None, x)
    assert float(model.calls) == float(reference.calls) == 1.0
    assert float(model.last[...]) == float(reference.last[...])
    affjax.signature_scores(model, None, x)  # a signature alone changes nothing
    assert float(model.calls) == 1.0


def test_nnx_output_and_scores_updates_the_models_state_as_its_call_would():
    # The capture runs on a copy of an NNX model (the signature is pure); output_and_scores
    # stands for the model's own forward pass, so BatchNorm statistics and RNG counts must
    # move exactly as model(x) moves them, also inside nnx.jit and nnx.grad.
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 6, rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.drop = nnx.Dropout(0.25, rngs=rngs)
            self.act = affjax.NnxActivation(jax.nn.relu)
            self.out = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(self.act(self.bn(self.lin(x)))))

    x = jax.random.normal(jax.random.key(0), (16, 3), jnp.float32) + 1.0  # the model's dtype
    model, reference = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
    model.train()
    reference.train()
    y, scores = regularizers.output_and_scores(model, None, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference(x)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.bn.mean[...]), np.asarray(reference.bn.mean[...]),
                               rtol=1e-6)
    assert scores.shape == (1,)

    def loss(m, x):
        out, s = regularizers.output_and_scores(m, None, x)
        return jnp.mean(out ** 2) + s[0]

    def ref_loss(m, x):
        return jnp.mean(m(x) ** 2)

    nnx.jit(nnx.grad(loss))(model, x)
    nnx.jit(nnx.grad(ref_loss))(reference, x)
    np.testing.assert_allclose(np.asarray(model.bn.mean[...]), np.asarray(reference.bn.mean[...]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-5)
