"""SqueezeNet 1.0 and 1.1 (torchvision's ``squeezenet.py``), in Flax linen.

Module names follow torchvision's ``nn.Sequential`` indices: ``features.<i>`` is a convolution
or a :class:`Fire` module (``squeeze``, ``squeeze_activation``, ``expand1x1``,
``expand1x1_activation``, ``expand3x3``, ``expand3x3_activation``); ``classifier.1`` is the
final 1x1 convolution (the head, a conv rather than a Linear) and ``classifier.2`` the ReLU
applied to the class maps before the global average. The max-pools use torch's
``ceil_mode=True``. 26 activation calls in both versions: the stem, 3 per Fire module (8) and
the classifier's ReLU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import conv
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

Fn = Callable[[jax.Array], jax.Array]
# torchvision: kaiming_uniform_ (fan_in, ReLU gain) for the convolutions, N(0, 0.01) for the
# final one, biases zero (Flax's default).
_kaiming_uniform = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")


def max_pool_ceil(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """``torch.nn.MaxPool2d(kernel_size, stride, ceil_mode=True)`` on ``(N, H, W, C)``.

    Output side ``ceil((n - k) / s) + 1``: the last window may hang over the bottom/right edge
    (padded with -inf), as long as it starts inside the map.
    """
    pads = []
    for n in x.shape[1:3]:
        out = math.ceil((n - kernel_size) / stride) + 1
        if (out - 1) * stride >= n:  # torch drops a window that would start outside
            out -= 1
        pads.append((0, max(0, (out - 1) * stride + kernel_size - n)))
    return nn.max_pool(x, (kernel_size, kernel_size), strides=(stride, stride), padding=pads)


class Fire(nn.Module):
    """1x1 squeeze (ReLU), then 1x1 and 3x3 expansions (each ReLU) concatenated (1x1 first)."""

    squeeze: int
    expand1x1: int
    expand3x3: int
    activation: Fn = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.squeeze, 1, kernel_init=_kaiming_uniform, name="squeeze")(x)
        x = Activation(self.activation, name="squeeze_activation")(x)
        a = conv(self.expand1x1, 1, kernel_init=_kaiming_uniform, name="expand1x1")(x)
        a = Activation(self.activation, name="expand1x1_activation")(a)
        b = conv(self.expand3x3, 3, padding=1, kernel_init=_kaiming_uniform,
                 name="expand3x3")(x)
        b = Activation(self.activation, name="expand3x3_activation")(b)
        return jnp.concatenate([a, b], axis=-1)


# Layers after the stem ReLU: "pool", or (squeeze, expand1x1, expand3x3) of a Fire module.
_LAYERS = {
    "1_0": ("pool", (16, 64, 64), (16, 64, 64), (32, 128, 128), "pool", (32, 128, 128),
            (48, 192, 192), (48, 192, 192), (64, 256, 256), "pool", (64, 256, 256)),
    "1_1": ("pool", (16, 64, 64), (16, 64, 64), "pool", (32, 128, 128), (32, 128, 128), "pool",
            (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)),
}


class SqueezeNet(nn.Module):
    """torchvision's SqueezeNet on NHWC float32 images (side >= 32); ``(N, num_classes)``.

    Attributes:
      version: ``"1_0"`` (7x7 stem, 96 channels) or ``"1_1"`` (3x3 stem, 64 channels).
      num_classes: channels of the final 1x1 convolution ``classifier.1``.
      dropout: rate of ``classifier.0`` (active only with ``train=True`` and a ``"dropout"``
        PRNG key).
      activation: the non-linearity of every ReLU module.

    Example:
      >>> model = SqueezeNet("1_1", num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 64, 64, 3))).shape
      (2, 10)
    """

    version: str = "1_0"
    num_classes: int = 1000
    dropout: float = 0.5
    activation: Fn = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.version not in _LAYERS:
            raise ValueError(f"SqueezeNet version must be '1_0' or '1_1', got {self.version!r}")
        if self.version == "1_0":
            x = conv(96, 7, stride=2, kernel_init=_kaiming_uniform, name="features.0")(x)
        else:
            x = conv(64, 3, stride=2, kernel_init=_kaiming_uniform, name="features.0")(x)
        x = Activation(self.activation, name="features.1")(x)
        for index, layer in enumerate(_LAYERS[self.version], start=2):
            if layer == "pool":
                x = max_pool_ceil(x, 3, 2)
            else:
                x = Fire(*layer, activation=self.activation, name=f"features.{index}")(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="classifier.0")(x)
        x = conv(self.num_classes, 1, kernel_init=nn.initializers.normal(0.01),
                 name="classifier.1")(x)
        x = Activation(self.activation, name="classifier.2")(x)
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten


for _version in ("1_0", "1_1"):
    register(ModelSpec(
        name=f"squeezenet{_version}", family="squeezenet",
        build=lambda _v=_version, **kw: SqueezeNet(_v, **kw),
        transform=EvalTransform(resize_size=256, crop_size=224), head="classifier.1",
    ))
