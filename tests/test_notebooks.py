"""Run every ``notebooks/*.ipynb`` top to bottom; any error or failed assertion fails its test.

Each notebook runs in a fresh ``python3`` kernel (ipykernel's own spec, which starts the
interpreter running pytest), with ``notebooks/`` as the working directory and the repository
root first on ``PYTHONPATH``, so the package under test is this checkout's even without
``pip install -e .``. A notebook gets ``DEFAULT_TIMEOUT_S`` seconds in all, or what its
metadata asks for (``{"affjax": {"timeout_s": 300}}``), and must save at least one PNG under
``notebooks/figures/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError
from nbclient.exceptions import CellTimeoutError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
FIGURES = NOTEBOOK_DIR / "figures"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
DEFAULT_TIMEOUT_S = 300
KERNEL = "python3"


class NotebookFailed(AssertionError):
    """A cell raised, or the notebook ran past its time budget."""


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this process's environment: put the repository first on its path."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))
    # On a small shared CI machine the OpenBLAS pools of NumPy and SciPy (jax's CPU LAPACK)
    # spin against XLA's threads: one thread each made a 1300 x 300 SVD 5x faster at load 5 on
    # 2 cores. A value set by the caller wins.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))


def run_notebook(nb, *, cwd: Path, timeout_s: float) -> None:
    """Execute ``nb`` in place, cell by cell, its cells within ``timeout_s`` seconds in all.

    Kernel start-up is not counted (nbclient gives it its own ``startup_timeout``).

    Raises:
      NotebookFailed: naming the cell that raised (with its traceback) or the cell that was
        running when the budget ran out.
    """
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}, allow_errors=False
    )
    with client.setup_kernel():
        deadline = time.monotonic() + timeout_s
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotebookFailed(f"time budget of {timeout_s:.0f} s spent before cell {index}")
            client.timeout = max(1, int(left))
            try:
                client.execute_cell(cell, index)
            except CellTimeoutError:
                raise NotebookFailed(
                    f"cell {index} still running when the {timeout_s:.0f} s budget ran out:\n"
                    + cell.source
                ) from None
            except CellExecutionError as err:
                raise NotebookFailed(f"cell {index} failed:\n{err}") from None


def _notebook(*sources: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    with_outputs = [i for i, c in enumerate(nb.cells) if c.get("outputs")]
    assert not with_outputs, f"{path.name}: commit it without outputs (cells {with_outputs})"
    timeout_s = nb.metadata.get("affjax", {}).get("timeout_s", DEFAULT_TIMEOUT_S)
    started = time.time()
    try:
        run_notebook(nb, cwd=NOTEBOOK_DIR, timeout_s=timeout_s)
    except NotebookFailed as err:
        pytest.fail(f"{path.name}: {err}", pytrace=False)
    new_figures = [p for p in FIGURES.glob("*.png") if p.stat().st_mtime >= started - 1]
    assert new_figures, f"{path.name} saved no PNG under {FIGURES}"


# --- the runner itself ------------------------------------------------------------------------


def test_kernel_runs_this_interpreter_and_this_checkout(tmp_path, kernel_env):
    nb = _notebook(
        "import sys, affjax\n"
        f"assert sys.executable == {sys.executable!r}, sys.executable\n"
        f"assert affjax.__file__.startswith({str(ROOT / 'affjax')!r}), affjax.__file__"
    )
    run_notebook(nb, cwd=tmp_path, timeout_s=120)


def test_failing_assertion_fails_the_run(tmp_path, kernel_env):
    nb = _notebook("x = 1", "assert x == 2, 'x moved'", "raise SystemExit('never reached')")
    with pytest.raises(NotebookFailed, match="cell 1 failed") as err:
        run_notebook(nb, cwd=tmp_path, timeout_s=120)
    assert "x moved" in str(err.value)


def test_time_budget_covers_the_whole_notebook(tmp_path, kernel_env):
    # Each cell alone is well under the budget; together they are not.
    nb = _notebook("import time", *["time.sleep(2)"] * 4)
    with pytest.raises(NotebookFailed, match="budget"):
        run_notebook(nb, cwd=tmp_path, timeout_s=5)


def test_bench_score_json_has_what_notebook_06_reads(tmp_path, monkeypatch):
    # benchmarks/bench_score.py --json on a tiny grid: folders created, the schema notebook 06
    # plots (cells with n, d, affjax/baseline medians and scores), complete at the end.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    if "ot" not in sys.modules:
        # POT would import TensorFlow and PyTorch as array backends (15 s here); the benchmark
        # hands it NumPy arrays only.
        monkeypatch.setenv("POT_BACKEND_DISABLE_TENSORFLOW", "1")
        monkeypatch.setenv("POT_BACKEND_DISABLE_PYTORCH", "1")
    import bench_score

    out = tmp_path / "results" / "bench.json"
    argv = ["--n", "16", "--d", "1", "3", "--repeats", "1", "--wait-idle", "0"]
    assert bench_score.main([*argv, "--no-headlines", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["complete"] is True
    assert sorted((c["n"], c["d"]) for c in saved["cells"]) == [(16, 1), (16, 3)]
    for c in saved["cells"]:
        assert c["affjax"]["median"] > 0 and c["baseline"]["median"] > 0
        assert abs(c["affjax"]["score"] - c["baseline"]["score"]) < 1e-3
    assert saved["args"]["d"] == [1, 3]
