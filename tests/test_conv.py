"""The zoo's convolution (``affjax.models.layers.conv2d`` / ``Conv``): every formulation
against XLA's ``lax.conv_general_dilated``, the per-shape rule, and ``nn.Conv`` compatibility."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax import models
from affjax.models import layers

# (input NHWC, kernel (kh, kw), out features, strides, padding, dilation, groups)
CASES = [
    ((3, 2, 2, 16), (3, 3), 8, 1, 1, 1, 1),                 # the small-map cliff shape
    ((2, 7, 7, 12), (1, 1), 20, 1, 0, 1, 1),                # 1x1 as a matrix product
    ((2, 8, 6, 12), (1, 1), 10, 2, 0, 1, 1),                # strided 1x1 (ResNet downsample)
    ((2, 5, 5, 6), (3, 3), 7, 2, 1, 1, 1),                  # odd size, stride 2
    ((2, 1, 1, 8), (3, 3), 4, 1, 1, 1, 1),                  # kernel wider than the map
    ((2, 9, 8, 5), (3, 3), 6, (2, 1), ((0, 1), (2, 0)), 1, 1),  # asymmetric everything
    ((2, 9, 9, 4), (3, 3), 5, 1, 2, 2, 1),                  # dilation 2
    ((2, 6, 9, 6), (1, 7), 4, 1, (0, 3), 1, 1),             # Inception's 1x7
    ((2, 6, 6, 8), (2, 2), 8, 2, 0, 1, 1),                  # ConvNeXt's patchify, no padding
    ((2, 4, 4, 12), (3, 3), 12, 1, 1, 1, 12),               # depthwise
    ((2, 7, 7, 10), (5, 5), 10, 2, 2, 1, 10),               # depthwise 5x5 stride 2
    ((2, 5, 5, 6), (3, 3), 12, 1, 1, 1, 6),                 # depthwise, channel multiplier 2
    ((2, 6, 6, 16), (3, 3), 24, 2, 1, 1, 4),                # grouped, 4 in / 6 out per group
    ((2, 4, 4, 32), (3, 3), 32, 1, 1, 1, 2),                # grouped, width 16 (XLA's range)
    ((2, 5, 5, 8), (3, 3), 8, 1, 1, 2, 2),                  # grouped and dilated
]
IDS = [f"{x}-k{k}-s{s}-p{p}-d{d}-g{g}" for x, k, _, s, p, d, g in CASES]


def _formulations(groups):
    return ["im2col", "taps"] if groups == 1 else ["taps"]


def _arrays(case, dtype, seed=0):
    x_shape, (kh, kw), features, *_, groups = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    k = rng.standard_normal((kh, kw, x_shape[-1] // groups, features)).astype(dtype)
    return jnp.asarray(x), jnp.asarray(k)


def _conv(case, formulation):
    *_, strides, padding, dilation, groups = case
    return jax.jit(lambda x, k: layers.conv2d(x, k, strides=strides, padding=padding,
                                              dilation=dilation, groups=groups,
                                              formulation=formulation))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_formulations_match_xla_float32(case):
    x, k = _arrays(case, np.float32)
    ref = _conv(case, "xla")(x, k)
    scale = float(jnp.max(jnp.abs(ref)))
    for f in _formulations(case[-1]):
        got = _conv(case, f)(x, k)
        assert got.shape == ref.shape and got.dtype == jnp.float32, f
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                                   atol=2e-6 * scale, err_msg=f)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_formulations_match_xla_float64(case):
    assert jax.config.jax_enable_x64
    x, k = _arrays(case, np.float64)
    ref = _conv(case, "xla")(x, k)
    for f in _formulations(case[-1]):
        got = _conv(case, f)(x, k)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-13, atol=1e-13,
                                   err_msg=f)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5], CASES[11], CASES[12]],
                         ids=[IDS[0], IDS[2], IDS[5], IDS[11], IDS[12]])
def test_gradients_match_xla(case):
    x, k = _arrays(case, np.float64)
    *_, strides, padding, dilation, groups = case
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(_conv(case, "xla")(x, k).shape))

    def grads(f):
        loss = lambda x, k: jnp.sum(layers.conv2d(  # noqa: E731
            x, k, strides=strides, padding=padding, dilation=dilation, groups=groups,
            formulation=f) * ct)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k)

    ref = grads("xla")
    for f in _formulations(groups):
        for got, want in zip(grads(f), ref, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12,
                                       atol=1e-12, err_msg=f)


def _rule(x, kernel, backend="cpu", **kw):
    return layers.conv_formulation(x, kernel, backend=backend, **kw)


def test_rule_per_shape_on_cpu():
    p1 = ((1, 1), (1, 1))
    assert _rule((64, 2, 2, 512), (3, 3, 512, 512), padding=p1) == "im2col"
    assert _rule((64, 4, 4, 512), (3, 3, 512, 512), padding=p1, strides=(2, 2)) == "im2col"
    assert _rule((64, 3, 3, 512), (3, 3, 512, 512), padding=p1) == "im2col"
    assert _rule((64, 4, 4, 256), (3, 3, 256, 256), padding=p1) == "xla"
    assert _rule((64, 56, 56, 64), (3, 3, 64, 64), padding=p1) == "xla"
    assert _rule((64, 56, 56, 256), (1, 1, 256, 64)) == "im2col"
    assert _rule((64, 56, 56, 256), (1, 1, 256, 512), strides=(2, 2)) == "im2col"
    assert _rule((64, 5, 5, 256), (1, 1, 256, 64), padding=p1) == "xla"  # padded 1x1
    assert _rule((64, 112, 112, 32), (3, 3, 1, 32), padding=p1, groups=32) == "taps"
    assert _rule((64, 56, 56, 128), (3, 3, 4, 128), padding=p1, groups=32) == "taps"
    assert _rule((64, 28, 28, 256), (3, 3, 8, 256), padding=p1, groups=32) == "taps"
    assert _rule((64, 14, 14, 512), (3, 3, 16, 512), padding=p1, groups=32) == "xla"
    assert _rule((64, 2, 2, 2048), (3, 3, 64, 2048), padding=p1, groups=32) == "xla"


@pytest.mark.parametrize("backend", ["gpu", "tpu", "cuda", "rocm", "METAL"])
def test_rule_keeps_xla_off_cpu(backend):
    assert _rule((64, 2, 2, 512), (3, 3, 512, 512), backend=backend,
                 padding=((1, 1), (1, 1))) == "xla"
    assert _rule((64, 7, 7, 512), (1, 1, 512, 2048), backend=backend) == "xla"
    assert _rule((64, 8, 8, 32), (3, 3, 1, 32), backend=backend, groups=32) == "xla"


def test_rule_reads_the_default_backend():
    shape = ((64, 2, 2, 512), (3, 3, 512, 512))
    want = "im2col" if jax.default_backend() == "cpu" else "xla"
    assert layers.conv_formulation(*shape, padding=((1, 1), (1, 1))) == want


def test_environment_forces_a_formulation(monkeypatch):
    dense = ((64, 56, 56, 64), (3, 3, 64, 64))
    grouped = ((64, 2, 2, 64), (3, 3, 16, 64))
    monkeypatch.setenv("AFFJAX_CONV", "xla")
    assert _rule(*dense) == _rule(*grouped, groups=4) == "xla"
    monkeypatch.setenv("AFFJAX_CONV", "im2col")
    assert _rule(*dense) == "im2col"
    assert _rule(*grouped, groups=4) == "xla"  # im2col needs groups == 1
    assert _rule(*dense, backend="gpu") == "im2col"
    monkeypatch.setenv("AFFJAX_CONV", "taps")
    assert _rule(*grouped, groups=4) == "taps"
    assert _rule(*dense) == "xla"
    monkeypatch.setenv("AFFJAX_CONV", "Auto")
    assert _rule(*dense) == "xla" and _rule(*grouped, groups=4) == "xla"
    monkeypatch.setenv("AFFJAX_CONV", "fast")
    with pytest.raises(ValueError, match="AFFJAX_CONV must be one of"):
        _rule(*dense)


def test_conv2d_refuses_what_does_not_fit():
    x = jnp.zeros((1, 4, 4, 6))
    with pytest.raises(ValueError, match="do not fit"):
        layers.conv2d(x, jnp.zeros((3, 3, 4, 8)), groups=1)
    with pytest.raises(ValueError, match="do not fit"):
        layers.conv2d(x, jnp.zeros((3, 3, 3, 5)), groups=2)  # 5 outputs in 2 groups
    with pytest.raises(ValueError, match="im2col formulation needs groups == 1"):
        layers.conv2d(x, jnp.zeros((3, 3, 3, 4)), groups=2, formulation="im2col")
    with pytest.raises(ValueError, match="unknown formulation"):
        layers.conv2d(x, jnp.zeros((3, 3, 6, 4)), formulation="fft")


@pytest.mark.parametrize(("kernel", "stride", "padding", "groups", "bias"),
                         [(3, 1, 1, 1, True), (1, 2, 0, 1, False), (3, 2, 1, 4, True),
                          ((1, 7), 1, (0, 3), 1, False), (5, 1, 2, 8, False)])
def test_conv_module_is_nn_conv(kernel, stride, padding, groups, bias):
    """Same parameter names, shapes and random initialisation as ``nn.Conv``; same output."""
    new = layers.conv(8, kernel, stride=stride, padding=padding, groups=groups, bias=bias,
                      name="c")
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    old = nn.Conv(8, (kh, kw), strides=(stride, stride), padding=((ph, ph), (pw, pw)),
                  feature_group_count=groups, use_bias=bias,
                  kernel_init=layers.torch_default_kernel)
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 8), jnp.float32)
    v_new, v_old = new.init(jax.random.key(0), x), old.init(jax.random.key(0), x)
    assert jax.tree.structure(v_new) == jax.tree.structure(v_old)
    for a, b in zip(jax.tree.leaves(v_new), jax.tree.leaves(v_old), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y_new, y_old = new.apply(v_new, x), old.apply(v_old, x)
    assert y_new.dtype == y_old.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y_new), np.asarray(y_old), rtol=0, atol=2e-6)
    # Extra leading batch axes are flattened and restored, as nn.Conv does.
    x5 = x.reshape(1, 2, 9, 9, 8)
    np.testing.assert_allclose(np.asarray(new.apply(v_new, x5))[0], np.asarray(y_new),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "mobilenet_v2"])
def test_models_agree_with_xla_convolutions(name, monkeypatch):
    """A whole model with the per-shape rule equals the model with XLA's convolution."""
    model, variables = models.create(name)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3), jnp.float32)
    monkeypatch.setenv("AFFJAX_CONV", "auto")
    auto = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    monkeypatch.setenv("AFFJAX_CONV", "xla")
    xla = jax.jit(lambda v, x: model.apply(v, x))(variables, x)  # traced anew: reads the variable
    scale = float(jnp.max(jnp.abs(xla)))
    np.testing.assert_allclose(np.asarray(auto), np.asarray(xla), rtol=0, atol=1e-4 * scale)


def test_every_family_builds_its_convolutions_with_layers_conv():
    """The per-shape choice lives in ``layers.Conv``: no family may bypass it with nn.Conv."""
    import pathlib
    import re

    folder = pathlib.Path(layers.__file__).parent
    offenders = [f"{path.name}:{i}" for path in sorted(folder.glob("*.py"))
                 if path.name != "layers.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bnn\.Conv(Transpose|Local)?\(|lax\.conv_general_dilated", line)]
    assert not offenders, offenders


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16])
def test_the_fusion_fence_is_the_identity(dtype):
    info = jnp.finfo(dtype)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, float(info.max), float(info.tiny),
               float(info.tiny) / 4, float(info.eps), 1 + float(info.eps), -3.5]
    x = jnp.concatenate([jnp.asarray(special, dtype),
                         jax.random.normal(jax.random.key(0), (1000,), dtype) * 1e3])
    y = jax.jit(layers._unfused)(x)
    assert y.dtype == x.dtype
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    np.testing.assert_array_equal(np.asarray(y).view(bits), np.asarray(x).view(bits))
    ints = jnp.arange(5)
    assert layers._unfused(ints) is ints
