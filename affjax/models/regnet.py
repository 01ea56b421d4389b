"""RegNet X and Y (torchvision's ``regnet.py``), in Flax linen.

Module names follow torchvision's state dict: the stem ``stem`` (``stem.0`` conv, ``stem.1``
BatchNorm, ``stem.2`` ReLU), block ``j`` of stage ``i`` is ``trunk_output.block<i>.block<i>-<j>``
with the optional projection ``proj.0``/``proj.1``, the bottleneck ``f.a`` (1x1), ``f.b``
(3x3 grouped, strided), RegNet Y's squeeze-excitation ``f.se`` (``fc1``, ``activation`` = ReLU,
``fc2``, ``scale_activation`` = Sigmoid), ``f.c`` (1x1, no activation) and the block's
``activation`` (ReLU after the residual addition); the head is ``fc``.

Activation calls, in torchvision's order: the stem ReLU, then per block ``f.a.2``, ``f.b.2``,
(Y only: ``f.se.activation``, ``f.se.scale_activation``) and ``activation``: 1 + 3 x blocks
(X) or 1 + 5 x blocks (Y).

The stage widths, depths and group widths are computed from RegNet's (depth, w_0, w_a, w_m,
group width) parameters as torchvision's ``BlockParams.from_init_params`` does (its float32
arithmetic reproduced in NumPy, checked against torchvision for all 15 models in
``tests/test_models.py`` through the parameter shapes of the conversion).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affjax.capture import Activation
from affjax.models.efficientnet import make_divisible
from affjax.models.layers import SqueezeExcitation
from affjax.models.layers import batch_norm
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import kaiming_normal_fan_out
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

# torchvision's RegNet init: conv weights N(0, 2 / fan_out), Linear N(0, 0.01^2).
_conv = functools.partial(conv, bias=False, kernel_init=kaiming_normal_fan_out)
_linear_init = nn.initializers.normal(0.01)


@dataclasses.dataclass(frozen=True)
class StageParams:
    """One RegNet stage: output width, number of blocks, group width, bottleneck ratio."""

    width: int
    depth: int
    group_width: int
    bottleneck_multiplier: float = 1.0


def stage_params(depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                 bottleneck_multiplier: float = 1.0) -> tuple[StageParams, ...]:
    """torchvision's ``BlockParams.from_init_params`` (quantised linear widths, in float32).

    Example:
      >>> [s.width for s in stage_params(22, 24, 24.48, 2.54, 16)]  # regnet_x_400mf
      [32, 64, 160, 400]
    """
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError(f"invalid RegNet settings w_0={w_0}, w_a={w_a}, w_m={w_m}")
    # torch computes these in float32 (arange * float + int -> float32).
    widths_cont = np.arange(depth, dtype=np.float32) * np.float32(w_a) + np.float32(w_0)
    capacity = np.round(np.log(widths_cont / np.float32(w_0)) / np.float32(math.log(w_m)))
    block_widths = (np.round(np.float32(w_0) * np.power(np.float32(w_m), capacity) / 8) * 8)
    block_widths = [int(w) for w in block_widths.astype(np.int32)]
    stage_widths, stage_depths, previous = [], [], None
    for w in block_widths:
        if w != previous:
            stage_widths.append(w)
            stage_depths.append(0)
        stage_depths[-1] += 1
        previous = w
    stages = []
    for w, d in zip(stage_widths, stage_depths, strict=True):
        w_bot = int(w * bottleneck_multiplier)
        g = min(group_width, w_bot)
        w_bot = make_divisible(w_bot, g)
        stages.append(StageParams(int(w_bot / bottleneck_multiplier), d, g,
                                  bottleneck_multiplier))
    return tuple(stages)


class ResBottleneckBlock(nn.Module):
    """x (or its projection) + 1x1 -> 3x3 grouped [-> SE] -> 1x1, then the activation."""

    width_out: int
    stride: int
    group_width: int
    bottleneck_multiplier: float = 1.0
    se_ratio: float | None = None
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    scale_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width_in = x.shape[-1]
        w_b = int(round(self.width_out * self.bottleneck_multiplier))
        out = _conv(w_b, 1, name="f.a.0")(x)
        out = Activation(self.activation, name="f.a.2")(batch_norm(train=train, name="f.a.1")(out))
        out = _conv(w_b, 3, stride=self.stride, padding=1, groups=w_b // self.group_width,
                    name="f.b.0")(out)
        out = Activation(self.activation, name="f.b.2")(batch_norm(train=train, name="f.b.1")(out))
        if self.se_ratio:
            out = SqueezeExcitation(int(round(self.se_ratio * width_in)),
                                    activation=self.activation,
                                    scale_activation=self.scale_activation, name="f.se")(out)
        out = _conv(self.width_out, 1, name="f.c.0")(out)
        out = batch_norm(train=train, name="f.c.1")(out)
        if width_in != self.width_out or self.stride != 1:
            x = _conv(self.width_out, 1, stride=self.stride, name="proj.0")(x)
            x = batch_norm(train=train, name="proj.1")(x)
        return Activation(self.activation, name="activation")(x + out)


class RegNet(nn.Module):
    """torchvision's RegNet on NHWC float32 images; returns ``(N, num_classes)`` logits.

    Attributes:
      stages: per-stage parameters (:func:`stage_params`); every stage starts with stride 2.
      se_ratio: squeeze-excitation ratio (0.25 for RegNet Y, ``None`` for X).
      num_classes: width of ``fc``.
      stem_width: output channels of the 3x3 stride-2 stem (32).
      activation: every ReLU (stem, blocks, SE ``activation``).
      scale_activation: the SE gate (Sigmoid).

    Example:
      >>> model = RegNet(stage_params(22, 24, 24.48, 2.54, 16), num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 64, 64, 3))).shape
      (2, 10)
    """

    stages: Sequence[StageParams]
    se_ratio: float | None = None
    num_classes: int = 1000
    stem_width: int = 32
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    scale_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.stem_width, 3, stride=2, padding=1, name="stem.0")(x)
        x = Activation(self.activation, name="stem.2")(batch_norm(train=train, name="stem.1")(x))
        for i, stage in enumerate(self.stages, start=1):
            for j in range(stage.depth):
                x = ResBottleneckBlock(
                    stage.width, stride=2 if j == 0 else 1, group_width=stage.group_width,
                    bottleneck_multiplier=stage.bottleneck_multiplier, se_ratio=self.se_ratio,
                    activation=self.activation, scale_activation=self.scale_activation,
                    name=f"trunk_output.block{i}.block{i}-{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        return dense(self.num_classes, kernel_init=_linear_init, name="fc")(x)


# torchvision's builders: (depth, w_0, w_a, w_m, group_width); Y models add SE (ratio 0.25).
_PARAMS = {
    "regnet_x_400mf": (22, 24, 24.48, 2.54, 16),
    "regnet_x_800mf": (16, 56, 35.73, 2.28, 16),
    "regnet_x_1_6gf": (18, 80, 34.01, 2.25, 24),
    "regnet_x_3_2gf": (25, 88, 26.31, 2.25, 48),
    "regnet_x_8gf": (23, 80, 49.56, 2.88, 120),
    "regnet_x_16gf": (22, 216, 55.59, 2.1, 128),
    "regnet_x_32gf": (23, 320, 69.86, 2.0, 168),
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24),
    "regnet_y_8gf": (17, 192, 76.82, 2.19, 56),
    "regnet_y_16gf": (18, 200, 106.23, 2.48, 112),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232),
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264),
}


def _register(name: str, params: tuple) -> None:
    stages = stage_params(*params)
    se_ratio = 0.25 if name.startswith("regnet_y") else None

    def build(**kw):
        return RegNet(stages, se_ratio=se_ratio, **kw)

    # Default weights: IMAGENET1K_V2 (resize 232) except regnet_y_128gf (SWAG E2E, 384 bicubic).
    if name == "regnet_y_128gf":
        transform = EvalTransform(resize_size=384, crop_size=384, interpolation="bicubic")
    else:
        transform = EvalTransform(resize_size=232, crop_size=224)
    register(ModelSpec(name=name, family="regnet", build=build, transform=transform, head="fc"))


for _name, _params in _PARAMS.items():
    _register(_name, _params)
