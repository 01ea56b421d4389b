"""The ``affjax`` command line.

Subcommands: ``signature`` (the main job: a model's non-linearity signature on a dataset,
saved after every batch and resumable), ``plot``, ``compare``, ``models``, ``datasets`` and
``reproduce`` (the paper's published small experiments). Run ``affjax COMMAND --help``.

Errors caused by the input (unknown names, missing files, datasets not prepared, batch sizes,
unwritable folders, results of another run) are one paragraph on stderr and exit status 2;
an interruption (Ctrl-C) exits with 130 after saying how to resume.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import re
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "resnet18"
DEFAULT_DATASET = "random"
DEFAULT_BATCH_SIZE = 2048  # as published
DEMO_BATCH_SIZE = 128  # `affjax signature` with no arguments: fast, no download
# Forward passes run over slices of this many images: activation maps of a 2048-image batch
# at 224 x 224 take about 18 GB in one pass. Exact, since the zoo's inference is per sample.
DEFAULT_FORWARD_CHUNK = 256
DEFAULT_OUT = "affjax-results"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A problem with the user's input, reported as one paragraph and exit status 2."""


class _StopRequested(Exception):
    """Raised by ``--stop-after`` once the requested number of new batches is saved."""


def _fail(message: str) -> CliError:
    return CliError(message)


def _model_api() -> Any:
    """The model zoo (``affjax.models``); a function so tests can substitute a tiny zoo."""
    from affjax import models

    return models


# --------------------------------------------------------------------------- reproduce


def _reproduce(args: argparse.Namespace) -> int:
    from affjax import published

    start = time.perf_counter()
    rows = published.all_rows()
    print(f"{'experiment':<28} {'affjax':>8} {'published':>10}")
    for label, score, ref in rows:
        ref_text = "" if math.isnan(ref) else f"{ref:.3f}"
        print(f"{label:<28} {score:>8.4f} {ref_text:>10}")
    print(f"({len(rows)} scores in {time.perf_counter() - start:.1f} s; published values are "
          "rounded to 3 decimals, x^11 to 2)")
    return 0


# --------------------------------------------------------------------------- models, datasets


def _models(args: argparse.Namespace) -> int:
    api = _model_api()
    for name in api.list_models():
        print(name)
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from affjax import data

    print("named datasets:")
    for name in data.NAMED_DATASETS:
        default = data.DEFAULT_SPLITS.get(name, "test")
        split = "" if name == "random" else f" (default split {default})"
        print(f"  {name}{split}")
    print("also: any TFDS image dataset by name, or a folder with one subfolder of images per "
          "class (give its path).")
    if args.all:
        print("TFDS datasets:")
        for name in data.list_tfds_image_datasets():
            print(f"  {name}")
    else:
        print("(`affjax datasets --all` lists every TFDS dataset name)")
    return 0


# --------------------------------------------------------------------------- signature: setup


def _check_model(api: Any, name: str) -> None:
    names = list(api.list_models())
    if name not in names:
        raise _fail(f"unknown model {name!r}. Available models: {', '.join(names)} "
                    "(`affjax models` lists them).")


def _load_model(api: Any, name: str, weights: str, seed: int) -> tuple[Any, Any]:
    if weights == "random":
        return api.create(name, seed=seed)
    path = Path(weights)
    if not path.is_file():
        raise _fail(f"weights file {weights!r} does not exist (or is not a file). Give the path "
                    "of a torchvision state dict (.pth or .safetensors) for this model, or "
                    "--weights random.")
    try:
        return api.from_torchvision(name, str(path))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        first = " ".join(str(e).split())
        raise _fail(f"weights file {weights} does not fit model {name!r}: {first}") from None


def _results_path(out: str, model: str, dataset: str) -> Path:
    if out.lower().endswith(".json") and not Path(out).is_dir():
        return Path(out)
    from affjax import data

    # A folder is named by its last part; a TFDS name keeps its config ("name/config").
    name = (Path(dataset).name or dataset) if data.names_a_folder(dataset) else dataset
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}_{name}")
    return Path(out) / f"{stem}.json"


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".affjax-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _fail(f"output folder {folder} is not writable ({e.strerror or e}): choose "
                    "another with --out.") from None


