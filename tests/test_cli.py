"""The `affjax` command line: end-to-end runs, resume, schema, plots, compare, bad input.

Most runs use a tiny zoo (a 3-activation CNN on 12x12 crops) substituted for ``affjax.models``
so they take seconds; the embedded default and the weights checks use the real zoo.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import affjax
from affjax import _batch
from affjax import cli
from affjax import data
from affjax import metrics
from affjax import models
from affjax import results
from affjax import runner
from affjax.signature import capture_layers


class Tiny(nn.Module):
    """Conv -> relu -> conv -> relu (the same module twice) -> pool -> dense -> tanh -> dense.

    Every activation is 4 wide, so one compiled scorer serves all layers (fast tests);
    ``extra`` adds a second tanh call (a longer signature for ``compare``).
    """

    extra: bool = False

    @nn.compact
    def __call__(self, x):
        act = affjax.Activation(nn.relu, name="relu")
        h = act(nn.Conv(4, (3, 3), name="conv0")(x))
        h = act(nn.Conv(4, (3, 3), name="conv1")(h))
        h = jnp.mean(h, axis=(1, 2))
        tanh = affjax.Activation(jnp.tanh, name="tanh")
        h = tanh(nn.Dense(4, name="fc0")(h))
        if self.extra:
            h = tanh(nn.Dense(4, name="fc1")(h))
        return nn.Dense(10, name="head")(h)


TRANSFORM = models.EvalTransform(resize_size=16, crop_size=12)


def _create(name, *, seed=0, num_classes=1000):
    module = Tiny(extra=name == "tiny3")
    return module, module.init(jax.random.key(seed), jnp.zeros((1, 12, 12, 3), jnp.float32))


def _from_torchvision(name, path):
    raise ValueError("state dict does not fit tiny: 1 missing: conv0.weight")


TINY_ZOO = types.SimpleNamespace(
    list_models=lambda: ["tiny", "tiny3"], create=_create, from_torchvision=_from_torchvision,
    eval_transform=lambda name: TRANSFORM)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(cli, "_model_api", lambda: TINY_ZOO)


def _run(capsys, *args):
    code = cli.main(["signature", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *args):
    code, out, err = _run(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("affjax signature: error: ")
    assert "\n\n" not in err.strip()  # one paragraph
    return " ".join(err.split())


def _check_schema(obj, *, n_batches, n_layers):
    """The JSON schema of the issue, checked key by key (independently of results.validate)."""
    for key, typ in {"format": str, "model": str, "weights": str, "dataset": str,
                     "batch_size": int, "batches": str, "covariance": str, "metrics": bool,
                     "seed": int, "batch_indices": list, "complete": bool, "versions": dict,
                     "timing": dict, "layers": list, "device": str}.items():
        assert isinstance(obj[key], typ), key
    assert obj["format"] == "affjax-signature/1"
    assert {"affjax", "jax", "jaxlib", "flax", "numpy", "python"} <= set(obj["versions"])
    assert {"started", "updated", "seconds", "batch_seconds"} <= set(obj["timing"])
    assert len(obj["timing"]["batch_seconds"]) == n_batches
    assert len(obj["batch_indices"]) == n_batches
    assert len(obj["layers"]) == n_layers
    for layer in obj["layers"]:
        assert {"name", "kind", "dim", "score", "std", "scores"} <= set(layer)
        assert isinstance(layer["dim"], int) and len(layer["scores"]) == n_batches
        assert layer["score"] == pytest.approx(np.mean(layer["scores"]), abs=1e-12)
        assert layer["std"] == pytest.approx(np.std(layer["scores"]), abs=1e-12)
    results.validate(obj)


def test_end_to_end_random_matches_the_library_signature(tiny, tmp_path, capsys):
    code, out, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--batches", "2",
                          "--out", str(tmp_path))
    assert code == 0, err
    obj = json.loads((tmp_path / "tiny_random.json").read_text())
    _check_schema(obj, n_batches=2, n_layers=3)
    assert obj["complete"] and obj["batch_size"] == 8 and obj["dataset"] == "random"
    assert [la["name"] for la in obj["layers"]] == ["relu:0", "relu:1", "tanh:0"]
    assert [la["kind"] for la in obj["layers"]] == ["relu", "relu", "tanh"]
    assert [la["dim"] for la in obj["layers"]] == [4, 4, 4]
    # Same numbers as the library on the same batches.
    module, variables = _create("tiny", seed=987)
    ds = data.load_dataset("random", TRANSFORM)
    for b, images in ds.batches(8, data.parse_batches("2")):
        sig = affjax.signature(module, variables, jnp.asarray(images))
        np.testing.assert_allclose([la["scores"][b] for la in obj["layers"]], sig.scores,
                                   rtol=1e-6)
    # Table on stdout, CSV and PNG beside the JSON.
    assert "relu:1" in out and "wrote" in out
    rows = list(csv.DictReader((tmp_path / "tiny_random.csv").open()))
    assert [r["name"] for r in rows] == ["relu:0", "relu:1", "tanh:0"]
    assert float(rows[2]["score"]) == pytest.approx(obj["layers"][2]["score"])
    assert float(rows[0]["batch_1"]) == pytest.approx(obj["layers"][0]["scores"][1])
    png = (tmp_path / "tiny_random.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("chunk", ["256", "3"])  # one forward pass; slices of 3, 3 and 2
def test_metrics_match_independent_computations(tiny, tmp_path, capsys, chunk):
    code, out, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--metrics",
                          "--forward-chunk", chunk, "--out", str(tmp_path / "m.json"))
    assert code == 0, err
    assert "companion metrics" in out
    obj = json.loads((tmp_path / "m.json").read_text())
    assert obj["metrics"] is True
    module, variables = _create("tiny", seed=987)
    _, images = next(data.load_dataset("random", TRANSFORM).batches(8))
    x = jnp.asarray(images)
    layers = capture_layers(module, variables, x)
    _, inter = module.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    pre0 = np.asarray(inter["intermediates"]["conv0"]["__call__"][0], np.float64)  # full NHWC
    got = obj["layers"][0]["metrics"]
    assert got["sparsity_before"]["values"][0] == pytest.approx(np.mean(np.abs(pre0) <= 1e-3))
    assert got["sparsity_after"]["values"][0] == pytest.approx(
        np.mean(np.maximum(pre0, 0) <= 1e-3))
    assert 0.1 < got["sparsity_after"]["mean"] < 0.9  # a ReLU zeroes a good share
    scores = affjax.signature(module, variables, x).scores
    np.testing.assert_allclose([la["score"] for la in obj["layers"]], scores, rtol=1e-5)
    for i, layer in enumerate(layers):
        xr, yr = np.asarray(layer.x, np.float64), np.asarray(layer.y, np.float64)
        m = obj["layers"][i]["metrics"]
        assert m["norm_diff"]["mean"] == pytest.approx(np.linalg.norm(xr - yr), rel=1e-5)
        assert m["cka"]["mean"] == pytest.approx(float(metrics.linear_cka(xr, yr)), rel=1e-4)
        assert m["r2"]["mean"] == pytest.approx(float(metrics.linear_fit_r2(xr, yr)), abs=1e-4)
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert "cka" in header and "r2" in header


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny, tmp_path, capsys,
                                                               monkeypatch):
    args = ["--model", "tiny", "--batch-size", "8", "--batches", "4", "--metrics"]
    assert _run(capsys, *args, "--out", str(tmp_path / "full"))[0] == 0
    part = str(tmp_path / "part")
    code, _, err = _run(capsys, *args, "--out", part, "--stop-after", "1")
    assert code == 130 and "run the same command again to resume" in err
    saved = json.loads((tmp_path / "part" / "tiny_random.json").read_text())
    assert saved["batch_indices"] == [0] and not saved["complete"]
    # A crash (Ctrl-C) in the middle of the third batch loses nothing already saved.
    real = runner._batch_signature
    calls = []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "_batch_signature", crash_on_second)
    code, _, err = _run(capsys, *args, "--out", part)
    assert code == 130 and "resuming" in err
    saved = json.loads((tmp_path / "part" / "tiny_random.json").read_text())
    assert saved["batch_indices"] == [0, 1]
    monkeypatch.setattr(runner, "_batch_signature", real)
    assert _run(capsys, *args, "--out", part)[0] == 0
    full = json.loads((tmp_path / "full" / "tiny_random.json").read_text())
    resumed = json.loads((tmp_path / "part" / "tiny_random.json").read_text())
    _check_schema(resumed, n_batches=4, n_layers=3)
    for key in ("timing", "versions"):
        full.pop(key), resumed.pop(key)
    assert resumed == full  # bit for bit, metrics included
    assert ((tmp_path / "full" / "tiny_random.csv").read_text()
            == (tmp_path / "part" / "tiny_random.csv").read_text())
    # Running again once complete recomputes nothing.
    monkeypatch.setattr(runner, "_batch_signature", None)
    code, _, err = _run(capsys, *args, "--out", part)
    assert code == 0 and "is complete" in err


def test_ctrl_c_inside_the_assignment_callback_is_an_interruption(tiny, tmp_path, capsys,
                                                                  monkeypatch):
    # JAX reports a KeyboardInterrupt raised in the scipy host callback as its own error:
    # that was a traceback and exit status 1, not 130 with the resume message.
    def interrupted(*a, **k):
        raise ValueError("INTERNAL: CpuCallback error calling callback: Traceback ...\n"
                         "KeyboardInterrupt")

    monkeypatch.setattr(runner, "_batch_signature", interrupted)
    code, _, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--out",
                        str(tmp_path / "o"))
    assert code == 130 and "nothing was written" in err

    def broken(*a, **k):
        raise ValueError("something else")

    monkeypatch.setattr(runner, "_batch_signature", broken)
    with pytest.raises(ValueError, match="something else"):
        _run(capsys, "--model", "tiny", "--batch-size", "8", "--out", str(tmp_path / "p"))


def test_the_command_exits_with_mains_status_and_skips_teardown_after_ctrl_c():
    # After Ctrl-C the interpreter's teardown crashed (SIGSEGV) with XLA busy; the command
    # now leaves with os._exit(130). Other statuses go through sys.exit.
    for status in (130, 2, 0):
        code = (f"import sys, affjax.cli as c; c.main = lambda: {status}; "
                "import atexit; atexit.register(lambda: print('teardown')); c.run()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == status
        assert ("teardown" in out.stdout) == (status != 130)


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    # `affjax models | head -1`: the pipe closes while the listing is still being written.
    code = ("import sys, affjax.cli as c\n"
            "def main():\n"
            "    for i in range(100000):\n"
            "        print('model', i)\n"
            "    return 0\n"
            "c.main = main; c.run()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "model 0\n"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == cli.EXIT_BROKEN_PIPE == 141
    assert err == ""  # no BrokenPipeError traceback, no "Exception ignored" on exit


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    results.atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        results.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left


def test_tfds_mock_and_image_folder_end_to_end(tiny, tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=20):
        code, _, err = _run(capsys, "--model", "tiny", "--dataset", "fashion_mnist",
                            "--batch-size", "8", "--batches", "all", "--out", str(tmp_path))
    assert code == 0, err
    obj = json.loads((tmp_path / "tiny_fashion_mnist.json").read_text())
    _check_schema(obj, n_batches=2, n_layers=3)  # 20 // 8
    assert obj["split"] == "test" and obj["batches"] == "all"
    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    from PIL import Image

    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for k in range(8):
            Image.fromarray(rng.integers(0, 256, (14 + k, 20, 3), dtype=np.uint8)).save(
                folder / cls / f"{k}.jpg")
    code, _, err = _run(capsys, "--model", "tiny", "--dataset", str(folder), "--batch-size", "8",
                        "--batches", "all", "--out", str(tmp_path))
    assert code == 0, err
    obj = json.loads((tmp_path / "tiny_imgs.json").read_text())
    _check_schema(obj, n_batches=2, n_layers=3)
    assert obj["dataset"] == str(folder)


def test_plot_and_compare(tiny, tmp_path, capsys):
    paths = []
    for seed, model in ((1, "tiny"), (2, "tiny3"), (3, "tiny")):
        out = tmp_path / f"r{seed}.json"
        assert _run(capsys, "--model", model, "--batch-size", "8", "--seed", str(seed),
                    "--out", str(out))[0] == 0
        paths.append(str(out))
    assert cli.main(["plot", paths[0], "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    # A trailing slash names a folder, made if new (it used to write "figs.png").
    assert cli.main(["plot", paths[0], "--out", str(tmp_path / "figs") + "/"]) == 0
    assert (tmp_path / "figs" / "r1.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "figs.png").exists()
    acc = tmp_path / "acc.csv"
    acc.write_text("r1,60.0\nr2,70.0\nr3,65.0\n")  # no header: the first row is a model
    capsys.readouterr()
    assert cli.main(["compare", *paths, "--accuracy", str(acc), "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    dtw_head = lines[lines.index("DTW distances") + 1]
    assert dtw_head.split() == ["r1", "r2", "r3"]  # the matrix's columns are named
    assert [line.split()[0] for line in lines[lines.index("DTW distances") + 2:][:3]] == [
        "r1", "r2", "r3"]
    assert "exact permutation p-values over all 3! = 6 pairings" in out
    assert "smallest possible p-value is 0.333" in " ".join(err.split())
    cmp_ = json.loads((tmp_path / "compare.json").read_text())
    assert cmp_["labels"] == ["r1", "r2", "r3"]  # model names repeat: the file stems are used
    assert cmp_["correlations"]["mean"]["p_method"] == "exact"
    assert cmp_["correlations"]["mean"]["spearman_p"] >= 1 / 3 - 1e-12
    sigs = [[la["score"] for la in json.loads(open(p).read())["layers"]] for p in paths]
    np.testing.assert_allclose(cmp_["dtw"], metrics.dtw_matrix(sigs), atol=1e-12)
    assert cmp_["statistics"]["r2"]["max"] == pytest.approx(max(sigs[1]))
    assert set(cmp_["correlations"]) == {"mean", "std", "min", "max", "max_over_mean"}
    assert (tmp_path / "compare_dendrogram.png").read_bytes()[:4] == b"\x89PNG"

    # A NaN score (kept in results files) stops compare with its name, or is left out.
    obj = json.loads(open(paths[1]).read())
    obj["layers"][1]["score"] = float("nan")
    nan_path = tmp_path / "r2nan.json"
    nan_path.write_text(results.to_json(obj))
    capsys.readouterr()
    args = ["compare", paths[0], str(nan_path), paths[2], "--out", str(tmp_path / "n")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "1 of 4 layers have a NaN score" in err and obj["layers"][1]["name"] in err
    assert "not finite" in err and "ledoit_wolf" not in err  # no advice that does not apply
    assert cli.main([*args, "--nan", "drop"]) == 0
    assert "left out 1 layers with a NaN score" in capsys.readouterr().out
    cmp_ = json.loads((tmp_path / "n" / "compare.json").read_text())
    kept = [la["score"] for i, la in enumerate(obj["layers"]) if i != 1]
    np.testing.assert_allclose(cmp_["dtw"], metrics.dtw_matrix([sigs[0], kept, sigs[2]]),
                               atol=1e-12)
    assert cli.main(["compare", paths[0], paths[0], "--out", str(tmp_path)]) == 2
    assert "given twice" in capsys.readouterr().err


def _drawn_figures(monkeypatch):
    """The figures ``affjax.plot`` saves, kept for inspection."""
    import matplotlib.figure

    saved = []
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        saved.append(fig)
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def _result_of(names, batches):
    rng = np.random.default_rng(0)
    layers = []
    for name in names:
        scores = rng.uniform(0.6, 1.0, batches).tolist()
        layers.append({"name": name, "kind": "relu", "dim": 4, "score": float(np.mean(scores)),
                       "std": float(np.std(scores)), "scores": scores})
    return {"model": "m", "weights": "random", "dataset": "random", "batch_size": 8,
            "layers": layers}


def test_the_signature_plot_names_its_layers(tmp_path, monkeypatch):
    from affjax.plot import plot_signature

    figures = _drawn_figures(monkeypatch)
    names17 = ["relu:0"] + [f"layer{a}.{b}/relu:{c}" for a in range(1, 5) for b in (0, 1)
                            for c in (0, 1)]
    plot_signature(_result_of(names17, 1), tmp_path / "a.png")
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names17  # every layer, by name
    assert len(ax.collections) == 1  # one batch: the points (one kind), no std band
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["relu"]
    plot_signature(_result_of(names17, 3), tmp_path / "b.png")
    ax = figures[-1].axes[0]
    assert len(ax.collections) == 2  # the band and the points
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "mean ± std over 3 batches", "relu"]
    # 151 layers: every layer has a tick, every 2nd a readable name; long names keep their end.
    names151 = [f"features.denseblock{i // 40}.denselayer{i % 40}/relu{i % 2}:0"
                for i in range(151)]
    plot_signature(_result_of(names151, 2), tmp_path / "c.png")
    ax = figures[-1].axes[0]
    labels = ax.get_xticklabels()
    step = round(ax.get_xticks()[1] - ax.get_xticks()[0])
    assert 2 <= step <= 3 and len(labels) == len(range(0, 151, step))
    assert [t.get_text() for t in labels][:2] == ["…denseblock0.denselayer0/relu0:0",
                                                  f"…denseblock0.denselayer{step}/relu{step % 2}:0"]
    assert min(t.get_fontsize() for t in labels) >= 6
    ticks = set(ax.get_xticks()) | set(ax.get_xticks(minor=True))
    assert ticks == set(range(151))
    from PIL import Image

    with Image.open(tmp_path / "c.png") as im:
        assert im.size[0] <= 2400  # 20 inches at 120 dpi


def test_one_batch_has_no_std_column(tiny, tmp_path, capsys):
    for batches, spread in (("1", False), ("2", True)):
        out = tmp_path / f"b{batches}.json"
        code, printed, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--batches",
                                  batches, "--out", str(out))
        assert code == 0, err
        table_head = next(line for line in printed.splitlines() if "layer" in line)
        assert ("std" in table_head.split()) == spread
        csv_head = out.with_suffix(".csv").read_text().splitlines()[0].split(",")
        assert ("std" in csv_head) == spread
        saved = results.to_dict(results.load(out))  # the JSON keeps std, loadable as before
        assert all("std" in layer for layer in saved["layers"])


def test_models_and_datasets_listings(capsys):
    assert cli.main(["models"]) == 0
    assert "resnet18" in capsys.readouterr().out.split()
    assert cli.main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "imagenet2012 (default split validation)" in out and "random" in out


# ---------------------------------------------------------------- bad input


def test_unknown_model_lists_the_valid_ones(capsys):
    msg = _error(capsys, "--model", "resnet_unknown")
    assert "unknown model 'resnet_unknown'" in msg and "resnet18" in msg and "resnet50" in msg


def test_unknown_dataset_lists_the_valid_ones(tiny, tmp_path, capsys):
    msg = _error(capsys, "--model", "tiny", "--dataset", "imagenet_typo", "--out", str(tmp_path))
    assert "unknown dataset 'imagenet_typo'" in msg
    assert "cifar10, cifar100, fashion_mnist, mnist, imagenet2012" in msg


def test_missing_weights_file(tmp_path, capsys):
    msg = _error(capsys, "--weights", str(tmp_path / "nope.pth"), "--out", str(tmp_path))
    assert "nope.pth" in msg and "does not exist" in msg


def test_mismatched_weights_file_names_the_tensors(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    models.save_safetensors(bad, {"conv1.weight": np.zeros((3, 3, 3, 3), np.float32)})
    msg = _error(capsys, "--model", "resnet18", "--weights", str(bad), "--out", str(tmp_path))
    assert "does not fit model 'resnet18'" in msg and "missing" in msg and "conv1.weight" in msg


def test_dataset_not_prepared_says_how(tiny, tmp_path, capsys):
    msg = _error(capsys, "--model", "tiny", "--dataset", "cifar100", "--data-dir",
                 str(tmp_path / "tfds"), "--out", str(tmp_path))
    assert "not prepared" in msg and "tfds build cifar100" in msg


def test_forward_chunk_must_be_positive(tiny, tmp_path, capsys):
    msg = _error(capsys, "--model", "tiny", "--forward-chunk", "0", "--out", str(tmp_path))
    assert "--forward-chunk must be at least 1, got 0" in msg


def test_batch_size_larger_than_the_split(tiny, tmp_path, capsys):
    msg = _error(capsys, "--model", "tiny", "--batch-size", "10001", "--out", str(tmp_path))
    assert "batch size 10001 is larger than random, which has 10000 examples" in msg
    with tfds.testing.mock_data(num_examples=20):
        msg = _error(capsys, "--model", "tiny", "--dataset", "mnist", "--batch-size", "32",
                     "--out", str(tmp_path))
    assert "batch size 32 is larger than mnist" in msg


def test_output_folder_not_writable(tiny, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    msg = _error(capsys, "--model", "tiny", "--out", str(blocker / "sub"))
    assert "is not writable" in msg and "file.txt" in msg


def test_resuming_a_results_file_of_another_model(tiny, tmp_path, capsys):
    out = str(tmp_path / "run.json")
    assert _run(capsys, "--model", "tiny", "--batch-size", "8", "--out", out,
                "--stop-after", "1", "--batches", "2")[0] == 130
    msg = _error(capsys, "--model", "tiny3", "--batch-size", "8", "--batches", "2", "--out", out)
    assert "belongs to another run" in msg and "model 'tiny' (this run: 'tiny3')" in msg
    msg = _error(capsys, "--model", "tiny", "--batch-size", "16", "--batches", "2", "--out", out)
    assert "batch_size 8 (this run: 16)" in msg
    assert _run(capsys, "--model", "tiny3", "--batch-size", "8", "--out", out,
                "--overwrite")[0] == 0


def test_bad_results_file_for_plot(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    assert cli.main(["plot", str(tmp_path / "x.json")]) == 2
    assert "not an affjax signature file" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(["plot", str(tmp_path / "bin.json")]) == 2
    assert "not a results file (not UTF-8 text)" in " ".join(capsys.readouterr().err.split())
    good = {"format": results.FORMAT, **dict.fromkeys(results.RUN_KEYS), "batch_indices": [0],
            "complete": True, "versions": {}, "timing": {},
            "layers": [{"name": "relu:0", "kind": "relu", "dim": 4, "score": 0.9, "std": 0.0,
                        "scores": [0.9]}]}
    layer = good["layers"][0]
    for change, message in (({"layers": [1]}, "layer 0 must be an object"),
                            ({"layers": [{**layer, "score": "0.9"}]}, "not a number"),
                            ({"layers": [{**layer, "kind": 3}]}, "ill-typed name, kind or dim"),
                            ({"batch_indices": None}, "'batch_indices' must be a list"),
                            ({"complete": "no"}, "'complete' must be true or false"),
                            # These passed validation and then crashed or misled:
                            ({"batch_indices": [0, 0], "layers": [{**layer, "scores": [.9, .9]}]},
                             "lists batch 0 more than once"),
                            ({"layers": [{**layer, "metrics": {"cka": 5}}]},
                             "metric 'cka' needs a number 'mean'"),
                            ({"metrics": True}, "lacks 'metrics', which the run computed"),
                            ({"timing": {"seconds": "1"}}, "'timing'.'seconds' must be a number")):
        (tmp_path / "m.json").write_text(json.dumps({**good, **change}))
        assert cli.main(["plot", str(tmp_path / "m.json")]) == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err
    (tmp_path / "m.json").write_text(json.dumps(good))
    assert cli.main(["plot", str(tmp_path / "m.json"), "--out", str(tmp_path / "p.txt")]) == 2
    assert "'.txt' is not a format matplotlib writes" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "figs").mkdir()
    for out, written in (("noext", "noext.png"), ("figs", "figs/m.png"), ("f.pdf", "f.pdf")):
        assert cli.main(["plot", str(tmp_path / "m.json"), "--out", str(tmp_path / out)]) == 0
        assert capsys.readouterr().out.strip() == f"wrote {tmp_path / written}"
        assert (tmp_path / written).stat().st_size > 0


def test_bad_options_fail_before_anything_is_written(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    for args, message in ((["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1, got -1"),
                          (["--stop-after", "0"], "--stop-after must be at least 1"),
                          (["--model", ""], "--model is empty"),
                          (["--batches", "1250:"], "--batches 1250: asks for batches that "
                                                   "random does not have: it has 1250"),
                          (["--batches", "1251"], "asks for batches")):
        msg = _error(capsys, *(["--model", "tiny"] if "--model" not in args else []),
                     "--batch-size", "8", *args, "--out", str(out))
        assert message in msg
    assert not out.exists()  # no folder, no stub to block the corrected command
    folder = tmp_path / "dir.json"
    folder.mkdir()
    code, _, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--out", str(folder))
    assert code == 0, err
    assert (folder / "tiny_random.json").is_file()  # a folder named *.json is a folder
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    msg = _error(capsys, "--model", "tiny", "--batch-size", "8",
                 "--out", str(tmp_path / "bin.json"))
    assert "not a results file" in msg and "--overwrite" in msg


def test_each_stage_of_a_batch_is_timed_and_saved(tiny, tmp_path, capsys, monkeypatch):
    import importlib
    import time

    signature_module = importlib.import_module("affjax.signature")  # affjax.signature: the function

    def slowed(fn, seconds):
        def slow(*a, **k):
            time.sleep(seconds)
            return fn(*a, **k)
        return slow

    # A known delay in each stage must show up in that stage.
    delays = {"load": 0.25, "transform": 0.15, "forward": 0.2, "score": 0.1, "metrics": 0.3,
              "write": 0.2}
    monkeypatch.setattr(data.RandomImages, "_examples",
                        slowed(data.RandomImages._examples, delays["load"]))
    zoo = types.SimpleNamespace(**{**vars(TINY_ZOO), "eval_transform": lambda name: slowed(
        TRANSFORM, delays["transform"])})
    monkeypatch.setattr(cli, "_model_api", lambda: zoo)
    monkeypatch.setattr(_batch, "chunked_capture",
                        slowed(_batch.chunked_capture, delays["forward"]))
    monkeypatch.setattr(signature_module, "score_layers",
                        slowed(signature_module.score_layers, delays["score"]))  # 1 group
    monkeypatch.setattr(metrics, "layer_metrics",
                        slowed(metrics.layer_metrics, delays["metrics"] / 3))  # 3 layers
    monkeypatch.setattr(results, "atomic_write_text",
                        slowed(results.atomic_write_text, delays["write"] / 2))  # JSON and CSV
    out = tmp_path / "r.json"
    code, printed, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--batches", "2",
                              "--metrics", "--out", str(out))
    assert code == 0, err
    timing = json.loads(out.read_text())["timing"]
    assert list(timing["stages"]) == list(results.STAGES)
    for stage, delay in delays.items():
        assert all(t >= delay for t in timing["stages"][stage]), (stage, timing["stages"])
    compute = [sum(timing["stages"][s][b] for s in ("forward", "score", "metrics"))
               for b in range(2)]
    assert timing["batch_seconds"] == pytest.approx(compute, rel=1e-12)
    assert "this run's first batch includes compiling" in printed
    table = printed.split("time per batch")[1].splitlines()
    assert [line.split()[0] for line in table[2:9]] == [*results.STAGES, "total"]
    # A run stopped on purpose saves the last batch's write time too; an older file
    # without a breakdown still loads, and its batches get null stages when resumed.
    stopped = tmp_path / "s.json"
    args = ["--model", "tiny", "--batch-size", "8", "--batches", "2", "--out", str(stopped)]
    assert _run(capsys, *args, "--stop-after", "1")[0] == 130
    saved = json.loads(stopped.read_text())
    assert saved["timing"]["stages"]["write"][0] >= delays["write"]
    del saved["timing"]["stages"]
    stopped.write_text(json.dumps(saved))
    results.load(stopped)
    assert _run(capsys, *args)[0] == 0
    stages = json.loads(stopped.read_text())["timing"]["stages"]
    assert stages["load"][0] is None and stages["load"][1] >= delays["load"]
    saved["timing"]["stages"] = {"load": ["fast"]}
    with pytest.raises(results.ResultsError, match="'stages' must map each stage"):
        results.validate(saved)


def test_files_are_created_with_the_umask_mode(tiny, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        out = tmp_path / "r.json"
        assert _run(capsys, "--model", "tiny", "--batch-size", "8", "--out", str(out))[0] == 0
        for suffix in (".json", ".csv", ".png"):  # the JSON and CSV were 0o600
            assert oct(out.with_suffix(suffix).stat().st_mode & 0o777) == "0o640", suffix
        # A file that exists keeps its mode when rewritten.
        os.chmod(out, 0o664)
        results.atomic_write_text(out, "{}")
        assert oct(out.stat().st_mode & 0o777) == "0o664"
    finally:
        os.umask(old)


def test_a_run_failing_before_its_first_batch_leaves_nothing(tiny, tmp_path, capsys,
                                                            monkeypatch):
    out = tmp_path / "new" / "deeper"

    def broken(*a, **k):
        raise RuntimeError("the forward pass failed")

    monkeypatch.setattr(runner, "_batch_signature", broken)
    with pytest.raises(RuntimeError, match="forward pass failed"):
        _run(capsys, "--model", "tiny", "--batch-size", "8", "--out", str(out))
    assert not (tmp_path / "new").exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_batch_signature", interrupted)
    code, _, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--out", str(out))
    assert code == 130 and "nothing was written" in err
    assert not (tmp_path / "new").exists()


def test_a_finished_run_adds_new_batches_and_leaves_its_files_alone(tiny, tmp_path, capsys,
                                                                     monkeypatch):
    args = ["--model", "tiny", "--batch-size", "8", "--metrics"]
    out = tmp_path / "r.json"
    assert _run(capsys, *args, "--batches", "1", "--out", str(out))[0] == 0
    real, calls = runner._batch_signature, []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "_batch_signature", counted)
    code, _, err = _run(capsys, *args, "--batches", "3", "--out", str(out))
    assert code == 0 and "extending" in err, err
    assert len(calls) == 2  # batches 1 and 2; batch 0 is not recomputed
    assert _run(capsys, *args, "--batches", "3", "--out", str(tmp_path / "fresh.json"))[0] == 0
    grown, fresh = (json.loads(p.read_text()) for p in (out, tmp_path / "fresh.json"))
    assert grown["batches"] == "3" and grown["complete"]
    for key in ("timing", "versions"):
        grown.pop(key), fresh.pop(key)
    assert grown == fresh  # bit for bit, as if --batches 3 had been asked from the start
    # Nothing new to do: no file is rewritten (nor recomputed).
    files = [out.with_suffix(s) for s in (".json", ".csv", ".png")]
    for f in files:
        os.utime(f, ns=(10**9, 10**9))
    calls.clear()
    code, printed, err = _run(capsys, *args, "--batches", "3", "--out", str(out))
    assert code == 0 and "is complete" in err and "results in" in printed
    assert calls == [] and [f.stat().st_mtime_ns for f in files] == [10**9] * 3
    # A selection leaving saved batches out is refused, as are other options.
    msg = _error(capsys, *args, "--batches", "@3", "--out", str(out))
    assert "holds batch(es) 0, 1, 2, which --batches @3 does not select" in msg
    msg = _error(capsys, *args, "--batches", "4", "--covariance", "ledoit_wolf",
                 "--out", str(out))
    assert "belongs to another run" in msg and "covariance 'empirical'" in msg
    assert calls == []


def test_a_finished_file_without_timing_is_reported(tiny, tmp_path, capsys):
    # "timing": {} passes validation (hand-made files); rerunning raised KeyError 'seconds'.
    out = tmp_path / "r.json"
    args = ["--model", "tiny", "--batch-size", "8", "--out", str(out)]
    assert _run(capsys, *args)[0] == 0
    saved = json.loads(out.read_text())
    out.write_text(json.dumps({**saved, "timing": {}}))
    code, printed, err = _run(capsys, *args)
    assert code == 0 and "is complete" in err and "Traceback" not in err
    assert "activation calls, 1 batch(es) of 8" in printed


def test_stop_after_on_the_last_batch_completes_the_run(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "--model", "tiny", "--batch-size", "8", "--batches", "2",
                        "--stop-after", "2", "--out", str(out))
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["batch_indices"] == [0, 1]
    assert out.with_suffix(".png").is_file()


def _image_folder(folder, per_class, start=0):
    from PIL import Image

    rng = np.random.default_rng(start)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for k in range(start, start + per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                folder / cls / f"{k}.png")


def test_a_folder_that_changed_is_not_resumed(tiny, tmp_path, capsys):
    folder = tmp_path / "grow"
    _image_folder(folder, 6)
    args = ["--model", "tiny", "--dataset", str(folder), "--batch-size", "4", "--batches", "all",
            "--out", str(tmp_path / "r.json")]
    assert _run(capsys, *args, "--stop-after", "1")[0] == 130
    _image_folder(folder, 2, start=6)  # 16 images now: the file order, and so batches, move
    msg = _error(capsys, *args)
    assert "was computed on 12 examples" in msg and "which now has 16" in msg
    # A finished file too: it said "complete, nothing to compute" and left the new batch out.
    done = tmp_path / "done"
    _image_folder(done, 2)
    args = ["--model", "tiny", "--dataset", str(done), "--batch-size", "2", "--batches", "all",
            "--out", str(tmp_path / "d.json")]
    assert _run(capsys, *args)[0] == 0
    _image_folder(done, 1, start=2)
    msg = _error(capsys, *args)
    assert "was computed on 4 examples" in msg and "which now has 6" in msg
    # Without its data (moved away, not prepared here) a finished file is still shown.
    shutil.rmtree(done)
    code, _, err = _run(capsys, *args)
    assert code == 0 and "cannot check that" in err and "is complete" in err


def test_a_named_dataset_wins_over_a_folder_of_that_name(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "mnist", 4)
    with tfds.testing.mock_data(num_examples=20):
        code, _, err = _run(capsys, "--model", "tiny", "--dataset", "mnist", "--batch-size", "8",
                            "--out", str(tmp_path / "tfds.json"))
    assert code == 0, err
    saved = json.loads((tmp_path / "tfds.json").read_text())
    assert saved["dataset"] == "mnist" and saved["split"] == "test"  # TFDS (mocked), not ./mnist
    code, _, err = _run(capsys, "--model", "tiny", "--dataset", "./mnist", "--batch-size", "8",
                        "--out", str(tmp_path / "folder.json"))
    assert code == 0, err
    saved = json.loads((tmp_path / "folder.json").read_text())
    assert saved["dataset"] == str(tmp_path / "mnist") and saved["num_examples"] == 8


def test_console_entry_point_reports_bad_input_without_traceback(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-m", "affjax", "signature", "--model", "vgg_typo",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'vgg_typo'" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- embedded default


def test_embedded_default_runs_resnet18_on_random_data(tmp_path, capsys, monkeypatch):
    """`affjax signature` with no arguments (batch shrunk from 128 to 16 to keep CI fast)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "DEMO_BATCH_SIZE", 16)
    assert cli.main(["signature", "--no-progress"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "affjax-results" / "resnet18_random.json"
    obj = json.loads(path.read_text())
    _check_schema(obj, n_batches=1, n_layers=17)  # 1 stem ReLU + 8 blocks x 2 calls
    assert (obj["model"], obj["weights"], obj["dataset"], obj["batch_size"]) == (
        "resnet18", "random", "random", 16)
    assert [la["dim"] for la in obj["layers"]] == [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4
    assert all(0.0 <= la["score"] <= 1.0 for la in obj["layers"])
    assert "layer4.1/relu:1" in out
    assert path.with_suffix(".png").exists() and path.with_suffix(".csv").exists()
    # A weights file of the same parameters (torchvision layout) gives the same signature.
    _, variables = models.create("resnet18", seed=987)
    weights = tmp_path / "resnet18.safetensors"
    models.save_safetensors(weights, models.to_torchvision("resnet18", variables))
    assert cli.main(["signature", "--no-progress", "--weights", str(weights), "--batch-size",
                     "16", "--out", str(tmp_path / "w.json")]) == 0
    loaded = json.loads((tmp_path / "w.json").read_text())
    assert loaded["weights"] == str(weights)
    np.testing.assert_allclose([la["score"] for la in loaded["layers"]],
                               [la["score"] for la in obj["layers"]], rtol=1e-5)


def test_results_file_of_a_tfds_config_keeps_the_dataset_name(tmp_path):
    from affjax import cli

    # The folder rule named the file after the config alone, so configs of two datasets
    # ("a_corrupted/brightness_1", "b_corrupted/brightness_1") shared one results file.
    assert cli._results_path(str(tmp_path), "resnet18", "cifar10_corrupted/brightness_1") == (
        tmp_path / "resnet18_cifar10_corrupted_brightness_1.json")
    (tmp_path / "imgs").mkdir()
    assert cli._results_path(str(tmp_path), "resnet18", str(tmp_path / "imgs")) == (
        tmp_path / "resnet18_imgs.json")


# ---------------------------------------------------------------- optional dependencies


def _unimportable(monkeypatch, *names):
    """Make the packages ``names`` (and their submodules) unimportable in this process."""
    for name in names:
        for module in [m for m in sys.modules if m.split(".")[0] == name]:
            monkeypatch.setitem(sys.modules, module, None)
        monkeypatch.setitem(sys.modules, name, None)


def _missing_error(capsys, argv, extra):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "\n\n" not in err.strip()
    msg = " ".join(err.split())
    assert f"pip install 'affjax[{extra}]'" in msg
    return msg


def test_a_torch_weights_file_without_torch_names_the_extra(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"not read: torch is missing")
    _unimportable(monkeypatch, "torch")
    msg = _missing_error(capsys, ["signature", "--no-progress", "--weights", str(weights),
                                  "--out", str(tmp_path / "o")], "torch")
    assert "needs the optional package torch" in msg and ".safetensors" in msg
    assert not (tmp_path / "o").exists()


def test_datasets_without_tensorflow_datasets_name_the_extra(tiny, tmp_path, capsys,
                                                             monkeypatch):
    _unimportable(monkeypatch, "tensorflow_datasets")
    assert cli.main(["datasets"]) == 0  # the named list needs no TFDS
    capsys.readouterr()
    msg = _missing_error(capsys, ["datasets", "--all"], "data")
    assert "needs the optional package tensorflow-datasets" in msg
    msg = _missing_error(capsys, ["signature", "--no-progress", "--model", "tiny", "--dataset",
                                  "cifar10", "--out", str(tmp_path)], "data")
    assert "'cifar10' needs tensorflow-datasets" in msg


def test_an_image_folder_without_pillow_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    _image_folder(tmp_path / "imgs", 2)
    _unimportable(monkeypatch, "PIL")
    msg = _missing_error(capsys, ["signature", "--no-progress", "--model", "tiny", "--dataset",
                                  str(tmp_path / "imgs"), "--batch-size", "4", "--out",
                                  str(tmp_path / "o")], "data")
    assert "reading image files needs the optional package pillow" in msg


def test_signature_and_compare_run_without_the_cli_extra(tiny, tmp_path, capsys, monkeypatch):
    _unimportable(monkeypatch, "tqdm", "matplotlib")
    paths = []
    for model in ("tiny", "tiny3", "tiny"):
        paths.append(tmp_path / f"{model}{len(paths)}.json")
        code = cli.main(["signature", "--model", model, "--batch-size", "8", "--batches", "2",
                         "--seed", str(len(paths)), "--out", str(paths[-1])])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "batches: 1/2 done" in err and "batches: 2/2 done" in err  # lines, not a bar
        assert "no plot" in err and "pip install 'affjax[cli]'" in err
        assert paths[-1].is_file() and paths[-1].with_suffix(".csv").is_file()
        assert not paths[-1].with_suffix(".png").exists()
        assert f"wrote {paths[-1]}, {paths[-1].with_suffix('.csv')}\n" in out
    assert cli.main(["compare", *map(str, paths), "--out", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert "no compare_dendrogram.png" in err and "pip install 'affjax[cli]'" in err
    saved = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert np.asarray(saved["linkage"]).shape == (2, 4)  # the clustering needs no figure
    assert not (tmp_path / "c" / "compare_dendrogram.png").exists()
    # `plot` exists to draw: without matplotlib it is a message.
    msg = _missing_error(capsys, ["plot", str(paths[0])], "cli")
    assert "drawing figures needs the optional package matplotlib" in msg


_BLOCKER = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "tensorflow", "tensorflow_datasets", "PIL", "matplotlib",
           "tqdm"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
import types
import flax.linen as nn, jax, jax.numpy as jnp
import affjax
from affjax import cli, models
class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(affjax.Activation(nn.relu)(nn.Conv(4, (3, 3))(x)).mean((1, 2)))
def create(name, *, seed=0, num_classes=1000):
    module = Tiny()
    return module, module.init(jax.random.key(seed), jnp.zeros((1, 12, 12, 3)))
cli._model_api = lambda: types.SimpleNamespace(
    list_models=lambda: ["tiny"], create=create,
    eval_transform=lambda name: models.EvalTransform(resize_size=16, crop_size=12))
cli.run()
"""


def test_the_command_needs_no_optional_package(tmp_path):
    # A fresh process in which none of the extras' packages can be imported, as after
    # `pip install affjax`: the main job runs, the figure is skipped with a note.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKER)
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, str(script), "signature", "--model", "tiny",
                           "--batch-size", "4", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "batches: 1/1 done" in proc.stderr and "no plot" in proc.stderr
    assert (tmp_path / "o" / "tiny_random.json").is_file()
    assert "Activation_0:0" in proc.stdout  # the table


def test_compilation_cache_is_written_and_reused(tmp_path):
    # The command turns on JAX's persistent compilation cache: the first run fills the
    # folder, a second run (another process) finds every executable there and adds none.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "tiny.py"
    script.write_text("import types" + _BLOCKER.split("import types", 1)[1])  # no blocking
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("AFFJAX_COMPILATION_CACHE")
    listings = []
    for run in range(2):
        proc = subprocess.run([sys.executable, str(script), "signature", "--model", "tiny",
                               "--batch-size", "4", "--out", str(tmp_path / f"o{run}"),
                               "--compilation-cache", str(cache), "--no-progress"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        listings.append(sorted(p.name for p in cache.iterdir()))
    assert listings[0], "the first run cached nothing"
    assert listings[1] == listings[0]
    off = subprocess.run([sys.executable, str(script), "signature", "--model", "tiny",
                          "--batch-size", "4", "--out", str(tmp_path / "o2"),
                          "--compilation-cache", "off", "--no-progress"],
                         capture_output=True, text=True, env=dict(env, HOME=str(tmp_path)),
                         timeout=300)
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / ".cache" / "affjax").exists()
