"""Reading and writing PyTorch state dicts: ``.pth`` and the like (through torch) and
``.safetensors``.

``.safetensors`` files are parsed and written by the ``safetensors`` package (its NumPy
interface; no torch needed). Its NumPy loader has no ``bfloat16``/float8 types, so the reader
takes the package's validated raw views (``safetensors.deserialize``) and maps each dtype code
to a NumPy dtype itself (``bfloat16`` and float8 through ``ml_dtypes``, as JAX does). torch
files (``.pth``, ``.pt``, ``.pth.tar``, ``.ckpt``, ``.bin``) are pickles and need torch,
imported only when such a file is read (with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
import pickle
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
    arrays = {str(name): contiguous(to_numpy(t)) for name, t in tensors.items()}
    for name, a in arrays.items():
        if a.dtype.newbyteorder("<") not in _SAFETENSORS_DTYPES.values():
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors code")
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    safetensors.numpy.save_file(arrays, os.fspath(path), metadata=meta)


def contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, with its shape kept (a 0-d array stays 0-d).

    Not ``np.ascontiguousarray`` alone: it returns at least 1-D, which would store a 0-d
    tensor (BatchNorm's ``num_batches_tracked``) as shape ``(1,)``.

    Example:
      >>> import numpy as np
      >>> contiguous(np.zeros((2, 3)).T).flags.c_contiguous, contiguous(np.array(5)).shape
      (True, ())
    """
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy view of a NumPy/JAX array or a torch tensor (bfloat16 tensors widened)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no native bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# Suffixes read through torch.load (matched case-insensitively): torch's own ``.pth``/``.pt``,
# Hugging Face's ``pytorch_model.bin``, training checkpoints ``.ckpt`` and ``.pth.tar``.
TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Keys under which training checkpoints keep the model's state dict.
_CHECKPOINT_KEYS = ("state_dict", "model")


def _is_array(value: Any) -> bool:
    return hasattr(value, "detach") or isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype"))


def _unwrap_checkpoint(obj: Any) -> Any:
    """The state dict inside a training checkpoint ``{"state_dict": ..., "epoch": ...}``."""
    if isinstance(obj, Mapping) and not all(_is_array(v) for v in obj.values()):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def _torch_load(torch: Any, path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # not a torch.save archive, or an older torch
            names = []
        if any(n.startswith("torch.nn.modules.") for n in names):
            raise ValueError(
                f"{path}: holds a pickled module (torch.save(model)), not a state dict; save "
                "model.state_dict() instead (files are read with torch.load(weights_only=True), "
                "which does not unpickle modules)") from None
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ValueError(
                f"{path}: holds pickled objects other than tensors ({shown}), which "
                "torch.load(weights_only=True) refuses; save a state dict of tensors "
                "(model.state_dict()) instead") from None
        raise ValueError(f"{path}: torch.load cannot read it ({e})") from None
    except OSError:
        raise
    except Exception as e:  # a truncated or foreign file: torch raises assorted errors
        raise ValueError(f"{path}: not a file torch.load can read ({type(e).__name__}: {e})"
                         ) from None


def _load_pth(path: str) -> StateDict:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (a .pth file is a torch pickle); install torch, or "
            "convert the file to .safetensors elsewhere") from None
    obj = _unwrap_checkpoint(_torch_load(torch, path))
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {str(k): to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """A state dict as ``{name: np.ndarray}`` from a mapping or a ``.pth``/``.safetensors`` path.

    Args:
      source: a mapping from tensor names to arrays (NumPy, JAX, torch), or the path of a
        torch file (``.pth``, ``.pt``, ``.pth.tar``, ``.ckpt``, ``.bin``; read with
        ``torch.load(weights_only=True)``; torch needed) or a ``.safetensors`` file (read
        without torch). Suffixes are matched case-insensitively. A training checkpoint (a
        mapping, or a file holding one, with non-tensor entries such as ``"epoch"``) is
        unwrapped: its ``"state_dict"`` or ``"model"`` entry is the state dict.

    Raises:
      FileNotFoundError: a path that does not exist.
      ValueError: an unknown file extension (the message lists the accepted ones), a
        malformed file, or a torch file holding a pickled module (``torch.save(model)``)
        or other non-tensor objects instead of a state dict.
      ImportError: a torch file without torch installed.

    Example:
      >>> sd = load_state_dict("resnet18-f37072fd.pth")   # doctest: +SKIP
      >>> sd["fc.weight"].shape                           # doctest: +SKIP
      (1000, 512)
    """
    if isinstance(source, Mapping):
        return {str(k): to_numpy(v) for k, v in _unwrap_checkpoint(source).items()}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"state_dict must be a mapping of arrays or a file path, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"state dict file not found: {path}")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        return load_safetensors(path)
    if lower.endswith(TORCH_SUFFIXES):
        return _load_pth(path)
    accepted = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise ValueError(f"{path}: unknown state dict format; expected one of the suffixes "
                     f"{accepted} (any case)")
