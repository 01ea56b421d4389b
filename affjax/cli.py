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
import math
import os
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from affjax.cli_output import OPTIONAL_MODULES  # noqa: F401 (affjax.cli.OPTIONAL_MODULES)
from affjax.cli_output import CliError
from affjax.cli_output import check_writable
from affjax.cli_output import compare_command
from affjax.cli_output import fail
from affjax.cli_output import finish
from affjax.cli_output import missing_message
from affjax.cli_output import missing_optional
from affjax.cli_output import plot_command

DEFAULT_MODEL = "resnet18"
DEFAULT_DATASET = "random"
DEFAULT_BATCH_SIZE = 2048  # as published
DEMO_BATCH_SIZE = 128  # `affjax signature` with no arguments: fast, no download
DEFAULT_FORWARD_CHUNK = 256  # affjax.runner.DEFAULT_FORWARD_CHUNK, without importing it
DEFAULT_OUT = "affjax-results"
_DEFAULT_CACHE = "~/.cache/affjax/jax"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command cut off by `head`


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
        raise fail(f"unknown model {name!r}. Available models: {', '.join(names)} "
                    "(`affjax models` lists them).")


def _load_model(api: Any, name: str, weights: str, seed: int) -> tuple[Any, Any]:
    if weights == "random":
        return api.create(name, seed=seed)
    path = Path(weights)
    if not path.is_file():
        raise fail(f"weights file {weights!r} does not exist (or is not a file). Give the path "
                    "of a torchvision state dict (.pth or .safetensors) for this model, or "
                    "--weights random.")
    try:
        return api.from_torchvision(name, str(path))
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        first = " ".join(str(e).split())
        raise fail(f"weights file {weights} does not fit model {name!r}: {first}") from None


def _results_path(out: str, model: str, dataset: str) -> Path:
    if out.lower().endswith(".json") and not Path(out).is_dir():
        return Path(out)
    from affjax import data

    # A folder is named by its last part; a TFDS name keeps its config ("name/config").
    name = (Path(dataset).name or dataset) if data.names_a_folder(dataset) else dataset
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}_{name}")
    return Path(out) / f"{stem}.json"


