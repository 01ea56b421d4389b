"""Test configuration: float64 available everywhere; float32 tests cast explicitly."""

import os

# POT would import TensorFlow and torch as backends (15 s here); tests use its NumPy backend.
os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
os.environ.setdefault("POT_BACKEND_DISABLE_PYTORCH", "1")
# The affjax command would turn on JAX's persistent compilation cache in the tests' process
# (and in ~/.cache): off, except where a test asks for it (tests/test_cli.py).
os.environ["AFFJAX_COMPILATION_CACHE"] = "off"

# The TFDS tests (TensorFlow) and the torchvision parity tests share this process, and
# importing TensorFlow before torchvision crashes the process (segfault in triton's import,
# seen with tensorflow-cpu 2.21 and torch 2.14.1): torchvision goes first.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after each test module.

    XLA:CPU gives each compiled kernel its own memory mappings (code, constants,
    data), and the jit caches keep them alive for the life of the process. The
    whole suite in one process compiles enough distinct shapes to pass Linux's
    default ``vm.max_map_count`` (65530), after which the next compile segfaults
    inside XLA (seen at about 85% of the suite). Each module recompiles what it uses.
    """
    yield
    jax.clear_caches()
