"""Smoke subset: one fast check per dependency surface that affjax uses.

``.ci/floors`` runs this file against the lowest versions pyproject.toml allows, with the
package installed from a wheel; the full test run runs it against the installed (newest)
ones. It covers the score (every solver: scipy, optax's Hungarian algorithm, OTT-JAX's
Sinkhorn), a linen and an NNX signature (eager, jitted, and split over two devices), the
regularizer step with optax, safetensors, and the command line on a zoo model.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import affjax
from affjax import cli
from affjax import models
from affjax import regularizers


def _x(n=128, d=6, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, d), jnp.float32)


def _run_affjax(*args, cwd, timeout=300):
    """``python -m affjax ARGS`` on the affjax this process imported."""
    root = str(Path(affjax.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "affjax", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_version_is_the_distributions_and_the_commands(capsys):
    assert affjax.__version__ == importlib.metadata.version("affjax")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"affjax {affjax.__version__}\n"
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="affjax")
    assert script.value == "affjax.cli:run"


def test_score_with_every_solver():
    x = _x()
    y = jax.nn.relu(x)
    exact = affjax.affinity_score(x, y)
    assert exact.dtype == jnp.float32 and 0.5 < float(exact) < 1.0
    for solver in ("scipy", "hungarian"):
        np.testing.assert_allclose(affjax.affinity_score(x, y, solver=solver), exact, rtol=1e-5)
    sinkhorn = float(affjax.affinity_score(x, y, solver="sinkhorn"))
    assert exact - 0.02 < sinkhorn <= exact + 1e-5  # entropic: biased low
    np.testing.assert_allclose(affjax.affinity_score(x, 2.0 * x - 1.0), 1.0, atol=1e-4)
    np.testing.assert_allclose(affjax.affinity_score(x[:, :1], jnp.tanh(x[:, :1]), solver="sort"),
                               affjax.affinity_score(x[:, :1], jnp.tanh(x[:, :1]), solver="scipy"),
                               rtol=1e-5)
    lw = affjax.affinity_score(x, y, covariance="ledoit_wolf")
    assert 0.5 < float(lw) < 1.0


def test_score_under_jit_vmap_and_grad():
    x = _x()
    jitted = jax.jit(affjax.affinity_score)(x, jnp.tanh(x))
    np.testing.assert_allclose(jitted, affjax.affinity_score(x, jnp.tanh(x)), rtol=1e-5)
    # Narrow layers compile too (the reason jax 0.6.0 is the floor: docs/compatibility.md).
    narrow = jax.jit(affjax.affinity_score)(x[:, :3], jnp.tanh(x[:, :3]))
    assert 0.5 < float(narrow) < 1.0
    xs = jnp.stack([x, 2.0 * x])
    batched = jax.vmap(affjax.affinity_score)(xs, jax.nn.gelu(xs))
    np.testing.assert_allclose(batched[0], affjax.affinity_score(x, jax.nn.gelu(x)), rtol=1e-5)
    g = jax.grad(lambda x: affjax.affinity_score(x, jax.nn.gelu(x)))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        act = affjax.Activation(jax.nn.relu)
        x = act(nn.Dense(8)(x))
        x = nn.gelu(nn.Dense(8)(x))  # a plain function call, captured too
        return nn.Dense(3)(act(x))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2, self.l3 = (nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs),
                                     nnx.Linear(8, 3, rngs=rngs))
        self.act = affjax.NnxActivation(jax.nn.relu)

    def __call__(self, x):
        x = self.act(self.l1(x))
        return self.l3(self.act(nnx.gelu(self.l2(x))))


def test_linen_signature_eager_and_jitted():
    x = _x()
    model = LinenMLP()
    variables = model.init(jax.random.key(1), x)
    sig = affjax.signature(model, variables, x)
    assert sig.names == ["Activation_0:0", "gelu:0", "Activation_0:1"]
    assert sig.kinds == ["relu", "gelu", "relu"]
    assert all(0.0 < s <= 1.0 for s in sig.scores)
    h = variables["params"]["Dense_0"]
    pre = x @ h["kernel"] + h["bias"]
    np.testing.assert_allclose(sig.scores[0], affjax.affinity_score(pre, jax.nn.relu(pre)),
                               rtol=1e-5)
    scores = jax.jit(lambda v, x: affjax.signature_scores(model, v, x))(variables, x)
    np.testing.assert_allclose(scores, sig.scores, rtol=1e-5)


def test_nnx_signature_and_regularizer():
    x = _x()
    model = NnxMLP(nnx.Rngs(0))
    if not hasattr(nnx, "capture"):  # Flax before 0.12.6: a message naming the release needed
        with pytest.raises(ImportError, match=r"need flax >= 0\.12\.6 \(nnx\.capture\)"):
            affjax.signature(model, None, x)
        with pytest.raises(ImportError, match=r"need flax >= 0\.12\.6"):
            regularizers.mean_nonlinearity(model, None, x)
        return
    sig = affjax.signature(model, None, x)
    assert sig.names == ["act:0", "gelu:0", "act:1"]
    assert sig.kinds == ["relu", "gelu", "relu"]
    pre = model.l1(x)
    np.testing.assert_allclose(sig.scores[0], affjax.affinity_score(pre, jax.nn.relu(pre)),
                               rtol=1e-5)
    penalty = regularizers.mean_nonlinearity(model, None, x, weight=1.0)
    np.testing.assert_allclose(penalty, np.mean(1.0 - sig.scores), rtol=1e-5)


def test_nnx_on_a_flax_without_capture_names_the_release_needed(monkeypatch):
    from affjax import _compat

    monkeypatch.setattr(_compat, "nnx", types.SimpleNamespace())  # no nnx.capture
    with pytest.raises(ImportError, match=r"need flax >= 0\.12\.6 \(nnx\.capture\).*"
                                          r"pip install 'affjax\[nnx\]'"):
        affjax.signature(NnxMLP(nnx.Rngs(0)), None, _x())


def test_regularizer_step_with_optax():
    x = _x()
    labels = jnp.arange(x.shape[0]) % 3
    model = LinenMLP()
    params = model.init(jax.random.key(1), x)["params"]
    optimizer = optax.adam(1e-2)

    def loss_fn(params, x, labels):
        logits, scores = regularizers.output_and_scores(model, {"params": params}, x,
                                                        kinds=["relu"])
        task = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return task + regularizers.target_penalty_from_scores(scores, target=0.5, weight=10.0)

    @jax.jit
    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(3):
        params, opt_state, loss = step(params, opt_state, x, labels)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_signature_split_over_two_devices(tmp_path):
    """Layers sharded over two CPU devices, and inside a jit whose inputs are sharded."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, flax.linen as nn, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        import affjax
        assert len(jax.devices()) == 2
        class M(nn.Module):
            @nn.compact
            def __call__(self, x):
                for _ in range(3):
                    x = affjax.Activation(jax.nn.relu)(nn.Dense(6)(x))
                return x
        x = jax.random.normal(jax.random.key(0), (64, 4))
        m = M(); v = m.init(jax.random.key(1), x)
        one = np.asarray(affjax.signature_scores(m, v, x, devices=jax.devices()[:1]))
        np.testing.assert_allclose(affjax.signature_scores(m, v, x), one, rtol=1e-6)
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
        f = jax.jit(lambda v, x: affjax.signature_scores(m, v, x))
        np.testing.assert_allclose(f(v, sharded), one, atol=1e-5)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    root = str(Path(affjax.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "OK"


def test_safetensors_round_trip(tmp_path):
    state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
             "a.bias": np.ones(3, np.float16), "n": np.array(5, np.int64)}
    models.save_safetensors(tmp_path / "w.safetensors", state)
    back = models.load_safetensors(tmp_path / "w.safetensors")
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


def test_command_line_signature_of_a_zoo_model(tmp_path):
    out = _run_affjax("signature", "--model", "alexnet", "--batch-size", "8", "--no-progress",
                      "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "alexnet_random.json").read_text())
    assert result["complete"] and result["batch_size"] == 8
    assert result["versions"]["jax"] == jax.__version__
    assert len(result["layers"]) == 7
    assert all(0.0 < layer["score"] <= 1.0 for layer in result["layers"])
    assert (tmp_path / "alexnet_random.csv").exists()
    assert (tmp_path / "alexnet_random.png").read_bytes()[:4] == b"\x89PNG"


def test_typed_package():
    """``py.typed`` ships with the package (PEP 561), where it is installed from."""
    assert (Path(affjax.__file__).parent / "py.typed").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
