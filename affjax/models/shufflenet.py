"""ShuffleNet V2 x0.5/x1.0/x1.5/x2.0 (torchvision's ``shufflenetv2.py``), in Flax linen.

Module names follow torchvision's state dict: ``conv1.0`` .. ``conv1.2``, ``stage2.0``
(holding ``branch1.0`` .. ``branch1.4`` in a strided block and ``branch2.0`` ..
``branch2.7``), ``conv5.0`` .. ``conv5.2``, ``fc``. The channel shuffle is done on the NHWC
channel axis with torch's index order (groups of 2: new channel ``j * 2 + i`` is old channel
``i * C / 2 + j``). 37 activation calls in every width: ``conv1``, 3 per strided block (3),
2 per other block (13), ``conv5``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import batch_norm
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import max_pool
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

Fn = Callable[[jax.Array], jax.Array]


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """torchvision's ``channel_shuffle`` on ``(N, H, W, C)`` (C divisible by ``groups``)."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


class InvertedResidual(nn.Module):
    """A ShuffleNet V2 unit; stride 1 splits the channels in two, stride 2 uses both branches."""

    features: int
    stride: int
    activation: Fn = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        branch = self.features // 2
        if self.stride == 1:
            left, x = jnp.split(x, 2, axis=-1)  # x.chunk(2, dim=1)
        else:
            inp = x.shape[-1]
            left = conv(inp, 3, stride=self.stride, padding=1, groups=inp, bias=False,
                        name="branch1.0")(x)
            left = batch_norm(train=train, name="branch1.1")(left)
            left = conv(branch, 1, bias=False, name="branch1.2")(left)
            left = batch_norm(train=train, name="branch1.3")(left)
            left = Activation(self.activation, name="branch1.4")(left)
        right = conv(branch, 1, bias=False, name="branch2.0")(x)
        right = Activation(self.activation, name="branch2.2")(
            batch_norm(train=train, name="branch2.1")(right))
        right = conv(branch, 3, stride=self.stride, padding=1, groups=branch, bias=False,
                     name="branch2.3")(right)
        right = batch_norm(train=train, name="branch2.4")(right)
        right = conv(branch, 1, bias=False, name="branch2.5")(right)
        right = Activation(self.activation, name="branch2.7")(
            batch_norm(train=train, name="branch2.6")(right))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """torchvision's ShuffleNetV2 on NHWC float32 images (side >= 32); ``(N, num_classes)``.

    Attributes:
      stages_out_channels: ``conv1``, ``stage2`` .. ``stage4`` and ``conv5`` widths.
      stages_repeats: units per stage (``(4, 8, 4)``).
      num_classes: width of ``fc``.
      activation: the non-linearity of every ReLU module.

    Example:
      >>> model = ShuffleNetV2((24, 48, 96, 192, 1024), num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    stages_out_channels: Sequence[int]
    stages_repeats: Sequence[int] = (4, 8, 4)
    num_classes: int = 1000
    activation: Fn = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.stages_out_channels) != 5 or len(self.stages_repeats) != 3:
            raise ValueError("ShuffleNetV2 needs 5 stages_out_channels and 3 stages_repeats, "
                             f"got {self.stages_out_channels} and {self.stages_repeats}")
        widths = self.stages_out_channels
        x = conv(widths[0], 3, stride=2, padding=1, bias=False, name="conv1.0")(x)
        x = Activation(self.activation, name="conv1.2")(batch_norm(train=train,
                                                                   name="conv1.1")(x))
        x = max_pool(x, 3, stride=2, padding=1)
        for stage, (repeats, width) in enumerate(zip(self.stages_repeats, widths[1:4],
                                                     strict=True), start=2):
            for index in range(repeats):
                x = InvertedResidual(width, 2 if index == 0 else 1, self.activation,
                                     name=f"stage{stage}.{index}")(x, train)
        x = conv(widths[4], 1, bias=False, name="conv5.0")(x)
        x = Activation(self.activation, name="conv5.2")(batch_norm(train=train,
                                                                   name="conv5.1")(x))
        x = jnp.mean(x, axis=(1, 2))
        return dense(self.num_classes, name="fc")(x)


def _register(name: str, widths: tuple[int, ...], resize: int) -> None:
    register(ModelSpec(
        name=name, family="shufflenet", build=lambda **kw: ShuffleNetV2(widths, **kw),
        transform=EvalTransform(resize_size=resize, crop_size=224), head="fc",
    ))


_register("shufflenet_v2_x0_5", (24, 48, 96, 192, 1024), 256)
_register("shufflenet_v2_x1_0", (24, 116, 232, 464, 1024), 256)
_register("shufflenet_v2_x1_5", (24, 176, 352, 704, 1024), 232)
_register("shufflenet_v2_x2_0", (24, 244, 488, 976, 2048), 232)
