"""VGG-11/13/16/19, with and without BatchNorm (torchvision's ``vgg.py``), in Flax linen.

Module names follow torchvision's ``nn.Sequential`` indices (``features.0`` conv,
``features.1`` BatchNorm or ReLU, ...; ``classifier.0`` Linear, ``classifier.1`` ReLU,
``classifier.2`` dropout, ...). The first Linear reads the 7x7x512 map flattened in NHWC
order; its torch weight rows (CHW order) are permuted on import (``ModelSpec.flatten``).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax

from affjax.capture import Activation
from affjax.models.layers import adaptive_avg_pool
from affjax.models.layers import batch_norm
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import kaiming_normal_fan_out
from affjax.models.layers import max_pool
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

# torchvision's configurations: channels of each 3x3 convolution, 0 for a 2x2 max-pool.
CONFIGS: dict[str, tuple[int, ...]] = {
    "vgg11": (64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0),
    "vgg13": (64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0),
    "vgg16": (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0),
    "vgg19": (64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0,
              512, 512, 512, 512, 0),
}
# torchvision initialises VGG's Linears with N(0, 0.01) and zero bias.
_linear_init = nn.initializers.normal(0.01)


class VGG(nn.Module):
    """torchvision's VGG on NHWC float32 images (side >= 32); ``(N, num_classes)`` logits.

    Attributes:
      config: channels per 3x3 convolution, 0 for a max-pool (see :data:`CONFIGS`).
      batch_norm: BatchNorm after each convolution (the ``_bn`` models).
      num_classes: width of the last Linear (``classifier.6``).
      dropout: dropout rate after the two hidden Linears (``train=True`` only).
      activation: the non-linearity of every activation module.

    Example:
      >>> model = VGG(CONFIGS["vgg11"], num_classes=10)
      >>> variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jax.numpy.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    config: Sequence[int]
    batch_norm: bool = False
    num_classes: int = 1000
    dropout: float = 0.5
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        index = 0
        for channels in self.config:
            if channels == 0:
                x = max_pool(x, 2, stride=2)
                index += 1
                continue
            x = conv(channels, 3, padding=1, kernel_init=kaiming_normal_fan_out,
                     name=f"features.{index}")(x)
            index += 1
            if self.batch_norm:
                x = batch_norm(train=train, name=f"features.{index}")(x)
                index += 1
            x = Activation(self.activation, name=f"features.{index}")(x)
            index += 1
        x = adaptive_avg_pool(x, (7, 7))
        x = x.reshape(x.shape[0], -1)  # NHWC order; see the module docstring
        for i in (0, 3):
            x = dense(4096, kernel_init=_linear_init, name=f"classifier.{i}")(x)
            x = Activation(self.activation, name=f"classifier.{i + 1}")(x)
            x = nn.Dropout(self.dropout, deterministic=not train, name=f"classifier.{i + 2}")(x)
        return dense(self.num_classes, kernel_init=_linear_init, name="classifier.6")(x)


def _register(name: str, bn: bool) -> None:
    config = CONFIGS[name.removesuffix("_bn")]

    def build(**kw):
        return VGG(config, batch_norm=bn, **kw)

    register(ModelSpec(
        name=name, family="vgg", build=build,
        transform=EvalTransform(resize_size=256, crop_size=224), head="classifier.6",
        min_size=32, flatten={"classifier.0": (7, 7, 512)},
    ))


for _name in CONFIGS:
    _register(_name, bn=False)
    _register(f"{_name}_bn", bn=True)
