"""The ``affjax`` command line.

Subcommands: ``signature`` (the main job: a model's non-linearity signature on a dataset,
saved after every batch and resumable), ``plot``, ``compare``, ``models``, ``datasets`` and
``reproduce`` (the paper's published small experiments). Run ``affjax COMMAND --help``.

Errors caused by the input (unknown names, missing files, datasets not prepared, batch sizes,
unwritable folders, results of another run) and a missing optional dependency (named with the
extra that installs it) are one paragraph on stderr and exit status 2; an interruption
(Ctrl-C) exits with 130 after saying how to resume. The signature itself needs only the core
dependencies: without tqdm a line per batch replaces the progress bars, and without
matplotlib ``signature`` and ``compare`` skip their figures with a note.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import errno
import functools
import math
import os
import platform
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "resnet18"
DEFAULT_DATASET = "random"
DEFAULT_BATCH_SIZE = 2048  # as published
DEMO_BATCH_SIZE = 128  # `affjax signature` with no arguments: fast, no download
# Forward passes run over slices of this many images: the activation maps of a published
# 2048-image batch at 224 x 224 do not fit in memory at once (docs/cli.md). Exact, since the
# zoo's inference is per sample.
DEFAULT_FORWARD_CHUNK = 256
DEFAULT_OUT = "affjax-results"
_DEFAULT_CACHE = "~/.cache/affjax/jax"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command cut off by `head`


class CliError(Exception):
    """A problem with the user's input, reported as one paragraph and exit status 2."""


class _StopRequested(Exception):
    """Raised by ``--stop-after`` once the requested number of new batches is saved."""


def _fail(message: str) -> CliError:
    return CliError(message)


# Optional dependencies: top-level module -> (pip package, affjax extra, what needs it).
OPTIONAL_MODULES: dict[str, tuple[str, str, str]] = {
    "torch": ("torch", "torch", "reading a torch weights file (.pth and the like; a "
              ".safetensors file needs no torch)"),
    "tensorflow_datasets": ("tensorflow-datasets", "data", "TFDS datasets"),
    "tensorflow": ("tensorflow", "data", "TFDS datasets"),
    "PIL": ("pillow", "data", "reading image files"),
    "matplotlib": ("matplotlib", "cli", "drawing figures"),
    "tqdm": ("tqdm", "cli", "progress bars"),
}


def _missing_optional(error: BaseException) -> ImportError | None:
    """The failed import of an optional module (see ``OPTIONAL_MODULES``) behind ``error``.

    Follows the chain of causes and contexts, so an ImportError re-raised with another
    message (``raise ImportError(...) from None`` keeps the original as its context) is
    traced to the module too. ``None`` when no optional module is involved.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ImportError) and e.name and e.name.split(".")[0] in OPTIONAL_MODULES:
            return e
        e = e.__cause__ or e.__context__
    return None


def _missing_message(error: ImportError) -> str:
    package, extra, purpose = OPTIONAL_MODULES[str(error.name).split(".")[0]]
    return (f"{purpose} needs the optional package {package}, which cannot be imported here "
            f"({' '.join(str(error).split())}). Install it with: pip install 'affjax[{extra}]'.")


def _optional_figure(draw: Any, what: str) -> bool:
    """Call ``draw()``; without matplotlib print a note on stderr instead. Whether it drew."""
    try:
        draw()
    except ImportError as e:
        missing = _missing_optional(e)
        if missing is None or not str(missing.name).startswith("matplotlib"):
            raise
        print(f"note: no {what}: drawing it needs matplotlib, which is not installed (pip "
              "install 'affjax[cli]').", file=sys.stderr)
        return False
    return True


class _LineProgress:
    """Progress without tqdm: one line on stderr per finished batch."""

    def __init__(self, total: int | None, initial: int, disable: bool):
        self.total, self.n, self.disable = total, initial, disable
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable:
            of = "" if self.total is None else f"/{self.total}"
            print(f"batches: {self.n}{of} done, {time.perf_counter() - self.start:.1f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _batch_progress(total: int | None, initial: int, enabled: bool) -> Any:
    """The outer progress bar: tqdm's, or a line per batch where tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, initial, disable=not enabled)
    return tqdm(total=total, initial=initial, desc="batches", unit="batch", file=sys.stderr,
                disable=not enabled)


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


