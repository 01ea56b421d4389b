"""MaxViT (torchvision's ``maxvit.py``), in Flax linen.

Module names follow torchvision's (``stem.0.0``,
``blocks.1.layers.0.layers.MBconv.layers.conv_b.0``,
``...window_attention.attn_layer.1.to_qkv``, ``classifier.5``). Activation modules, in
torchvision's call order (68 calls for MaxViT-T):

* the stem's GELU ``stem.0.2``;
* per MaxViT layer: the MBConv's GELUs ``layers.conv_a.2`` and ``layers.conv_b.2``, its
  squeeze-excitation ``activation`` (SiLU, on the pooled ``(N, 1, 1, C)`` map) and
  ``scale_activation`` (Sigmoid), then the MLP GELU ``mlp_layer.2`` of the window attention
  and of the grid attention;
* the classifier's Tanh ``classifier.4`` (on ``(N, 512)``).

The attention MLP GELUs act on partitioned tensors ``(N, groups, tokens, 4 C)``, channels
last: reduced over groups and tokens, keeping channels (docs/models.md). The attention
softmax is not an activation. torch's ``relative_position_index`` buffer is recomputed.

The input side must give stage maps divisible by the partition size 7 at every stage: 224
(torchvision checks this in its constructor; the port raises a ``ValueError``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from affjax.capture import Activation
from affjax.models.layers import SqueezeExcitation
from affjax.models.layers import StochasticDepth
from affjax.models.layers import conv
from affjax.models.layers import stochastic_depth_rates
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.swin import relative_position_index
from affjax.models.transforms import EvalTransform

exact_gelu = functools.partial(jax.nn.gelu, approximate=False)
_normal = nn.initializers.normal(0.02)
_conv = functools.partial(conv, kernel_init=_normal)
_dense = functools.partial(nn.Dense, kernel_init=_normal)
_layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False)


def _batch_norm(*, train: bool, name: str) -> nn.BatchNorm:
    """``nn.BatchNorm2d(eps=1e-3, momentum=0.01)`` (MaxViT's norm layer)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck with squeeze-excitation and a (pooled) projection."""

    out_channels: int
    stride: int
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    stochastic_depth: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out, mid = self.out_channels, 4 * self.out_channels
        res = x
        if self.stride == 2:  # AvgPool2d(3, 2, 1), padding counted (torch's default)
            res = nn.avg_pool(res, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                              count_include_pad=True)
            res = _conv(out, 1, name="proj.1")(res)
        elif x.shape[-1] != out:
            res = _conv(out, 1, name="proj.0")(res)
        y = _batch_norm(train=train, name="layers.pre_norm")(x)
        y = _conv(mid, 1, bias=False, name="layers.conv_a.0")(y)
        y = _batch_norm(train=train, name="layers.conv_a.1")(y)
        y = Activation(self.activation, name="layers.conv_a.2")(y)
        y = _conv(mid, 3, stride=self.stride, padding=1, groups=mid, bias=False,
                  name="layers.conv_b.0")(y)
        y = _batch_norm(train=train, name="layers.conv_b.1")(y)
        y = Activation(self.activation, name="layers.conv_b.2")(y)
        y = SqueezeExcitation(out // 4, kernel_init=_normal, name="layers.squeeze_excitation")(y)
        y = _conv(out, 1, name="layers.conv_c")(y)
        y = StochasticDepth(self.stochastic_depth, name="stochastic_depth")(
            y, deterministic=not train)
        return res + y


class RelativePositionalAttention(nn.Module):
    """Multi-head attention over ``(N, G, P, C)`` partitions with a relative position bias."""

    head_dim: int
    partition_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, g, p, c = x.shape
        heads = c // self.head_dim
        qkv = _dense(3 * c, name="to_qkv")(x)
        q, k, v = (a.reshape(n, g, p, heads, self.head_dim).transpose(0, 1, 3, 2, 4)
                   for a in jnp.split(qkv, 3, axis=-1))
        k = k * c ** -0.5  # torchvision scales by feat_dim ** -0.5
        size = self.partition_size
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           ((2 * size - 1) ** 2, heads), jnp.float32)
        bias = table[relative_position_index(size)].reshape(p, p, heads).transpose(2, 0, 1)
        attn = jax.nn.softmax(jnp.einsum("nghid,nghjd->nghij", q, k) + bias, axis=-1)
        out = jnp.einsum("nghij,nghjd->nghid", attn, v).transpose(0, 1, 3, 2, 4)
        return _dense(c, name="merge")(out.reshape(n, g, p, c))


class PartitionAttention(nn.Module):
    """Window (local P x P blocks) or grid (dilated, stride H / P) attention, then an MLP."""

    head_dim: int
    partition_size: int
    grid: bool
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    stochastic_depth: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n, h, w, c = x.shape
        # torch: window partitions of side p; grid: p = number of partitions, then swap axes
        p = h // self.partition_size if self.grid else self.partition_size
        gh, gw = h // p, w // p
        x = x.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, p * p, c)
        if self.grid:
            x = jnp.swapaxes(x, 1, 2)
        # One instance for both branches, as torch: each call draws its own mask.
        drop = StochasticDepth(self.stochastic_depth, name="stochastic_dropout")
        y = _layer_norm(name="attn_layer.0")(x)
        y = RelativePositionalAttention(self.head_dim, self.partition_size,
                                        name="attn_layer.1")(y)
        x = x + drop(y, deterministic=not train)
        y = _layer_norm(name="mlp_layer.0")(x)
        y = _dense(4 * c, name="mlp_layer.1")(y)
        y = Activation(self.activation, name="mlp_layer.2")(y)
        x = x + drop(_dense(c, name="mlp_layer.3")(y), deterministic=not train)
        if self.grid:
            x = jnp.swapaxes(x, 1, 2)
        x = x.reshape(n, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h, w, c)