def _versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib
    import numpy

    import affjax

    out = {"affjax": affjax.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "flax": flax.__version__, "numpy": numpy.__version__,
           "python": platform.python_version()}
    tfds = sys.modules.get("tensorflow_datasets")
    if tfds is not None:
        out["tensorflow_datasets"] = tfds.__version__
    return out


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{len(jax.devices())}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- signature: compute


@functools.lru_cache(maxsize=8)
def _jitted_capture(model: Any, metrics: bool) -> Any:
    """One compiled forward pass per model: the reduced pairs, plus full-tensor sparsity.

    The published sparsity is measured on the full activation tensors, which the capture
    reduces at once; with ``metrics`` it is measured through the capture's
    ``on_full_tensors`` hook, one call per layer in forward order (checked).
    """
    import jax
    import jax.numpy as jnp

    from affjax.metrics import sparsity
    from affjax.signature import capture_layers

    def run(variables, x):
        if not metrics:
            return capture_layers(model, variables, x), None
        recorded = []

        def on_full_tensors(a, b):
            recorded.append(jnp.stack([sparsity(a), sparsity(b)]))

        layers = capture_layers(model, variables, x, on_full_tensors=on_full_tensors)
        if len(recorded) != len(layers):
            raise RuntimeError(f"sparsity hook saw {len(recorded)} calls for {len(layers)} "
                               "layers")
        return layers, jnp.stack(recorded)

    return jax.jit(run)


def _chunked_capture(capture: Any, variables: Any, images: Any, chunk: int) -> tuple:
    """``capture`` over slices of ``chunk`` images, the reduced pairs joined along samples.

    Exact for models whose inference treats samples independently (the zoo's: batch norm
    with running statistics). Full-tensor sparsities are averaged with the slice sizes as
    weights, which is their value over the whole batch. Each slice finishes before the
    next starts, so only one slice's activation maps are ever alive.
    """
    import dataclasses

    import jax
    import jax.numpy as jnp

    n = images.shape[0]
    if chunk >= n:
        return jax.block_until_ready(capture(variables, images))
    parts, weights = [], []
    for start in range(0, n, chunk):
        part = images[start:start + chunk]
        parts.append(jax.block_until_ready(capture(variables, part)))
        weights.append(part.shape[0] / n)
    layers = [
        dataclasses.replace(layer, x=jnp.concatenate([p[0][i].x for p in parts]),
                            y=jnp.concatenate([p[0][i].y for p in parts]))
        for i, layer in enumerate(parts[0][0])
    ]
    sparsities = None
    if parts[0][1] is not None:
        sparsities = sum(w * p[1] for w, p in zip(weights, parts, strict=True))
    return layers, sparsities


def _batch_signature(model: Any, variables: Any, images: Any, *, covariance: str, metrics: bool,
                     progress: bool, label: str,
                     forward_chunk: int = DEFAULT_FORWARD_CHUNK) -> list[dict]:
    """Scores (and metrics) of every activation call on one batch, one dict per layer."""
    import numpy as np
    from tqdm import tqdm

    from affjax.metrics import layer_metrics
    from affjax.signature import score_layers

    try:
        capture = _jitted_capture(model, metrics)
    except TypeError:  # an unhashable module: compile without the cache
        capture = _jitted_capture.__wrapped__(model, metrics)
    # The forward passes finish before scoring starts: the scoring's LAPACK calls must not run
    # beside another XLA:CPU executable (OpenBLAS has deadlocked under concurrent use here).
    layers, sparsities = _chunked_capture(capture, variables, images, forward_chunk)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        groups[(layer.x.shape, str(layer.x.dtype), str(layer.y.dtype))].append(i)
    scores = np.zeros(len(layers))
    bar = tqdm(groups.values(), desc=f"{label}: layer groups", unit="group", leave=False,
               file=sys.stderr, disable=not progress)
    for idx in bar:
        out = score_layers([layers[i] for i in idx], covariance=covariance)
        scores[idx] = np.asarray(out, np.float64)
    rows = []
    for i, layer in enumerate(layers):
        row = {"name": layer.name, "kind": layer.kind, "dim": int(layer.x.shape[1]),
               "score": float(scores[i])}
        if metrics:
            full = (sparsities[i, 0], sparsities[i, 1])
            row["metrics"] = layer_metrics(layer.x, layer.y, full_sparsity=full)
        rows.append(row)
    return rows