def _check_writable(folder: Path, *, create: bool = False) -> None:
    """Stop unless files can be written in ``folder``, or in it once created.

    A missing folder is only made with ``create``: ``signature`` makes it when it saves its
    first batch, so a run that fails before then leaves nothing behind.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            existing = folder
        if existing == folder:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".affjax-probe-")
            os.close(fd)
            os.unlink(probe)
        else:  # the folders to make must be creatable here
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".affjax-probe-"))
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
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


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


class _StageClock:
    """Seconds spent in each stage of one batch (``affjax.results.STAGES``).

    ``with clock("forward"): ...`` adds the block's wall time to that stage. A stage ends
    when its results are on the host (the forward pass is waited for, scores are copied to
    NumPy), so asynchronous work is counted where it runs.
    """

    def __init__(self) -> None:
        from affjax.results import STAGES

        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Any:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def _batch_signature(model: Any, variables: Any, images: Any, *, covariance: str, metrics: bool,
                     forward_chunk: int = DEFAULT_FORWARD_CHUNK, solver: str = "auto",
                     clock: _StageClock | None = None) -> list[dict]:
    """Scores (and metrics) of every activation call on one batch, one dict per layer.

    ``clock`` receives the time of the forward pass, the scoring and the metrics. Every
    layer is scored by one ``score_layers`` call: its assignments are one batched call.
    """
    import numpy as np

    from affjax.metrics import layer_metrics
    from affjax.signature import score_layers

    clock = clock or _StageClock()
    try:
        capture = _jitted_capture(model, metrics)
    except TypeError:  # an unhashable module: compile without the cache
        capture = _jitted_capture.__wrapped__(model, metrics)
    # The forward passes finish before scoring starts: the scoring's LAPACK calls never run
    # beside another XLA:CPU executable (docs/signatures.md, "Batched LAPACK on CPU").
    with clock("forward"):
        layers, sparsities = _chunked_capture(capture, variables, images, forward_chunk)
    with clock("score"):
        scores = np.asarray(score_layers(layers, covariance=covariance, solver=solver),
                            np.float64)
    rows = []
    with clock("metrics"):
        for i, layer in enumerate(layers):
            row = {"name": layer.name, "kind": layer.kind, "dim": int(layer.x.shape[1]),
                   "score": float(scores[i])}
            if metrics:
                full = (sparsities[i, 0], sparsities[i, 1])
                row["metrics"] = layer_metrics(layer.x, layer.y, full_sparsity=full)
            rows.append(row)
    return rows


def _merge_batch(result: dict, index: int, rows: list[dict], seconds: float,
                 stages: dict[str, float | None] | None = None) -> None:
    """Add one batch's per-layer values to the results object and refresh the summaries.

    Per-batch lists stay in batch order (``batch_indices`` ascending), so a run extended
    to more batches equals one that selected them from the start. ``seconds`` is the
    batch's compute time (forward, scoring, metrics), ``stages`` its time per stage.
    """
    from affjax.metrics import METRIC_NAMES
    from affjax.results import STAGES
    from affjax.results import summarise

    if not result["layers"]:
        result["layers"] = [{"name": r["name"], "kind": r["kind"], "dim": r["dim"], "score": None,
                             "std": None, "scores": []} for r in rows]
    names = [layer["name"] for layer in result["layers"]]
    if names != [r["name"] for r in rows]:
        raise RuntimeError(f"batch {index} gives different activation calls than the saved ones")
    at = bisect.bisect(result["batch_indices"], index)
    for layer, row in zip(result["layers"], rows, strict=True):
        layer["scores"].insert(at, row["score"])
        layer["score"], layer["std"] = summarise(layer["scores"])
        if "metrics" in row:
            metrics = layer.setdefault("metrics", {m: {"values": []} for m in METRIC_NAMES})
            for m in METRIC_NAMES:
                metrics[m]["values"].insert(at, row["metrics"][m])
                metrics[m]["mean"], metrics[m]["std"] = summarise(metrics[m]["values"])
    timing = result["timing"]
    before = len(result["batch_indices"])
    timing.setdefault("batch_seconds", [0.0] * before)  # hand-made
    # Batches computed without a breakdown (older files) have null stages.
    breakdown = timing.setdefault("stages", {})
    for stage in STAGES:
        breakdown.setdefault(stage, [None] * before).insert(at, (stages or {}).get(stage))
    result["batch_indices"].insert(at, index)
    timing["batch_seconds"].insert(at, seconds)
    timing["seconds"] = float(sum(timing["batch_seconds"]))
    timing["updated"] = _now()


def _save(result: dict, json_path: Path) -> None:
    from affjax import results

    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)  # first save: the folder is new
        results.atomic_write_text(json_path, results.to_json(result))
        results.atomic_write_text(json_path.with_suffix(".csv"), results.to_csv(result))
    except OSError as e:  # the atomic write leaves the file as it was before this write
        raise _fail(f"cannot write results file {json_path} ({e.strerror or e}); it still "
                    "holds what was saved before.") from None


def _table(result: dict) -> str:
    import numpy as np

    from affjax.signature import Signature

    layers = result["layers"]
    spread = len(result["batch_indices"]) > 1  # no std column for one batch
    sig = Signature(names=[la["name"] for la in layers], kinds=[la["kind"] for la in layers],
                    scores=np.array([la["score"] for la in layers]),
                    dims=[la["dim"] for la in layers],
                    std=np.array([la["std"] for la in layers]) if spread else None)
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


def _finish(result: dict, json_path: Path, *, saved: bool = True,
            new: list[int] | None = None) -> None:
    """Draw the PNG, print the table and where the time went. ``saved=False``: the files
    are as they were (the PNG is drawn only if it is missing). ``new``: the batches this
    run computed."""
    from affjax.plot import plot_signature

    files = [json_path, json_path.with_suffix(".csv")]
    png = json_path.with_suffix(".png")
    if saved or not png.exists():
        if _optional_figure(lambda: plot_signature(result, png), f"plot {png.name}"):
            files.append(png)
    else:
        files.append(png)
    print(_table(result))
    seconds = result["timing"].get("seconds")  # hand-made files may leave it out
    compute = "" if seconds is None else f", {seconds:.1f} s of compute"
    print(f"\n{len(result['layers'])} activation calls, {len(result['batch_indices'])} batch(es) "
          f"of {result['batch_size']}{compute}")
    breakdown = _time_table(result, new or [])
    if breakdown:
        print("\n" + breakdown)
    print(f"{'wrote' if saved else 'results in'} {', '.join(str(p) for p in files)}")


def _time_table(result: dict, new: list[int]) -> str:
    """Seconds per batch and stage: this run's first batch (which compiles) and the mean of
    its others; for a run that computed nothing, the mean over the file's batches."""
    import numpy as np

    from affjax.results import STAGES

    stages = result["timing"].get("stages")
    if not stages or not all(s in stages for s in STAGES):
        return ""
    position = {b: i for i, b in enumerate(result["batch_indices"])}

    def column(batches: list[int]) -> list[float] | None:
        rows = [[stages[s][position[b]] for s in STAGES] for b in batches]
        rows = [r for r in rows if None not in r]
        return list(np.mean(rows, axis=0)) if rows else None

    if new:
        columns = [(f"batch {new[0]}", column(new[:1]))]
        if len(new) > 1:
            columns.append((f"mean of {len(new) - 1} more", column(new[1:])))
        title = "time per batch (s): this run's first batch includes compiling"
    else:
        columns = [(f"mean of {len(position)}", column(list(position)))]
        title = "time per batch (s), as saved"
    columns = [(name, values) for name, values in columns if values is not None]
    if not columns:
        return ""
    width = max(len(name) for name, _ in columns) + 2
    lines = [title, f"{'stage':<10}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    for i, stage in enumerate(STAGES):
        lines.append(f"{stage:<10}" + "".join(f"{v[i]:>{width}.3f}" for _, v in columns))
    lines.append(f"{'total':<10}" + "".join(f"{sum(v):>{width}.3f}" for _, v in columns))
    return "\n".join(lines)


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


# Options a results file is tied to; --batches may grow to include more batches.
_FIXED_KEYS = ("model", "weights", "dataset", "split", "batch_size", "covariance", "metrics",
               "seed")


def _resume(json_path: Path, args: argparse.Namespace) -> dict | None:
    """The saved results of this run, or ``None`` for a new run.

    A saved file continues when its run options equal this run's and ``--batches`` selects
    every batch it holds (the same selection, or a larger one: the new batches are added).
    """
    from affjax import results

    if args.overwrite or not json_path.exists():
        return None
    if json_path.is_dir():
        raise _fail(f"{json_path} is a folder, not a results file: choose another --out.")
    try:
        saved = results.load(json_path)
    except results.ResultsError as e:
        raise _fail(f"{e}. Choose another --out, or pass --overwrite to replace it.") from None
    diff = [f"{k} {saved.get(k)!r} (this run: {getattr(args, k)!r})" for k in _FIXED_KEYS
            if saved.get(k) != getattr(args, k)]
    if diff:
        raise _fail(f"results file {json_path} belongs to another run: it has "
                    f"{'; '.join(diff)}. Resume with the same options, choose another --out, or "
                    "pass --overwrite to start again.")
    sel = args.selection
    outside = [i for i in saved["batch_indices"]
               if i < sel.start or (sel.stop is not None and i >= sel.stop)]
    if outside:
        raise _fail(f"results file {json_path} holds batch(es) {_listing(outside)}, which "
                    f"--batches {args.batches} does not select (it was run with --batches "
                    f"{saved['batches']}). Resume with a selection that includes them (its "
                    "new batches are added), choose another --out, or pass --overwrite to "
                    "start again.")
    return saved


def _listing(indices: list[int], most: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


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


def _compilation_cache(setting: str | None) -> None:
    """Turns on JAX's persistent compilation cache (``off`` leaves it off).

    The first run of a model compiles its forward pass and scorers (most of a short run's
    time); later runs load them from this folder.
    """
    import jax

    setting = setting or os.environ.get("AFFJAX_COMPILATION_CACHE") or _DEFAULT_CACHE
    if setting == "off":
        return
    folder = Path(os.path.expandvars(setting)).expanduser()
    if setting == _DEFAULT_CACHE and os.environ.get("XDG_CACHE_HOME"):
        folder = Path(os.environ["XDG_CACHE_HOME"]) / "affjax" / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"note: no compilation cache ({folder}: {e.strerror}); every run compiles anew",
              file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _signature(args: argparse.Namespace) -> int:
    from affjax import data

    _normalise_args(args)
    _compilation_cache(args.compilation_cache)
    api = _model_api()
    _check_model(api, args.model)
    json_path = _results_path(args.out, args.model, args.dataset)
    _check_writable(json_path.parent)
    result = _resume(json_path, args)
    transform = api.eval_transform(args.model)
    # A finished file asked for its own batches is shown, even without its data.
    finished = (result is not None and result["complete"]
                and result["batches"] == args.batches)
    try:
        dataset = data.load_dataset(args.dataset, transform, split=args.split,
                                    data_dir=args.data_dir, download=args.download,
                                    manual_dir=args.manual_dir, seed=args.seed)
    except data.DataError as e:
        if not finished:
            raise
        # A finished result is shown without its data (moved, or not prepared here).
        print(f"note: cannot check that {args.dataset} is unchanged ({e})", file=sys.stderr)
        dataset = None
    todo = None
    if dataset is not None:
        # A finished file too: with examples added, "complete" would leave new batches out.
        if result is not None and result.get("num_examples") != dataset.num_examples():
            raise _fail(f"results file {json_path} was computed on "
                        f"{result.get('num_examples')} examples of {args.dataset}, which now "
                        f"has {dataset.num_examples()}: its batches would not be the same "
                        "images. Choose another --out, or pass --overwrite to start again.")
        dataset.check_selection(args.batch_size, args.selection)  # before any file is written
        todo = args.selection.indices(dataset.num_batches(args.batch_size))
        finished = finished or (result is not None and result["complete"] and todo is not None
                                and set(todo) <= set(result["batch_indices"]))
    if finished:
        print(f"{json_path} is complete ({len(result['batch_indices'])} batches); nothing to "
              "compute (pass --overwrite to recompute).", file=sys.stderr)
        _finish(result, json_path, saved=False)
        return 0
    model, variables = _load_model(api, args.model, args.weights, args.seed)
    # Finished here, so that the first batch's stages do not include the rest of it (JAX
    # dispatches asynchronously).
    _block(variables)
    if result is None:
        result = _new_result(args, dataset.num_examples())  # saved with its first batch
        saved = 0
    else:
        saved = len(result["batch_indices"])
        if result["batches"] != args.batches:
            print(f"extending {json_path} from --batches {result['batches']} to "
                  f"{args.batches}: {saved} batch(es) already done", file=sys.stderr)
            result["batches"], result["complete"] = args.batches, False
        elif saved:
            print(f"resuming {json_path}: {saved} batch(es) already done", file=sys.stderr)
    done = list(result["batch_indices"])
    bar = _batch_progress(None if todo is None else len(todo), len(done), args.progress)
    new: list[int] = []
    write_pending = False  # the last batch's write time is not on disk yet
    try:
        stream = dataset.batches(args.batch_size, args.selection, skip=done, prepare=False)
        while True:
            clock = _StageClock()
            with clock("load"):
                item = next(stream, None)
            if item is None:
                break
            # Checked before the next batch, so a run whose last batch was the last to do
            # finishes (complete, plotted) instead of asking to be resumed.
            if args.stop_after is not None and len(new) >= args.stop_after:
                raise _StopRequested
            index, raw = item
            with clock("transform"):
                images = dataset.prepare(raw)
            rows = _batch_signature(model, variables, images, covariance=args.covariance,
                                    metrics=args.metrics, forward_chunk=args.forward_chunk,
                                    solver=args.solver, clock=clock)
            compute = sum(clock.seconds[k] for k in ("forward", "score", "metrics"))
            stages = {**clock.seconds, "write": None}  # measured by the save below
            _merge_batch(result, index, rows, compute, stages)
            with clock("write"):
                _save(result, json_path)
            # On disk with the next save (the next batch's, or the run's last).
            result["timing"]["stages"]["write"][result["batch_indices"].index(index)] = (
                clock.seconds["write"])
            saved, write_pending = len(result["batch_indices"]), True
            new.append(index)
            bar.update(1)
    except _StopRequested:
        bar.close()
        if write_pending:
            _save(result, json_path)
        print(f"\nstopped (--stop-after): {_saved_message(saved, json_path)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {_saved_message(saved, json_path)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        # Ctrl-C inside the scipy assignment's host callback reaches us as JAX's error
        # about the callback, not as a KeyboardInterrupt.
        if not _interrupted_in_callback(e):
            raise
        bar.close()
        print(f"\ninterrupted: {_saved_message(saved, json_path)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    result["complete"] = True
    _save(result, json_path)
    _finish(result, json_path, new=new)
    return 0


def _block(tree: Any) -> None:
    import jax

    jax.block_until_ready(tree)


def _saved_message(saved: int, json_path: Path) -> str:
    if not saved:
        return "no batch had finished, so nothing was written; run the same command to start again."
    return (f"{saved} batch(es) saved in {json_path}; run the same command again to resume.")


# --------------------------------------------------------------------------- plot, compare


def _plot(args: argparse.Namespace) -> int:
    from affjax import results
    from affjax.plot import plot_signature

    result = results.load(args.result)
    if not result["layers"]:
        raise _fail(f"{args.result} holds no batch yet: nothing to plot.")
    default = Path(args.result).with_suffix(".png")
    out = _figure_path(args.out, default.name) if args.out else default
    _check_writable(out.parent, create=True)
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
    _check_writable(folder, create=True)
    width = max(len(label) for label in labels)
    print(f"{'model':<{width}}  {'layers':>6}  " + "  ".join(f"{s:>13}"
                                                           for s in compare.STATISTICS))
    for label, r in zip(labels, loaded, strict=True):
        st = out["statistics"][label]
        print(f"{label:<{width}}  {len(r['layers']) - len(out['dropped'].get(label, ())):>6}  "
              + "  ".join(f"{st[s]:>13.4f}" for s in compare.STATISTICS))
    print("\nDTW distances")
    columns = [max(8, len(label)) for label in labels]
    print(" " * width + "  " + "  ".join(f"{label:>{w}}"
                                         for label, w in zip(labels, columns, strict=True)))
    for i, label in enumerate(labels):
        print(f"{label:<{width}}  " + "  ".join(
            f"{v:>{w}.3f}" for v, w in zip(out["dtw"][i], columns, strict=True)))
    if out["correlations"] is not None:
        _print_correlations(out["correlations"], len(labels))
    for label, names in out["dropped"].items():
        print(f"\n{label}: left out {len(names)} layers with a NaN score: {', '.join(names)}")
    png = folder / "compare_dendrogram.png"
    link = compare.linkage(out["dtw"], method=args.linkage)
    drawn = _optional_figure(
        lambda: plot_dendrogram(labels, out["dtw"], png, method=args.linkage), png.name)
    out["linkage"] = link.tolist()
    out["files"] = [str(p) for p in args.results]
    results.atomic_write_text(folder / "compare.json", json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {folder / 'compare.json'}" + (f", {png}" if drawn else ""))
    return 0


def _print_correlations(correlations: dict, n: int) -> None:
    from affjax import compare

    exact = all(c["p_method"] == "exact" for c in correlations.values())
    how = (f"exact permutation p-values over all {n}! = {math.factorial(n)} pairings" if exact
           else "large-sample p-values of scipy.stats.pearsonr and spearmanr")
    print(f"\ncorrelation with accuracy ({n} models; {how})")
    print(f"{'statistic':<14} {'pearson':>8} {'p':>8} {'spearman':>9} {'p':>8}")
    for s, c in correlations.items():
        print(f"{s:<14} {c['pearson']:>8.3f} {_p_text(c['pearson_p']):>8} "
              f"{c['spearman']:>9.3f} {_p_text(c['spearman_p']):>8}")
    smallest = compare.smallest_p_value(n)
    if exact and smallest > 0.05:
        print(f"warning: with {n} models the smallest possible p-value is {smallest:.3f}: no "
              "correlation can be significant at the 0.05 level.", file=sys.stderr)


def _p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"  # NaN compares False: "nan"


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
    sig.add_argument("--solver", default="auto",
                     choices=["auto", "auction", "identity_or_scipy", "scipy", "hungarian"],
                     help="exact assignment solver of the W2 (default auto: the certified "
                          "on-device auction on an accelerator, identity_or_scipy on CPU); "
                          "every choice gives the same scores")
    sig.add_argument("--compilation-cache", metavar="DIR|off",
                     help="JAX's persistent compilation cache, so a second run starts "
                          f"compiled (default $AFFJAX_COMPILATION_CACHE or {_DEFAULT_CACHE})")
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

    After Ctrl-C the process ends without Python's teardown (``os._exit``), so that it exits
    with 130: with XLA still compiling or running on its threads, the teardown can crash
    (SIGSEGV) after the results are saved and the message printed.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout left (``affjax models | head``): the usual pipeline exit,
        # with stdout pointed at /dev/null so that the interpreter's final flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
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
    except ImportError as e:
        missing = _missing_optional(e)
        if missing is None:
            raise
        _report(args.command, _missing_message(missing))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    run()
