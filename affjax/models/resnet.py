"""ResNet, Wide ResNet and ResNeXt (torchvision's ``resnet.py``), in Flax linen.

Module names follow torchvision's state dict (``conv1``, ``bn1``, ``layer2.0``,
``layer2.0.downsample.0``, ``fc``), so the weights convert by the generic rules. Each block
reuses one activation module ``relu`` as torchvision does: 2 calls per basic block, 3 per
bottleneck, the last after the residual addition; the stem has its own ``relu``. Signature
names are therefore ``relu:0``, ``layer1.0/relu:0`` ... ``layer4.1/relu:1``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import batch_norm
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import kaiming_normal_fan_out
from affjax.models.layers import max_pool
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

_conv = functools.partial(conv, bias=False, kernel_init=kaiming_normal_fan_out)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a residual connection (ResNet-18/34)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.groups != 1 or self.base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64 (torchvision)")
        relu = Activation(self.activation, name="relu")
        out = _conv(self.planes, 3, stride=self.stride, padding=1, name="conv1")(x)
        out = relu(batch_norm(train=train, name="bn1")(out))
        out = _conv(self.planes, 3, padding=1, name="conv2")(out)
        out = batch_norm(train=train, name="bn2")(out)
        identity = x
        if self.downsample:
            identity = _conv(self.planes, 1, stride=self.stride, name="downsample.0")(x)
            identity = batch_norm(train=train, name="downsample.1")(identity)
        return relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped, strided), 1x1 expand by 4 (ResNet-50+, ResNeXt, Wide)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        relu = Activation(self.activation, name="relu")
        out = _conv(width, 1, name="conv1")(x)
        out = relu(batch_norm(train=train, name="bn1")(out))
        out = _conv(width, 3, stride=self.stride, padding=1, groups=self.groups, name="conv2")(out)
        out = relu(batch_norm(train=train, name="bn2")(out))
        out = _conv(self.planes * self.expansion, 1, name="conv3")(out)
        out = batch_norm(train=train, name="bn3")(out)
        identity = x
        if self.downsample:
            identity = _conv(self.planes * self.expansion, 1, stride=self.stride,
                             name="downsample.0")(x)
            identity = batch_norm(train=train, name="downsample.1")(identity)
        return relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet on NHWC float32 images; returns ``(N, num_classes)`` logits.

    Attributes:
      block: :class:`BasicBlock` or :class:`Bottleneck`.
      layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      num_classes: width of ``fc``.
      groups, width_per_group: ResNeXt cardinality and bottleneck width (64 = plain ResNet;
        128 = Wide ResNet-*-2).
      activation: the elementwise non-linearity of every ``relu`` module.

    Example:
      >>> model = ResNet(BasicBlock, (2, 2, 2, 2), num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((4, 32, 32, 3))).shape
      (4, 10)
    """

    block: type[BasicBlock] | type[Bottleneck]
    layers: Sequence[int]
    num_classes: int = 1000
    groups: int = 1
    width_per_group: int = 64
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(64, 7, stride=2, padding=3, name="conv1")(x)
        x = batch_norm(train=train, name="bn1")(x)
        x = Activation(self.activation, name="relu")(x)
        x = max_pool(x, 3, stride=2, padding=1)
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers,
                                                     strict=True)):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                outplanes = planes * self.block.expansion
                x = self.block(
                    planes, stride=stride, downsample=stride != 1 or inplanes != outplanes,
                    groups=self.groups, base_width=self.width_per_group,
                    activation=self.activation, name=f"layer{stage + 1}.{index}",
                )(x, train)
                inplanes = outplanes
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        return dense(self.num_classes, name="fc")(x)


def _register(name: str, block: type, layers: tuple[int, ...], resize: int,
              groups: int = 1, width_per_group: int = 64) -> None:
    def build(**kw):
        return ResNet(block, layers, groups=groups, width_per_group=width_per_group, **kw)

    register(ModelSpec(name=name, family="resnet", build=build,
                       transform=EvalTransform(resize_size=resize, crop_size=224), head="fc"))


# resize 232 where torchvision's default weights are IMAGENET1K_V2 (and resnext101_64x4d V1).
_register("resnet18", BasicBlock, (2, 2, 2, 2), 256)
_register("resnet34", BasicBlock, (3, 4, 6, 3), 256)
_register("resnet50", Bottleneck, (3, 4, 6, 3), 232)
_register("resnet101", Bottleneck, (3, 4, 23, 3), 232)
_register("resnet152", Bottleneck, (3, 8, 36, 3), 232)
_register("resnext50_32x4d", Bottleneck, (3, 4, 6, 3), 232, groups=32, width_per_group=4)
_register("resnext101_32x8d", Bottleneck, (3, 4, 23, 3), 232, groups=32, width_per_group=8)
_register("resnext101_64x4d", Bottleneck, (3, 4, 23, 3), 232, groups=64, width_per_group=4)
_register("wide_resnet50_2", Bottleneck, (3, 4, 6, 3), 232, width_per_group=128)
_register("wide_resnet101_2", Bottleneck, (3, 4, 23, 3), 232, width_per_group=128)