def _merge_batch(result: dict, index: int, rows: list[dict], seconds: float) -> None:
    """Append one batch's per-layer values to the results object and refresh the summaries."""
    from affjax.metrics import METRIC_NAMES
    from affjax.results import summarise

    if not result["layers"]:
        result["layers"] = [{"name": r["name"], "kind": r["kind"], "dim": r["dim"], "score": None,
                             "std": None, "scores": []} for r in rows]
    names = [layer["name"] for layer in result["layers"]]
    if names != [r["name"] for r in rows]:
        raise RuntimeError(f"batch {index} gives different activation calls than the saved ones")
    for layer, row in zip(result["layers"], rows, strict=True):
        layer["scores"].append(row["score"])
        layer["score"], layer["std"] = summarise(layer["scores"])
        if "metrics" in row:
            metrics = layer.setdefault("metrics", {m: {"values": []} for m in METRIC_NAMES})
            for m in METRIC_NAMES:
                metrics[m]["values"].append(row["metrics"][m])
                metrics[m]["mean"], metrics[m]["std"] = summarise(metrics[m]["values"])
    result["batch_indices"].append(index)
    timing = result["timing"]
    timing.setdefault("batch_seconds", [0.0] * (len(result["batch_indices"]) - 1))  # hand-made
    timing["batch_seconds"].append(seconds)
    timing["seconds"] = float(sum(timing["batch_seconds"]))
    timing["updated"] = _now()


def _save(result: dict, json_path: Path) -> None:
    from affjax import results

    try:
        results.atomic_write_text(json_path, results.to_json(result))
        results.atomic_write_text(json_path.with_suffix(".csv"), results.to_csv(result))
    except OSError as e:  # the atomic write leaves the file as it was before this write
        raise _fail(f"cannot write results file {json_path} ({e.strerror or e}); it still "
                    "holds what was saved before.") from None


def _table(result: dict) -> str:
    import numpy as np

    from affjax.signature import Signature

    layers = result["layers"]
    sig = Signature(names=[la["name"] for la in layers], kinds=[la["kind"] for la in layers],
                    scores=np.array([la["score"] for la in layers]),
                    dims=[la["dim"] for la in layers],
                    std=np.array([la["std"] for la in layers]))
    text = str(sig)
    if layers and "metrics" in layers[0]:
        from affjax.metrics import METRIC_NAMES

        head = f"{'#':>3}  " + "  ".join(f"{m:>15}" for m in METRIC_NAMES)
        lines = [head, "-" * len(head)]
        for i, la in enumerate(layers):
            lines.append(f"{i:>3}  " + "  ".join(f"{la['metrics'][m]['mean']:>15.4f}"
                                                 for m in METRIC_NAMES))
        text += "\n\ncompanion metrics (mean over batches)\n" + "\n".join(lines)
    return text


def _finish(result: dict, json_path: Path) -> None:
    from affjax.plot import plot_signature

    png = json_path.with_suffix(".png")
    plot_signature(result, png)
    print(_table(result))
    seconds = result["timing"].get("seconds")  # hand-made files may leave it out
    compute = "" if seconds is None else f", {seconds:.1f} s of compute"
    print(f"\n{len(result['layers'])} activation calls, {len(result['batch_indices'])} batch(es) "
          f"of {result['batch_size']}{compute}")
    print(f"wrote {json_path}, {json_path.with_suffix('.csv')}, {png}")


