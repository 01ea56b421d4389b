"""Building blocks with PyTorch semantics for the torchvision ports (NHWC, float32).

Flax's defaults differ from torch's in small ways that change numbers: BatchNorm epsilon
(1e-6 in Flax, 1e-5 in torch) and momentum convention, ``"SAME"`` vs explicit symmetric
padding, adaptive pooling (no Flax equivalent). These helpers fix those once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affjax.capture import Activation

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"), used by torchvision's
# ResNet and VGG convolutions.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's default Conv/Linear weight init: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return (int(v), int(v))
    a, b = v
    return (int(a), int(b))


def _conv_out_size(size: int, pad: tuple[int, int], k: int, stride: int, dilation: int) -> int:
    return (size + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


CONV_FORMULATIONS = ("xla", "im2col", "taps")


def conv_formulation(x_shape: Sequence[int], kernel_shape: Sequence[int], *,
                     strides: tuple[int, int] = (1, 1),
                     padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
                     dilation: tuple[int, int] = (1, 1), groups: int = 1,
                     backend: str | None = None) -> str:
    """The formulation :func:`conv2d` uses for these static shapes on ``backend``.

    ``backend`` defaults to ``jax.default_backend()`` at trace time. Off the CPU backend
    (GPU, TPU) always ``"xla"``: ``lax.conv_general_dilated``. On CPU, XLA's convolution is
    slow on small maps (a 3x3 convolution on 2x2 maps runs at about 2 GFLOP/s), for 1x1
    kernels, and for depthwise and narrow grouped convolutions; there (crossovers measured
    with ``benchmarks/bench_conv.py``, numbers in ``docs/models.md``):

    * ``"im2col"`` (``groups == 1``): the ``kh * kw`` shifted, strided slices of the padded
      input, concatenated, times the kernel as one matrix product. Used for every 1x1
      convolution without padding (a plain matrix product) and for larger kernels whose
      output has at most 9 pixels (3x3).
    * ``"taps"`` (``groups > 1``): one broadcast multiply-add per kernel tap and input channel
      of a group. Used when a group has at most 8 input channels (depthwise convolutions
      have 1).
    * ``"xla"`` otherwise.

    The environment variable ``AFFJAX_CONV`` (``auto``, ``xla``, ``im2col`` or ``taps``), read
    at trace time on every backend, forces a formulation where it applies (``im2col`` needs
    ``groups == 1``, ``taps`` is only used for ``groups > 1``; other shapes get ``xla``).
    A function already traced keeps the formulations it was traced with.

    Example:
      >>> conv_formulation((64, 2, 2, 512), (3, 3, 512, 512), padding=((1, 1), (1, 1)),
      ...                  backend="cpu")
      'im2col'
      >>> conv_formulation((64, 2, 2, 512), (3, 3, 512, 512), padding=((1, 1), (1, 1)),
      ...                  backend="gpu")
      'xla'
    """
    _, h, w, _ = x_shape
    kh, kw, cg, _ = kernel_shape
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    forced = os.environ.get("AFFJAX_CONV", "").strip().lower()
    if forced and forced != "auto":
        if forced not in CONV_FORMULATIONS:
            raise ValueError(f"AFFJAX_CONV must be one of auto, {', '.join(CONV_FORMULATIONS)}; "
                             f"got {forced!r}")
        if forced == "im2col" and groups != 1 or forced == "taps" and groups == 1:
            return "xla"
        return forced
    if (backend or jax.default_backend()) != "cpu":
        return "xla"
    ho = _conv_out_size(h, padding[0], kh, strides[0], dilation[0])
    wo = _conv_out_size(w, padding[1], kw, strides[1], dilation[1])
    if groups == 1:
        if kh == kw == 1 and padding == ((0, 0), (0, 0)):
            return "im2col"
        return "im2col" if ho * wo <= _IM2COL_MAX_OUTPUT else "xla"
    return "taps" if cg <= _TAPS_MAX_GROUP_WIDTH else "xla"


# Crossovers measured on a 2-core Xeon (AVX-512), jaxlib 0.10.2; see docs/models.md.
_IM2COL_MAX_OUTPUT = 9
_TAPS_MAX_GROUP_WIDTH = 8


def _unfused(x: jax.Array) -> jax.Array:
    """``x`` unchanged, through an op XLA:CPU does not fuse across (jaxlib 0.10.2).

    ``reduce_precision`` to the dtype's own exponent and mantissa widths is the identity
    (NaN, infinities and subnormals included), and keeps producers and consumers out of the
    fused loop of the ``taps`` formulation.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _pad(x: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    if padding == ((0, 0), (0, 0)):
        return x
    return jax.lax.pad(x, jnp.zeros((), x.dtype),
                       ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


def _taps(x: jax.Array, kh: int, kw: int, strides: tuple[int, int],
          padding: tuple[tuple[int, int], tuple[int, int]],
          dilation: tuple[int, int]) -> list[jax.Array]:
    """The ``kh * kw`` shifted, strided views of ``x`` (NHWC), row-major over the kernel."""
    n, h, w, c = x.shape
    ho = _conv_out_size(h, padding[0], kh, strides[0], dilation[0])
    wo = _conv_out_size(w, padding[1], kw, strides[1], dilation[1])
    x = _pad(x, padding)
    sh, sw = strides
    return [jax.lax.slice(x, (0, i * dilation[0], j * dilation[1], 0),
                          (n, i * dilation[0] + (ho - 1) * sh + 1,
                           j * dilation[1] + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: int | Sequence[int] = 1,
           padding: int | Sequence[int] | Sequence[Sequence[int]] = 0,
           dilation: int | Sequence[int] = 1, groups: int = 1,
           formulation: str | None = None) -> jax.Array:
    """``torch.nn.functional.conv2d`` on NHWC input with an HWIO kernel, no bias.

    ``padding`` is zero padding: an int, ``(ph, pw)`` (symmetric) or ``((top, bottom),
    (left, right))``. ``kernel`` has shape ``(kh, kw, in_channels / groups, out_channels)``.
    The formulation (see :func:`conv_formulation`) is chosen from the static shapes at trace
    time unless given; all give the same numbers within rounding.

    Example:
      >>> x = jnp.arange(2 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 3, 4) / 10
      >>> k = jnp.ones((3, 3, 4, 5), jnp.float32) / 36
      >>> a = conv2d(x, k, padding=1, formulation="xla")
      >>> b = conv2d(x, k, padding=1, formulation="im2col")
      >>> a.shape, bool(jnp.allclose(a, b, atol=1e-6))
      ((2, 3, 3, 5), True)
    """
    strides, dilation = _pair(strides), _pair(dilation)
    if isinstance(padding, int | np.integer):
        pads = ((int(padding),) * 2,) * 2
    else:
        pads = tuple(_pair(p) for p in padding)
        if len(pads) != 2:
            raise ValueError(f"conv2d: padding must be an int, (ph, pw) or ((t, b), (l, r)); "
                             f"got {padding}")
    kh, kw, cg, features = kernel.shape
    c = x.shape[-1]
    if x.ndim != 4 or kernel.ndim != 4 or c != cg * groups or features % groups:
        raise ValueError(f"conv2d: input {x.shape} (NHWC), kernel {kernel.shape} (HWIO) and "
                         f"groups={groups} do not fit")
    if formulation is None:
        formulation = conv_formulation(x.shape, kernel.shape, strides=strides, padding=pads,
                                       dilation=dilation, groups=groups)
    if formulation == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, strides, pads, rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    n, h, w, _ = x.shape
    ho = _conv_out_size(h, pads[0], kh, strides[0], dilation[0])
    wo = _conv_out_size(w, pads[1], kw, strides[1], dilation[1])
    if formulation == "im2col":
        if groups != 1:
            raise ValueError("conv2d: the im2col formulation needs groups == 1")
        taps = _taps(x, kh, kw, strides, pads, dilation)
        cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        y = jnp.dot(cols.reshape(n * ho * wo, kh * kw * c), kernel.reshape(kh * kw * c, features))
        return y.reshape(n, ho, wo, features)
    if formulation == "taps":
        # y[..., g, :] += x_tap[..., g, c] * kernel[tap, c, g, :] for every tap and every
        # input channel c of a group: broadcast multiply-adds, one fused loop. Its input and
        # output are fenced (_unfused), or XLA fuses the BatchNorm/ReLU before it into every
        # term, or the reduction after it around the sum, and the loop runs 5-10x slower.
        wk = kernel.reshape(kh * kw, cg, groups, features // groups)
        xp = _unfused(_pad(x, pads))
        y = None
        for t, tap in enumerate(_taps(xp, kh, kw, strides, ((0, 0), (0, 0)), dilation)):
            tap = tap.reshape(n, ho, wo, groups, cg)
            for ci in range(cg):
                term = tap[..., ci:ci + 1] * wk[t, ci]
                y = term if y is None else y + term
        return _unfused(y.reshape(n, ho, wo, features))
    raise ValueError(f"conv2d: unknown formulation {formulation!r}; one of {CONV_FORMULATIONS}")


class Conv(nn.Module):
    """``torch.nn.Conv2d`` on NHWC input: :func:`conv2d` plus a bias.

    Parameters as ``flax.linen.Conv``'s (``kernel`` ``(kh, kw, in / groups, features)``,
    ``bias`` ``(features,)``, created in that order), so weights and random initialisations
    are those of ``nn.Conv``; the difference is the formulation, chosen per shape on CPU
    (:func:`conv_formulation`). Leading batch dimensions beyond one are flattened.

    Example:
      >>> c = Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2)
      >>> v = c.init(jax.random.key(0), jnp.ones((1, 2, 2, 4)))
      >>> jax.tree.map(jnp.shape, v)["params"]
      {'bias': (8,), 'kernel': (3, 3, 2, 8)}
      >>> c.apply(v, jnp.ones((5, 2, 2, 4))).shape
      (5, 2, 2, 8)
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    kernel_dilation: tuple[int, int] = (1, 1)
    feature_group_count: int = 1
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = torch_default_kernel
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        groups = self.feature_group_count
        if x.ndim < 4:
            raise ValueError(f"Conv {self.name}: input must be (..., H, W, C), got {x.shape}")
        if x.shape[-1] % groups:
            raise ValueError(f"Conv {self.name}: {x.shape[-1]} input channels do not split "
                             f"into {groups} groups")
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1] // groups, self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        dtype = jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        lead = x.shape[:-3]
        y = conv2d(x.reshape(-1, *x.shape[-3:]), kernel, strides=self.strides,
                   padding=self.padding, dilation=self.kernel_dilation, groups=groups)
        if bias is not None:
            y = y + bias.astype(dtype)
        return y.reshape(*lead, *y.shape[1:])


def conv(
    features: int,
    kernel_size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    bias: bool = True,
    kernel_init: nn.initializers.Initializer = torch_default_kernel,
    name: str,
) -> Conv:
    """``torch.nn.Conv2d(in, features, kernel_size, stride, padding, groups=groups, bias=bias)``.

    Kernel layout HWIO, ``(kh, kw, in / groups, features)``; symmetric zero padding. Every
    convolution of the zoo is built here (a :class:`Conv`), so the per-shape choice of
    formulation (:func:`conv_formulation`) is made in one place.
    """
    ph, pw = _pair(padding)
    return Conv(features, _pair(kernel_size), strides=_pair(stride),
                padding=((ph, ph), (pw, pw)), feature_group_count=groups, use_bias=bias,
                kernel_init=kernel_init, name=name)


def dense(features: int, *, kernel_init: nn.initializers.Initializer = torch_default_kernel,
          name: str) -> nn.Dense:
    """``torch.nn.Linear(in, features)``; kernel ``(in, features)`` (torch's weight transposed)."""
    return nn.Dense(features, kernel_init=kernel_init, name=name)


def batch_norm(*, train: bool, name: str) -> nn.BatchNorm:
    """``torch.nn.BatchNorm2d`` (eps 1e-5; torch momentum 0.1 is Flax momentum 0.9).

    Inference (``train=False``) uses the running averages, as torch's ``.eval()`` does. In
    training mode Flax updates the running variance with the biased batch variance where torch
    uses the unbiased one (a factor n / (n - 1) on the update).
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def max_pool(x: jax.Array, kernel_size: int, *, stride: int, padding: int = 0) -> jax.Array:
    """``torch.nn.MaxPool2d(kernel_size, stride, padding)`` (floor mode; padding is -inf)."""
    return nn.max_pool(x, (kernel_size, kernel_size), strides=(stride, stride),
                       padding=((padding, padding), (padding, padding)))


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row i averages input positions floor(i * n / m) .. ceil((i + 1) * n / m) - 1 (torch)."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d(output_size)`` on ``(N, H, W, C)``.

    Exact torch bins (overlapping when the size does not divide, replicated when the input
    is smaller than the output), computed as two small averaging matrices.
    """
    _, h, w, _ = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    if oh == 1 and ow == 1:
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    ph = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, x, precision=jax.lax.Precision.HIGHEST)


class SqueezeExcitation(nn.Module):
    """``torchvision.ops.SqueezeExcitation``: global mean, ``fc1`` (1x1 conv), ``activation``,
    ``fc2``, ``scale_activation``, times the input. Both activations are scored (on
    ``(N, 1, 1, C)`` maps), under torch's names. Shared by EfficientNet, RegNet Y, MobileNetV3
    and MaxViT; ``kernel_init`` is the family's initialiser of the two 1x1 convolutions.
    """

    squeeze_channels: int
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu
    scale_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid
    kernel_init: Callable = kaiming_normal_fan_out

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = conv(self.squeeze_channels, 1, kernel_init=self.kernel_init, name="fc1")(scale)
        scale = Activation(self.activation, name="activation")(scale)
        scale = conv(x.shape[-1], 1, kernel_init=self.kernel_init, name="fc2")(scale)
        scale = Activation(self.scale_activation, name="scale_activation")(scale)
        return scale * x


def stochastic_depth_rates(prob: float, count: int) -> list[float]:
    """torchvision's linear schedule: block ``i`` of ``count`` gets ``prob * i / (count - 1)``.

    The first block never drops, the last drops with ``prob`` (ConvNeXt, Swin, MaxViT).

    Example:
      >>> stochastic_depth_rates(0.5, 3)
      [0.0, 0.25, 0.5]
    """
    return [prob * i / max(count - 1.0, 1.0) for i in range(count)]


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth(rate, "row")``: drop a residual branch per sample.

    In training (``deterministic=False``) each sample's branch (the first axis indexes
    samples) is zeroed with probability ``rate`` and kept samples are divided by
    ``1 - rate``, so the expectation is unchanged; this needs a ``"dropout"`` PRNG stream
    (``rngs={"dropout": key}``). In inference, or with ``rate == 0``, it is the identity.
    The module has no variables, so it changes no parameter tree or torch weight mapping.
    Each call draws anew (torch's Swin and MaxViT apply one instance to two branches).

    Example:
      >>> sd = StochasticDepth(0.5)
      >>> x = jnp.ones((6, 2))
      >>> bool((sd.apply({}, x, deterministic=True) == x).all())
      True
      >>> y = sd.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
      >>> sorted(set(y[:, 0].tolist()) | set(y[:, 1].tolist())) in ([0.0, 2.0], [0.0], [2.0])
      True
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"StochasticDepth {self.name}: rate must be in [0, 1], "
                             f"got {self.rate}")
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob,
                                    (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))
