"""``vmap`` of the score on CPU: LAPACK one matrix at a time, derivatives through it.

jaxlib 0.10's batched CPU LAPACK kernels block XLA pool threads while their pieces run;
``jax.jit(jax.vmap(affinity_score))`` hung on 2 cores at (8, 512, 64) with ``y = relu(x)``
and at (4, 1024, 64), where a Cholesky and a QR batch ran at once. ``affjax.linalg`` loops
such calls on CPU; these tests hold it to that.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import affjax
from affjax.covariance import covariance_parts
from affjax.linalg import gram_cholesky
from affjax.linalg import qr_lower_factor


def _pairs(batch, n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((batch, n, d))
    w = rng.standard_normal((d, d)) / np.sqrt(d)
    ys = np.maximum(xs @ w + 0.3, 0.0)
    return jnp.asarray(xs, dtype), jnp.asarray(ys, dtype)


def _lapack_calls(fn, *args):
    hlo = jax.jit(fn).lower(*args).as_text()
    return [line for line in hlo.splitlines() if "lapack_" in line and "custom_call" in line]


both_args = dict(argnums=(0, 1))
BATCHED = {
    "score": jax.vmap(affjax.affinity_score),
    "affinity": jax.vmap(affjax.affinity),
    "grad": jax.vmap(jax.grad(affjax.affinity_score, **both_args)),
    "nested": jax.vmap(jax.vmap(affjax.affinity_score)),
}


# (48, 6): the dense path; (8, 40): the span path (d > 2n). No axis of length 3 but the batch.
@pytest.mark.parametrize("shape", [(48, 6), (8, 40)], ids=["dense", "span"])
@pytest.mark.parametrize("what", list(BATCHED))
def test_vmap_on_cpu_calls_lapack_one_matrix_at_a_time(shape, what):
    xs, ys = _pairs(3, *shape, jnp.float32)
    if what == "nested":
        xs, ys = xs[:, None], ys[:, None]
    calls = _lapack_calls(BATCHED[what], xs, ys)
    assert calls, "expected LAPACK custom calls"
    for line in calls:  # every operand is one matrix, inside a loop
        assert "tensor<3x" not in line, line


def test_vmapped_score_at_sizes_that_hung_finishes():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        import affjax
        rng = np.random.default_rng(0)
        for shape, mix in [((4, 1024, 64), True), ((8, 512, 64), False)]:
            x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            w = jnp.asarray(rng.standard_normal((64, 64)) / 8.0, jnp.float32)
            y = jax.nn.relu(x @ w if mix else x)
            batched = np.asarray(jax.jit(jax.vmap(affjax.affinity_score))(x, y))
            single = np.array([float(affjax.affinity_score(a, b)) for a, b in zip(x, y)])
            np.testing.assert_allclose(batched, single, atol=1e-5)
        print("ok")
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("jax.vmap(affinity_score) at (4, 1024, 64) or (8, 512, 64) did not "
                    "finish in 300 s (the batched-LAPACK deadlock)")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("shape", [(40, 5), (6, 20)], ids=["dense", "span"])
def test_batched_values_and_gradients_equal_unbatched(shape):
    xs, ys = _pairs(3, *shape, jnp.float64, seed=1)
    grad = jax.grad(affjax.affinity_score, **both_args)
    scores = BATCHED["score"](xs, ys)
    gx, gy = BATCHED["grad"](xs, ys)
    nested = BATCHED["nested"](xs.reshape(1, 3, *shape), ys.reshape(1, 3, *shape))
    for i in range(3):
        np.testing.assert_allclose(scores[i], affjax.affinity_score(xs[i], ys[i]), atol=1e-12)
        ex, ey = grad(xs[i], ys[i])
        np.testing.assert_allclose(gx[i], ex, atol=1e-10)
        np.testing.assert_allclose(gy[i], ey, atol=1e-10)
    np.testing.assert_allclose(nested[0], scores, atol=1e-12)


def test_second_derivatives_forward_and_reverse_over_reverse():
    x = jax.random.normal(jax.random.key(0), (16, 3), jnp.float64)

    def f(x):
        return affjax.affinity_score(x, jnp.tanh(x))

    hess = jax.hessian(f)(x)                   # forward over reverse
    rev = jax.jacrev(jax.grad(f))(x)           # reverse over reverse
    np.testing.assert_allclose(rev, hess, atol=1e-9)
    step = 1e-5
    for i, j in [(2, 1), (9, 0)]:
        e = jnp.zeros_like(x).at[i, j].set(1.0)
        fd = (jax.grad(f)(x + step * e) - jax.grad(f)(x - step * e)) / (2 * step)
        np.testing.assert_allclose(hess[:, :, i, j], fd, atol=1e-8)


def test_second_derivatives_on_the_span_path_are_refused_not_wrong():
    # The span's basis is held fixed: exact to first order, but the Hessian of a (6, 15)
    # case was 18% off the dense path's, with nothing to warn.
    x = jax.random.normal(jax.random.key(0), (6, 15), jnp.float64)

    def f(x, path="auto"):
        return affjax.affinity_score(x, jnp.tanh(x), path=path)

    for second in (jax.hessian(f), jax.jacfwd(jax.grad(f)), jax.jacrev(jax.grad(f))):
        with pytest.raises(NotImplementedError, match="path='dense'"):
            second(x)
    dense = jax.hessian(lambda x: f(x, "dense"))(x)
    step = 1e-5
    e = jnp.zeros_like(x).at[0, 0].set(1.0)
    fd = (jax.grad(f)(x + step * e) - jax.grad(f)(x - step * e)) / (2 * step)
    np.testing.assert_allclose(dense[:, :, 0, 0], fd, atol=1e-7)
    # First derivatives, forward and reverse, are the dense path's.
    np.testing.assert_allclose(jax.jacfwd(f)(x), jax.grad(lambda x: f(x, "dense"))(x),
                               atol=1e-12)
    # A basis of the whole space (path="span" with d <= 2n) turns nowhere: allowed, exact.
    x2 = x[:, :4]
    np.testing.assert_allclose(jax.hessian(lambda x: f(x, "span"))(x2),
                               jax.hessian(lambda x: f(x, "dense"))(x2), atol=1e-10)


@pytest.mark.parametrize("shape", [(9, 4), (30, 6)])
def test_lower_factors_against_numpy_and_finite_differences(shape):
    f = jnp.asarray(np.random.default_rng(2).standard_normal(shape))
    expected = np.linalg.cholesky(np.asarray(f).T @ np.asarray(f))
    np.testing.assert_allclose(gram_cholesky(f), expected, atol=1e-10)
    low = qr_lower_factor(f)
    np.testing.assert_allclose(np.abs(low), np.abs(expected), atol=1e-10)
    np.testing.assert_allclose(low @ low.T, expected @ expected.T, atol=1e-10)
    np.testing.assert_allclose(np.triu(np.asarray(low), 1), 0.0)
    check_grads(gram_cholesky, (f,), order=2, modes=("fwd", "rev"))
    check_grads(qr_lower_factor, (f,), order=2, modes=("fwd", "rev"))


def _factor_of(y):
    cy = covariance_parts(y, covariance="empirical", ridge=1e-6)
    d = y.shape[1]
    return jnp.concatenate([jnp.sqrt(cy.alpha) * cy.centered,
                            jnp.sqrt(cy.shift) * jnp.eye(d, dtype=y.dtype)])


def test_gradient_in_y_is_finite_where_cholesky_breaks_down():
    # Nearly repeated output columns at a large scale: the float32 Gram matrix of C_y is
    # indefinite, Cholesky gives NaN and the score takes QR. The gradient in y used to be
    # NaN there (the discarded Cholesky branch's tangent met its NaN factor).
    rng = np.random.default_rng(0)
    n, d = 64, 8
    base = rng.standard_normal((n, 2)) @ rng.standard_normal((2, d))
    scale = 10.0 ** rng.uniform(1, 4)
    y = scale * np.maximum(base, 0) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)))
    y = np.concatenate([y[:, :4], 1.1 * y[:, :4] + 1e-3 * y[:, 4:]], axis=1)
    x = rng.standard_normal((n, d))
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    assert not np.isfinite(np.asarray(gram_cholesky(_factor_of(y32)))).all()

    grad_y = jax.grad(affjax.affinity_score, argnums=1)
    g32 = grad_y(x32, y32)
    assert np.isfinite(np.asarray(g32)).all()
    g64 = grad_y(jnp.asarray(x), jnp.asarray(y))  # float64: Cholesky succeeds
    assert np.linalg.norm(g32 - g64) < 0.1 * np.linalg.norm(g64)
    batched = jax.vmap(grad_y)(jnp.stack([x32, x32]), jnp.stack([y32, jax.nn.relu(x32)]))
    np.testing.assert_allclose(batched[0], g32, rtol=1e-4, atol=1e-9)