def _new_result(args: argparse.Namespace, num_examples: int | None) -> dict:
    from affjax.results import FORMAT

    return {"format": FORMAT, "model": args.model, "weights": args.weights,
            "dataset": args.dataset, "split": args.split, "batch_size": args.batch_size,
            "batches": args.batches, "covariance": args.covariance, "metrics": args.metrics,
            "seed": args.seed, "num_examples": num_examples, "batch_indices": [],
            "complete": False, "versions": _versions(), "device": _device(),
            "timing": {"started": _now(), "updated": _now(), "seconds": 0.0,
                       "batch_seconds": []},
            "layers": []}


def _resume(json_path: Path, args: argparse.Namespace) -> dict | None:
    from affjax import results

    if args.overwrite or not json_path.exists():
        return None
    if json_path.is_dir():
        raise _fail(f"{json_path} is a folder, not a results file: choose another --out.")
    try:
        saved = results.load(json_path)
    except results.ResultsError as e:
        raise _fail(f"{e}. Choose another --out, or pass --overwrite to replace it.") from None
    wanted = {k: getattr(args, k) for k in results.RUN_KEYS}
    diff = [f"{k} {saved.get(k)!r} (this run: {wanted[k]!r})" for k in results.RUN_KEYS
            if saved.get(k) != wanted[k]]
    if diff:
        raise _fail(f"results file {json_path} belongs to another run: it has "
                    f"{'; '.join(diff)}. Resume with the same options, choose another --out, or "
                    "pass --overwrite to start again.")
    return saved


def _normalise_args(args: argparse.Namespace) -> None:
    from affjax import data

    for option in ("model", "weights", "dataset", "split", "data_dir", "manual_dir"):
        if getattr(args, option, None) == "":
            raise _fail(f"--{option.replace('_', '-')} is empty; leave it out for the default.")
    if not 0 <= args.seed < 2**32:
        raise _fail(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}.")
    if args.stop_after is not None and args.stop_after < 1:
        raise _fail(f"--stop-after must be at least 1 (batches computed before stopping), got "
                    f"{args.stop_after}.")
    demo = all(getattr(args, k) is None for k in ("model", "weights", "dataset", "batch_size"))
    args.model = args.model or DEFAULT_MODEL
    args.weights = args.weights or "random"
    args.dataset = args.dataset or DEFAULT_DATASET
    if args.batch_size is None:
        args.batch_size = DEMO_BATCH_SIZE if demo else DEFAULT_BATCH_SIZE
    if args.weights != "random":
        args.weights = str(Path(args.weights).expanduser().resolve())
    for option in ("data_dir", "manual_dir"):  # "--data-dir=~/x" reaches us unexpanded
        if getattr(args, option, None) is not None:
            setattr(args, option, os.path.expanduser(getattr(args, option)))
    folder = data.names_a_folder(args.dataset)
    if folder and Path(args.dataset).expanduser().is_dir():
        args.dataset = str(Path(args.dataset).expanduser().resolve())
    if args.split is None and args.dataset != "random" and not folder:
        args.split = data.DEFAULT_SPLITS.get(args.dataset, "test")
    args.selection = data.parse_batches(args.batches)
    args.batches = str(args.selection)
    if args.batch_size < 2:
        raise _fail(f"--batch-size must be at least 2 (a covariance needs two samples), got "
                    f"{args.batch_size}.")
    if args.forward_chunk < 1:
        raise _fail(f"--forward-chunk must be at least 1, got {args.forward_chunk}.")


