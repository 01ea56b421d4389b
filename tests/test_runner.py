"""The library runner (``affjax.run_signature``) and results files written by older code.

``tests/data/tiny_random_v1.json`` was written by the command line before the runner
existed (``affjax signature --model tiny --batch-size 8 --batches 3 --metrics
--stop-after 2``, with the tiny zoo of tests/test_cli.py): two of three batches saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cli import TINY_ZOO

from affjax import cli
from affjax import results
from affjax import runner

FIXTURE = Path(__file__).parent / "data" / "tiny_random_v1.json"
FIXTURE_ARGS = ["--model", "tiny", "--batch-size", "8", "--batches", "3", "--metrics",
                "--compilation-cache", "off"]


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(cli, "_model_api", lambda: TINY_ZOO)


def _cli(capsys, *args):
    code = cli.main(["signature", "--no-progress", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def _without_run_details(obj):
    return {k: v for k, v in obj.items() if k not in ("timing", "versions", "device")}


def _assert_same_result(a, b):
    """Equal results files, scores and metrics to float32 rounding (the fixture is older)."""
    a, b = _without_run_details(a), _without_run_details(b)
    la, lb = a.pop("layers"), b.pop("layers")
    assert a == b
    assert [(x["name"], x["kind"], x["dim"]) for x in la] == [
        (x["name"], x["kind"], x["dim"]) for x in lb]
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-5)
        np.testing.assert_allclose(x["score"], y["score"], rtol=1e-5)
        assert set(x.get("metrics", {})) == set(y.get("metrics", {}))
        for m in x.get("metrics", {}):
            np.testing.assert_allclose(x["metrics"][m]["values"], y["metrics"][m]["values"],
                                       rtol=1e-4, atol=1e-6)


def test_an_old_results_file_loads_and_the_command_resumes_it(tiny, tmp_path, capsys,
                                                             monkeypatch):
    saved = results.to_dict(results.load(FIXTURE))
    assert saved["batch_indices"] == [0, 1] and not saved["complete"]
    part = tmp_path / "part.json"
    shutil.copy(FIXTURE, part)
    real, calls = runner._batch_signature, []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "_batch_signature", counted)
    _, err = _cli(capsys, *FIXTURE_ARGS, "--out", str(part))
    assert "resuming" in err and len(calls) == 1  # only batch 2 is computed
    _cli(capsys, *FIXTURE_ARGS, "--out", str(tmp_path / "full.json"))
    resumed = json.loads(part.read_text())
    assert resumed["complete"] and resumed["batch_indices"] == [0, 1, 2]
    assert resumed["timing"]["started"] == saved["timing"]["started"]
    _assert_same_result(resumed, json.loads((tmp_path / "full.json").read_text()))
