"""Measure the mini family's quality-versus-steps table and draw its picture (for docs/mini.md).

    python -m fastgen.mini.report --prompts 34 --picture docs/mini_steps.png
    python -m fastgen.mini.report --targets --prompts 68   # only the rows part 3's targets name
    python -m fastgen.mini.report --refine --prompts 16    # drafts refined, against the baseline at 50 steps
    python -m fastgen.mini.report --vae [FOLDER]           # renders through a VAE and back: its ceiling

Prints a Markdown table: accuracy (all attributes correct) on seen / held-out combinations in the lenient and
the strict reading (fastgen.mini.analyzer), the
Fréchet distance (seen / held-out) and seconds per image, for each method at each step count.
"""

from __future__ import annotations

import argparse
import time

STEPS = {"baseline": (1, 2, 4, 8, 25, 50), "lcm": (1, 2, 4, 8), "lcm-lora": (1, 2, 4, 8), "turbo": (1, 2, 4)}
TARGET_ROWS = {"baseline": (50,), "lcm": (4,), "lcm-lora": (4,), "turbo": (1,)}  # the rows part 3's targets name
PICTURE_PROMPT = "a large yellow triangle on a purple background"


def table(engine, prompts: int, settings: dict[str, tuple[int, ...]] = STEPS) -> str:
    """One row per method and step count in `settings` (default: every step count the picture shows)."""
    from fastgen.registry import get_family

    from .evaluate import evaluate

    family = get_family("mini")
    rows = ["| method | steps | guidance | accuracy seen | accuracy held-out | strict seen | strict held-out "
            "| distance seen | distance held-out | s/image |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, counts in settings.items():
        spec = family.method(method)
        for steps in counts:
            scores = {s.split: s for s in evaluate(engine, method, steps, None, prompts)}
            seen, held = scores["seen"], scores["held-out"]
            seconds = (seen.seconds_per_image * seen.prompts + held.seconds_per_image * held.prompts) / (
                seen.prompts + held.prompts)
            rows.append(f"| {spec.label} | {steps} | {spec.guidance:g} | {seen.accuracy['all']:.3f} | "
                        f"{held.accuracy['all']:.3f} | {seen.accuracy['strict']:.3f} | {held.accuracy['strict']:.3f} | "
                        f"{seen.distance:.4f} | {held.distance:.4f} | {seconds:.3f} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


DRAFTS = (("turbo", 1), ("lcm", 2), ("lcm-lora", 2))
REFINERS = ("turbo", "lcm", "lcm-lora", "baseline")
STRENGTHS = (0.3, 0.5, 0.7)


def refine_table(engine, prompts: int) -> str:
    """Fast drafts refined by each method at each strength, against the baseline at 50 steps alone; then
    inpainting the drafted shape in another colour."""
    from fastgen.registry import get_family

    from .evaluate import evaluate, evaluate_inpaint, evaluate_refine, refine_steps

    family = get_family("mini")

    def row(name: str, scores) -> str:
        seen, held = scores["seen"], scores["held-out"]
        seconds = (seen.seconds_per_image * seen.prompts + held.seconds_per_image * held.prompts) / (
            seen.prompts + held.prompts)
        return (f"| {name} | {seen.accuracy['all']:.3f} | {held.accuracy['all']:.3f} | {seen.distance:.4f} | "
                f"{held.distance:.4f} | {seconds:.3f} |")

    rows = ["| draft -> refine (strength, steps) | accuracy seen | accuracy held-out | distance seen | "
            "distance held-out | s/image (draft + refine) |", "|---|---:|---:|---:|---:|---:|"]
    rows.append(row("baseline, 50 steps alone", {s.split: s for s in evaluate(engine, "baseline", 50, None, prompts)}))
    print(rows[-1], flush=True)
    for draft, draft_steps in DRAFTS:
        for refiner in REFINERS:
            for strength in STRENGTHS:
                steps = refine_steps(family.method(refiner), strength)
                scores = {s.split: s for s in evaluate_refine(engine, draft, draft_steps, refiner, strength, prompts)}
                rows.append(row(f"{draft}@{draft_steps} -> {refiner} ({strength:g}, {steps})", scores))
                print(rows[-1], flush=True)
    rows += ["", "| draft -> inpaint (strength) | new colour read | all attributes | outside moved, mean / max "
             "(not kept) | outside moved, max (kept) | s/image (draft + inpaint) |", "|---|---:|---:|---:|---:|---:|"]
    for refiner in REFINERS:
        r = evaluate_inpaint(engine, "turbo", 1, refiner, prompts)
        strength = family.method(refiner).refine_recipe("inpaint").strength
        rows.append(f"| turbo@1 -> {refiner} ({strength:g}) | {r['color']:.3f} | {r['all']:.3f} | "
                    f"{r['outside_mean']:.2f} / {r['outside_max']} | {r['kept_max']} | {r['seconds_per_image']:.3f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def vae_table(folder=None, count: int = 300) -> str:
    """Renders through a VAE (default: the shipped one) and back, scored like generated images: the ceiling the
    VAE sets."""
    from diffusers import AutoencoderKL

    from . import WEIGHTS
    from .evaluate import vae_round_trip

    vae = AutoencoderKL.from_pretrained(folder or WEIGHTS / "base" / "vae").eval()
    r = vae_round_trip(vae, count)
    a = r["accuracy"]
    return "\n".join([
        f"{r['images']} renders through the VAE and back (latent mean, float32):",
        "| reading | background | color | shape | size | all |", "|---|---:|---:|---:|---:|---:|",
        f"| lenient | {a['background']:.3f} | {a['color']:.3f} | {a['shape']:.3f} | {a['size']:.3f} | {a['all']:.3f} |",
        f"| strict | {a['strict_background']:.3f} | {a['strict_color']:.3f} | {a['strict_shape']:.3f} | "
        f"{a['strict_size']:.3f} | {a['strict']:.3f} |",
        "", f"mean absolute error (0-255): {r['error_all']:.2f} over all pixels, {r['error_edges']:.2f} on the "
            f"shapes' edges, {r['error_flat']:.2f} elsewhere"])


def picture(engine, path: str, seed: int = 0) -> None:
    """One prompt, one row per method, one column per step count (the base's 25 and 50 at the right)."""
    from PIL import Image, ImageDraw

    columns = (1, 2, 4, 8, 25, 50)
    cell, label_width, pad = 96, 90, 4
    canvas = Image.new("RGB", (label_width + len(columns) * (cell + pad), 20 + len(STEPS) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, steps in enumerate(columns):
        draw.text((label_width + c * (cell + pad) + 30, 4), f"{steps} step{'s' if steps > 1 else ''}", fill="black")
    for r, (method, counts) in enumerate(STEPS.items()):
        y = 20 + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), method, fill="black")
        for c, steps in enumerate(columns):
            if steps not in counts:
                continue
            image = engine.run("mini", method, PICTURE_PROMPT, seed=seed, steps=steps).image
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (label_width + c * (cell + pad), y))
    canvas.save(path)


def main(argv=None):
    from fastgen.engine import Engine

    parser = argparse.ArgumentParser(prog="python -m fastgen.mini.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=34,
                        help="prompts per split (held-out has 34 combinations; past 34 they repeat with other seeds)")
    parser.add_argument("--targets", action="store_true",
                        help="only the rows the targets name: baseline 50, LCM 4, LCM-LoRA 4, Turbo 1 steps")
    parser.add_argument("--picture", help="also draw one prompt across methods and steps to this PNG")
    parser.add_argument("--refine", action="store_true", help="measure refining fast drafts instead (the refine "
                                                              "table)")
    parser.add_argument("--vae", nargs="?", const="", metavar="FOLDER",
                        help="measure a VAE's round trip on renders instead (default: the shipped VAE; a freshly "
                             "trained one is in runs/mini/vae)")
    parser.add_argument("--traced", action="store_true",
                        help="run the UNets as TorchScript traces: the same images, sooner (the s/image column "
                             "then times the traced runs)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.vae is not None:
        print(vae_table(args.vae or None))
        print(f"({time.perf_counter() - start:.0f} s)")
        return
    engine = Engine(device="cpu", traced=args.traced)
    if args.picture:
        picture(engine, args.picture)
    print(refine_table(engine, args.prompts) if args.refine else
          table(engine, args.prompts, TARGET_ROWS if args.targets else STEPS))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
