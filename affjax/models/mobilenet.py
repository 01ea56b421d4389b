"""MobileNetV2 and MobileNetV3 small/large (torchvision's ``mobilenetv2.py``,
``mobilenetv3.py``), in Flax linen.

Module names follow torchvision's state dict. torchvision's ``Conv2dNormActivation`` is an
``nn.Sequential`` (``0`` conv, ``1`` BatchNorm, ``2`` activation), here :class:`ConvBNAct`
with children named ``"0"``, ``"1"``, ``"2"``; an inverted residual is ``features.<i>`` holding
``conv.<j>`` (V2) or ``block.<j>`` (V3). V3's squeeze-excitation (``torchvision.ops.
SqueezeExcitation``) keeps its names ``fc1``, ``activation`` (ReLU), ``fc2``,
``scale_activation`` (Hardsigmoid); both activations are scored, on the pooled ``(N, 1, 1, C)``
map (reduced to ``(N, C)``), in that order. Activation calls: V2 35 (ReLU6), V3-small 42 and
V3-large 48 (ReLU, Hardswish, Hardsigmoid, including the Hardswish between the two
classifier Linears).

BatchNorm: V2 uses torch's defaults (eps 1e-5); V3 uses eps 1e-3, momentum 0.01 (Flax 0.99).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import SqueezeExcitation
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import kaiming_normal_fan_out
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

Fn = Callable[[jax.Array], jax.Array]
# torchvision's MobileNet init: Linear weight N(0, 0.01), biases zero (Flax's default).
_linear_init = nn.initializers.normal(0.01)


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: nearest multiple of ``divisor``, at most 10% smaller."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvBNAct(nn.Module):
    """``Conv2dNormActivation``: conv (no bias) ``"0"``, BatchNorm ``"1"``, activation ``"2"``.

    ``activation=None`` leaves the activation out (V3's projection convolutions).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    activation: Fn | None = jax.nn.relu6
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9  # Flax convention: torch momentum 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.features, self.kernel_size, stride=self.stride,
                 padding=(self.kernel_size - 1) // 2, groups=self.groups, bias=False,
                 kernel_init=kaiming_normal_fan_out, name="0")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=self.bn_epsilon, name="1")(x)
        if self.activation is not None:
            x = Activation(self.activation, name="2")(x)
        return x


class InvertedResidualV2(nn.Module):
    """1x1 expand (ReLU6, skipped when ``expand_ratio == 1``), 3x3 depthwise (ReLU6), 1x1
    linear projection; residual when the stride is 1 and the widths agree."""

    features: int
    stride: int
    expand_ratio: int
    activation: Fn = jax.nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inp = x.shape[-1]
        hidden = int(round(inp * self.expand_ratio))
        out, index = x, 0
        if self.expand_ratio != 1:
            out = ConvBNAct(hidden, 1, activation=self.activation, name="conv.0")(out, train)
            index = 1
        out = ConvBNAct(hidden, 3, stride=self.stride, groups=hidden, activation=self.activation,
                        name=f"conv.{index}")(out, train)
        out = conv(self.features, 1, bias=False, kernel_init=kaiming_normal_fan_out,
                   name=f"conv.{index + 1}")(out)
        out = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           name=f"conv.{index + 2}")(out)
        if self.stride == 1 and inp == self.features:
            out = out + x
        return out


