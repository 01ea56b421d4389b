"""Gradients of the score against central finite differences (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import affjax
from affjax.covariance import COVARIANCES
from affjax.solvers import EXACT_SOLVERS


def _fd_check(f, x, rng, directions=4, h=1e-6, rtol=1e-4, floor=1e-3):
    """Compare the directional derivative of f along random directions with central FD.

    The error bound is ``rtol * max(|fd|, floor * |grad|)``.
    """
    g = np.asarray(jax.grad(f)(x))
    assert np.all(np.isfinite(g))
    for _ in range(directions):
        v = rng.normal(size=x.shape)
        v /= np.linalg.norm(v)
        fd = (float(f(x + h * v)) - float(f(x - h * v))) / (2 * h)
        analytic = float(np.sum(g * v))
        assert abs(fd - analytic) <= rtol * max(abs(fd), floor * np.linalg.norm(g)), (fd, analytic)
    return g


def _softplus(v, beta=3.0):
    return jnp.logaddexp(beta * v, 0.0) / beta


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("n, d", [(40, 1), (30, 3), (12, 40)])  # 1-D, dense, span path
def test_grad_wrt_x_through_y(n, d, covariance):
    rng = np.random.default_rng(n * d)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3

    def f(x):
        return affjax.affinity_score(x, _softplus(x), covariance=covariance)

    _fd_check(f, x, rng)


@pytest.mark.parametrize("n, d", [(30, 3), (12, 40)])
def test_grad_wrt_x_and_y_separately(n, d):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d))
    y = np.tanh(2 * x) + 0.1 * rng.normal(size=(n, d))
    _fd_check(lambda x: affjax.affinity_score(x, y), x, rng)
    _fd_check(lambda y: affjax.affinity_score(x, y), y, rng)


@pytest.mark.parametrize("solver", EXACT_SOLVERS)
def test_grad_other_exact_solvers(solver):
    rng = np.random.default_rng(2)
    d = 1 if solver == "sort" else 2
    x = rng.normal(size=(25, d))
    _fd_check(lambda x: affjax.affinity_score(x, _softplus(x), solver=solver), x, rng)


def test_grad_sinkhorn_matches_fd():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 2))
    y = np.tanh(x)
    _fd_check(lambda x: affjax.sinkhorn_w2_squared(x, y, epsilon=0.01), x, rng, h=1e-5)
    # In the score, epsilon follows the data but is held constant for the gradient: the
    # finite difference also sees epsilon move: within 1% of the gradient's norm here.
    _fd_check(lambda x: affjax.affinity_score(x, _softplus(x), solver="sinkhorn"), x, rng,
              h=1e-5, rtol=1e-2, floor=1.0)


def test_grad_finite_at_repeated_eigenvalues():
    # x, y with exactly isotropic covariances: C_x = C_y = c I (a rotated orthogonal design),
    # where the derivative of eigh divides by zero eigenvalue gaps.
    z = np.random.default_rng(4).normal(size=(16, 4))
    q, _ = np.linalg.qr(z - z.mean(0))  # orthonormal, zero-mean columns
    x = np.sqrt(15.0) * q
    np.testing.assert_allclose(np.cov(x.T), np.eye(4), atol=1e-12)
    for y in (2.0 * x + 1.0, np.maximum(x, 0.0)):
        g = jax.grad(lambda x, y=y: affjax.affinity_score(x, jnp.asarray(y)))(x)
        assert np.all(np.isfinite(np.asarray(g)))
    # The same through the activation, and isotropic outputs too.
    g = jax.grad(lambda x: affjax.affinity_score(x, 3.0 * x))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(g)).max() < 1e-6  # an exact PSD affine map is a maximum


def test_grad_finite_dead_and_constant():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 3))
    for y_fn in (lambda x: jnp.maximum(x - 100.0, 0.0), lambda x: 0.0 * x + 1.0,
                 lambda x: x.at[:, 0].set(2.0)):
        g = jax.grad(lambda x, f=y_fn: affjax.affinity_score(x, f(x)))(x)
        assert np.all(np.isfinite(np.asarray(g)))


def test_psd_sqrt_and_inv_sqrt_jvp_match_fd():
    rng = np.random.default_rng(6)
    b = rng.normal(size=(5, 5))
    m = b @ b.T + 0.5 * np.eye(5)
    dm = rng.normal(size=(5, 5))
    dm = dm + dm.T
    h = 1e-6
    for fn in (affjax.psd_sqrt, affjax.psd_inv_sqrt):
        _, tangent = jax.jvp(fn, (m,), (dm,))
        fd = (np.asarray(fn(m + h * dm)) - np.asarray(fn(m - h * dm))) / (2 * h)
        np.testing.assert_allclose(np.asarray(tangent), fd, rtol=1e-6, atol=1e-8)
    # Repeated eigenvalues: finite, and equal to the closed form for m = c I.
    _, t = jax.jvp(affjax.psd_sqrt, (4.0 * np.eye(3),), (dm[:3, :3],))
    np.testing.assert_allclose(np.asarray(t), dm[:3, :3] / 4.0, atol=1e-12)
    _, t = jax.jvp(affjax.psd_inv_sqrt, (4.0 * np.eye(3),), (dm[:3, :3],))
    np.testing.assert_allclose(np.asarray(t), -dm[:3, :3] / 16.0, atol=1e-12)


def _assert_jvp_matches_fd(fn, x, dx, *, rtol, atol, h=1e-6):
    """The JVP of a matrix function along ``dx`` against central finite differences."""
    _, tangent = jax.jvp(fn, (x,), (dx,))
    fd = (np.asarray(fn(x + h * dx)) - np.asarray(fn(x - h * dx))) / (2 * h)
    np.testing.assert_allclose(np.asarray(tangent), fd, rtol=rtol, atol=atol)


def test_gram_inv_sqrt_jvp_matches_fd():
    from affjax.linalg import gram_inv_sqrt

    rng = np.random.default_rng(7)
    f = rng.normal(size=(9, 4))
    _assert_jvp_matches_fd(gram_inv_sqrt, f, rng.normal(size=(9, 4)), rtol=1e-6, atol=1e-8)
    m = f.T @ f
    w, v = np.linalg.eigh(m)
    np.testing.assert_allclose(np.asarray(gram_inv_sqrt(f)), (v / np.sqrt(w)) @ v.T, rtol=1e-10)


def test_pseudo_inverse_jvps_follow_rank_preserving_perturbations():
    # A singular Gram matrix F^T F (F has fewer rows than columns) keeps its rank when F
    # moves, but its range turns: the kept/dropped cross terms were left out, and with
    # ridge = 0 a layer wider than its input (x = z W) got a score gradient 15% off.
    from affjax.linalg import gram_inv_sqrt

    rng = np.random.default_rng(8)
    f = rng.normal(size=(3, 5))
    df = rng.normal(size=(3, 5))
    h = 1e-6
    _assert_jvp_matches_fd(gram_inv_sqrt, f, df, rtol=1e-5, atol=1e-7, h=h)
    _assert_jvp_matches_fd(lambda f: affjax.psd_inv_sqrt(f.T @ f), f, df, rtol=1e-5, atol=1e-6,
                           h=h)

    z = rng.normal(size=(16, 3))
    w, dw = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))

    def score(w):
        return affjax.affinity_score(z @ w, jax.nn.relu(z @ w), ridge=0.0)

    g = float(np.sum(np.asarray(jax.grad(score)(w)) * dw))
    fd = (float(score(w + h * dw)) - float(score(w - h * dw))) / (2 * h)
    assert abs(g - fd) < 1e-6 * max(1.0, abs(fd)), (g, fd)


def test_psd_sqrt_jvp_is_the_clipped_functions_on_indefinite_input():
    # sqrt(max(l, 0)) is smooth where no eigenvalue is 0; with a clearly negative one the
    # JVP used 1/(0 + s_j) instead of the divided difference s_j / (l_j - l_i).
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    m = q @ np.diag([-0.5, 0.3, 1.0, 2.0]) @ q.T
    e = rng.normal(size=(4, 4))
    e = e + e.T
    f = lambda t: jnp.sum(jnp.sin(affjax.psd_sqrt(jnp.asarray(m) + t * e)))
    h = 1e-6
    fd = (f(h) - f(-h)) / (2 * h)
    assert abs(float(jax.grad(f)(0.0)) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))
