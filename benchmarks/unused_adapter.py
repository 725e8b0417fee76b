"""Does the LCM-LoRA left (disabled) on the reference's UNet slow the reference down?

    python benchmarks/unused_adapter.py [--family synthetic-sd15] [--size 256] [--steps 4] [--repeats 4]
                                        [--wrapped-layers]

The reference shares its UNet with LCM-LoRA, whose peft adapter stays attached (disabled) after an LCM-LoRA run
so the next one need not load it again. Two engines over the same weights: one never runs LCM-LoRA, the other
ran it once. Their reference runs alternate, and the denoising medians are compared: a ratio over 1.01 would
mean the speed-ups shown are flattered. The engine runs the reference on the UNet's clean twin (plain layers
over the same tensors, fastgen.adapters); `--wrapped-layers` drops the twin to measure what the wrappers cost.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastgen.engine import Engine  # noqa: E402
from fastgen.registry import get_family  # noqa: E402

PROMPT = "a large red circle on a blue background"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="synthetic-sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--wrapped-layers", action="store_true",
                        help="run the reference on the peft-wrapped UNet (no clean twin), as before the twin")
    args = parser.parse_args()
    size = dict(width=args.size, height=args.size)
    clean, wrapped = Engine(device=args.device), Engine(device=args.device)
    reference = "baseline"
    for engine in (clean, wrapped):
        engine.run(args.family, reference, PROMPT, steps=args.steps, **size)  # load and warm
    wrapped.run(args.family, "lcm-lora", PROMPT, steps=2, **size)  # its adapter now stays on the shared UNet
    layers = sum(1 for m in wrapped.cache.report() if m["kind"] == "lora")
    if args.wrapped_layers:
        family = get_family(args.family)
        pipe, keys, *_ = wrapped._pipeline(family, family.method(reference))
        for key in keys:  # the reference's UNet: forget its twin, so the reference runs on the wrapped layers
            item = wrapped.cache.entry(key)
            if item.kind == "unet":
                item.clean = None
    times = {"clean": [], "wrapped": []}
    pair = [("clean", clean), ("wrapped", wrapped)]
    for repeat in range(args.repeats):  # ABBA: each engine goes first in every other pair (no order bias)
        for name, engine in (pair if repeat % 2 == 0 else pair[::-1]):
            result = engine.run(args.family, reference, PROMPT, steps=args.steps, **size)
            times[name].append(result.timings["denoising"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    how = "its peft-wrapped layers" if args.wrapped_layers else "the clean twin"
    print(f"{args.family} {reference}, {args.steps} steps at {args.size}², device {clean.device}, "
          f"{args.repeats} alternating runs each ({layers} LoRA attached on the second engine's UNet; its "
          f"reference runs on {how})")
    for name, values in times.items():
        print(f"  {name:8s} denoising median {medians[name]:.3f} s (min {min(values):.3f}, max {max(values):.3f})")
    print(f"  wrapped / clean: {medians['wrapped'] / medians['clean']:.3f}x")


if __name__ == "__main__":
    main()
