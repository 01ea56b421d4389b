"""Swin Transformer V1 and V2 (torchvision's ``swin_transformer.py``), in Flax linen.

Module names follow torchvision's (``features.0.0`` patch conv, ``features.1.0.attn.qkv``,
``features.2.reduction`` patch merging, ``norm``, ``head``). The activations torchvision runs
as modules on the data are each block's MLP GELU (``mlp.1``, exact erf GELU): one signature
entry per block, ``features.<s>.<b>/mlp.1:0``, acting on the channels-last map
``(N, H, W, 4 C)`` (reduced over H, W, keeping channels; docs/models.md).

Not in the signature (documented in docs/models.md):

* the attention softmax (as everywhere);
* V2's continuous position bias MLP ``attn.cpb_mlp`` (Linear, ``nn.ReLU``, Linear, then
  ``16 * sigmoid``): it maps the fixed relative-coordinate table to the attention bias and
  does not depend on the input (batch axis 1), so it is not a layer of the network's
  response to data. The port computes it with ``jnp.maximum`` / ``jax.lax.logistic`` (not
  captured), and ``tools/parity.py`` skips ``cpb_mlp`` modules on the torch side.

torch's fixed buffers ``relative_position_index`` and (V2) ``relative_coords_table`` are
recomputed by the port from the window size; ``from_torchvision`` ignores them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affjax.capture import Activation
from affjax.models.layers import StochasticDepth
from affjax.models.layers import conv
from affjax.models.layers import stochastic_depth_rates
from affjax.models.registry import ModelSpec
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

exact_gelu = functools.partial(jax.nn.gelu, approximate=False)
_layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False)
_trunc_normal = nn.initializers.truncated_normal(0.02)
_dense = functools.partial(nn.Dense, kernel_init=_trunc_normal)


def relative_position_index(window: int) -> np.ndarray:
    """torch's ``relative_position_index``: ``(window**2 * window**2,)`` indices into the table."""
    side = np.arange(window)
    coords = np.stack(np.meshgrid(side, side, indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).reshape(-1)


def relative_coords_table(window: int) -> np.ndarray:
    """torch's V2 ``relative_coords_table``: ``(1, 2w-1, 2w-1, 2)`` log-spaced, float32."""
    r = np.arange(-(window - 1), window, dtype=np.float32)
    table = np.stack(np.meshgrid(r, r, indexing="ij")).transpose(1, 2, 0)[None]
    table = table / np.float32(window - 1) * np.float32(8)
    return (np.sign(table) * np.log2(np.abs(table) + 1) / 3).astype(np.float32)


def shift_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray:
    """torch's shifted-window mask: ``(windows, T, T)``, 0 within a region, -100 across."""
    region = np.zeros((height, width), np.float32)
    count = 0
    for h0, h1 in ((0, -window), (-window, -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window), (-window, -shift[1]), (-shift[1], None)):
            region[h0:h1, w0:w1] = count
            count += 1
    region = region.reshape(height // window, window, width // window, window)
    region = region.transpose(0, 2, 1, 3).reshape(-1, window * window)
    diff = region[:, None, :] - region[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0))


class _QKV(nn.Module):
    """``nn.Linear(C, 3 C)``; V2 zeroes the k third of the bias when applying it (torch)."""

    features: int
    zero_k_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _trunc_normal, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if self.zero_k_bias:
            third = self.features // 3
            bias = bias.at[third:2 * third].set(0.0)
        return x @ kernel + bias


class ShiftedWindowAttention(nn.Module):
    """torchvision's (V1) / V2 shifted-window multi-head self-attention on ``(N, H, W, C)``."""

    num_heads: int
    window: int
    shift: int
    v2: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        ws, heads = self.window, self.num_heads
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        ph, pw = h + pad_b, w + pad_r
        # torch drops the shift along an axis that one window covers
        shift = (0 if ws >= ph else self.shift, 0 if ws >= pw else self.shift)
        if sum(shift) > 0:
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        windows = (ph // ws) * (pw // ws)
        t = ws * ws
        x = x.reshape(n, ph // ws, ws, pw // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n * windows, t, c)
        qkv = _QKV(3 * c, zero_k_bias=self.v2, name="qkv")(x)
        qkv = qkv.reshape(n * windows, t, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        index = relative_position_index(ws)
        if self.v2:
            def normalize(a):  # F.normalize: a / max(||a||, 1e-12)
                return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)

            attn = normalize(q) @ jnp.swapaxes(normalize(k), -2, -1)
            logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)),
                                     (heads, 1, 1), jnp.float32)
            attn = attn * jnp.exp(jnp.minimum(logit_scale, math.log(100.0)))
            # Continuous position bias: input-independent, not a signature layer (module doc).
            table = jnp.asarray(relative_coords_table(ws))
            table = _dense(512, name="cpb_mlp.0")(table)
            table = _dense(heads, use_bias=False, name="cpb_mlp.2")(jnp.maximum(table, 0.0))
            bias = table.reshape(-1, heads)[index].reshape(t, t, heads).transpose(2, 0, 1)
            bias = 16.0 * jax.lax.logistic(bias)
        else:
            q = q * (c // heads) ** -0.5
            attn = q @ jnp.swapaxes(k, -2, -1)
            table = self.param("relative_position_bias_table", _trunc_normal,
                               ((2 * ws - 1) ** 2, heads), jnp.float32)
            bias = table[index].reshape(t, t, heads).transpose(2, 0, 1)
        attn = attn + bias[None]
        if sum(shift) > 0:
            mask = jnp.asarray(shift_mask(ph, pw, ws, shift))
            attn = attn.reshape(n, windows, heads, t, t) + mask[None, :, None]
            attn = attn.reshape(n * windows, heads, t, t)
        attn = jax.nn.softmax(attn, axis=-1)  # attention internals: not an activation
        x = jnp.swapaxes(attn @ v, 1, 2).reshape(n * windows, t, c)
        x = _dense(c, name="proj")(x)
        x = x.reshape(n, ph // ws, pw // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, ph, pw, c)
        if sum(shift) > 0:
            x = jnp.roll(x, shift, axis=(1, 2))
        return x[:, :h, :w]


class SwinBlock(nn.Module):
    """V1: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; V2: ``x + norm1(attn(x))``, ..."""

    num_heads: int
    window: int
    shift: int
    v2: bool = False
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    stochastic_depth: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        attn = ShiftedWindowAttention(self.num_heads, self.window, self.shift, v2=self.v2,
                                      name="attn")
        norm1, norm2 = _layer_norm(name="norm1"), _layer_norm(name="norm2")
        mlp_dense = functools.partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
                                      bias_init=nn.initializers.normal(1e-6))

        def mlp(y):
            y = mlp_dense(4 * c, name="mlp.0")(y)
            y = Activation(self.activation, name="mlp.1")(y)
            return mlp_dense(c, name="mlp.3")(y)

        # One instance for both branches, as torch: each call draws its own mask.
        drop = StochasticDepth(self.stochastic_depth, name="stochastic_depth")

        def branch(y):
            return drop(y, deterministic=not train)

        if self.v2:
            x = x + branch(norm1(attn(x)))
            return x + branch(norm2(mlp(x)))
        x = x + branch(attn(norm1(x)))
        return x + branch(mlp(norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (x00, x10, x01, x11), LayerNorm and Linear 4C -> 2C.

    V1 normalises before the reduction (norm over 4 C), V2 after it (over 2 C).
    """

    v2: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                             x[:, 1::2, 1::2]], axis=-1)
        reduction = _dense(2 * c, use_bias=False, name="reduction")
        if self.v2:
            return _layer_norm(name="norm")(reduction(x))
        return reduction(_layer_norm(name="norm")(x))


class SwinTransformer(nn.Module):
    """torchvision's Swin Transformer (V1 or V2) on NHWC images; ``(N, num_classes)`` logits.

    Attributes:
      embed_dim: the first stage's width (doubling at each patch merging).
      depths: blocks per stage, e.g. ``(2, 2, 6, 2)``.
      num_heads: attention heads per stage.
      window: the attention window side (7 for V1, 8 for V2).
      v2: Swin V2 (post-norm blocks, cosine attention, continuous position bias).
      num_classes: width of ``head``.
      activation: the MLP non-linearity (exact GELU).
      stochastic_depth_prob: the last block's stochastic depth rate; block ``i`` of ``B``
        drops each residual branch with ``prob * i / (B - 1)`` in training (``train=True``,
        which then needs a ``"dropout"`` rng), as torchvision. The zoo uses torchvision's
        0.2 (t), 0.3 (s), 0.5 (b), V1 and V2.

    Any input side of at least 4 works (windows and merges pad as torch does).

    Example:
      >>> model = SwinTransformer(8, (1, 1), (1, 2), window=4, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((4, 32, 32, 3))).shape
      (4, 10)
    """

    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    window: int = 7
    v2: bool = False
    num_classes: int = 1000
    activation: Callable[[jax.Array], jax.Array] = exact_gelu
    stochastic_depth_prob: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # No BatchNorm or dropout: stochastic depth is the only train-time difference.
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"SwinTransformer: depths {tuple(self.depths)} and num_heads "
                             f"{tuple(self.num_heads)} must have one entry per stage")
        x = conv(self.embed_dim, 4, stride=4, kernel_init=_trunc_normal, name="features.0.0")(x)
        x = _layer_norm(name="features.0.2")(x)
        index = 1
        rates = iter(stochastic_depth_rates(self.stochastic_depth_prob, sum(self.depths)))
        for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
            for block in range(depth):
                x = SwinBlock(heads, self.window, 0 if block % 2 == 0 else self.window // 2,
                              v2=self.v2, activation=self.activation,
                              stochastic_depth=next(rates),
                              name=f"features.{index}.{block}")(x, train)
            index += 1
            if stage + 1 < len(self.depths):
                x = PatchMerging(v2=self.v2, name=f"features.{index}")(x)
                index += 1
        x = _layer_norm(name="norm")(x)
        x = jnp.mean(x, axis=(1, 2))  # permute, AdaptiveAvgPool2d(1), flatten
        return _dense(self.num_classes, name="head")(x)


def _register(name: str, embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...],
              v2: bool, transform: EvalTransform, stochastic_depth_prob: float) -> None:
    window = 8 if v2 else 7

    def build(**kw):
        kw.setdefault("stochastic_depth_prob", stochastic_depth_prob)
        return SwinTransformer(embed_dim, depths, heads, window=window, v2=v2, **kw)

    register(ModelSpec(name=name, family="swin", build=build, transform=transform,
                       head="head", min_size=32, parity_size=64))


# (name, embed dim, depths, heads, V2, eval transform, stochastic depth: torchvision's builders)
_register("swin_t", 96, (2, 2, 6, 2), (3, 6, 12, 24), False,
          EvalTransform(232, 224, "bicubic"), 0.2)
_register("swin_s", 96, (2, 2, 18, 2), (3, 6, 12, 24), False,
          EvalTransform(246, 224, "bicubic"), 0.3)
_register("swin_b", 128, (2, 2, 18, 2), (4, 8, 16, 32), False,
          EvalTransform(238, 224, "bicubic"), 0.5)
_register("swin_v2_t", 96, (2, 2, 6, 2), (3, 6, 12, 24), True,
          EvalTransform(260, 256, "bicubic"), 0.2)
_register("swin_v2_s", 96, (2, 2, 18, 2), (3, 6, 12, 24), True,
          EvalTransform(260, 256, "bicubic"), 0.3)
_register("swin_v2_b", 128, (2, 2, 18, 2), (4, 8, 16, 32), True,
          EvalTransform(272, 256, "bicubic"), 0.5)
