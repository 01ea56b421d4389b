"""Argument checks of the public functions: errors that name the argument, shape and dtype.

Only static properties (dtype, shape) are checked, so the checks cost nothing under
``jax.jit`` and ``jax.vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def real_array(name: str, v: ArrayLike, *, integers: bool = True) -> jax.Array:
    """``v`` as a JAX array; ``TypeError`` naming ``name`` unless it is real.

    With ``integers=False`` only floating dtypes pass (the score's inputs).
    """
    # Checked before conversion, so that e.g. an int64 NumPy array is named as such.
    arr = v if isinstance(v, jax.Array) else np.asarray(v)
    # jnp.issubdtype, not np.issubdtype: NumPy does not count bfloat16 as floating.
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if not integers:
            raise TypeError(
                f"{name} must be a floating-point array, got dtype {arr.dtype}; "
                f"cast it, e.g. {name}.astype(jnp.float32)"
            )
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError(f"{name} must be a real-valued (float) array, got dtype {arr.dtype}")
    return jnp.asarray(arr)


def point_cloud(name: str, v: ArrayLike, *, integers: bool = True) -> jax.Array:
    """``(n, d)`` points in rows; ``(n,)`` is read as ``d = 1``; any other rank is an error.

    ``integers``: as in :func:`real_array`.
    """
    arr = real_array(name, v, integers=integers)
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape (n, d) with samples in rows, or (n,), got shape {arr.shape}"
        )
    return arr[:, None] if arr.ndim == 1 else arr


def same_shape(what: str, x: jax.Array, y: jax.Array) -> None:
    """``ValueError`` unless the two point clouds of ``what`` have one shape."""
    if x.shape != y.shape:
        raise ValueError(
            f"{what} needs two point clouds of the same shape (n, d), got x {x.shape} and "
            f"y {y.shape}"
        )


def square_matrix(name: str, m: ArrayLike) -> jax.Array:
    """A ``(..., d, d)`` float array, or a ``ValueError`` naming ``name`` and its shape.

    Integers become the default float dtype and float16/bfloat16 become float32: the
    eigendecompositions and factorisations have no kernels for them (as in the score).
    """
    arr = real_array(name, m)
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"{name} must be a square matrix of shape (..., d, d), got {arr.shape}")
    return linalg_dtype(arr)


def linalg_float(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype LAPACK-style kernels take for ``dtype``: ints to float, half to float32."""
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.result_type(float)
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def linalg_dtype(arr: jax.Array) -> jax.Array:
    """``arr`` cast to :func:`linalg_float` of its dtype (no copy when it already is)."""
    dtype = linalg_float(arr.dtype)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def is_real_number(v: object) -> bool:
    """A Python or NumPy real scalar, not a bool (options are static, compile-time values)."""
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
