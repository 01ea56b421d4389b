"""Generated pre/post-activation pairs covering the hard cases of the score."""

from __future__ import annotations

import numpy as np

KINDS = ("relu", "tanh", "dead_units", "all_dead", "constant_input_cols", "low_rank",
         "psd_affine", "negation", "isotropic")


def make_case(kind: str, n: int, d: int, seed: int = 0, scale: float = 1.0):
    """(x, y) float64 arrays of shape (n, d)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, d)) / np.sqrt(d)
    x = (rng.normal(size=(n, d)) @ w + rng.normal(size=d)) * scale
    if kind == "relu":
        y = np.maximum(x, 0)
    elif kind == "tanh":
        y = np.tanh(x)
    elif kind == "dead_units":
        x[:, : max(1, d // 4)] -= 100 * scale  # these ReLU units never fire
        y = np.maximum(x, 0)
    elif kind == "all_dead":
        y = np.maximum(x - 1000 * scale, 0)
    elif kind == "constant_input_cols":
        x[:, : max(1, d // 5)] = 3.0
        y = np.maximum(x, 0)
    elif kind == "low_rank":
        x = rng.normal(size=(n, min(8, d))) @ rng.normal(size=(min(8, d), d)) * scale
        y = np.maximum(x, 0)
    elif kind == "psd_affine":
        p = rng.normal(size=(d, d))
        p = p @ p.T / d + 0.1 * np.eye(d)
        y = x @ p + 1.0
    elif kind == "negation":
        y = -x
    elif kind == "isotropic":
        x = rng.normal(size=(n, d)) * scale
        y = np.maximum(x, 0)
    else:
        raise ValueError(kind)
    return x, y
