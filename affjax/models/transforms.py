"""The evaluation transform of torchvision's pretrained classifiers, in JAX."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision InterpolationMode value -> jax.image.resize method ("nearest": torch's own
# rule, see _nearest_legacy; jax's nearest samples pixel centres, torch's "nearest-exact").
_METHODS = {"nearest": "nearest-legacy", "nearest-exact": "nearest", "bilinear": "linear",
            "bicubic": "cubic"}


def _nearest_legacy(images: jax.Array, new_h: int, new_w: int) -> jax.Array:
    """torch's ``nearest`` (torchvision's ``NEAREST`` on tensors): source pixel
    ``floor(i * in / out)``, computed in float32 as torch does, not the pixel centre."""
    def index(size_in: int, size_out: int) -> np.ndarray:
        scale = np.float32(size_in) / np.float32(size_out)
        src = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, size_in - 1)

    h, w = images.shape[1:3]
    return images[:, index(h, new_h)][:, :, index(w, new_w)]


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size``, as torchvision computes it.

    The longer side is ``int(size * long / short)`` (truncated, not rounded).
    """
    short, long = (height, width) if height <= width else (width, height)
    if short == size:
        return height, width
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


@functools.partial(jax.jit, static_argnames=("resize_size", "crop_size", "method", "antialias",
                                             "mean", "std"))
def _transform(images, *, resize_size, crop_size, method, antialias, mean, std):
    is_uint8 = images.dtype == jnp.uint8
    if is_uint8:
        images = images.astype(jnp.float32) / 255.0
    else:
        images = images.astype(jnp.float32)
    n, h, w, c = images.shape
    new_h, new_w = resized_shape(h, w, resize_size)
    if (new_h, new_w) != (h, w):
        if method == "nearest-legacy":
            images = _nearest_legacy(images, new_h, new_w)
        else:
            images = jax.image.resize(images, (n, new_h, new_w, c), method=method,
                                      antialias=antialias)
        if is_uint8:
            # torchvision resizes a uint8 image in float and casts back to uint8: bicubic's
            # overshoot at edges is clamped to 0..255 (then rounded; we keep the fraction,
            # see EvalTransform). Float input is not clamped, as in torchvision.
            images = jnp.clip(images, 0.0, 1.0)
    # torchvision's center_crop: Python round (half to even) of the centred offset.
    top = int(round((new_h - crop_size) / 2.0))
    left = int(round((new_w - crop_size) / 2.0))
    images = images[:, top:top + crop_size, left:left + crop_size, :]
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side, centre-crop, scale to [0, 1] and normalise.

    The numbers are those of the model's default torchvision weights
    (``torchvision.models.get_model_weights(name).DEFAULT.transforms()``).

    Attributes:
      resize_size: the shorter side after resizing (pixels).
      crop_size: the side of the square centre crop (pixels).
      interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"nearest-exact"``
        (torchvision's mode names; ``"nearest"`` picks the pixels torchvision's ``NEAREST``
        picks on tensors, ``floor(i * in / out)``; ``"nearest-exact"`` the pixel centres).
      mean, std: per-channel normalisation (RGB).
      antialias: low-pass filter when downsampling, as torchvision's default ``antialias=True``.

    Call it on ``(N, H, W, 3)`` images, ``uint8`` in 0..255 or float in [0, 1] (floats are
    not range-checked), or on one ``(H, W, 3)`` image; it returns float32
    ``(N, crop, crop, 3)`` (or ``(crop, crop, 3)``). Jitted per input shape.

    Numerical caveat: the filter is ``jax.image.resize``'s scaled triangle (bilinear) or Keys
    cubic (bicubic), computed in float32 on the [0, 1]-scaled image. For ``uint8`` input the
    resized image is clipped to [0, 1] as torchvision clamps it to 0..255 (bicubic overshoots
    at edges by up to about 30 grey levels). torchvision (the weights' v1 transforms; v2 is a
    fixed-point kernel, see ``docs/models.md``) on a ``uint8`` tensor then rounds to
    ``uint8``; this transform keeps the fraction, so outputs differ by at most half a grey
    level (0.5 / 255 / std, about 0.009 after normalisation; rounding too would make it 0 on
    most pixels but a whole grey level where the two float results straddle a half). Against
    a PIL image the difference is about one grey level for bilinear; PIL's bicubic clips to
    ``uint8`` between its horizontal and vertical passes, which this transform (like
    torchvision on tensors) does not, so near strong edges the two differ by more.
    ``tests/test_models_parity.py`` and ``tests/test_models_fixes.py`` measure these.

    Example:
      >>> t = EvalTransform(resize_size=256, crop_size=224)
      >>> t(jnp.zeros((2, 300, 400, 3), jnp.uint8)).shape
      (2, 224, 224, 3)
    """

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    antialias: bool = True

    def __post_init__(self) -> None:
        if self.interpolation not in _METHODS:
            raise ValueError(
                f"interpolation {self.interpolation!r} not supported; one of {sorted(_METHODS)}")
        if not 0 < self.crop_size <= self.resize_size:
            raise ValueError(
                f"need 0 < crop_size <= resize_size, got {self.crop_size} and {self.resize_size}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")

    def __call__(self, images: ArrayLike) -> jax.Array:
        images = jnp.asarray(images)
        channels = len(self.mean)
        if images.ndim not in (3, 4) or images.shape[-1] != channels:
            raise ValueError(
                f"expected (N, H, W, {channels}) or (H, W, {channels}) images "
                f"(channels last), got shape {tuple(images.shape)}")
        if images.shape[-3] == 0 or images.shape[-2] == 0:
            raise ValueError(
                f"empty image: height and width must be positive, got shape "
                f"{tuple(images.shape)}")
        if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
            raise TypeError(
                f"images must be uint8 (0..255) or float ([0, 1]), got {images.dtype}")
        single = images.ndim == 3
        if single:
            images = images[None]
        out = _transform(images, resize_size=self.resize_size, crop_size=self.crop_size,
                         method=_METHODS[self.interpolation], antialias=self.antialias,
                         mean=tuple(self.mean), std=tuple(self.std))
        return out[0] if single else out

    def resize_with_pillow(self, image: np.ndarray) -> np.ndarray:
        """One ``(H, W, C)`` uint8 image resized by Pillow, as torchvision's ``Resize`` on a
        PIL image: the published pipeline's resize (Pillow's bicubic clips to uint8 between
        its two passes). Calling the transform on the result then only crops and normalises.
        Returned unchanged when it already has the resized shape, or without Pillow.
        """
        h, w = image.shape[:2]
        new_h, new_w = resized_shape(h, w, self.resize_size)
        if (new_h, new_w) == (h, w) or 0 in (h, w):
            return image
        try:
            from PIL import Image
        except ImportError:
            return image
        # torchvision hands both nearest modes to Pillow's NEAREST.
        resample = getattr(Image.Resampling, self.interpolation.upper().replace("-EXACT", ""))
        return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
