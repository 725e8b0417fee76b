"""Command line: compare methods side by side, refine an image, download a family's weights, check the machine, or
measure.

    python -m fastgen compare "a red circle" --family sdxl --size 64x64 --out out/
    python -m fastgen refine out/turbo.png "a red square" --family mini --mask mask.png --out refined/
    python -m fastgen download --family sdxl --dry-run
    python -m fastgen doctor
    python -m fastgen bench --family synthetic-sd15 --size 256x256 --steps baseline=8 --json bench.json

One function per subcommand; `main(argv)` dispatches on `args.command`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fastgen import synthetic
from fastgen.fetch import DownloadError
from fastgen.registry import FAMILIES, custom_family, get_family


def _size(text: str) -> tuple[int | None, int | None]:
    from fastgen.request import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("`size`", "--size")) from None


def _pairs(cast):
    def parse(text: str):
        method, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected METHOD=VALUE (like baseline=25), got {text!r}")
        try:
            return method, cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a valid {cast.__name__} in {text!r}") from None

    return parse


def _family(args):
    if args.base:
        from fastgen import single_file

        if single_file.is_single_file(args.base):  # one .safetensors: its architecture is read from the file
            from fastgen.request import custom_base

            return custom_base(args.base)
        return custom_family(args.base, arch=args.family or "sdxl", variant=args.variant)
    if args.family is None:
        from fastgen.engine import default_family

        return get_family(default_family())
    return get_family(args.family)


def _progress(stream=sys.stderr):
    """A one-line progress bar on stderr: method, step/total."""

    def on_step(method: str, step: int, total: int) -> None:
        filled = int(20 * step / total)
        stream.write(f"\r{method:>9} [{'#' * filled}{'.' * (20 - filled)}] {step}/{total}")
        if step == total:
            stream.write("\n")
        stream.flush()

    return on_step


def compare(args) -> int:
    from fastgen.engine import Engine
    from fastgen.request import CompareRequest

    family = _family(args)
    width, height = args.size or (None, None)  # (None, None): each method's native size
    request = CompareRequest.parse(dict(
        prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, width=width, height=height,
        methods=args.methods.split(",") if args.methods else None, steps=dict(args.steps) or None,
        guidance=dict(args.guidance) or None,
        loras=[dict(zip(("repo", "weight_name", "scale"), lora)) for lora in args.lora] or None),
        family=family, trusted=True)  # your own machine: any model, any LoRA
    engine = Engine(device=args.device, dtype=args.dtype, memory_budget=args.memory_budget,
                    cuda_graphs=args.cuda_graphs, traced=args.traced)
    comparison = engine.compare(family, request.prompt, list(request.methods), **request.engine_kwargs(),
                                on_step=_progress())
    lines = {}
    for result in comparison.results:
        speedup = comparison.speedup(result.method)
        extra = f"  {speedup:.1f}x {comparison.reference}" if speedup and result.method != comparison.reference else ""
        lines[result.method] = f"{result.steps:>3} steps  {result.seconds:7.2f} s{extra}"
    return _write(comparison, Path(args.out), lines)


def _write(comparison, out: Path, lines: dict[str, str]) -> int:
    """Save the comparison to `out` and print one line per panel (`lines[method]`), its warnings and any
    failures; the exit status is 1 when a panel failed."""
    comparison.save(out)
    if comparison.family in FAMILIES and synthetic.family_is_synthetic(FAMILIES[comparison.family]):
        print(f"{synthetic.NOTE}: the images are noise")
    for result in comparison.results:
        print(f"{result.label:>16}: {lines[result.method]}")
        for warning in result.warnings:
            print(f"{'':>18}warning: {warning}")
    for failure in comparison.failures:
        print(f"{failure.label:>16}: failed: {failure.message}", file=sys.stderr)
    print(f"wrote {len(comparison.results)} images, {'grid.png and ' if comparison.results else ''}results.json "
          f"to {out}")
    return 1 if comparison.failures else 0


def _open_image(path: str, what: str, mode: str):
    """An image file as `mode` (RGB for a source, L for a mask: a mask saved as RGB or with alpha is common), or
    a clear error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if mode == "RGB" and image.mode in ("RGBA", "LA", "P"):  # transparent pixels become white, not black
                image = image.convert("RGBA")
                flat = Image.new("RGBA", image.size, "white")
                flat.alpha_composite(image)
                image = flat
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what} {path!r} is not a readable image ({error})") from None