def _normalise_args(args: argparse.Namespace) -> None:
    from affjax import data

    for option in ("model", "weights", "dataset", "split", "data_dir", "manual_dir"):
        if getattr(args, option, None) == "":
            raise fail(f"--{option.replace('_', '-')} is empty; leave it out for the default.")
    if not 0 <= args.seed < 2**32:
        raise fail(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}.")
    if args.stop_after is not None and args.stop_after < 1:
        raise fail(f"--stop-after must be at least 1 (batches computed before stopping), got "
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
        raise fail(f"--batch-size must be at least 2 (a covariance needs two samples), got "
                    f"{args.batch_size}.")
    if args.forward_chunk < 1:
        raise fail(f"--forward-chunk must be at least 1, got {args.forward_chunk}.")


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


class _Progress:
    """The progress callback of ``run_signature``: a bar made on its first call."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = _batch_progress(total, done, self.enabled)
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _open_dataset(args: argparse.Namespace, api: Any, finished: bool) -> Any:
    """The dataset of the run; ``None`` when it cannot be read and the file is finished."""
    from affjax import data

    transform = api.eval_transform(args.model)
    try:
        return data.load_dataset(args.dataset, transform, split=args.split,
                                 data_dir=args.data_dir, download=args.download,
                                 manual_dir=args.manual_dir, seed=args.seed)
    except data.DataError as e:
        if not finished:
            raise
        # A finished result is shown without its data (moved, or not prepared here).
        print(f"note: cannot check that {args.dataset} is unchanged ({e})", file=sys.stderr)
        return None


def _signature(args: argparse.Namespace) -> int:
    from affjax import runner

    _normalise_args(args)
    processes = _processes(args)  # before anything starts a JAX backend
    _compilation_cache(args.compilation_cache)
    api = _model_api()
    _check_model(api, args.model)
    json_path = _results_path(args.out, args.model, args.dataset)
    check_writable(json_path.parent)
    own_path = processes.own_path(json_path)
    info = {k: getattr(args, k) for k in (*runner.FIXED_KEYS, "batches")}
    saved = runner.open_results(own_path, info, args.selection, overwrite=args.overwrite)
    # A finished file asked for its own batches is shown, even without its data. Several
    # processes never stop here: each takes part in gathering the parts.
    finished = (saved is not None and saved.run.complete and saved.run.batches == args.batches
                and not processes.distributed)
    dataset = _open_dataset(args, api, finished)
    if dataset is not None and not processes.distributed:  # checked before any file is written
        finished = runner.plan(saved, dataset, args.batch_size, args.selection, json_path)[1]
    if finished:
        print(f"{json_path} is complete ({len(saved.run.batch_indices)} batches); nothing to "
              "compute (pass --overwrite to recompute).", file=sys.stderr)
        finish(saved, json_path, saved=False)
        return 0
    model, variables = _load_model(api, args.model, args.weights, args.seed)
    # Finished here, so that the first batch's stages do not include the rest of it (JAX
    # dispatches asynchronously).
    _block(variables)
    before = set() if saved is None else set(saved.run.batch_indices)
    bar = _Progress(args.progress)
    try:
        sig = runner.run_signature(
            model, variables, dataset, batch_size=args.batch_size, batches=args.selection,
            covariance=args.covariance, solver=args.solver, metrics=args.metrics,
            forward_chunk=args.forward_chunk, path=json_path, overwrite=args.overwrite,
            info=info, stop_after=args.stop_after, progress=bar,
            log=lambda line: print(line, file=sys.stderr), processes=processes)
    except runner.RunInterrupted as e:
        bar.close()
        print(f"\ninterrupted: {_saved_message(e.saved, json_path)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    if not processes.is_main:
        print(f"process {processes.process_index}: its batches are in {own_path}; process 0 "
              f"wrote the merged results to {json_path}", file=sys.stderr)
        return 0 if sig.run.complete else EXIT_INTERRUPTED
    if not sig.run.complete:
        print(f"\nstopped (--stop-after): {_saved_message(len(sig.run.batch_indices), json_path)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finish(sig, json_path, new=[b for b in sig.run.batch_indices if b not in before])
    return 0


def _processes(args: argparse.Namespace) -> Any:
    """This process's :class:`affjax.distributed.ProcessContext`, JAX's runtime started."""
    from affjax import distributed

    try:
        return distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                      auto=args.distributed)
    except distributed.DistributedError as e:
        raise fail(f"{e} (--coordinator HOST:PORT --num-processes N --process-id I, or "
                   "--distributed alone where JAX finds them, as on a TPU pod).") from None


def _block(tree: Any) -> None:
    import jax

    jax.block_until_ready(tree)


def _saved_message(saved: int, json_path: Path) -> str:
    if not saved:
        return "no batch had finished, so nothing was written; run the same command to start again."
    return (f"{saved} batch(es) saved in {json_path}; run the same command again to resume.")


# --------------------------------------------------------------------------- plot, compare


def _signature_parser(sub: Any) -> None:
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
    sig.add_argument("--coordinator", metavar="HOST:PORT",
                     help="several processes (jax.distributed): process 0's address; with "
                     "--num-processes and --process-id. Each process scores its share of the "
                     "batches into its own file; process 0 writes the merged one "
                     "(docs/distributed.md)")
    sig.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator")
    sig.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: 0 .. N-1")
    sig.add_argument("--distributed", action="store_true",
                     help="several processes with what JAX finds itself (a TPU pod slice)")
    sig.add_argument("--stop-after", type=int, metavar="K",
                     help="stop after K new batches are saved (resume later)")
    sig.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars")
    sig.set_defaults(func=_signature)


def _parser() -> argparse.ArgumentParser:
    import affjax

    parser = argparse.ArgumentParser(
        prog="affjax", description="Affinity scores and non-linearity signatures in JAX.")
    parser.add_argument("--version", action="version", version=f"affjax {affjax.__version__}")
    sub = parser.add_subparsers(dest="command")

    _signature_parser(sub)

    plot = sub.add_parser("plot", help="re-draw a signature plot from a results JSON file")
    plot.add_argument("result")
    plot.add_argument("--out", help="PNG path (default: next to the JSON file)")
    plot.set_defaults(func=plot_command)

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
    cmp_.set_defaults(func=compare_command)

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
    from affjax.runner import RunError

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["reproduce"])
    try:
        return args.func(args)
    except (CliError, DataError, ResultsError, RunError, AccuracyError) as e:
        _report(args.command, str(e))
        return EXIT_USAGE
    except ImportError as e:
        missing = missing_optional(e)
        if missing is None:
            raise
        _report(args.command, missing_message(missing))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    run()
