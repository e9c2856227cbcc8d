"""Synthetic world throughput: (reference, standard) pairs per second on one core.

    python benchmarks/bench_synthetic.py [--sizes 128x192 512x768] [--n 200]

"new characters": every pair is a new character, so its standard render is drawn too (worst case).
"seen characters": the standard renders are cached (training draws many scenes per character).
The process is pinned to one core; numbers are measured here, not estimated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.synthetic import render_sample  # noqa: E402
from trainer.synthetic.__main__ import parse_size  # noqa: E402


def rate(size, n, first_id, seed_offset) -> float:
    start = time.perf_counter()
    for i in range(n):
        render_sample(first_id + i, seed_offset + i, size)
    return n / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(128, 192), (512, 768)])
    parser.add_argument("--n", type=int, default=200, help="pairs per measurement (a quarter of it at >= 512 px)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print("| size | new characters (pairs/s/core) | seen characters (pairs/s/core) |\n|---|---|---|")
    for size in args.sizes:
        n = args.n if size[0] < 512 else max(10, args.n // 4)
        render_sample(0, 0, size)  # warm-up
        new = rate(size, n, 10_000, 0)
        seen = rate(size, n, 10_000, 77)  # same characters, other scenes: standard renders cached
        print(f"| {size[0]}x{size[1]} | {new:.1f} | {seen:.1f} |")


if __name__ == "__main__":
    main()
