"""affjax.distributed: batches split over processes, part files, merge; real multi-process runs.

The first tests are pure (partition, part names, argument checks, merge). The last ones
launch 1, 2 and 3 Python processes of ``tests/distributed_driver.py`` with
``jax.distributed.initialize`` on a loopback coordinator (127.0.0.1, a free port), Gloo
collectives on CPU: each process scores its own batches of a tiny CNN on the ``random``
dataset, writes its part atomically, and process 0 merges. The merged files must equal
the one-process run's to the last bit, in float32 and float64. Each launch is bounded
(120 s) and its processes are killed on failure.
"""

from __future__ import annotations

import copy
import os
import sys

import jax
import numpy as np
import pytest

from affjax import distributed
from affjax import results
from affjax.distributed import DistributedError
from affjax.distributed import ProcessContext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed_driver as driver  # noqa: E402

# ----------------------------------------------------------------------------- partition


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 6, 25])
def test_partition_covers_every_batch_once_and_balances(n, count):
    indices = list(range(3, 3 + n))
    shares = [distributed.partition(indices, i, count) for i in range(count)]
    assert sorted(b for share in shares for b in share) == indices
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(share == sorted(share) for share in shares)
    # Deterministic and independent of the order the indices come in.
    assert shares == [distributed.partition(indices[::-1], i, count) for i in range(count)]


@pytest.mark.parametrize("index,count", [(2, 2), (-1, 2), (0, 0), (0.0, 1), (True, 2)])
def test_partition_refuses_a_process_outside_the_count(index, count):
    with pytest.raises(DistributedError, match="process_"):
        distributed.partition(range(4), index, count)


def test_part_paths_name_the_process_count(tmp_path):
    merged = tmp_path / "resnet18_random.json"
    names = {distributed.part_path(merged, i, n).name for n in (1, 2, 4) for i in range(n)}
    assert len(names) == 7  # no part of a 2-process run is a part of a 4-process run
    assert "resnet18_random.part-1-of-4.json" in names
    assert distributed.part_path(merged, 0, 1).parent == tmp_path
    assert merged.name not in names


# ----------------------------------------------------------------------------- initialize