def refine(args) -> int:
    from fastgen.engine import Engine
    from fastgen.request import RefineRequest

    family = _family(args)
    request = RefineRequest.parse(dict(
        prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, strength=args.strength,
        methods=args.methods.split(",") if args.methods else None, steps=dict(args.steps) or None,
        guidance=dict(args.guidance) or None, keep_outside=args.keep_outside, resize=args.resize), family=family)
    image = _open_image(args.image, "image", "RGB")
    mask = _open_image(args.mask, "mask", "L") if args.mask else None
    engine = Engine(device=args.device, dtype=args.dtype, memory_budget=args.memory_budget,
                    cuda_graphs=args.cuda_graphs, traced=args.traced)
    comparison = engine.refine_compare(family, image, request.prompt, list(request.methods), mask=mask,
                                       **request.engine_kwargs(), on_step=_progress())
    lines = {}
    for result in comparison.results:
        moved, change = "", result.outside_change
        if change is not None:
            moved = f"  outside the mask moved {change['mean']:.2f} mean, {change['max']} max (0-255)"
        lines[result.method] = (f"strength {result.strength:g}, {result.denoising_steps:>3} of {result.steps} steps "
                                f"{result.seconds:7.2f} s{moved}")
    return _write(comparison, Path(args.out), lines)


