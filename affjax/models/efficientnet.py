"""EfficientNet B0-B7 and EfficientNet V2 S/M/L (torchvision's ``efficientnet.py``), in Flax.

Module names follow torchvision's state dict: the stem ``features.0`` (conv ``features.0.0``,
BatchNorm ``features.0.1``, SiLU ``features.0.2``), stage ``i`` block ``j`` is
``features.i.j`` with its layers under ``block.k`` (``block.k.0`` conv, ``block.k.1``
BatchNorm, ``block.k.2`` SiLU), the squeeze-excitation of an MBConv block under
``block.<k>`` (``fc1``, ``activation`` = SiLU, ``fc2``, ``scale_activation`` = Sigmoid), the
last 1x1 conv ``features.<last>`` and the head ``classifier.1``.

Activation calls, in torchvision's order: stem SiLU; per MBConv block the expansion SiLU
(absent when the expansion ratio is 1), the depthwise SiLU, the SE SiLU and the SE Sigmoid
(both on the pooled ``(N, 1, 1, C)`` map, reduced to ``(N, C)``); per FusedMBConv block one
SiLU; the last conv's SiLU. Stochastic depth and dropout are identities in inference mode.
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

from affjax.capture import Activation
from affjax.models.layers import SqueezeExcitation
from affjax.models.layers import StochasticDepth
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import kaiming_normal_fan_out
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import IMAGENET_MEAN
from affjax.models.transforms import IMAGENET_STD
from affjax.models.transforms import EvalTransform

_conv = functools.partial(conv, bias=False, kernel_init=kaiming_normal_fan_out)
# torchvision's Linear init here: U(+-1 / sqrt(out_features)).
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, not below 90%."""
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def _batch_norm(train: bool, epsilon: float, name: str) -> nn.BatchNorm:
    # torch momentum 0.1 (0.01 for B5-B7: only training updates differ) = Flax 0.9 (0.99).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon, name=name)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of blocks (torchvision's ``MBConvConfig`` / ``FusedMBConvConfig``).

    Channels and depth are already scaled by the width and depth multipliers.
    """

    fused: bool
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def _v1_stages(width_mult: float, depth_mult: float) -> tuple[StageConfig, ...]:
    base = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
            (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
            (6, 3, 1, 192, 320, 1))
    return tuple(StageConfig(False, e, k, s, make_divisible(i * width_mult),
                             make_divisible(o * width_mult), int(math.ceil(n * depth_mult)))
                 for e, k, s, i, o, n in base)


def _v2_stages(rows: Sequence[tuple]) -> tuple[StageConfig, ...]:
    return tuple(StageConfig(fused, e, k, s, i, o, n) for fused, e, k, s, i, o, n in rows)


_V2_S = _v2_stages(((True, 1, 3, 1, 24, 24, 2), (True, 4, 3, 2, 24, 48, 4),
                    (True, 4, 3, 2, 48, 64, 4), (False, 4, 3, 2, 64, 128, 6),
                    (False, 6, 3, 1, 128, 160, 9), (False, 6, 3, 2, 160, 256, 15)))
_V2_M = _v2_stages(((True, 1, 3, 1, 24, 24, 3), (True, 4, 3, 2, 24, 48, 5),
                    (True, 4, 3, 2, 48, 80, 5), (False, 4, 3, 2, 80, 160, 7),
                    (False, 6, 3, 1, 160, 176, 14), (False, 6, 3, 2, 176, 304, 18),
                    (False, 6, 3, 1, 304, 512, 5)))
_V2_L = _v2_stages(((True, 1, 3, 1, 32, 32, 4), (True, 4, 3, 2, 32, 64, 7),
                    (True, 4, 3, 2, 64, 96, 7), (False, 4, 3, 2, 96, 192, 10),
                    (False, 6, 3, 1, 192, 224, 19), (False, 6, 3, 2, 224, 384, 25),
                    (False, 6, 3, 1, 384, 640, 7)))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand], depthwise kxk, squeeze-excitation, 1x1 project."""

    cfg: StageConfig
    epsilon: float = 1e-5
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu
    scale_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid
    stochastic_depth: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        expanded = make_divisible(cfg.input_channels * cfg.expand_ratio)
        out, k = x, 0
        if expanded != cfg.input_channels:
            out = _conv(expanded, 1, name=f"block.{k}.0")(out)
            out = _batch_norm(train, self.epsilon, f"block.{k}.1")(out)
            out = Activation(self.activation, name=f"block.{k}.2")(out)
            k += 1
        out = _conv(expanded, cfg.kernel, stride=cfg.stride, padding=(cfg.kernel - 1) // 2,
                    groups=expanded, name=f"block.{k}.0")(out)
        out = _batch_norm(train, self.epsilon, f"block.{k}.1")(out)
        out = Activation(self.activation, name=f"block.{k}.2")(out)
        out = SqueezeExcitation(max(1, cfg.input_channels // 4), activation=self.activation,
                                scale_activation=self.scale_activation,
                                name=f"block.{k + 1}")(out)
        out = _conv(cfg.out_channels, 1, name=f"block.{k + 2}.0")(out)
        out = _batch_norm(train, self.epsilon, f"block.{k + 2}.1")(out)
        if cfg.stride == 1 and cfg.input_channels == cfg.out_channels:
            out = StochasticDepth(self.stochastic_depth, name="stochastic_depth")(
                out, deterministic=not train)
            out = out + x
        return out


class FusedMBConv(nn.Module):
    """EfficientNet V2's fused block: kxk expand (or kxk when the ratio is 1), 1x1 project."""

    cfg: StageConfig
    epsilon: float = 1e-3
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu
    stochastic_depth: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.cfg
        expanded = make_divisible(cfg.input_channels * cfg.expand_ratio)
        pad = (cfg.kernel - 1) // 2
        if expanded != cfg.input_channels:
            out = _conv(expanded, cfg.kernel, stride=cfg.stride, padding=pad, name="block.0.0")(x)
            out = _batch_norm(train, self.epsilon, "block.0.1")(out)
            out = Activation(self.activation, name="block.0.2")(out)
            out = _conv(cfg.out_channels, 1, name="block.1.0")(out)
            out = _batch_norm(train, self.epsilon, "block.1.1")(out)
        else:
            out = _conv(cfg.out_channels, cfg.kernel, stride=cfg.stride, padding=pad,
                        name="block.0.0")(x)
            out = _batch_norm(train, self.epsilon, "block.0.1")(out)
            out = Activation(self.activation, name="block.0.2")(out)
        if cfg.stride == 1 and cfg.input_channels == cfg.out_channels:
            out = StochasticDepth(self.stochastic_depth, name="stochastic_depth")(
                out, deterministic=not train)
            out = out + x
        return out


class EfficientNet(nn.Module):
    """torchvision's EfficientNet (V1 and V2) on NHWC float32 images -> ``(N, num_classes)``.

    Attributes:
      stages: the stage configurations (:class:`StageConfig`, channels already scaled).
      last_channel: width of the last 1x1 conv (``None``: 4 x the last stage's width).
      epsilon: BatchNorm epsilon (1e-5 for B0-B4, 1e-3 for B5-B7 and V2, as torchvision).
      num_classes: width of ``classifier.1``.
      dropout: dropout rate before the classifier (training mode only; needs a
        ``"dropout"`` rng).
      stochastic_depth_prob: block ``i`` of ``B`` (counted over all stages) drops its
        residual branch with ``prob * i / B`` in training, as torchvision (0.2 in every
        torchvision EfficientNet).
      activation: every SiLU (stem, blocks, SE ``activation``, last conv).
      scale_activation: the SE gate (Sigmoid).

    Example:
      >>> model = EfficientNet(_v1_stages(1.0, 1.0), num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 64, 64, 3))).shape
      (2, 10)
    """

    stages: Sequence[StageConfig]
    last_channel: int | None = None
    epsilon: float = 1e-5
    num_classes: int = 1000
    dropout: float = 0.2
    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu
    scale_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid
    stochastic_depth_prob: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.stages[0].input_channels, 3, stride=2, padding=1, name="features.0.0")(x)
        x = _batch_norm(train, self.epsilon, "features.0.1")(x)
        x = Activation(self.activation, name="features.0.2")(x)
        block_id, total = 0, sum(cfg.num_layers for cfg in self.stages)
        for i, cfg in enumerate(self.stages, start=1):
            for j in range(cfg.num_layers):
                block_cfg = cfg if j == 0 else dataclasses.replace(
                    cfg, input_channels=cfg.out_channels, stride=1)
                rate = self.stochastic_depth_prob * block_id / total
                if cfg.fused:
                    x = FusedMBConv(block_cfg, epsilon=self.epsilon, activation=self.activation,
                                    stochastic_depth=rate, name=f"features.{i}.{j}")(x, train)
                else:
                    x = MBConv(block_cfg, epsilon=self.epsilon, activation=self.activation,
                               scale_activation=self.scale_activation, stochastic_depth=rate,
                               name=f"features.{i}.{j}")(x, train)
                block_id += 1
        last = len(self.stages) + 1
        width = self.last_channel or 4 * self.stages[-1].out_channels
        x = _conv(width, 1, name=f"features.{last}.0")(x)
        x = _batch_norm(train, self.epsilon, f"features.{last}.1")(x)
        x = Activation(self.activation, name=f"features.{last}.2")(x)
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return dense(self.num_classes, kernel_init=_linear_init, name="classifier.1")(x)


