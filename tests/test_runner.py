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
from test_cli import _run
from test_cli import tiny  # noqa: F401 (the fixture)

from affjax import results
from affjax import runner

FIXTURE = Path(__file__).parent / "data" / "tiny_random_v1.json"
FIXTURE_ARGS = ["--model", "tiny", "--batch-size", "8", "--batches", "3", "--metrics",
                "--compilation-cache", "off"]


def _cli(capsys, *args):
    code, out, err = _run(capsys, *args)
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


@pytest.mark.usefixtures("tiny")
def test_an_old_results_file_loads_and_the_command_resumes_it(tmp_path, capsys,
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


def _library_run(**kwargs):
    from test_cli import TRANSFORM
    from test_cli import _create

    import affjax
    from affjax import data

    module, variables = _create("tiny", seed=987)
    dataset = data.load_dataset("random", TRANSFORM, seed=987)
    info = {"model": "tiny", "weights": "random", "dataset": "random", "split": None,
            "seed": 987}
    return affjax.run_signature(module, variables, dataset, batch_size=8, info=info, **kwargs)


@pytest.mark.usefixtures("tiny")
def test_the_library_runner_equals_the_command(tmp_path, capsys):
    _cli(capsys, "--model", "tiny", "--batch-size", "8", "--batches", "3", "--metrics",
         "--out", str(tmp_path / "cli.json"))
    calls = []
    sig = _library_run(batches="3", metrics=True, path=tmp_path / "lib.json",
                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert sig.run.complete and sig.run.batch_indices == (0, 1, 2)
    assert sig.batch_scores.shape == (3, 3) and sig.metrics["cka"].shape == (3, 3)
    assert list(sig.run.timing["stages"]) == list(results.STAGES)
    cli_file = json.loads((tmp_path / "cli.json").read_text())
    lib_file = json.loads((tmp_path / "lib.json").read_text())
    assert _without_run_details(lib_file) == _without_run_details(cli_file)  # bit for bit
    assert results.load(tmp_path / "lib.json") == sig  # the file is the returned Signature
    # In memory only: the same numbers, no file.
    again = _library_run(batches="3", metrics=True)
    np.testing.assert_array_equal(again.batch_scores, sig.batch_scores)


def test_the_library_resumes_without_recomputing(tmp_path):
    path = tmp_path / "run.json"
    part = _library_run(batches="3", path=path, stop_after=2)
    assert not part.run.complete and part.run.batch_indices == (0, 1)
    assert results.load(path) == part
    calls, lines = [], []
    full = _library_run(batches="3", path=path, log=lines.append,
                        progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)]  # only batch 2 is computed
    assert lines == [f"resuming {path}: 2 batch(es) already done"]
    assert full.run.complete and full.run.batch_indices == (0, 1, 2)
    np.testing.assert_array_equal(full.batch_scores[:2], part.batch_scores)
    assert full.run.timing["stages"]["load"][:2] == part.run.timing["stages"]["load"]
    calls.clear()
    done = _library_run(batches="3", path=path, progress=lambda *a: calls.append(a))
    assert calls == [] and done == full  # complete: nothing to do, the saved result
    with pytest.raises(runner.RunError, match="belongs to another run"):
        _library_run(batches="3", path=path, covariance="ledoit_wolf")


def test_the_old_file_resumes_through_the_library(tmp_path):
    path = tmp_path / "old.json"
    shutil.copy(FIXTURE, path)
    calls = []
    sig = _library_run(batches="3", metrics=True, path=path,
                       progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)] and sig.run.complete
    fresh = _library_run(batches="3", metrics=True)
    np.testing.assert_allclose(sig.batch_scores, fresh.batch_scores, rtol=1e-5)


def test_plot_and_compare_take_a_signature_or_a_path(tmp_path):
    from affjax import compare
    from affjax.plot import plot_signature

    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    sigs = [_library_run(batches=b, path=p) for b, p in zip(("2", "@3"), paths, strict=True)]
    for given in (sigs[0], paths[0], str(paths[0])):
        out = tmp_path / f"{type(given).__name__}.png"
        plot_signature(given, out)
        assert out.read_bytes()[:4] == b"\x89PNG"
    as_dicts = [results.to_dict(s) for s in sigs]
    expected = compare.compare(as_dicts, ["a", "b"])
    assert compare.compare(sigs, ["a", "b"]) == expected
    assert compare.compare([str(p) for p in paths], ["a", "b"]) == expected
    assert compare.compare([sigs[0], paths[1]], ["a", "b"]) == expected
    assert compare.labels_for(sigs, [str(p) for p in paths]) == ["a", "b"]  # same model
