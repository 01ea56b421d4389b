"""DenseNet-121/161/169/201 (torchvision's ``densenet.py``), in Flax linen.

Module names follow torchvision's state dict: ``features.conv0``, ``features.norm0``,
``features.denseblock1.denselayer1`` (holding ``norm1``, ``relu1``, ``conv1``, ``norm2``,
``relu2``, ``conv2``), ``features.transition1`` (``norm``, ``relu``, ``conv``),
``features.norm5``, ``classifier``.

The final ReLU: torchvision applies it as a function (``F.relu`` in ``DenseNet.forward``, after
``features.norm5``), so the published module hooks never saw it. The port scores it, as an
``Activation`` named ``relu`` at the top level (signature name ``relu:0``, the last entry),
because it is a non-linearity of the network like any other; the torch reference of
``tools/parity.py`` records functional activations under the name
``<calling module>.<function>``, here ``relu``. Drop it with ``exclude=("relu:0",)`` to get the
published pipeline's list. DenseNet-121 thus has 121 activation calls: the stem, two per dense
layer (58), one per transition (3) and the final one.
"""

from __future__ import annotations

import functools
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

# torchvision: nn.init.kaiming_normal_(conv.weight) (fan_in, ReLU gain); Linear bias zero.
_kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_conv = functools.partial(conv, bias=False, kernel_init=_kaiming_normal_fan_in)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to ``bn_size * growth_rate``), BN-ReLU-3x3 conv (to ``growth_rate``).

    Takes the concatenation of all previous feature maps of the block (NHWC) and returns only
    the ``growth_rate`` new channels.
    """

    growth_rate: int
    bn_size: int
    drop_rate: float = 0.0
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = Activation(self.activation, name="relu1")(batch_norm(train=train, name="norm1")(x))
        out = _conv(self.bn_size * self.growth_rate, 1, name="conv1")(out)
        out = Activation(self.activation, name="relu2")(batch_norm(train=train, name="norm2")(out))
        out = _conv(self.growth_rate, 3, padding=1, name="conv2")(out)
        if self.drop_rate > 0:
            out = nn.Dropout(self.drop_rate, deterministic=not train)(out)
        return out


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (halving the channels), 2x2 average pooling with stride 2."""

    features: int
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = Activation(self.activation, name="relu")(batch_norm(train=train, name="norm")(x))
        x = _conv(self.features, 1, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))  # AvgPool2d(2, 2): floor, no padding


class DenseNet(nn.Module):
    """torchvision's DenseNet on NHWC float32 images (side >= 29); ``(N, num_classes)`` logits.

    Attributes:
      growth_rate: channels each dense layer adds (32; 48 for DenseNet-161).
      block_config: dense layers per block, e.g. ``(6, 12, 24, 16)`` for DenseNet-121.
      num_init_features: channels of the stem convolution (64; 96 for DenseNet-161).
      bn_size: bottleneck width factor of the 1x1 convolutions.
      drop_rate: dropout after each dense layer (0 in torchvision's models; active only with
        ``train=True``, which then needs a ``"dropout"`` PRNG key).
      num_classes: width of ``classifier``.
      activation: the non-linearity of every ReLU, including the final functional one.

    Example:
      >>> model = DenseNet(32, (2, 2, 2, 2), num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((4, 32, 32, 3))).shape
      (4, 10)
    """

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    num_classes: int = 1000
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.num_init_features, 7, stride=2, padding=3, name="features.conv0")(x)
        x = batch_norm(train=train, name="features.norm0")(x)
        x = Activation(self.activation, name="features.relu0")(x)
        x = max_pool(x, 3, stride=2, padding=1)
        channels = self.num_init_features
        for block, layers in enumerate(self.block_config, start=1):
            for layer in range(1, layers + 1):
                new = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate, self.activation,
                                 name=f"features.denseblock{block}.denselayer{layer}")(x, train)
                x = jnp.concatenate([x, new], axis=-1)  # torch.cat(features, 1): old first
            channels += layers * self.growth_rate
            if block != len(self.block_config):
                channels //= 2
                x = Transition(channels, self.activation,
                               name=f"features.transition{block}")(x, train)
        x = batch_norm(train=train, name="features.norm5")(x)
        x = Activation(self.activation, name="relu")(x)  # F.relu in torchvision; see above
        x = jnp.mean(x, axis=(1, 2))  # adaptive_avg_pool2d((1, 1)) + flatten
        # torchvision leaves the Linear weight at torch's default init and zeroes its bias.
        return dense(self.num_classes, name="classifier")(x)


def _register(name: str, growth_rate: int, block_config: tuple[int, ...],
              num_init_features: int) -> None:
    def build(**kw):
        return DenseNet(growth_rate=growth_rate, block_config=block_config,
                        num_init_features=num_init_features, **kw)

    register(ModelSpec(name=name, family="densenet", build=build,
                       transform=EvalTransform(resize_size=256, crop_size=224),
                       head="classifier", min_size=32))


_register("densenet121", 32, (6, 12, 24, 16), 64)
_register("densenet161", 48, (6, 12, 36, 24), 96)
_register("densenet169", 32, (6, 12, 32, 32), 64)
_register("densenet201", 32, (6, 12, 48, 32), 64)
