"""GoogLeNet (torchvision's ``googlenet.py``), in Flax linen.

torchvision's ``BasicConv2d`` (conv, BatchNorm eps 1e-3, ``F.relu``) applies its ReLU as a
*function*, so forward hooks on activation modules see no activation at all in GoogLeNet and
Inception v3. The port scores it anyway: each ``BasicConv2d`` has an
:class:`affjax.Activation` named ``relu``, so the signature name ``inception3a/branch2.1/relu:0``
stands for the ReLU inside torch's ``inception3a.branch2.1`` (a module path that does not exist
in torch; ``tools/parity.py`` hooks ``BasicConv2d``'s ``bn`` output and the module's output
to compute the same pair on the torch side). See ``docs/models.md``.

Defaults follow torchvision's pretrained weights: ``transform_input=True`` (the weights expect
the ImageNet-normalised input re-mapped to the [-1, 1] normalisation of the original Caffe
model) and no auxiliary heads (the weights file still holds ``aux1.*`` and ``aux2.*``; the
converter accepts and ignores them). Dropout is off in inference mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import IMAGENET_MEAN
from affjax.models.transforms import IMAGENET_STD
from affjax.models.transforms import EvalTransform

# torchvision's GoogLeNet init: trunc_normal_(std=0.01, a=-2, b=2), i.e. truncated at 200 std.
_init = nn.initializers.normal(0.01)


def max_pool_ceil(x: jax.Array, kernel_size: int, *, stride: int, padding: int = 0) -> jax.Array:
    """``torch.nn.MaxPool2d(kernel_size, stride, padding, ceil_mode=True)`` on NHWC.

    Ceil mode adds a last, partial window on the bottom/right when the input does not tile
    exactly, unless that window would start in the right padding (torch's rule).
    """

    def extra(size: int) -> int:
        out = -(-(size + 2 * padding - kernel_size) // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
        return max(0, (out - 1) * stride + kernel_size - (size + 2 * padding))

    eh, ew = extra(x.shape[1]), extra(x.shape[2])
    return nn.max_pool(x, (kernel_size, kernel_size), strides=(stride, stride),
                       padding=((padding, padding + eh), (padding, padding + ew)))


def transform_input(x: jax.Array) -> jax.Array:
    """torchvision's ``_transform_input``: ImageNet normalisation -> (x - 0.5) / 0.5 per channel."""
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


class BasicConv2d(nn.Module):
    """Conv (no bias), BatchNorm (eps 1e-3), ReLU; the ReLU is scored as ``relu``."""

    features: int
    kernel_size: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    kernel_init: nn.initializers.Initializer = _init

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.features, self.kernel_size, stride=self.stride, padding=self.padding,
                 bias=False, kernel_init=self.kernel_init, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                         name="bn")(x)
        return Activation(self.activation, name="relu")(x)


class Inception(nn.Module):
    """GoogLeNet's inception block: 1x1 | 1x1-3x3 | 1x1-3x3 | maxpool-1x1, concatenated.

    (The third branch is 3x3, not 5x5, as in torchvision's implementation.)
    """

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        block = functools.partial(BasicConv2d, activation=self.activation)
        b1 = block(self.ch1x1, 1, name="branch1")(x, train)
        b2 = block(self.ch3x3red, 1, name="branch2.0")(x, train)
        b2 = block(self.ch3x3, 3, padding=1, name="branch2.1")(b2, train)
        b3 = block(self.ch5x5red, 1, name="branch3.0")(x, train)
        b3 = block(self.ch5x5, 3, padding=1, name="branch3.1")(b3, train)
        b4 = max_pool_ceil(x, 3, stride=1, padding=1)
        b4 = block(self.pool_proj, 1, name="branch4.1")(b4, train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


_INCEPTIONS = {
    "inception3a": (64, 96, 128, 16, 32, 32), "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64), "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64), "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128), "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet (inference graph) on NHWC float32 images -> ``(N, num_classes)``.

    Attributes:
      num_classes: width of ``fc``.
      transform_input: re-map the input from ImageNet normalisation to [-1, 1]
        normalisation first (True for torchvision's pretrained weights).
      dropout: before ``fc``, training mode only (needs a ``"dropout"`` rng).
      activation: the function of every ``BasicConv2d``'s ReLU.

    Example:
      >>> model = GoogLeNet(num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((2, 64, 64, 3))).shape
      (2, 10)
    """

    num_classes: int = 1000
    transform_input: bool = True
    dropout: float = 0.2
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.transform_input:
            x = transform_input(x)
        block = functools.partial(BasicConv2d, activation=self.activation)
        x = block(64, 7, stride=2, padding=3, name="conv1")(x, train)
        x = max_pool_ceil(x, 3, stride=2)
        x = block(64, 1, name="conv2")(x, train)
        x = block(192, 3, padding=1, name="conv3")(x, train)
        x = max_pool_ceil(x, 3, stride=2)
        for name, channels in _INCEPTIONS.items():
            if name in ("inception4a", "inception5a"):
                x = max_pool_ceil(x, 3 if name == "inception4a" else 2, stride=2)
            # aux1 (after inception4a) and aux2 (after 4d) run only in training: not ported.
            x = Inception(*channels, activation=self.activation, name=name)(x, train)
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return dense(self.num_classes, kernel_init=_init, name="fc")(x)


register(ModelSpec(
    name="googlenet", family="googlenet", build=GoogLeNet,
    transform=EvalTransform(resize_size=256, crop_size=224), head="fc", min_size=15,
    ignored_prefixes=("aux1.", "aux2."),
    # As torchvision's builder for the pretrained weights (aux heads built, then unused).
    torchvision_kwargs={"transform_input": True, "aux_logits": True, "init_weights": False},
))
