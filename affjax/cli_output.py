"""What the ``affjax`` command prints and draws: the signature and time tables, ``plot`` and
``compare``, and the messages for a missing optional dependency (see ``affjax.cli``)."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A problem with the user's input, reported as one paragraph and exit status 2."""


def fail(message: str) -> CliError:
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


def missing_optional(error: BaseException) -> ImportError | None:
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


def missing_message(error: ImportError) -> str:
    package, extra, purpose = OPTIONAL_MODULES[str(error.name).split(".")[0]]
    return (f"{purpose} needs the optional package {package}, which cannot be imported here "
            f"({' '.join(str(error).split())}). Install it with: pip install 'affjax[{extra}]'.")


def _optional_figure(draw: Any, what: str) -> bool:
    """Call ``draw()``; without matplotlib print a note on stderr instead. Whether it drew."""
    try:
        draw()
    except ImportError as e:
        missing = missing_optional(e)
        if missing is None or not str(missing.name).startswith("matplotlib"):
            raise
        print(f"note: no {what}: drawing it needs matplotlib, which is not installed (pip "
              "install 'affjax[cli]').", file=sys.stderr)
        return False
    return True


def check_writable(folder: Path, *, create: bool = False) -> None:
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
        raise fail(f"output folder {folder} is not writable ({e.strerror or e}): choose "
                   "another with --out.") from None


def _table(sig: Any) -> str:
    text = str(sig)
    if sig.metrics is not None:
        means = sig.metric_means()
        head = f"{'#':>3}  " + "  ".join(f"{m:>15}" for m in means)
        lines = [head, "-" * len(head)]
        for i in range(len(sig)):
            lines.append(f"{i:>3}  " + "  ".join(f"{v[i]:>15.4f}" for v in means.values()))
        text += "\n\ncompanion metrics (mean over batches)\n" + "\n".join(lines)
    return text


def finish(sig: Any, json_path: Path, *, saved: bool = True,
           new: list[int] | None = None) -> None:
    """Draw the PNG, print the table and where the time went. ``saved=False``: the files
    are as they were (the PNG is drawn only if it is missing). ``new``: the batches this
    run computed."""
    from affjax.plot import plot_signature

    files = [json_path, json_path.with_suffix(".csv")]
    png = json_path.with_suffix(".png")
    if saved or not png.exists():
        if _optional_figure(lambda: plot_signature(sig, png), f"plot {png.name}"):
            files.append(png)
    else:
        files.append(png)
    print(_table(sig))
    seconds = sig.run.timing.get("seconds")  # hand-made files may leave it out
    compute = "" if seconds is None else f", {seconds:.1f} s of compute"
    print(f"\n{len(sig)} activation calls, {len(sig.run.batch_indices)} batch(es) "
          f"of {sig.run.batch_size}{compute}")
    breakdown = _time_table(sig.run, new or [])
    if breakdown:
        print("\n" + breakdown)
    print(f"{'wrote' if saved else 'results in'} {', '.join(str(p) for p in files)}")


def _time_table(run: Any, new: list[int]) -> str:
    """Seconds per batch and stage: this run's first batch (which compiles) and the mean of
    its others; for a run that computed nothing, the mean over the file's batches."""
    import numpy as np

    from affjax.results import STAGES

    stages = run.timing.get("stages")
    if not stages or not all(s in stages for s in STAGES):
        return ""
    position = {b: i for i, b in enumerate(run.batch_indices)}

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


def plot_command(args: argparse.Namespace) -> int:
    from affjax import results
    from affjax.plot import plot_signature

    sig = results.load(args.result)
    if not len(sig):
        raise fail(f"{args.result} holds no batch yet: nothing to plot.")
    default = Path(args.result).with_suffix(".png")
    out = _figure_path(args.out, default.name) if args.out else default
    check_writable(out.parent, create=True)
    plot_signature(sig, out)
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
        raise fail(f"cannot write a figure as {path.name}: the suffix {path.suffix!r} is not "
                    f"a format matplotlib writes ({', '.join(formats)}).")
    return path


def compare_command(args: argparse.Namespace) -> int:
    import json

    from affjax import compare
    from affjax import results
    from affjax.plot import plot_dendrogram

    loaded = [results.load(p) for p in args.results]
    for p, r in zip(args.results, loaded, strict=True):
        if not len(r):
            raise fail(f"{p} holds no batch yet: nothing to compare.")
    if len(loaded) < 2:
        raise fail("compare needs at least two results files.")
    accuracy = compare.read_accuracy(args.accuracy) if args.accuracy else None
    try:
        labels = compare.labels_for(loaded, args.results)
        out = compare.compare(loaded, labels, accuracy=accuracy, nan=args.nan)
    except ValueError as e:  # AccuracyError included
        raise fail(str(e)) from None
    folder = Path(args.out)
    check_writable(folder, create=True)
    width = max(len(label) for label in labels)
    print(f"{'model':<{width}}  {'layers':>6}  " + "  ".join(f"{s:>13}"
                                                           for s in compare.STATISTICS))
    for label, r in zip(labels, loaded, strict=True):
        st = out["statistics"][label]
        print(f"{label:<{width}}  {len(r) - len(out['dropped'].get(label, ())):>6}  "
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
