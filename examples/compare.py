"""Compare the fast methods with the 50-step baseline from Python, without the web demo.

    python examples/compare.py                                   # mini family, first example prompt
    python examples/compare.py "a photo of a red fox in snow" --family sdxl --out out/

Prints one line per method (steps, guidance, seconds, speed-up) and saves the captioned grid.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing fastgen
from fastgen.engine import Engine, default_family  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("prompt", nargs="?", default="a large red circle on a blue background")
parser.add_argument("--family", default=None, help="sdxl, sd15 or mini (default: sdxl with CUDA, else mini)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--size", type=int, default=0, help="one square size for all panels (default 0: each native)")
parser.add_argument("--out", type=Path, default=Path("out"))
args = parser.parse_args()

engine = Engine()  # picks the device and dtype once: CUDA + fp16 where present, else CPU + float32
size = args.size or None
comparison = engine.compare(args.family or default_family(), args.prompt, seed=args.seed, width=size, height=size)

for result in comparison.results:
    speedup = comparison.speedup(result.method)
    print(f"{result.label:10} {result.steps:3d} steps  guidance {result.guidance:4.1f}  {result.seconds:6.2f} s"
          + (f"  {speedup:5.1f}x faster" if speedup and result.method != "baseline" else ""))

for failure in comparison.failures:
    print(f"{failure.label:10} failed: {failure.message}")

grid, _ = comparison.save(args.out)  # <method>.png, grid.png and results.json, as the CLI writes them
print(f"saved to {args.out}: grid.png, results.json and one PNG per panel" if grid else f"nothing finished; see {args.out}")
