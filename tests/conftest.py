"""Test configuration: float64 available everywhere; float32 tests cast explicitly."""

import os

# POT would import TensorFlow and torch as backends (15 s here); tests use its NumPy backend.
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_PYTORCH", "1")

# The TFDS tests (TensorFlow) and the torchvision parity tests share this process, and
# importing TensorFlow before torchvision crashes the process (segfault in triton's import,
# seen with tensorflow-cpu 2.21 and torch 2.14.1): torchvision goes first.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
