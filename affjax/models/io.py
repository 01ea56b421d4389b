"""Reading and writing PyTorch state dicts: ``.pth`` (through torch) and ``.safetensors``.

The ``.safetensors`` reader and writer are plain NumPy (the format is an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the raw little-endian bytes), so safetensors files load without
torch or the ``safetensors`` package. ``.pth`` files are pickles and need torch,
imported only when such a file is read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

# safetensors dtype codes -> NumPy dtypes (little-endian).
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
    "BF16": np.dtype(jnp.bfloat16),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
}
_DTYPE_CODES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# A header larger than this is not a safetensors file (the reference reader uses 100 MB).
_MAX_HEADER_BYTES = 100_000_000

StateDict = dict[str, np.ndarray]


def load_safetensors(path: str | os.PathLike) -> StateDict:
    """Read every tensor of a ``.safetensors`` file into NumPy arrays.

    Args:
      path: the file.

    Returns:
      ``{name: array}`` in the file's dtypes (``bfloat16`` and float8 as ``jnp.bfloat16`` etc.).

    Raises:
      ValueError: a malformed file (bad header, unknown dtype, byte ranges that do not
        match the shapes or overlap the end of the file), naming the file and tensor.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be a .safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError(f"{path}: header length {header_len} exceeds the file; not .safetensors")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the .safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the .safetensors header is not a JSON object")
    buffer = memoryview(data)[8 + header_len:]
    out: StateDict = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: tensor {name!r} has a malformed header entry {info!r} (dtype one of "
                f"{sorted(_SAFETENSORS_DTYPES)}, shape, data_offsets)") from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(buffer) or end - begin != expected:
            raise ValueError(
                f"{path}: tensor {name!r} ({info['dtype']}, shape {shape}) has byte range "
                f"[{begin}, {end}) but needs {expected} bytes within {len(buffer)}")
        out[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape).copy()
    return out


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``{name: array}`` as a ``.safetensors`` file (C order, little-endian).

    Arrays may be NumPy arrays, JAX arrays or torch tensors (converted with ``.numpy()``).
    The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
    """
    arrays = {name: np.ascontiguousarray(to_numpy(t)) for name, t in tensors.items()}
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, a in arrays.items():
        code = _DTYPE_CODES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in arrays.values():
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


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