# (expand ratio t, output channels c, repeats n, first stride s) of MobileNetV2.
_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 on NHWC float32 images (side >= 32); ``(N, num_classes)``.

    Attributes:
      num_classes: width of ``classifier.1``.
      width_mult: channel multiplier (1.0 in torchvision's ``mobilenet_v2``).
      dropout: rate of ``classifier.0`` (active only with ``train=True`` and a ``"dropout"``
        PRNG key).
      activation: the non-linearity of every ReLU6 module.

    Example:
      >>> model = MobileNetV2(num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    dropout: float = 0.2
    activation: Fn = jax.nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = make_divisible(32 * self.width_mult)
        last = make_divisible(1280 * max(1.0, self.width_mult))
        x = ConvBNAct(channels, 3, stride=2, activation=self.activation,
                      name="features.0")(x, train)
        index = 1
        for t, c, n, s in _V2_SETTING:
            out = make_divisible(c * self.width_mult)
            for i in range(n):
                x = InvertedResidualV2(out, s if i == 0 else 1, t, self.activation,
                                       name=f"features.{index}")(x, train)
                index += 1
        x = ConvBNAct(last, 1, activation=self.activation, name=f"features.{index}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # adaptive_avg_pool2d((1, 1)) + flatten
        x = nn.Dropout(self.dropout, deterministic=not train, name="classifier.0")(x)
        return dense(self.num_classes, kernel_init=_linear_init, name="classifier.1")(x)


class BlockV3(NamedTuple):
    """One row of torchvision's ``InvertedResidualConfig`` (width_mult 1, no dilation)."""

    inp: int
    kernel: int
    expanded: int
    out: int
    use_se: bool
    hardswish: bool  # "HS" (Hardswish) or "RE" (ReLU)
    stride: int


def _v3(*rows: tuple) -> tuple[BlockV3, ...]:
    return tuple(BlockV3(i, k, e, o, se, act == "HS", s) for i, k, e, o, se, act, s in rows)


_V3_LARGE = _v3(
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1), (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)
_V3_SMALL = _v3(
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1), (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2), (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)


_V3_BN = {"bn_epsilon": 1e-3, "bn_momentum": 0.99}  # torch eps 0.001, momentum 0.01


class InvertedResidualV3(nn.Module):
    """1x1 expand (if wider), kxk depthwise, optional squeeze-excitation, 1x1 projection."""

    config: BlockV3
    relu: Fn = jax.nn.relu
    hardswish: Fn = jax.nn.hard_swish
    hardsigmoid: Fn = jax.nn.hard_sigmoid

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        act = self.hardswish if c.hardswish else self.relu
        out, index = x, 0
        if c.expanded != c.inp:
            out = ConvBNAct(c.expanded, 1, activation=act, name="block.0", **_V3_BN)(out, train)
            index = 1
        out = ConvBNAct(c.expanded, c.kernel, stride=c.stride, groups=c.expanded, activation=act,
                        name=f"block.{index}", **_V3_BN)(out, train)
        index += 1
        if c.use_se:
            out = SqueezeExcitation(make_divisible(c.expanded // 4), self.relu, self.hardsigmoid,
                                    name=f"block.{index}")(out)
            index += 1
        out = ConvBNAct(c.out, 1, activation=None, name=f"block.{index}", **_V3_BN)(out, train)
        if c.stride == 1 and c.inp == c.out:
            out = out + x
        return out


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3 on NHWC float32 images (side >= 32); ``(N, num_classes)``.

    Attributes:
      blocks: the inverted-residual table (``"large"`` or ``"small"``).
      last_channel: width of ``classifier.0`` (1280 large, 1024 small).
      num_classes: width of ``classifier.3``.
      dropout: rate of ``classifier.2`` (active only with ``train=True``).
      relu, hardswish, hardsigmoid: the functions of torchvision's ReLU, Hardswish and
        Hardsigmoid modules (the last only in squeeze-excitation).

    Example:
      >>> model = MobileNetV3("small", 1024, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    blocks: str = "large"
    last_channel: int = 1280
    num_classes: int = 1000
    dropout: float = 0.2
    relu: Fn = jax.nn.relu
    hardswish: Fn = jax.nn.hard_swish
    hardsigmoid: Fn = jax.nn.hard_sigmoid

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.blocks not in ("large", "small"):
            raise ValueError(f"MobileNetV3 blocks must be 'large' or 'small', got {self.blocks!r}")
        table = _V3_LARGE if self.blocks == "large" else _V3_SMALL
        x = ConvBNAct(table[0].inp, 3, stride=2, activation=self.hardswish, name="features.0",
                      **_V3_BN)(x, train)
        for index, config in enumerate(table, start=1):
            x = InvertedResidualV3(config, self.relu, self.hardswish, self.hardsigmoid,
                                   name=f"features.{index}")(x, train)
        x = ConvBNAct(6 * table[-1].out, 1, activation=self.hardswish,
                      name=f"features.{len(table) + 1}", **_V3_BN)(x, train)
        x = jnp.mean(x, axis=(1, 2))  # adaptive_avg_pool2d((1, 1)) + flatten
        x = dense(self.last_channel, kernel_init=_linear_init, name="classifier.0")(x)
        x = Activation(self.hardswish, name="classifier.1")(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="classifier.2")(x)
        return dense(self.num_classes, kernel_init=_linear_init, name="classifier.3")(x)


register(ModelSpec(
    name="mobilenet_v2", family="mobilenet", build=MobileNetV2, head="classifier.1",
    transform=EvalTransform(resize_size=232, crop_size=224),  # IMAGENET1K_V2
))
register(ModelSpec(
    name="mobilenet_v3_large", family="mobilenet", head="classifier.3",
    build=lambda **kw: MobileNetV3("large", 1280, **kw),
    transform=EvalTransform(resize_size=232, crop_size=224),  # IMAGENET1K_V2
))
register(ModelSpec(
    name="mobilenet_v3_small", family="mobilenet", head="classifier.3",
    build=lambda **kw: MobileNetV3("small", 1024, **kw),
    transform=EvalTransform(resize_size=256, crop_size=224),  # IMAGENET1K_V1
))