def _register(name: str, stages: tuple[StageConfig, ...], *, last_channel: int | None,
              epsilon: float, dropout: float, resize: int, crop: int, interpolation: str,
              mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
              ) -> None:
    def build(**kw):
        kw.setdefault("dropout", dropout)
        return EfficientNet(stages, last_channel=last_channel, epsilon=epsilon, **kw)

    register(ModelSpec(name=name, family="efficientnet", build=build,
                       transform=EvalTransform(resize_size=resize, crop_size=crop,
                                               interpolation=interpolation, mean=mean,
                                               std=std),
                       head="classifier.1"))


# (width, depth, dropout, BatchNorm eps, resize, crop, interpolation): torchvision's builders
# and default weights (B1's default is IMAGENET1K_V2: resize 255, bilinear).
for _name, (_w, _d, _p, _eps, _resize, _crop, _interp) in {
    "efficientnet_b0": (1.0, 1.0, 0.2, 1e-5, 256, 224, "bicubic"),
    "efficientnet_b1": (1.0, 1.1, 0.2, 1e-5, 255, 240, "bilinear"),
    "efficientnet_b2": (1.1, 1.2, 0.3, 1e-5, 288, 288, "bicubic"),
    "efficientnet_b3": (1.2, 1.4, 0.3, 1e-5, 320, 300, "bicubic"),
    "efficientnet_b4": (1.4, 1.8, 0.4, 1e-5, 384, 380, "bicubic"),
    "efficientnet_b5": (1.6, 2.2, 0.4, 1e-3, 456, 456, "bicubic"),
    "efficientnet_b6": (1.8, 2.6, 0.5, 1e-3, 528, 528, "bicubic"),
    "efficientnet_b7": (2.0, 3.1, 0.5, 1e-3, 600, 600, "bicubic"),
}.items():
    _register(_name, _v1_stages(_w, _d), last_channel=None, epsilon=_eps, dropout=_p,
              resize=_resize, crop=_crop, interpolation=_interp)

_register("efficientnet_v2_s", _V2_S, last_channel=1280, epsilon=1e-3, dropout=0.2,
          resize=384, crop=384, interpolation="bilinear")
_register("efficientnet_v2_m", _V2_M, last_channel=1280, epsilon=1e-3, dropout=0.3,
          resize=480, crop=480, interpolation="bilinear")
_register("efficientnet_v2_l", _V2_L, last_channel=1280, epsilon=1e-3, dropout=0.4,
          resize=480, crop=480, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
