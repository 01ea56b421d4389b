"""Test configuration: float64 available everywhere; float32 tests cast explicitly."""

import jax

jax.config.update("jax_enable_x64", True)
