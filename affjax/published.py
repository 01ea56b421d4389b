"""The paper's small experiments with published numbers (METHOD.md section 3).

Each function regenerates the authors' inputs and returns
``(label, affjax score, published value)`` rows; ``affjax reproduce`` prints them.
"""

from __future__ import annotations

import numpy as np

from affjax.score import affinity_score

Row = tuple[str, float, float]

POLYNOMIALS = {1: 1.000, 3: 0.711, 5: 0.577, 11: 0.400, 21: 0.289, 41: 0.205}
ACTIVATIONS = {"relu": 0.487, "tanh": 0.670, "sigmoid": 0.775}
RELU_SWEEP = {5: 0.134, 8: 0.526, 11: 0.792, 13: 0.940, 14: 0.993}


def _relu(v: np.ndarray) -> np.ndarray:
    return np.maximum(v, 0)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-v))).astype(v.dtype)


def polynomial_rows() -> list[Row]:
    """y = x^k on x = linspace(-1, 1, 1000)."""
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    return [(f"x^{k}", float(affinity_score(x, x**k)), v) for k, v in POLYNOMIALS.items()]


def activation_and_sweep_rows() -> list[Row]:
    """ReLU/Tanh/Sigmoid on N(-1, 2), then the ReLU input-range sweep (one RNG stream)."""
    rng = np.random.RandomState(987)  # the authors' legacy stream
    rows: list[Row] = []
    for (name, published), fn in zip(ACTIVATIONS.items(), (_relu, np.tanh, _sigmoid), strict=True):
        x = rng.normal(-1, 2, (1000, 1)).astype(np.float32)
        rows.append((f"{name}(N(-1, 2))", float(affinity_score(x, fn(x))), published))
    for i, m in enumerate(np.linspace(-4, 4, 20)):
        x = rng.uniform(m - 2, m + 2, (1000, 1)).astype(np.float32)
        published = RELU_SWEEP.get(i, 1.0 if i <= 4 or i >= 15 else float("nan"))
        rows.append((f"relu(U({m - 2:+.2f}, {m + 2:+.2f}))", float(affinity_score(x, _relu(x))),
                     published))
    return rows


def all_rows() -> list[Row]:
    """Every published number that needs no pretrained model."""
    return polynomial_rows() + activation_and_sweep_rows()
