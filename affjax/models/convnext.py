"""ConvNeXt (torchvision's ``convnext.py``), in Flax linen.

Module names follow torchvision's (``features.0.0`` stem conv, ``features.1.2.block.3``,
``features.2.0`` downsampling LayerNorm, ``classifier.2``). The only activation module is each
block's GELU (``block.4``, exact erf GELU): one signature entry per block, named
``features.<s>.<b>/block.4:0``. It acts on the channels-last map ``(N, H, W, 4 C)`` of the
block's inverted-bottleneck MLP (torch permutes to channels-last there too); the signature
averages it over H, W and keeps the channels (docs/models.md).

torch's per-block ``layer_scale`` has shape ``(C, 1, 1)`` (broadcast over an NCHW map); the
port keeps ``(C,)`` and reads it with a conversion-rule override.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import StochasticDepth
from affjax.models.layers import conv
from affjax.models.layers import stochastic_depth_rates
from affjax.models.registry import ModelSpec
from affjax.models.registry import Rule
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

exact_gelu = functools.partial(jax.nn.gelu, approximate=False)
# torchvision's LayerNorm2d / LayerNorm(eps=1e-6) over the channel axis (last, in NHWC).
_layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False)
_trunc_normal = nn.initializers.truncated_normal(0.02)
_conv = functools.partial(conv, kernel_init=_trunc_normal)
_dense = functools.partial(nn.Dense, kernel_init=_trunc_normal)


class CNBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, Linear 4C, GELU, Linear C, layer scale, residual."""

    layer_scale: float = 1e-6
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    stochastic_depth: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        y = _conv(dim, 7, padding=3, groups=dim, name="block.0")(x)
        y = _layer_norm(name="block.2")(y)
        y = _dense(4 * dim, name="block.3")(y)
        y = Activation(self.activation, name="block.4")(y)
        y = _dense(dim, name="block.5")(y)
        scale = self.param("layer_scale", nn.initializers.constant(self.layer_scale), (dim,),
                           jnp.float32)
        y = StochasticDepth(self.stochastic_depth, name="stochastic_depth")(
            scale * y, deterministic=not train)
        return x + y


class ConvNeXt(nn.Module):
    """torchvision's ConvNeXt on NHWC float32 images; returns ``(N, num_classes)`` logits.

    Attributes:
      channels: the four stage widths, e.g. ``(96, 192, 384, 768)`` for ConvNeXt-T.
      depths: blocks per stage, e.g. ``(3, 3, 9, 3)``.
      num_classes: width of ``classifier.2``.
      activation: the block MLP non-linearity (exact GELU).
      stochastic_depth_prob: the last block's stochastic depth rate; block ``i`` of ``B``
        drops its branch with ``prob * i / (B - 1)`` in training (``train=True``, which then
        needs a ``"dropout"`` rng), as torchvision. The zoo uses torchvision's 0.1 (tiny),
        0.4 (small), 0.5 (base, large).

    Inputs need a side of at least 32 (stem stride 4, then three stride-2 downsamplings).

    Example:
      >>> model = ConvNeXt((8, 16, 32, 64), (1, 1, 1, 1), num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((4, 32, 32, 3))).shape
      (4, 10)
    """

    channels: Sequence[int]
    depths: Sequence[int]
    num_classes: int = 1000
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    stochastic_depth_prob: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # No BatchNorm: stochastic depth is the only train-time difference.
        if len(self.channels) != len(self.depths):
            raise ValueError(f"ConvNeXt: channels {tuple(self.channels)} and depths "
                             f"{tuple(self.depths)} must have one entry per stage")
        x = _conv(self.channels[0], 4, stride=4, name="features.0.0")(x)
        x = _layer_norm(name="features.0.1")(x)
        index = 1
        rates = iter(stochastic_depth_rates(self.stochastic_depth_prob, sum(self.depths)))
        for stage, depth in enumerate(self.depths):
            for block in range(depth):
                x = CNBlock(activation=self.activation, stochastic_depth=next(rates),
                            name=f"features.{index}.{block}")(x, train)
            index += 1
            if stage + 1 < len(self.channels):
                x = _layer_norm(name=f"features.{index}.0")(x)
                x = _conv(self.channels[stage + 1], 2, stride=2, name=f"features.{index}.1")(x)
                index += 1
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
        x = _layer_norm(name="classifier.0")(x)
        return _dense(self.num_classes, name="classifier.2")(x)


def _layer_scale(collection: str, path: tuple[str, ...], leaf: str,
                 shape: tuple[int, ...]) -> Rule | None:
    """Flax ``layer_scale`` ``(C,)`` <-> torch ``(C, 1, 1)``."""
    if collection != "params" or leaf != "layer_scale":
        return None
    return Rule(".".join(path + (leaf,)), shape + (1, 1), lambda a: a.reshape(shape),
                lambda a: a.reshape(shape + (1, 1)))


def _register(name: str, channels: tuple[int, ...], depths: tuple[int, ...], resize: int,
              stochastic_depth_prob: float) -> None:
    def build(**kw):
        kw.setdefault("stochastic_depth_prob", stochastic_depth_prob)
        return ConvNeXt(channels, depths, **kw)

    register(ModelSpec(name=name, family="convnext", build=build,
                       transform=EvalTransform(resize_size=resize, crop_size=224),
                       head="classifier.2", min_size=32, parity_size=64, rules=_layer_scale))


_register("convnext_tiny", (96, 192, 384, 768), (3, 3, 9, 3), 236, 0.1)
_register("convnext_small", (96, 192, 384, 768), (3, 3, 27, 3), 230, 0.4)
_register("convnext_base", (128, 256, 512, 1024), (3, 3, 27, 3), 232, 0.5)
_register("convnext_large", (192, 384, 768, 1536), (3, 3, 27, 3), 232, 0.5)
