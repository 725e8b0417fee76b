"""How long the demo's default four-panel comparison takes on the mini family, on this machine's CPU.

    python benchmarks/mini_panels.py [--repeats 5] [--traced] [--threads N]

Loading is timed apart (first call); then each repeat runs Turbo 1 step, LCM 4, LCM-LoRA 4 and the
baseline 50 on one prompt and prints each panel's generation seconds and the total. `--traced` runs the
UNets as TorchScript traces (fastgen.graphs); `--threads` sets torch's intra-op threads (default: torch's).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastgen.engine import Engine  # noqa: E402

PROMPT = "a large red circle on a blue background"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--traced", action="store_true", help="UNets as TorchScript traces")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(device="cpu", traced=args.traced)
    first = engine.compare("mini", PROMPT, seed=0)
    print(f"first comparison (loads the family): {time.perf_counter() - start:.2f} s wall, "
          f"load {sum(r.load_seconds for r in first.results):.2f} s")
    totals, per_panel = [], {r.method: [] for r in first.results}
    for seed in range(1, args.repeats + 1):
        wall = time.perf_counter()
        comparison = engine.compare("mini", PROMPT, seed=seed)
        totals.append(time.perf_counter() - wall)
        for r in comparison.results:
            per_panel[r.method].append(r.seconds)
    for method, seconds in per_panel.items():
        result = first.result(method)
        print(f"{method:>9} {result.steps:>3} steps: {statistics.median(seconds):.3f} s median "
              f"({min(seconds):.3f}-{max(seconds):.3f})")
    print(f"four panels ({'traced' if args.traced else 'eager'}, {torch.get_num_threads()} threads), wall clock: "
          f"{statistics.median(totals):.2f} s median over {args.repeats} "
          f"({min(totals):.2f}-{max(totals):.2f})")


if __name__ == "__main__":
    main()