class MaxVit(nn.Module):
    """torchvision's MaxViT on NHWC float32 images; returns ``(N, num_classes)`` logits.

    Attributes:
      stem_channels: width of the stem.
      block_channels, block_layers: per stage, the width and the number of MaxViT layers.
      head_dim: attention head width.
      partition_size: window / grid side (every stage map must be divisible by it).
      num_classes: width of ``classifier.5``.
      activation: the GELU of the stem, MBConvs and MLPs (SE keeps SiLU / Sigmoid, the
        classifier Tanh).
      stochastic_depth_prob: MaxViT layer ``i`` of ``L`` (over all stages) drops each of
        its three residual branches with ``prob * i / (L - 1)`` in training (``train=True``,
        which then needs a ``"dropout"`` rng), as torchvision (0.2 for MaxViT-T).

    Example:
      >>> model = MaxVit(8, (16, 32), (1, 1), head_dim=8, partition_size=2, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((4, 32, 32, 3))).shape
      (4, 10)
    """

    stem_channels: int
    block_channels: Sequence[int]
    block_layers: Sequence[int]
    head_dim: int = 32
    partition_size: int = 7
    num_classes: int = 1000
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    stochastic_depth_prob: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        side = x.shape[1:3]
        sizes = []
        for _ in range(len(self.block_channels) + 1):
            side = tuple((s - 1) // 2 + 1 for s in side)  # 3x3 conv, stride 2, padding 1
            sizes.append(side)
        if any(s % self.partition_size for size in sizes[1:] for s in size):
            raise ValueError(f"MaxVit: input {x.shape[1:3]} gives stage maps {sizes[1:]}, not all "
                             f"divisible by the partition size {self.partition_size} (use 224)")
        x = _conv(self.stem_channels, 3, stride=2, padding=1, bias=False, name="stem.0.0")(x)
        x = _batch_norm(train=train, name="stem.0.1")(x)
        x = Activation(self.activation, name="stem.0.2")(x)
        x = _conv(self.stem_channels, 3, padding=1, name="stem.1.0")(x)
        # torchvision: np.linspace(0, prob, L) over the MaxViT layers of all stages.
        rates = iter(stochastic_depth_rates(self.stochastic_depth_prob, sum(self.block_layers)))
        for i, (width, layers) in enumerate(zip(self.block_channels, self.block_layers,
                                                strict=True)):
            for j in range(layers):
                prefix = f"blocks.{i}.layers.{j}.layers"
                rate = next(rates)
                x = MBConv(width, 2 if j == 0 else 1, activation=self.activation,
                           stochastic_depth=rate, name=f"{prefix}.MBconv")(x, train)
                for kind in ("window", "grid"):
                    x = PartitionAttention(self.head_dim, self.partition_size, kind == "grid",
                                           activation=self.activation, stochastic_depth=rate,
                                           name=f"{prefix}.{kind}_attention")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = _layer_norm(name="classifier.2")(x)
        x = _dense(self.block_channels[-1], name="classifier.3")(x)
        x = Activation(jnp.tanh, name="classifier.4")(x)
        return _dense(self.num_classes, use_bias=False, name="classifier.5")(x)


def _build(**kw):
    kw.setdefault("stochastic_depth_prob", 0.2)  # torchvision's maxvit_t
    return MaxVit(64, (64, 128, 256, 512), (2, 2, 5, 2), **kw)


register(ModelSpec(name="maxvit_t", family="maxvit", build=_build,
                   transform=EvalTransform(224, 224, "bicubic"), head="classifier.5",
                   min_size=224, parity_size=224))
