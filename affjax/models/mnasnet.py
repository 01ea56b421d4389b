"""MNASNet 0.5/0.75/1.0/1.3 (torchvision's ``mnasnet.py``), in Flax linen.

Module names follow torchvision's state dict: the whole trunk is the ``nn.Sequential``
``layers`` (``layers.0`` .. ``layers.16``); ``layers.8`` .. ``layers.13`` are stacks of
inverted residuals, each block (``layers.8.0``) holding its own ``layers.0`` .. ``layers.7``
(1x1 expand, BN, ReLU, depthwise, BN, ReLU, 1x1 project, BN); ``classifier.1`` is the Linear.
BatchNorm momentum is torchvision's 0.0003 (Flax 0.9997), eps 1e-5. 35 activation calls in
every width: 2 in the stem, 2 per inverted residual (16), 1 after ``layers.14``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import Conv
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import kaiming_normal_fan_out
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

Fn = Callable[[jax.Array], jax.Array]
# torchvision: Linear kaiming_uniform_(mode="fan_out", nonlinearity="sigmoid"), bias zero.
_linear_init = nn.initializers.variance_scaling(1.0, "fan_out", "uniform")


def _bn(train: bool, name: str) -> nn.BatchNorm:
    # torch momentum 1 - 0.9997 (MNASNet's _BN_MOMENTUM) is Flax momentum 0.9997.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9997, epsilon=1e-5, name=name)


def _conv(features: int, kernel: int, *, stride: int = 1, groups: int = 1, name: str) -> Conv:
    return conv(features, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False,
                kernel_init=kaiming_normal_fan_out, name=name)


def round_to_multiple_of(value: float, divisor: int = 8, round_up_bias: float = 0.9) -> int:
    """torchvision's ``_round_to_multiple_of``: nearest multiple, at most 10% smaller."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new if new >= round_up_bias * value else new + divisor


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU), kxk depthwise (ReLU), 1x1 linear projection; residual when the
    stride is 1 and the widths agree."""

    features: int
    kernel_size: int
    stride: int
    expansion: int
    activation: Fn = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        mid = x.shape[-1] * self.expansion
        out = _conv(mid, 1, name="layers.0")(x)
        out = Activation(self.activation, name="layers.2")(_bn(train, "layers.1")(out))
        out = _conv(mid, self.kernel_size, stride=self.stride, groups=mid, name="layers.3")(out)
        out = Activation(self.activation, name="layers.5")(_bn(train, "layers.4")(out))
        out = _bn(train, "layers.7")(_conv(self.features, 1, name="layers.6")(out))
        if self.stride == 1 and x.shape[-1] == self.features:
            out = out + x
        return out


# (kernel, first stride, expansion, repeats) of the stacks layers.8 .. layers.13.
_STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))


class MNASNet(nn.Module):
    """torchvision's MNASNet on NHWC float32 images (side >= 32); ``(N, num_classes)``.

    Attributes:
      alpha: width multiplier (0.5, 0.75, 1.0, 1.3 in torchvision's models).
      num_classes: width of ``classifier.1``.
      dropout: rate of ``classifier.0`` (active only with ``train=True`` and a ``"dropout"``
        PRNG key).
      activation: the non-linearity of every ReLU module.

    Example:
      >>> model = MNASNet(0.5, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    alpha: float = 1.0
    num_classes: int = 1000
    dropout: float = 0.2
    activation: Fn = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.alpha <= 0:
            raise ValueError(f"MNASNet alpha must be positive, got {self.alpha}")
        depths = [round_to_multiple_of(d * self.alpha) for d in (32, 16, 24, 40, 80, 96, 192,
                                                                   320)]
        x = _conv(depths[0], 3, stride=2, name="layers.0")(x)
        x = Activation(self.activation, name="layers.2")(_bn(train, "layers.1")(x))
        x = _conv(depths[0], 3, groups=depths[0], name="layers.3")(x)
        x = Activation(self.activation, name="layers.5")(_bn(train, "layers.4")(x))
        x = _bn(train, "layers.7")(_conv(depths[1], 1, name="layers.6")(x))
        for stack, (kernel, stride, expansion, repeats) in enumerate(_STACKS):
            for index in range(repeats):
                x = InvertedResidual(depths[stack + 2], kernel, stride if index == 0 else 1,
                                     expansion, self.activation,
                                     name=f"layers.{8 + stack}.{index}")(x, train)
        x = _conv(1280, 1, name="layers.14")(x)
        x = Activation(self.activation, name="layers.16")(_bn(train, "layers.15")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train, name="classifier.0")(x)
        return dense(self.num_classes, kernel_init=_linear_init, name="classifier.1")(x)


def _register(name: str, alpha: float, resize: int) -> None:
    register(ModelSpec(
        name=name, family="mnasnet", build=lambda **kw: MNASNet(alpha, **kw),
        transform=EvalTransform(resize_size=resize, crop_size=224), head="classifier.1",
    ))


_register("mnasnet0_5", 0.5, 256)
_register("mnasnet0_75", 0.75, 232)
_register("mnasnet1_0", 1.0, 256)
_register("mnasnet1_3", 1.3, 232)
