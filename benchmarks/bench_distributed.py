"""Wall time of a signature study on 1, 2 and 4 local processes (``affjax.distributed``).

Each configuration launches ``tests/distributed_driver.py`` on N processes with
``jax.distributed.initialize`` on a loopback coordinator (one process: no coordinator):
every process scores its share of the same ``--batches`` batches (a tiny CNN of
``--width`` channels, ``random`` dataset, float32), writes its part, and process 0
merges. Printed per configuration: the wall time of the whole launch (Python start-up
to the last exit); the start-up (slowest process to import JAX, initialise the runtime
and build the model, from the driver's first line); drawing and transforming the images
(slowest process); the scoring (the sum over processes of the batches' compute time, and
the slowest process's share: the critical path); the first batch (slowest process; it
compiles) and the median later batch (warm), all read from the part files' per-stage
timing; the time after a process's last batch (gathering the parts, with the wait for the
slowest process, and process 0's merge and write); and the speed-up over one process. The merged
scores of every configuration are checked equal to the one-process run's.

On a machine with fewer cores than processes this measures overhead, not speed-up: the
processes share the cores. Run from the repository root:

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --processes 1 2 4 --batches 8 --json dist.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # this checkout's affjax

import distributed_driver as driver  # noqa: E402

from affjax import results  # noqa: E402
from affjax.distributed import part_path as driver_part  # noqa: E402


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def run(n: int, args: argparse.Namespace, folder: Path) -> dict:
    """One launch of ``n`` processes; its timings and merged scores."""
    out = folder / f"p{n}" / "tiny.json"
    out.parent.mkdir(parents=True)
    extra = ["--out", str(out), "--batches", str(args.batches), "--batch-size",
             str(args.batch_size), "--width", str(args.width), "--dtypes", "float32"]
    start = time.perf_counter()
    outcomes = driver.launch(n, extra, timeout=args.timeout)
    wall = time.perf_counter() - start
    for i, o in enumerate(outcomes):
        if o["returncode"] != 0:
            raise SystemExit(f"{n} processes: process {i} failed:\n{o['stderr'][-3000:]}")
    events = [o["events"] for o in outcomes]
    merged_path = out.with_name("tiny_float32.json")
    part_paths = ([merged_path] if n == 1 else
                  [driver_part(merged_path, i, n) for i in range(n)])
    timings = [results.load(path).run.timing for path in part_paths]
    batch = [list(t.get("batch_seconds", [])) for t in timings]  # forward + score + metrics

    def stage_sum(t, *stages):
        return sum(v or 0.0 for s in stages for v in t.get("stages", {}).get(s, []))

    images = [stage_sum(t, "load", "transform") for t in timings]
    # What a process spent outside its batches after start-up: gathering the parts (with the
    # wait for the slowest process), merging, writing the merged file.
    tail = [next(e for e in ev if e["event"] == "done")["seconds"]
            - next(e for e in ev if e["event"] == "start")["seconds"]
            - sum(b) - stage_sum(t, "load", "transform", "write")
            for ev, b, t in zip(events, batch, timings, strict=True)]
    merged = results.load(merged_path)
    return {"processes": n, "wall_s": wall,
            "startup_s": max(next(e for e in ev if e["event"] == "start")["seconds"]
                             for ev in events),
            "images_s": max(images),
            "score_total_s": sum(map(sum, batch)),
            "score_critical_s": max(map(sum, batch)),
            "first_batch_s": max(b[0] for b in batch if b),
            "warm_batch_s": statistics.median(t for b in batch for t in b[1:])
            if any(len(b) > 1 for b in batch) else None,
            "gather_s": max(tail),
            "batches_per_process": [len(b) for b in batch],
            "part_bytes": sum(os.path.getsize(path) for path in part_paths) if n > 1 else 0,
            "scores": merged.batch_scores.tolist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    print(f"{platform.node()}: {_load()}, {args.batches} batches of {args.batch_size}, "
          f"tiny CNN width {args.width}, float32", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            rows.append(run(n, args, Path(tmp)))
            print(f"  {n} process(es) done in {rows[-1]['wall_s']:.1f} s ({_load()})",
                  flush=True)
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    for r in rows:
        r["speedup"] = base["wall_s"] / r["wall_s"]
        r["scores_equal"] = r["scores"] == base["scores"]
    header = ("| processes | wall s | start-up s | images s (slowest) | scoring s (sum) "
              "| scoring s (slowest) | 1st batch s | warm batch s | after last batch s "
              "| batches each | speed-up | scores equal |")
    print(header)
    print("|---" * 12 + "|")
    for r in rows:
        print(f"| {r['processes']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | "
              f"{r['images_s']:.1f} | "
              f"{r['score_total_s']:.1f} | {r['score_critical_s']:.1f} | "
              f"{r['first_batch_s']:.1f} | "
              f"{'-' if r['warm_batch_s'] is None else format(r['warm_batch_s'], '.3f')} | "
              f"{r['gather_s']:.2f} | "
              f"{'/'.join(map(str, r['batches_per_process']))} | {r['speedup']:.2f} | "
              f"{r['scores_equal']} |")
    print(f"after: {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": platform.node(), "cores": os.cpu_count(), "load_after": _load(),
             "args": vars(args), "rows": [{k: v for k, v in r.items() if k != "scores"}
                                          for r in rows]}, indent=1) + "\n")
    return 0 if all(r["scores_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
