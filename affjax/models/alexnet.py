"""AlexNet (torchvision's ``alexnet.py``, the one-GPU variant), in Flax linen.

Module names follow torchvision's ``nn.Sequential`` indices: ``features.0`` is the first
convolution, ``features.1`` its ReLU, ``classifier.1`` the first Linear (``classifier.0`` is
a dropout). The first Linear reads the 6x6x256 map flattened in NHWC order; its torch weight
rows (CHW order) are permuted on import (``ModelSpec.flatten``).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from affjax.capture import Activation
from affjax.models.layers import adaptive_avg_pool
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.layers import max_pool
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

# (output channels, kernel, stride, padding, max-pool after) of the five convolutions.
_CONVS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
          (256, 3, 1, 1, False), (256, 3, 1, 1, True))


class AlexNet(nn.Module):
    """torchvision's AlexNet on NHWC float32 images (side >= 63); ``(N, num_classes)`` logits.

    Attributes:
      num_classes: width of the last Linear (``classifier.6``).
      dropout: dropout rate before the two hidden Linears (active only with ``train=True``,
        which then needs a ``"dropout"`` PRNG key).
      activation: the non-linearity of the seven activation modules.

    Example:
      >>> model = AlexNet(num_classes=10)
      >>> variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 64, 64, 3)))
      >>> model.apply(variables, jax.numpy.zeros((2, 64, 64, 3))).shape
      (2, 10)
    """

    num_classes: int = 1000
    dropout: float = 0.5
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        index = 0
        for features, kernel, stride, padding, pool in _CONVS:
            x = conv(features, kernel, stride=stride, padding=padding,
                     name=f"features.{index}")(x)
            x = Activation(self.activation, name=f"features.{index + 1}")(x)
            index += 2
            if pool:
                x = max_pool(x, 3, stride=2)
                index += 1
        x = adaptive_avg_pool(x, (6, 6))
        x = x.reshape(x.shape[0], -1)  # NHWC order; see the module docstring
        x = nn.Dropout(self.dropout, deterministic=not train, name="classifier.0")(x)
        x = dense(4096, name="classifier.1")(x)
        x = Activation(self.activation, name="classifier.2")(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="classifier.3")(x)
        x = dense(4096, name="classifier.4")(x)
        x = Activation(self.activation, name="classifier.5")(x)
        return dense(self.num_classes, name="classifier.6")(x)


register(ModelSpec(
    name="alexnet", family="alexnet", build=AlexNet,
    transform=EvalTransform(resize_size=256, crop_size=224), head="classifier.6",
    min_size=63, parity_size=128, flatten={"classifier.1": (6, 6, 256)},
))
