"""Vision Transformer (torchvision's ``vision_transformer.py``), in Flax linen.

Module names follow torchvision's (``conv_proj``, ``class_token``,
``encoder.pos_embedding``, ``encoder.layers.encoder_layer_3.mlp.0``, ``heads.head``). The only
activation torchvision runs as a module is each block's MLP GELU (``mlp.1``, exact erf GELU):
one signature entry per encoder layer, named ``encoder/layers.encoder_layer_<i>/mlp.1:0``. It
acts on token tensors ``(N, T, D)``; the signature averages them over D (tokens act as
features, METHOD.md section 2). The attention softmax is not an activation.

torch's ``nn.MultiheadAttention`` keeps the q, k, v projections fused in ``in_proj_weight``
``(3 D, D)`` and ``in_proj_bias``; the port has one Dense ``self_attention/in_proj`` with
kernel ``(D, 3 D)``, read from those tensors by a conversion-rule override.

As in torchvision, the position embedding's shape depends on ``image_size`` (default 224):
``create("vit_b_16", image_size=64)`` builds a model for 64x64 inputs; loading torchvision's
default ``vit_h_14`` weights (SWAG, 518x518 inputs) needs ``image_size=518``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from affjax.capture import Activation
from affjax.models.layers import conv
from affjax.models.layers import dense
from affjax.models.registry import ModelSpec
from affjax.models.registry import Rule
from affjax.models.registry import register
from affjax.models.transforms import EvalTransform

exact_gelu = functools.partial(jax.nn.gelu, approximate=False)
_layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False)
_xavier = nn.initializers.xavier_uniform()


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention(D, num_heads, batch_first=True)`` as self-attention.

    ``(N, T, D)`` -> ``(N, T, D)``; softmax over keys (not an activation of the signature).
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        head_dim = d // self.num_heads
        qkv = nn.Dense(3 * d, kernel_init=_xavier, bias_init=nn.initializers.zeros,
                       name="in_proj")(x)
        q, k, v = (a.reshape(n, t, self.num_heads, head_dim) for a in jnp.split(qkv, 3, -1))
        logits = jnp.einsum("nqhd,nkhd->nhqk", q / math.sqrt(head_dim), k)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
        return dense(d, name="out_proj")(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(.))``."""

    num_heads: int
    mlp_dim: int
    activation: Callable[[jax.Array], jax.Array] = exact_gelu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = MultiheadAttention(self.num_heads, name="self_attention")(_layer_norm(name="ln_1")(x))
        x = x + y
        y = _layer_norm(name="ln_2")(x)
        mlp_dense = functools.partial(nn.Dense, kernel_init=_xavier,
                                      bias_init=nn.initializers.normal(1e-6))
        y = mlp_dense(self.mlp_dim, name="mlp.0")(y)
        y = Activation(self.activation, name="mlp.1")(y)
        y = mlp_dense(x.shape[-1], name="mlp.3")(y)
        return x + y


class Encoder(nn.Module):
    """Position embedding, ``num_layers`` blocks, final LayerNorm ``ln``."""

    seq_length: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    activation: Callable[[jax.Array], jax.Array] = exact_gelu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                         (1, self.seq_length, x.shape[-1]), jnp.float32)
        x = x + pos
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, activation=self.activation,
                             name=f"layers.encoder_layer_{i}")(x)
        return _layer_norm(name="ln")(x)


class VisionTransformer(nn.Module):
    """torchvision's ViT on NHWC float32 images; returns ``(N, num_classes)`` logits.

    Attributes:
      patch_size, num_layers, num_heads, hidden_dim, mlp_dim: the architecture.
      image_size: the (square) input side; fixes the position embedding's length
        ``(image_size // patch_size) ** 2 + 1``. Inputs of another size are an error.
      num_classes: width of ``heads.head``.
      activation: the MLP non-linearity (exact GELU).

    Example:
      >>> model = VisionTransformer(16, 2, 2, 32, 64, image_size=32, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(variables, jnp.zeros((4, 32, 32, 3))).shape
      (4, 10)
    """

    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    image_size: int = 224
    num_classes: int = 1000
    activation: Callable[[jax.Array], jax.Array] = exact_gelu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # dropout is 0 in torchvision's ViTs; nothing else differs in training mode
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"VisionTransformer(image_size={self.image_size}) expects NHWC "
                             f"input (N, {self.image_size}, {self.image_size}, 3), got shape "
                             f"{x.shape}; build it with image_size=<input side>")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size "
                             f"{self.patch_size}")
        n = x.shape[0]
        fan_in = 3 * self.patch_size ** 2
        x = conv(self.hidden_dim, self.patch_size, stride=self.patch_size,
                 kernel_init=nn.initializers.truncated_normal(math.sqrt(1 / fan_in)),
                 name="conv_proj")(x)
        x = x.reshape(n, -1, self.hidden_dim)  # row-major patches, as torch's flatten(2)
        token = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim),
                           jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(token, (n, 1, self.hidden_dim)), x], axis=1)
        x = Encoder(x.shape[1], self.num_layers, self.num_heads, self.mlp_dim,
                    activation=self.activation, name="encoder")(x)
        return dense(self.num_classes, kernel_init=nn.initializers.zeros,
                     name="heads.head")(x[:, 0])


def _fused_in_proj(collection: str, path: tuple[str, ...], leaf: str,
                   shape: tuple[int, ...]) -> Rule | None:
    """``self_attention/in_proj`` reads torch's fused ``in_proj_weight`` / ``in_proj_bias``."""
    if collection != "params" or path[-2:] != ("self_attention", "in_proj"):
        return None
    prefix = ".".join(path[:-1])
    if leaf == "kernel":  # Flax (D, 3D) = torch (3D, D) transposed; q, k, v stacked on 3D
        return Rule(f"{prefix}.in_proj_weight", (shape[1], shape[0]), np.transpose, np.transpose)
    return Rule(f"{prefix}.in_proj_{'bias' if leaf == 'bias' else leaf}", shape,
                lambda a: a, lambda a: a)


def _register(name: str, patch: int, layers: int, heads: int, hidden: int, mlp: int,
              transform: EvalTransform, parity_size: int) -> None:
    def build(**kw):
        return VisionTransformer(patch, layers, heads, hidden, mlp, **kw)

    register(ModelSpec(name=name, family="vit", build=build, transform=transform,
                       head="heads.head", min_size=224, parity_size=parity_size,
                       rules=_fused_in_proj, size_argument="image_size"))


# parity_size: 2 x 2 patches (5 tokens), the smallest grid with more than one patch.
_register("vit_b_16", 16, 12, 12, 768, 3072, EvalTransform(256, 224), 32)
_register("vit_b_32", 32, 12, 12, 768, 3072, EvalTransform(256, 224), 64)
_register("vit_l_16", 16, 24, 16, 1024, 4096, EvalTransform(242, 224), 32)
_register("vit_l_32", 32, 24, 16, 1024, 4096, EvalTransform(256, 224), 64)
# The default weights (IMAGENET1K_SWAG_E2E_V1) are for 518x518 inputs, bicubic.
_register("vit_h_14", 14, 32, 16, 1280, 5120, EvalTransform(518, 518, "bicubic"), 28)
