"""Helpers shared by the affjax notebooks: where figures go, and the checks that end each one.

The notebooks run with ``notebooks/`` as the working directory (Jupyter's default, and what
``tests/test_notebooks.py`` does), so ``import nbhelpers`` finds this file.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax

FIGURES = Path(__file__).resolve().parent / "figures"


def save_figure(fig, name: str) -> Path:
    """Save a Matplotlib figure as ``notebooks/figures/<name>.png`` and return the path."""
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"saved {path.relative_to(FIGURES.parent)}")
    return path


def median_seconds(fn: Callable[[], object], *, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, each waited for on the device.

    Call ``fn`` once yourself first if it compiles: this times warm calls only.
    """
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class _Check:
    label: str
    measured: float
    expected: str
    ok: bool


class Checks:
    """Named comparisons collected over a notebook; :meth:`assert_all` fails on any miss.

    Every check is printed in one table, so a reader sees the measured numbers beside the
    published ones, and a failing notebook names each number that moved.
    """

    def __init__(self) -> None:
        self.rows: list[_Check] = []

    def close(self, label: str, measured: float, expected: float, *, atol: float) -> None:
        """``|measured - expected| <= atol``."""
        measured = float(measured)
        ok = math.isfinite(measured) and abs(measured - expected) <= atol
        self.rows.append(_Check(label, measured, f"{expected:.5g} +- {atol:.1g}", ok))

    def below(self, label: str, measured: float, bound: float) -> None:
        """``measured < bound``."""
        measured = float(measured)
        self.rows.append(_Check(label, measured, f"< {bound:.5g}", measured < bound))

    def above(self, label: str, measured: float, bound: float) -> None:
        """``measured > bound``."""
        measured = float(measured)
        self.rows.append(_Check(label, measured, f"> {bound:.5g}", measured > bound))

    def table(self) -> str:
        width = max(len(r.label) for r in self.rows)
        lines = [f"{'check':<{width}}  {'measured':>10}  {'expected':<18}  ok"]
        for r in self.rows:
            lines.append(
                f"{r.label:<{width}}  {r.measured:>10.5f}  {r.expected:<18}  "
                f"{'yes' if r.ok else 'NO'}"
            )
        return "\n".join(lines)

    def assert_all(self) -> None:
        """Print the table; raise ``AssertionError`` listing every failed check."""
        if not self.rows:
            raise AssertionError("no checks were recorded")
        print(self.table())
        failed = [r for r in self.rows if not r.ok]
        if failed:
            lines = [f"{r.label}: measured {r.measured:.5f}, expected {r.expected}" for r in failed]
            raise AssertionError(f"{len(failed)} check(s) failed:\n" + "\n".join(lines))
