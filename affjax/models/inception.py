"""Inception v3 (torchvision's ``inception.py``), in Flax linen.

Same conventions as :mod:`affjax.models.googlenet`: every ``BasicConv2d`` (conv, BatchNorm eps
1e-3, functional ReLU) scores its ReLU as ``<module>/relu``, e.g. ``Mixed_5b/branch5x5_2/relu:0``
for the ReLU inside torch's ``Mixed_5b.branch5x5_2``. Defaults follow torchvision's pretrained
weights: ``transform_input=True``, no auxiliary head (``AuxLogits.*`` tensors of a weights file
are accepted and ignored on import). The pooling branches use ``F.avg_pool2d(3, 1, 1)``, which
counts the zero padding (``count_include_pad=True``), and ``F.max_pool2d(3, 2)``. Dropout is
off in inference mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.models.googlenet import BasicConv2d
from affjax.models.googlenet import transform_input
from affjax.models.layers import dense
from affjax.models.layers import max_pool
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

# torchvision's Inception v3 init: trunc_normal_(std=0.1, a=-2, b=2) for conv and Linear.
_init = nn.initializers.truncated_normal(0.1, lower=-20.0, upper=20.0)
_Act = Callable[[jax.Array], jax.Array]


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """``F.avg_pool2d(x, 3, stride=1, padding=1)``: zeros padded and counted (divide by 9)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=True)


class _Block(nn.Module):
    """Base of the Mixed blocks: ``self.conv(name, features, kernel, ...)`` builds a BasicConv2d."""

    activation: _Act = jax.nn.relu

    def conv(self, name: str, features: int, kernel: int | tuple[int, int], *, stride: int = 1,
             padding: int | tuple[int, int] = 0) -> Callable:
        module = BasicConv2d(features, kernel, stride=stride, padding=padding,
                             activation=self.activation, kernel_init=_init, name=name)
        return functools.partial(module, train=self.train_flag)

    train_flag: bool = False


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_1", 48, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, max_pool(x, 3, stride=2)], axis=-1)


class InceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_1", 192, 1)(x)
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 3, stride=2)], axis=-1)


class InceptionE(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Inception3(nn.Module):
    """torchvision's Inception v3 (inference graph) on NHWC float32 -> ``(N, num_classes)``.

    Attributes:
      num_classes: width of ``fc``.
      transform_input: re-map the input from ImageNet normalisation to [-1, 1]
        normalisation first (True for torchvision's pretrained weights).
      dropout: before ``fc``, training mode only (needs a ``"dropout"`` rng).
      activation: the function of every ``BasicConv2d``'s ReLU.

    The input side must be at least 75 (torchvision's ``min_size``).

    Example:
      >>> model = Inception3(num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
      >>> model.apply(variables, jnp.zeros((2, 107, 107, 3))).shape
      (2, 10)
    """

    num_classes: int = 1000
    transform_input: bool = True
    dropout: float = 0.5
    activation: _Act = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.shape[1] < 75 or x.shape[2] < 75:
            raise ValueError(f"Inception v3 needs inputs of at least 75x75, got {x.shape[1:3]} "
                             f"(NHWC shape {x.shape})")
        if self.transform_input:
            x = transform_input(x)

        def block(name, features, kernel, **kw):
            return BasicConv2d(features, kernel, activation=self.activation, kernel_init=_init,
                               name=name, **kw)

        x = block("Conv2d_1a_3x3", 32, 3, stride=2)(x, train)
        x = block("Conv2d_2a_3x3", 32, 3)(x, train)
        x = block("Conv2d_2b_3x3", 64, 3, padding=1)(x, train)
        x = max_pool(x, 3, stride=2)
        x = block("Conv2d_3b_1x1", 80, 1)(x, train)
        x = block("Conv2d_4a_3x3", 192, 3)(x, train)
        x = max_pool(x, 3, stride=2)
        common = {"activation": self.activation, "train_flag": train}
        x = InceptionA(pool_features=32, name="Mixed_5b", **common)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **common)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **common)(x)
        x = InceptionB(name="Mixed_6a", **common)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7=c7, name=name, **common)(x)
        # AuxLogits (after Mixed_6e) runs only in training: not ported.
        x = InceptionD(name="Mixed_7a", **common)(x)
        x = InceptionE(name="Mixed_7b", **common)(x)
        x = InceptionE(name="Mixed_7c", **common)(x)
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return dense(self.num_classes, kernel_init=_init, name="fc")(x)


register(ModelSpec(
    name="inception_v3", family="inception", build=Inception3,
    transform=EvalTransform(resize_size=342, crop_size=299), head="fc", min_size=75,
    parity_size=107, ignored_prefixes=("AuxLogits.",),
    # As torchvision's builder for the pretrained weights (aux head built, then unused).
    torchvision_kwargs={"transform_input": True, "aux_logits": True, "init_weights": False},
))
