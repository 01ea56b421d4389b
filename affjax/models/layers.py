"""Building blocks with PyTorch semantics for the torchvision ports (NHWC, float32).

Flax's defaults differ from torch's in small ways that change numbers: BatchNorm epsilon
(1e-6 in Flax, 1e-5 in torch) and momentum convention, ``"SAME"`` vs explicit symmetric
padding, adaptive pooling (no Flax equivalent). These helpers fix those once.
"""

from __future__ import annotations

from collections.abc import Callable

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


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: bool = True,
    kernel_init: nn.initializers.Initializer = torch_default_kernel,
    name: str,
) -> nn.Conv:
    """``torch.nn.Conv2d(in, features, kernel_size, stride, padding, groups=groups, bias=bias)``.

    Kernel layout HWIO, ``(k, k, in / groups, features)``; symmetric zero padding.
    """
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), feature_group_count=groups,
                   use_bias=bias, kernel_init=kernel_init, name=name)


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