@pytest.fixture
def no_runtime(monkeypatch):
    """jax.distributed.initialize recorded, not run."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


@pytest.mark.parametrize("args,kwargs,message", [
    (("127.0.0.1:1234", 2, 2), {}, r"process_id must be in \[0, num_processes\) = \[0, 2\)"),
    (("127.0.0.1:1234", 2, -1), {}, r"process_id must be in"),
    (("127.0.0.1:1234", 0, 0), {}, r"num_processes must be at least 1"),
    (("127.0.0.1:1234", "2", 0), {}, r"num_processes must be an integer"),
    (("127.0.0.1", 2, 0), {}, r"coordinator must be HOST:PORT"),
    (("127.0.0.1:0", 2, 0), {}, r"coordinator must be HOST:PORT"),
    (("127.0.0.1:99999", 2, 0), {}, r"coordinator must be HOST:PORT"),
    (("http://h:1", 2, 0), {}, r"coordinator must be HOST:PORT"),
    (("127.0.0.1:1234", 2), {}, r"together \(missing: process_id\)"),
    ((None, 2, 0), {}, r"together \(missing: coordinator\)"),
    (("h:1",), {}, r"missing: num_processes, process_id"),
    ((), {"local_device_ids": [0]}, r"local_device_ids needs a distributed run"),
    ((None, None, -1), {"auto": True}, r"process_id must be an integer from 0"),
])
def test_initialize_checks_its_arguments_before_starting_anything(no_runtime, args, kwargs,
                                                                  message):
    with pytest.raises(DistributedError, match=message):
        distributed.initialize(*args, **kwargs)
    assert no_runtime == []


def test_initialize_passes_its_arguments_to_jax(no_runtime):
    assert distributed.initialize() == ProcessContext(0, 1)
    assert no_runtime == []  # nothing asked: one process, nothing started
    ctx = distributed.initialize("[::1]:8476", 2, 1, local_device_ids=[1],
                                 initialization_timeout=30)
    assert no_runtime[-1] == (("[::1]:8476", 2, 1),
                              {"local_device_ids": [1], "initialization_timeout": 30})
    assert ctx == ProcessContext(jax.process_index(), jax.process_count())
    distributed.initialize(auto=True)  # a TPU pod: JAX finds them
    assert no_runtime[-1] == ((None, None, None), {})
    assert jax.config.jax_cpu_collectives_implementation is not None


def test_process_context_checks_itself():
    assert ProcessContext(3, 4).distributed and not ProcessContext(3, 4).is_main
    with pytest.raises(DistributedError, match="process_index"):
        ProcessContext(4, 4)


def test_scoring_refuses_devices_of_other_processes(monkeypatch):
    from affjax.layer_scoring import device_tuple

    assert device_tuple(jax.local_devices()) == tuple(jax.local_devices())
    # As process 1 of 2, this process's device belongs to "another process".
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"belong to other processes.*jax\.local_devices\(\)"):
        device_tuple(jax.devices())


# ----------------------------------------------------------------------------- merge


def _full_result(num_batches: int, *, metrics: bool = True, seed: int = 0) -> dict:
    """A one-process results object as the CLI builds it (scores, metrics, timing)."""
    rng = np.random.default_rng(seed)
    names = ["relu:0", "relu:1", "tanh:0"]
    result = {"format": results.FORMAT, "model": "m", "weights": "random", "dataset": "random",
              "split": None, "batch_size": 8, "batches": str(num_batches),
              "covariance": "empirical", "metrics": metrics, "seed": 987, "num_examples": 100,
              "batch_indices": list(range(num_batches)), "complete": True,
              "versions": {"affjax": "x"}, "device": "cpu",
              "timing": {"started": "2026-01-01T00:00:00+00:00",
                         "updated": "2026-01-01T00:10:00+00:00",
                         "batch_seconds": rng.random(num_batches).tolist(),
                         "stages": {s: rng.random(num_batches).tolist()
                                    for s in results.STAGES}},
              "layers": []}
    result["timing"]["stages"]["write"][-1] = None
    result["timing"]["seconds"] = float(sum(result["timing"]["batch_seconds"]))
    for name in names:
        scores = rng.random(num_batches).tolist()
        mean, std = results.summarise(scores)
        layer = {"name": name, "kind": name[:4], "dim": 4, "score": mean, "std": std,
                 "scores": scores}
        if metrics:
            layer["metrics"] = {}
            for m in ("cka", "sparsity"):
                values = rng.random(num_batches).tolist()
                mu, sd = results.summarise(values)
                layer["metrics"][m] = {"mean": mu, "std": sd, "values": values}
        result["layers"].append(layer)
    return results.validate(result)


def _part(full: dict, keep: list[int]) -> dict:
    """The part of ``full`` holding the batches ``keep``: what one process would write."""
    at = [full["batch_indices"].index(b) for b in keep]
    part = copy.deepcopy(full)
    part["batch_indices"] = list(keep)
    timing = part["timing"]
    timing["batch_seconds"] = [timing["batch_seconds"][i] for i in at]
    timing["seconds"] = float(sum(timing["batch_seconds"]))
    timing["stages"] = {s: [v[i] for i in at] for s, v in timing["stages"].items()}
    for layer in part["layers"]:
        layer["scores"] = [layer["scores"][i] for i in at]
        layer["score"], layer["std"] = (results.summarise(layer["scores"]) if at
                                        else (None, None))
        for metric in layer.get("metrics", {}).values():
            metric["values"] = [metric["values"][i] for i in at]
            metric["mean"], metric["std"] = (results.summarise(metric["values"]) if at
                                             else (None, None))
    return part


@pytest.mark.parametrize("metrics", [True, False])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 9])
def test_merge_of_the_parts_is_the_one_process_result(count, metrics):
    full = _full_result(7, metrics=metrics)
    parts = [_part(full, distributed.partition(full["batch_indices"], i, count))
             for i in range(count)]
    merged = distributed.merge(parts)
    assert merged["timing"].pop("processes") == count
    assert merged == full  # every field, to the last bit (summaries recomputed in order)
    results.validate(merged)
    assert distributed.merge(parts[::-1])["layers"] == full["layers"]  # any order of parts
    assert parts == [_part(full, distributed.partition(full["batch_indices"], i, count))
                     for i in range(count)]  # the parts are not modified


def test_merge_keeps_a_batch_found_twice_once_if_equal():
    full = _full_result(4)
    merged = distributed.merge([full, _part(full, [1, 3])])  # an old merge and a part
    merged["timing"].pop("processes")
    assert merged == full
    other = _part(_full_result(4, seed=1), [1])
    with pytest.raises(DistributedError, match="batch 1 is in parts 0 and 1 with different"):
        distributed.merge([full, other])


def test_merge_is_incomplete_while_a_part_is():
    full = _full_result(4)
    parts = [_part(full, [0, 2]), _part(full, [1])]  # batch 3's process was lost
    parts[1]["complete"] = False
    merged = distributed.merge(parts)
    assert merged["complete"] is False and merged["batch_indices"] == [0, 1, 2]
    results.validate(merged)


@pytest.mark.parametrize("field,value,message", [
    ("model", "other", r"part 1 belongs to another run: its 'model'"),
    ("batch_size", 16, r"its 'batch_size' is 16"),
    ("num_examples", 200, r"its 'num_examples'"),
    ("versions", {"affjax": "y"}, r"its 'versions'"),
])
def test_merge_refuses_parts_of_other_runs(field, value, message):
    full = _full_result(2)
    other = {**_part(full, [1]), field: value}
    with pytest.raises(DistributedError, match=message):
        distributed.merge([_part(full, [0]), other])


def test_merge_refuses_other_layers_and_no_parts():
    full = _full_result(2)
    other = _part(full, [1])
    other["layers"][0]["name"] = "gelu:0"
    with pytest.raises(DistributedError, match="part 1 has other activation calls"):
        distributed.merge([_part(full, [0]), other])
    with pytest.raises(DistributedError, match="at least one part"):
        distributed.merge([])


def test_merge_accepts_parts_without_batches():
    full = _full_result(2)
    empty = {**_part(full, []), "layers": []}  # a process with no batch writes no layer
    merged = distributed.merge([empty, _part(full, [0]), _part(full, [1]), empty])
    assert merged["timing"].pop("processes") == 4
    assert merged == full


def test_gather_parts_on_one_process_is_the_part():
    part = _full_result(2)
    assert distributed.gather_parts(part) == [part]


# ----------------------------------------------------------------------------- processes

BATCHES = 5  # divisible by neither 2 nor 3
DTYPES = ("float32", "float64")


def _launch(n, out, *extra, **kwargs):
    outcomes = driver.launch(n, ["--out", str(out), "--batches", str(BATCHES),
                                 "--dtypes", ",".join(DTYPES), *extra], timeout=120, **kwargs)
    return outcomes


def _ok(outcomes):
    for i, o in enumerate(outcomes):
        assert o["returncode"] == 0, f"process {i} failed:\n{o['stderr'][-3000:]}"
    return outcomes


def _merged(out, dtype):
    return results.load(out.with_name(f"{out.stem}_{dtype}.json"))


def _same_run(a, b):
    """Equal results but for where and how long they ran (``device``: the devices of all the
    processes; ``timing``: wall clock and the process count)."""
    a, b = results.to_dict(a), results.to_dict(b)
    keys = [k for k in a if k not in ("timing", "device")]
    assert sorted(keys) == sorted(k for k in b if k not in ("timing", "device"))
    for k in keys:
        assert a[k] == b[k], k  # scores compared as floats: to the last bit


def _scored(outcomes):
    """{dtype: [batches]} scored in a launch, per the drivers' events."""
    done = {d: [] for d in DTYPES}
    for o in outcomes:
        for e in o["events"]:
            if e["event"] == "batch":
                done[e["dtype"]].append(e["batch"])
    return {d: sorted(v) for d, v in done.items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return {"root": root, "cache": root / "jax-cache"}


@pytest.fixture(scope="module")
def one_process(work):
    out = work["root"] / "one" / "tiny.json"
    out.parent.mkdir()
    _ok(_launch(1, out, "--cache", str(work["cache"]), "--check-library"))
    return {d: _merged(out, d) for d in DTYPES}


def test_two_processes_score_what_one_does(one_process, work):
    out = work["root"] / "two" / "tiny.json"
    out.parent.mkdir()
    outcomes = _ok(_launch(2, out, "--cache", str(work["cache"]), "--check-library"))
    for dtype in DTYPES:
        merged = _merged(out, dtype)
        assert merged.run.timing["processes"] == 2 and merged.run.complete
        assert list(merged.run.batch_indices) == list(range(BATCHES))
        _same_run(merged, one_process[dtype])
        np.testing.assert_array_equal(merged.batch_scores, one_process[dtype].batch_scores)
        # Each process scored its own share, on its own device.
        for i in range(2):
            part = results.load(distributed.part_path(out.with_name(f"tiny_{dtype}.json"), i, 2))
            assert list(part.run.batch_indices) == distributed.partition(range(BATCHES), i, 2)
    checks = [e for o in outcomes for e in o["events"] if e["event"] == "check"]
    assert len(checks) == 2 * len(DTYPES)
    for check in checks:
        assert check["signature_scores_equal"]  # the public signature, bit for bit
        assert len(check["devices"]) == 1  # its own CPU device, not the two global ones
        assert "jax.local_devices()" in check["foreign_devices"]


def test_three_processes_resume_after_one_is_killed(one_process, work):
    out = work["root"] / "three" / "tiny.json"
    out.parent.mkdir()
    # Process 1 (batches 1 and 4) dies once its first batch is saved (float32 runs first);
    # the job is then lost, and the other processes are killed as a scheduler would.
    first = _launch(3, out, "--cache", str(work["cache"]), per_process={1: ["--die-after", "1"]},
                    expect_exit={1: driver.DIE_EXIT_CODE})
    assert first[1]["returncode"] == driver.DIE_EXIT_CODE, first[1]["stderr"][-3000:]
    saved = {}
    for dtype in DTYPES:
        merged_path = out.with_name(f"tiny_{dtype}.json")
        assert not merged_path.exists()
        saved[dtype] = sorted(b for i in range(3) if distributed.part_path(
            merged_path, i, 3).exists() for b in results.load(
            distributed.part_path(merged_path, i, 3)).run.batch_indices)
    assert 1 in saved["float32"] and 4 not in saved["float32"]
    assert not {1, 4} & set(saved["float64"])
    # Everything on disk was scored in the first run, and nothing else was saved.
    assert all(set(saved[d]) <= set(_scored(first)[d]) for d in DTYPES)

    second = _ok(_launch(3, out, "--cache", str(work["cache"])))
    again = _scored(second)
    for dtype in DTYPES:
        assert not set(again[dtype]) & set(saved[dtype]), "a finished batch was recomputed"
        assert sorted(again[dtype] + saved[dtype]) == list(range(BATCHES))
        merged = _merged(out, dtype)
        assert merged.run.timing["processes"] == 3 and merged.run.complete
        _same_run(merged, one_process[dtype])


def test_the_command_line_on_two_processes_writes_the_one_process_file(work):
    # `affjax signature ... --coordinator HOST:PORT --num-processes 2 --process-id I`.
    common = ["--cli", "--model", "tiny", "--dataset", "random", "--batch-size", "8",
              "--batches", str(BATCHES), "--metrics", "--no-progress",
              "--compilation-cache", str(work["cache"])]
    runs = {}
    for n in (1, 2):
        out = work["root"] / f"cli{n}"
        outcomes = _ok(driver.launch(n, [*common, "--out", str(out)], timeout=120))
        runs[n] = results.load(out / "tiny_random.json")
        if n == 2:
            assert "process 1: its batches are in" in outcomes[1]["stderr"]
            assert (out / "tiny_random.csv").exists() and (out / "tiny_random.png").exists()
            for i in range(2):
                part = results.load(out / f"tiny_random.part-{i}-of-2.json")
                assert list(part.run.batch_indices) == distributed.partition(
                    range(BATCHES), i, 2)
    _same_run(runs[2], runs[1])  # scores and metrics of every batch, to the last bit
    assert runs[2].run.complete and runs[2].run.timing["processes"] == 2
    # Run again: nothing is recomputed, the merged file is written again, the same.
    out = work["root"] / "cli2"
    before = results.load(out / "tiny_random.part-1-of-2.json")
    _ok(driver.launch(2, [*common, "--out", str(out)], timeout=120))
    assert results.load(out / "tiny_random.part-1-of-2.json").run.timing == before.run.timing
    _same_run(results.load(out / "tiny_random.json"), runs[1])


def test_the_command_line_names_its_distributed_options(tmp_path):
    outcome = driver.launch(1, ["--cli", "--coordinator", "127.0.0.1:1234", "--num-processes",
                                "2", "--out", str(tmp_path), "--no-progress"], timeout=60)[0]
    assert outcome["returncode"] == 2
    said = " ".join(outcome["stderr"].split())
    assert "(missing: process_id)" in said
    assert "--coordinator HOST:PORT --num-processes N --process-id I" in said
    assert "Traceback" not in outcome["stderr"]