def bench(args) -> int:
    import json

    from tqdm import tqdm

    from fastgen import bench as benchmark

    family = _family(args)
    if synthetic.family_is_synthetic(family):
        print(f"{family.name}: {synthetic.NOTE}", file=sys.stderr)
    methods = args.methods.split(",") if args.methods else None
    if args.meta:
        report = benchmark.meta_run(family, methods, dtype=args.dtype or "float16")
    else:
        bars = []

        def progress(total):
            bars.append(tqdm(total=total, desc=f"bench {family.name}", file=sys.stderr, dynamic_ncols=True))
            return lambda: bars[0].update()

        try:
            report = benchmark.run(family, methods, size=args.size or (None, None), steps=dict(args.steps) or None,
                                   repeats=args.repeats, device=args.device, dtype=args.dtype, compile=args.compile,
                                   channels_last=args.channels_last, cuda_graphs=args.cuda_graphs,
                                   traced=args.traced,
                                   memory_budget=args.memory_budget, check_finite=args.check_finite,
                                   progress=progress)
        finally:
            for bar in bars:
                bar.close()
    print(benchmark.markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def serve(args) -> int:
    from fastgen import serve as serving  # deferred: Ray is only needed here

    return serving.main(args)


def download(args) -> int:
    from fastgen import fetch, hub

    family = _family(args)
    if args.methods == "all":
        methods = list(family.methods)
    else:  # the methods named, else the ones the page opens with
        methods = [family.method(m) for m in (args.methods.split(",") if args.methods else family.default_methods)]
    local = [m for m in methods if all(hub.is_local(r) for r in m.repos)]
    missing = hub.missing_repos(local)
    if local:
        state = f"missing: {', '.join(missing)} (the mini family's are trained in fastgen/mini)" if missing else "present"
        print(f"{family.name}: weights on disk, nothing to download ({state})")
    specs = [m for m in methods if m not in local]
    if not specs:
        return 1 if missing else 0
    # 1. Can the Hub be used at all? One short probe, so that no network fails in seconds, not minutes.
    problem = fetch.hub_problem(fresh=True)
    if problem and not hub.missing_repos(specs):
        print(f"{family.name}: every file is already in {hub.cache_dir()} (nothing to fetch; {problem})")
        return 0
    fetch.check_hub(problem)
    # 2. What would be fetched, and how big it is.
    plan = fetch.plan(specs, fetch.HubListing())
    if args.space_card:
        print(space_card(plan))
        return 0
    print_plan(family.name, plan)
    if args.dry_run:
        return 0
    # 3. Drop what interrupted runs left half-written (it cannot be resumed), refuse before the first byte when
    #    the disk cannot hold the rest, then fetch with one bar for all files.
    stale = fetch.stale_partials(plan.repos)
    if stale:
        size = sum(p.stat().st_size for p in stale)
        for partial in stale:
            partial.unlink(missing_ok=True)
        print(f"removed {len(stale)} half-fetched files ({fetch.size_text(size)}) left by an interrupted download")
    fetch.check_space(plan)
    if not plan.needed_bytes and all(f.present for f in plan.files):
        print(f"{family.name}: every file is already in {hub.cache_dir()}")
        return 0
    from tqdm import tqdm

    try:
        with tqdm(total=plan.needed_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=family.name,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            fetch.download(plan, on_bytes=bar.update)
    except KeyboardInterrupt:
        print("interrupted: the files that finished are kept; run the same command to fetch the rest",
              file=sys.stderr)
        return 130
    print(f"downloaded {fetch.size_text(plan.needed_bytes)} into {hub.cache_dir()}")
    return 0


def print_plan(family: str, plan) -> None:
    """The files per method (each file once, under the first method that loads it), totals and free space."""
    from fastgen import fetch, hub

    files = plan.files
    print(f"{family}: {len(plan.methods)} methods, {len(files)} files, {fetch.size_text(plan.total_bytes)} in total, "
          f"{fetch.size_text(plan.needed_bytes)} still to download")
    listed = set()
    for method, method_files in plan.methods:
        size = sum(f.size for f in method_files)
        new = [f for f in method_files if (f.repo, f.name) not in listed]
        shared = len(method_files) - len(new)
        note = "" if not shared else (", all listed above" if not new else f", {shared} of them listed above")
        print(f"  {method}: {len(method_files)} files, {fetch.size_text(size)}{note}")
        for f in new:
            print(f"    {f.size / 1e6:10.1f} MB  {f.label}{'  (already here)' if f.present else ''}")
            listed.add((f.repo, f.name))
    cache = hub.cache_dir()
    print(f"free space where the Hub cache lives ({cache}): {fetch.size_text(fetch.free_bytes(cache))}")


def space_card(plan) -> str:
    """The README front matter lines that make a Space list these repos and fetch these files at build time."""
    lines = ["models:", *(f"- {repo}" for repo in plan.repos), "preload_from_hub:"]
    return "\n".join(lines + [f"- {entry}" for entry in plan.preload_from_hub()])


def doctor(args) -> int:
    from fastgen import doctor as checks

    print(checks.report(args.family.split(",") if args.family else None))
    return 0


def evaluate(args) -> int:
    from fastgen.mini import evaluate as mini_evaluate  # deferred: the mini family's own module

    return mini_evaluate.main(args) or 0


def _lora(value: str) -> tuple[str, str, float]:
    """REPO[:WEIGHT_NAME][@SCALE] as (repo, weight name, scale)."""
    repo, scale = value, 1.0
    if "@" in value:
        repo, _, text = value.rpartition("@")
        try:
            scale = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a LoRA's scale must be a number, got {text!r}") from None
    weight_name = "pytorch_lora_weights.safetensors"  # diffusers' name for a saved LoRA
    head, sep, tail = repo.rpartition(":")
    if sep and tail.endswith((".safetensors", ".bin")):
        repo, weight_name = head, tail
    if not repo:
        raise argparse.ArgumentTypeError(f"expected REPO[:WEIGHT_NAME][@SCALE], got {value!r}")
    return repo, weight_name, scale


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m fastgen", description=__doc__.split("\n\n")[0])
    root.add_argument("-v", "--verbose", action="store_true", help="log what loads and what is evicted")
    commands = root.add_subparsers(dest="command", required=True)

    def family_options(p, default=None):
        p.add_argument("--family", choices=list(FAMILIES), default=default,
                       help="model family (default: sdxl with CUDA, else mini); with --base, its architecture")
        p.add_argument("--base", help="a custom SDXL/SD1.5 checkpoint (Hub id or folder, or one .safetensors "
                                      "file) as baseline, with LCM-LoRA applied on it")
        p.add_argument("--variant", help="weight variant of --base (e.g. fp16), if it ships one")

    def run_options(p):
        p.add_argument("--steps", type=_pairs(int), action="append", default=[], metavar="METHOD=N")
        p.add_argument("--guidance", type=_pairs(float), action="append", default=[], metavar="METHOD=G")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--negative", default="", help="negative prompt (ignored by methods without CFG)")

    def engine_options(p):
        p.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: cuda if present)")
        p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, float16 on GPU)")
        p.add_argument("--memory-budget", help="bytes the component cache may hold, e.g. 12GB")
        p.add_argument("--cuda-graphs", action="store_true", default=None,
                       help="replay the UNets and text encoders as CUDA graphs: same pixels, less launch overhead "
                            "(default: FASTGEN_CUDA_GRAPHS=1)")
        p.add_argument("--traced", action="store_true", default=None,
                       help="on the CPU, run the UNets as TorchScript traces: same pixels, less Python per step, "
                            "a warm-up run added to each first load (default: FASTGEN_TRACED=1)")

    p = commands.add_parser("compare", help="run methods on one prompt and seed, side by side")
    p.add_argument("prompt")
    family_options(p)
    p.add_argument("--methods", help="comma-separated, in order (default: turbo,lcm,lcm-lora,baseline)")
    p.add_argument("--size", type=_size, default=None, help="WxH for every method, or native (default)")
    run_options(p)
    p.add_argument("--lora", type=_lora, action="append", default=[], metavar="REPO[:WEIGHT_NAME][@SCALE]",
                   help="a style LoRA (Hub id or folder; weight file default pytorch_lora_weights.safetensors; "
                        "scale default 1) stacked on the baseline and the adapter methods; repeatable")
    p.add_argument("--out", default="out", help="folder for <method>.png, grid.png, results.json")
    engine_options(p)
    p.set_defaults(run=compare)

    p = commands.add_parser("refine", help="refine an image (image-to-image, or inpainting with --mask), method by "
                                           "method")
    p.add_argument("image", help="the source image (a draft: e.g. out/turbo.png)")
    p.add_argument("prompt")
    p.add_argument("--mask", help="inpaint: a mask image of the same size, white where to repaint")
    family_options(p)
    p.add_argument("--methods", help="comma-separated, in order (default: the family's shown methods)")
    p.add_argument("--strength", type=float, help="share of the schedule redone, in (0, 1] (default: each method's: "
                                                  "its model card's)")
    run_options(p)
    p.add_argument("--keep-outside", action="store_true", help="inpaint: paste the source back outside the mask")
    p.add_argument("--resize", action="store_true",
                   help="fit the image (and mask) to each method's native size: longer side, multiples of 8")
    p.add_argument("--out", default="refined", help="folder for <method>.png, grid.png, results.json (default: "
                                                   "refined)")
    engine_options(p)
    p.set_defaults(run=refine)

    p = commands.add_parser("bench", help="measure load, warm generation, memory, sharing and the engine's "
                                          "overhead (synthetic-sdxl / synthetic-sd15: full size, no downloads)")
    family_options(p)
    p.add_argument("--methods", help="comma-separated, in order (default: turbo,lcm,lcm-lora,baseline)")
    p.add_argument("--size", type=_size, default=None, help="WxH for every method, or native (default)")
    p.add_argument("--steps", type=_pairs(int), action="append", default=[], metavar="METHOD=N")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method after one warm-up (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile each UNet's repeated blocks (regional; "
                                                          "compiled in the warm-up run, reported apart)")
    p.add_argument("--channels-last", action="store_true", help="each UNet in the channels_last memory format")
    p.add_argument("--check-finite", action="store_true",
                   help="check that no module returns NaN or inf in the warm-up run (the fp16 path)")
    p.add_argument("--meta", action="store_true", help="synthetic families: load every method on the meta device "
                                                       "and report the cache's bytes only (no memory, no runs)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    engine_options(p)
    p.set_defaults(run=bench)

    p = commands.add_parser("serve", help="serve the methods on Ray Serve: an HTTP API the page can use "
                                          "(python app.py --backend URL)")
    p.add_argument("--family", choices=list(FAMILIES), default=None, help="the family to serve (default: mini)")
    p.add_argument("--methods", help="comma-separated (default: all of the family's)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per deployment group (default 1)")
    p.add_argument("--max-replicas", type=int, help="autoscale each group between --replicas and this")
    p.add_argument("--gpus-per-replica", type=float, help="GPUs per replica; fractions share a GPU (default: 1 "
                                                          "when the Ray cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, help="default: 1 with GPUs; on CPUs alone, the CPUs "
                                                          "shared out so every replica is scheduled")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=serve)

    p = commands.add_parser("download", help="fetch only the files a family needs")
    family_options(p)
    p.add_argument("--methods", help="comma-separated methods to fetch, or all (default: the ones the page opens "
                                      "with: turbo,lcm,lcm-lora,baseline for sdxl)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files, their sizes and the free disk space; download nothing")
    p.add_argument("--space-card", action="store_true",
                   help="print the Space card's models: and preload_from_hub: lines for these methods; "
                        "download nothing")
    p.set_defaults(run=download)

    p = commands.add_parser("doctor", help="show the software, the accelerator, and which families' weights are here")
    p.add_argument("--family", help="comma-separated families to check (default: all)")
    p.set_defaults(run=doctor)

    p = commands.add_parser("evaluate", help="score a mini-family method on a prompt set")
    p.add_argument("--family", default="mini")
    p.add_argument("--method", help="turbo, lcm, lcm-lora or baseline (default: baseline)")
    p.add_argument("--steps", type=int, help="default: the method's")
    p.add_argument("--guidance", type=float, help="default: the method's")
    p.add_argument("--prompts", type=int, default=32, help="prompts per split: seen and held-out (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=evaluate)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except ValueError as error:  # bad input and missing weights: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DownloadError) as error:  # missing weights, or a download that cannot proceed
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
