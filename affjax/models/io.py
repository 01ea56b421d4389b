"""Reading and writing PyTorch state dicts: ``.pth`` (through torch) and ``.safetensors``.

``.safetensors`` files are parsed and written by the ``safetensors`` package (its NumPy
interface; no torch needed). Its NumPy loader has no ``bfloat16``/float8 types, so the reader
takes the package's validated raw views (``safetensors.deserialize``) and maps each dtype code
to a NumPy dtype itself (``bfloat16`` and float8 through ``ml_dtypes``, as JAX does). ``.pth``
files are pickles and need torch, imported only when such a file is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

# safetensors dtype codes -> NumPy dtypes (little-endian, as the format stores them).
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
}

StateDict = dict[str, np.ndarray]


def load_safetensors(path: str | os.PathLike) -> StateDict:
    """Read every tensor of a ``.safetensors`` file into NumPy arrays.

    Args:
      path: the file.

    Returns:
      ``{name: array}`` in the file's dtypes (``bfloat16`` and float8 as ``jnp.bfloat16`` etc.),
      in the file's storage order (the reference writer orders by dtype alignment, then name).

    Raises:
      ValueError: a malformed file (the ``safetensors`` package's diagnosis: bad header, byte
        ranges that do not match the shapes, ...) or a dtype NumPy cannot hold, naming the
        file (and the tensor).

    Example:
      >>> sd = load_safetensors("resnet18.safetensors")       # doctest: +SKIP
      >>> module, variables = affjax.models.from_torchvision("resnet18", sd)  # doctest: +SKIP
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        views = safetensors.deserialize(data)
    except Exception as e:  # safetensors' SafetensorError is not exported under a stable name
        raise ValueError(f"{path}: not a valid .safetensors file ({e})") from None
    out: StateDict = {}
    for name, view in views:
        dtype = _SAFETENSORS_DTYPES.get(view["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {view['dtype']}, which NumPy "
                             f"cannot hold (supported: {sorted(_SAFETENSORS_DTYPES)})")
        out[name] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
    return out


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``{name: array}`` as a ``.safetensors`` file (``safetensors.numpy.save_file``).

    Arrays may be NumPy arrays, JAX arrays (``bfloat16`` included) or torch tensors (converted
    with ``.numpy()``, ``bfloat16`` widened to float32). The file stores the tensors in the
    writer's order (by dtype alignment, then name), not in the mapping's order.

    Example:
      >>> _, variables = affjax.models.create("resnet18")                      # doctest: +SKIP
      >>> sd = affjax.models.to_torchvision("resnet18", variables)             # doctest: +SKIP
      >>> save_safetensors("resnet18.safetensors", sd)                         # doctest: +SKIP
    """
    arrays = {str(name): np.ascontiguousarray(to_numpy(t)) for name, t in tensors.items()}
    for name, a in arrays.items():
        if a.dtype.newbyteorder("<") not in _SAFETENSORS_DTYPES.values():
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    safetensors.numpy.save_file(arrays, os.fspath(path), metadata=meta)


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy view of a NumPy/JAX array or a torch tensor (bfloat16 tensors widened)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no native bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _load_pth(path: str) -> StateDict:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (a .pth file is a torch pickle); install torch, or "
            "convert the file to .safetensors elsewhere") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and not all(hasattr(v, "detach") for v in obj.values()):
        for key in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {str(k): to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """A state dict as ``{name: np.ndarray}`` from a mapping or a ``.pth``/``.safetensors`` path.

    Args:
      source: a mapping from tensor names to arrays (NumPy, JAX, torch), or the path of a
        ``.pth``/``.pt`` file (read with ``torch.load(weights_only=True)``; torch needed) or a
        ``.safetensors`` file (read without torch).

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: an unknown file extension or a malformed file.
      ImportError: a ``.pth`` file without torch installed.

    Example:
      >>> sd = load_state_dict("resnet18-f37072fd.pth")   # doctest: +SKIP
      >>> sd["fc.weight"].shape                           # doctest: +SKIP
      (1000, 512)
    """
    if isinstance(source, Mapping):
        return {str(k): to_numpy(v) for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"state_dict must be a mapping of arrays or a file path, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"state dict file not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    if path.endswith((".pth", ".pt", ".bin")):
        return _load_pth(path)
    raise ValueError(f"{path}: unknown state dict format; expected .pth, .pt or .safetensors")
