"""The ``affjax`` command line."""

from __future__ import annotations

import argparse
import math
import sys
import time


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="affjax", description="Affinity scores and non-linearity signatures in JAX."
    )
    sub = parser.add_subparsers(dest="command")
    rep = sub.add_parser("reproduce", help="print the paper's published small-experiment scores")
    rep.set_defaults(func=_reproduce)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["reproduce"])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