def _signature(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from affjax import data

    _normalise_args(args)
    api = _model_api()
    _check_model(api, args.model)
    json_path = _results_path(args.out, args.model, args.dataset)
    _check_writable(json_path.parent)
    result = _resume(json_path, args)
    transform = api.eval_transform(args.model)
    complete = result is not None and result["complete"]
    try:
        dataset = data.load_dataset(args.dataset, transform, split=args.split,
                                    data_dir=args.data_dir, download=args.download,
                                    manual_dir=args.manual_dir, seed=args.seed)
    except data.DataError as e:
        if not complete:
            raise
        # A finished result is shown without its data (moved, or not prepared here).
        print(f"note: cannot check that {args.dataset} is unchanged ({e})", file=sys.stderr)
        dataset = None
    # A finished file too: with examples added, "complete" would leave new batches out.
    if (result is not None and dataset is not None
            and result.get("num_examples") != dataset.num_examples()):
        raise _fail(f"results file {json_path} was computed on {result.get('num_examples')} "
                    f"examples of {args.dataset}, which now has {dataset.num_examples()}: "
                    "its batches would not be the same images. Choose another --out, or "
                    "pass --overwrite to start again.")
    if complete:
        print(f"{json_path} is complete ({len(result['batch_indices'])} batches); nothing to "
              "compute (pass --overwrite to recompute).", file=sys.stderr)
        _save(result, json_path)
        _finish(result, json_path)
        return 0
    model, variables = _load_model(api, args.model, args.weights, args.seed)
    dataset.check_selection(args.batch_size, args.selection)  # before any file is written
    if result is None:
        result = _new_result(args, dataset.num_examples())
        _save(result, json_path)
    else:
        if result["batch_indices"]:
            print(f"resuming {json_path}: {len(result['batch_indices'])} batch(es) already done",
                  file=sys.stderr)
    done = list(result["batch_indices"])
    todo = args.selection.indices(dataset.num_batches(args.batch_size))
    bar = tqdm(total=None if todo is None else len(todo), initial=len(done), desc="batches",
               unit="batch", file=sys.stderr, disable=not args.progress)
    new = 0
    try:
        for index, images in dataset.batches(args.batch_size, args.selection, skip=done):
            # Checked before the next batch, so a run whose last batch was the last to do
            # finishes (complete, plotted) instead of asking to be resumed.
            if args.stop_after is not None and new >= args.stop_after:
                raise _StopRequested
            start = time.perf_counter()
            rows = _batch_signature(model, variables, images, covariance=args.covariance,
                                    metrics=args.metrics, progress=args.progress,
                                    label=f"batch {index}", forward_chunk=args.forward_chunk)
            _merge_batch(result, index, rows, time.perf_counter() - start)
            _save(result, json_path)
            bar.update(1)
            new += 1
    except (KeyboardInterrupt, _StopRequested) as e:
        bar.close()
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped (--stop-after)"
        print(f"\n{why}: {len(result['batch_indices'])} batch(es) saved in {json_path}; run the "
              "same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        # Ctrl-C inside the scipy assignment's host callback reaches us as JAX's error
        # about the callback, not as a KeyboardInterrupt.
        if not _interrupted_in_callback(e):
            raise
        bar.close()
        print(f"\ninterrupted: {len(result['batch_indices'])} batch(es) saved in {json_path}; "
              "run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    result["complete"] = True
    _save(result, json_path)
    _finish(result, json_path)
    return 0


# --------------------------------------------------------------------------- plot, compare


def _plot(args: argparse.Namespace) -> int:
    from affjax import results
    from affjax.plot import plot_signature

    result = results.load(args.result)
    if not result["layers"]:
        raise _fail(f"{args.result} holds no batch yet: nothing to plot.")
    default = Path(args.result).with_suffix(".png")
    out = _figure_path(args.out, default.name) if args.out else default
    _check_writable(out.parent)
    plot_signature(result, out)
    print(f"wrote {out}")
    return 0


def _figure_path(out: str, default_name: str) -> Path:
    """``--out`` of ``plot``: a folder (the default name inside), or a file whose suffix
    names a format matplotlib writes (none: ``.png``)."""
    from affjax.plot import figure_formats

    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):  # "figs/" names a folder, made if new
        path.mkdir(parents=True, exist_ok=True)
        return path / default_name
    if not path.suffix:
        return path.with_suffix(".png")
    formats = figure_formats()
    if path.suffix[1:].lower() not in formats:
        raise _fail(f"cannot write a figure as {path.name}: the suffix {path.suffix!r} is not "
                    f"a format matplotlib writes ({', '.join(formats)}).")
    return path


def _compare(args: argparse.Namespace) -> int:
    import json

    from affjax import compare
    from affjax import results
    from affjax.plot import plot_dendrogram

    loaded = [results.load(p) for p in args.results]
    for p, r in zip(args.results, loaded, strict=True):
        if not r["layers"]:
            raise _fail(f"{p} holds no batch yet: nothing to compare.")
    if len(loaded) < 2:
        raise _fail("compare needs at least two results files.")
    accuracy = compare.read_accuracy(args.accuracy) if args.accuracy else None
    try:
        labels = compare.labels_for(loaded, args.results)
        out = compare.compare(loaded, labels, accuracy=accuracy, nan=args.nan)
    except ValueError as e:  # AccuracyError included
        raise _fail(str(e)) from None
    folder = Path(args.out)
    _check_writable(folder)
    width = max(len(label) for label in labels)
    print(f"{'model':<{width}}  {'layers':>6}  " + "  ".join(f"{s:>13}"
                                                           for s in compare.STATISTICS))
    for label, r in zip(labels, loaded, strict=True):
        st = out["statistics"][label]
        print(f"{label:<{width}}  {len(r['layers']) - len(out['dropped'].get(label, ())):>6}  "
              + "  ".join(f"{st[s]:>13.4f}" for s in compare.STATISTICS))
    print("\nDTW distances")
    print(" " * width + "  " + "  ".join(f"{i:>8}" for i in range(len(labels))))
    for i, label in enumerate(labels):
        print(f"{label:<{width}}  " + "  ".join(f"{v:>8.3f}" for v in out["dtw"][i]))
    if out["correlations"] is not None:
        print(f"\ncorrelation with accuracy ({len(labels)} models)")
        print(f"{'statistic':<14} {'pearson':>8} {'p':>8} {'spearman':>9} {'p':>8}")
        for s, c in out["correlations"].items():
            print(f"{s:<14} {c['pearson']:>8.3f} {c['pearson_p']:>8.3f} {c['spearman']:>9.3f} "
                  f"{c['spearman_p']:>8.3f}")
    for label, names in out["dropped"].items():
        print(f"\n{label}: left out {len(names)} layers with a NaN score: {', '.join(names)}")
    png = folder / "compare_dendrogram.png"
    out["linkage"] = plot_dendrogram(labels, out["dtw"], png, method=args.linkage).tolist()
    out["files"] = [str(p) for p in args.results]
    results.atomic_write_text(folder / "compare.json", json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {folder / 'compare.json'}, {png}")
    return 0


# --------------------------------------------------------------------------- parser, main


def _parser() -> argparse.ArgumentParser:
    import affjax

    parser = argparse.ArgumentParser(
        prog="affjax", description="Affinity scores and non-linearity signatures in JAX.")
    parser.add_argument("--version", action="version", version=f"affjax {affjax.__version__}")
    sub = parser.add_subparsers(dest="command")

    sig = sub.add_parser(
        "signature", help="the signature of a model on a dataset (the main job)",
        description="The non-linearity signature of a zoo model on a dataset: one affinity "
        "score per activation call, per batch. Results go to a JSON file (plus CSV and PNG), "
        "written after every batch; running the same command again resumes. With no "
        f"arguments: {DEFAULT_MODEL}, random weights, the random dataset, batch size "
        f"{DEMO_BATCH_SIZE}, one batch (no download).")
    sig.add_argument("--model", help=f"zoo model name (default {DEFAULT_MODEL}; `affjax models`)")
    sig.add_argument("--weights", help="random (default) or a torchvision .pth/.safetensors file")
    sig.add_argument("--dataset", help="random (default), cifar10, cifar100, fashion_mnist, "
                     "mnist, imagenet2012, any TFDS image dataset, or an image folder path")
    sig.add_argument("--split", help="TFDS split (default test; validation for imagenet2012)")
    sig.add_argument("--batch-size", type=int, help=f"default {DEFAULT_BATCH_SIZE} as "
                     f"published ({DEMO_BATCH_SIZE} when model, weights, dataset and batch "
                     "size are all left out)")
    sig.add_argument("--forward-chunk", type=int, default=DEFAULT_FORWARD_CHUNK, metavar="M",
                     help="run the forward pass over slices of M images and join the reduced "
                     f"activations (default {DEFAULT_FORWARD_CHUNK}): same numbers, less "
                     "memory; raise it on an accelerator with memory to spare")
    sig.add_argument("--batches", default="1", help="'all', K (the first K batches, default "
                     "1), '@I' (only batch I, from 0) or 'I:J'")
    sig.add_argument("--covariance", default="empirical", choices=["empirical", "ledoit_wolf"])
    sig.add_argument("--metrics", action="store_true",
                     help="also compute CKA, sparsity, entropy, difference norm and R^2")
    sig.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}) "
                     "or results file ending in .json")
    sig.add_argument("--seed", type=int, default=987,
                     help="seed of the random weights and the random dataset (default 987)")
    sig.add_argument("--data-dir", help="TFDS data folder (default ~/tensorflow_datasets)")
    sig.add_argument("--download", action="store_true",
                     help="let TFDS download and prepare the dataset if it is missing")
    sig.add_argument("--manual-dir", help="folder with manually downloaded archives "
                     "(imagenet2012), used with --download")
    sig.add_argument("--overwrite", action="store_true",
                     help="start again instead of resuming an existing results file")
    sig.add_argument("--stop-after", type=int, metavar="K",
                     help="stop after K new batches are saved (resume later)")
    sig.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars")
    sig.set_defaults(func=_signature)

    plot = sub.add_parser("plot", help="re-draw a signature plot from a results JSON file")
    plot.add_argument("result")
    plot.add_argument("--out", help="PNG path (default: next to the JSON file)")
    plot.set_defaults(func=_plot)

    cmp_ = sub.add_parser("compare", help="DTW distances, dendrogram, summary statistics and "
                          "correlation with accuracy of several results")
    cmp_.add_argument("results", nargs="+", help="results JSON files (two or more)")
    cmp_.add_argument("--accuracy", help="model -> accuracy table (.json object or .csv)")
    cmp_.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    cmp_.add_argument("--linkage", default="average",
                      choices=["single", "complete", "average", "weighted", "ward"])
    cmp_.add_argument("--nan", default="raise", choices=["raise", "drop"],
                      help="layers with a NaN score: stop with an error naming them (default), "
                      "or leave them out of their signature")
    cmp_.set_defaults(func=_compare)

    models = sub.add_parser("models", help="list the zoo models")
    models.set_defaults(func=_models)
    datasets = sub.add_parser("datasets", help="list the datasets")
    datasets.add_argument("--all", action="store_true", help="also list every TFDS name")
    datasets.set_defaults(func=_datasets)

    rep = sub.add_parser("reproduce", help="print the paper's published small-experiment scores")
    rep.set_defaults(func=_reproduce)
    return parser


def _report(command: str, message: str) -> None:
    text = " ".join(message.split())
    print(textwrap.fill(f"affjax {command}: error: {text}", width=100, break_long_words=False,
                        break_on_hyphens=False), file=sys.stderr)


def _interrupted_in_callback(e: BaseException) -> bool:
    """Whether ``e`` is JAX's report of a KeyboardInterrupt raised inside a host callback."""
    return "callback" in str(e).lower() and "KeyboardInterrupt" in str(e)


def run() -> None:
    """The ``affjax`` command: :func:`main`, then exit with its status.

    After Ctrl-C the process ends without Python's teardown (``os._exit``): with XLA
    still compiling or running on its threads, the teardown crashed (SIGSEGV) after the
    results had been saved and the message printed, instead of exiting with 130.
    """
    code = main()
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    from affjax.compare import AccuracyError
    from affjax.data import DataError
    from affjax.results import ResultsError

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["reproduce"])
    try:
        return args.func(args)
    except (CliError, DataError, ResultsError, AccuracyError) as e:
        _report(args.command, str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    run()
