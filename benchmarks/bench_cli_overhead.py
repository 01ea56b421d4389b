"""The `affjax signature` command's time per batch against the library's `signature` call.

Both sides compute the same thing on the same batch (batch 1 of the ``random`` dataset,
random weights with the command's seed 987, the model's evaluation transform), in one
process, taking turns so that the load of other processes drifts over both alike:

* ``cli``: ``affjax.cli.main(["signature", ..., "--batches", "@1", "--overwrite"])``, the
  command's own code path. Its time for the batch is read from the results file's breakdown
  (``timing.stages``: reading the images, transform, forward and capture, scoring, metrics,
  writing); model creation and start-up are not part of a batch.
* ``library``: ``affjax.signature(module, variables, images)`` on the prepared images of that
  batch: forward, capture and scoring, nothing else.

One turn of each first, to compile (not timed), then ``--repeats`` timed turns of each.
Printed: the command's stages (median over the turns), the share of its batch spent outside
forward and scoring (reading, transform, writing), the library's time, and the ratio of the
medians, command over library (the target is 1.2 or less), with the ratio of the fastest
turns beside it (less sensitive to other processes on a shared machine). The scores of both
sides are compared (the same batch must give the same numbers).

The issue's case is ``--model resnet50 --batch-size 256`` (224 px); the defaults (resnet18,
64 images) take a few minutes on 2 CPU cores. Run from the repository root:

    python benchmarks/bench_cli_overhead.py
    python benchmarks/bench_cli_overhead.py --model resnet50 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's affjax


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def cli_turn(model: str, batch_size: int, out: Path) -> dict:
    """One run of the command on batch 1 alone; its results object."""
    from affjax import cli

    argv = ["signature", "--model", model, "--batch-size", str(batch_size), "--batches", "@1",
            "--out", str(out), "--overwrite", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(argv)
    if code != 0:
        sys.exit(f"affjax {' '.join(argv)} exited with {code}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed turns of each side, after one to compile (default 5)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np

    import affjax
    from affjax import data
    from affjax import models
    from affjax.results import STAGES

    print(f"{args.model}, batch {args.batch_size}, random images, batch 1; {_load()}")
    module, variables = models.create(args.model, seed=987)  # the command's random weights
    images = jnp.asarray(data.load_dataset("random", models.eval_transform(args.model))
                         .batch(1, args.batch_size))
    cli_stages: list[dict[str, float]] = []
    library: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        for turn in range(args.repeats + 1):
            result = cli_turn(args.model, args.batch_size, out)
            start = time.perf_counter()
            sig = affjax.signature(module, variables, images)
            seconds = time.perf_counter() - start
            stages = {s: result["timing"]["stages"][s][0] for s in STAGES}
            if turn == 0:
                print(f"compiling turn: command {sum(stages.values()):.1f} s, library "
                      f"{seconds:.1f} s")
                continue
            cli_stages.append(stages)
            library.append(seconds)
    diff = float(np.max(np.abs(np.array([la["scores"][0] for la in result["layers"]])
                               - sig.scores)))
    totals = [sum(t.values()) for t in cli_stages]
    cli_batch, lib = statistics.median(totals), statistics.median(library)
    median = {s: statistics.median(t[s] for t in cli_stages) for s in STAGES}
    around = sum(median[s] for s in ("load", "transform", "write"))

    print(f"\naffjax signature, batch 1 ({args.repeats} turns; {_load()})")
    print(f"{'stage':<10} {'median':>8}   turns")
    for s in STAGES:
        print(f"{s:<10} {median[s]:>8.3f}   " + " ".join(f"{t[s]:.3f}" for t in cli_stages))
    print(f"{'total':<10} {cli_batch:>8.3f}   " + " ".join(f"{t:.3f}" for t in totals))
    print(f"\naffjax.signature, batch 1: median {lib:.3f} s (turns "
          f"{', '.join(f'{t:.3f}' for t in library)})")
    print(f"max |score difference|: {diff:.2e}")
    print(f"the command's own stages (load, transform, write): {around:.3f} s, "
          f"{100 * around / sum(median.values()):.1f}% of its batch (stage medians)")
    print(f"ratio, command / library: {cli_batch / lib:.2f}x of the medians (target <= 1.2x), "
          f"{min(totals) / min(library):.2f}x of the fastest turns")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "batch_size": args.batch_size, "cli_stages": cli_stages,
            "library": library, "ratio": cli_batch / lib,
            "ratio_fastest": min(totals) / min(library), "max_score_diff": diff}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
