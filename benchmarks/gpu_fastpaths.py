"""CUDA fast paths, measured one at a time on synthetic-sdxl: where a run's wall time goes (GPU kernels against
the host), then the VAE decoding in bfloat16 instead of an upcast to float32, then CUDA graphs of the UNet and
of the text encoders, each added on top of the last, for SDXL Turbo at 512x512 (1 step) and the 50-step
reference at 1024x1024.

    python benchmarks/gpu_fastpaths.py --json fastpaths.json          # on a GPU machine
    python benchmarks/gpu_fastpaths.py --device cpu --family mini     # the same code paths on a CPU (no graphs)

Each stage calls the diffusers pipeline the engine assembles (same modules, same recipe) and times it end to end
(prompt to PIL image), median of --repeats after a warm-up. It also reports how far the image moved from the
eager one (0-255), so a fast path that changes pixels says by how much. A stage that fails is reported with its
error and the next one still runs. The numbers are a benchmark's, never a test's assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastgen.bench import sync  # noqa: E402
from fastgen.graphs import Graphed  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon"


class Bfloat16Decode:
    """The VAE held and run in bfloat16 (float32's range, so no overflow where float16 would need the upcast),
    with the latents cast to it on the way in."""

    def __init__(self, pipe):
        import torch

        self.pipe, self.vae = pipe, pipe.vae
        vae = type(pipe.vae).from_config(pipe.vae.config).to(pipe.vae.device, torch.bfloat16).eval()
        vae.load_state_dict(pipe.vae.state_dict())
        decode = vae.decode
        vae.decode = lambda z, *a, **k: decode(z.to(torch.bfloat16), *a, **k)
        pipe.vae = vae

    def remove(self) -> None:
        self.pipe.vae = self.vae


def pipeline(engine, family, method: str, steps: int):
    from fastgen.engine import call_kwargs

    spec = family.method(method).at_steps(steps)
    pipe, *_ = engine._pipeline(family, spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(num_inference_steps=steps, guidance_scale=spec.guidance, **call_kwargs(spec))


def timed(pipe, kwargs: dict, size: int, repeats: int, device: str):
    import numpy as np
    import torch

    def once():
        sync(device)
        start = time.perf_counter()
        image = pipe(PROMPT, width=size, height=size, generator=torch.Generator("cpu").manual_seed(0),
                     **kwargs).images[0]
        sync(device)
        return time.perf_counter() - start, np.asarray(image).astype(np.int16)

    first, _ = once()
    runs = [once() for _ in range(repeats)]
    seconds = [s for s, _ in runs]
    return {"first_seconds": round(first, 4), "median": round(statistics.median(seconds), 4),
            "min": round(min(seconds), 4), "max": round(max(seconds), 4)}, runs[-1][1]


def profile(pipe, kwargs: dict, size: int, device: str) -> dict:
    """One run under torch.profiler: wall time against the GPU's busy time (the sum of its kernels' times)."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        pipe(PROMPT, width=size, height=size, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
        sync(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy = sum(getattr(e, "device_time", 0) or 0 for e in kernels) / 1e6
    return {"wall_seconds": round(wall, 4), "gpu_busy_seconds": round(busy, 4), "kernels": len(kernels),
            "gpu_busy_share": round(busy / wall, 3) if wall else None}


def markdown(report: dict) -> str:
    """The report as docs/benchmarks.md shows it: one table per case, each stage on top of the ones above it."""
    m = report["machine"]
    lines = [f"### Fast paths, {report['family']} on {report['device']}, {report['dtype']}", "",
             f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; torch {m['torch']}, "
             f"diffusers {m['diffusers']}"]
    for case in report["cases"].values():
        lines += ["", f"**{case['method']}, {case['steps']} steps, {case['size']}x{case['size']}**"]
        p = case.get("profile", {})
        if "wall_seconds" in p:
            lines += ["", f"Profiled over {p['steps']} steps: {p['wall_seconds']:.3f} s wall, the GPU busy "
                          f"{p['gpu_busy_seconds']:.3f} s of it ({p['gpu_busy_share']:.0%}), {p['kernels']:,} kernels."]
        lines += ["", "| stage | median s | min s | max s | first run s | pixels moved (0-255): mean / max |",
                  "|---|---:|---:|---:|---:|---|"]
        for s in case["stages"]:
            if "error" in s:
                lines.append(f"| {s['stage']} | failed: {s['error']} | | | | |")
                continue
            moved = s.get("pixels_moved")
            moved = f"{moved['mean']} / {moved['max']}" if moved else "-"
            lines.append(f"| {s['stage']} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | "
                         f"{s['first_seconds']:.2f} | {moved} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="synthetic-sdxl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from fastgen.bench import machine
    from fastgen.engine import Engine
    from fastgen.registry import get_family

    family = get_family(args.family)
    engine = Engine(device=args.device, dtype=args.dtype)
    small = family.method("turbo").native_size
    cases = {"turbo": ("turbo", 1, small, args.repeats),
             "baseline": (family.reference, 50, family.method(family.reference).native_size,
                          max(2, args.repeats // 4))}
    engine.load(family, [m for m, *_ in cases.values()])
    report = {"machine": machine(), "family": family.name, "device": engine.device, "dtype": engine.dtype_name,
              "prompt": PROMPT, "cases": {}}

    def save():
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    pipes = {name: pipeline(engine, family, method, steps) for name, (method, steps, _, _) in cases.items()}
    eager_images = {}
    for name, (method, steps, size, repeats) in cases.items():
        pipe, kwargs = pipes[name]
        case = report["cases"][name] = {"method": method, "steps": steps, "size": size, "stages": []}
        seconds, eager_images[name] = timed(pipe, kwargs, size, repeats, engine.device)
        case["stages"].append({"stage": "eager", **seconds})
        try:
            short = {**kwargs, "num_inference_steps": min(steps, 4)}
            case["profile"] = {"steps": short["num_inference_steps"], **profile(pipe, short, size, engine.device)}
        except Exception as e:  # noqa: BLE001 - a benchmark reports what failed and goes on
            case["profile"] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(case), flush=True)
        save()

    fast = []  # what is installed, removed at the end
    stages = [("+ VAE decode in bfloat16", lambda pipe: [Bfloat16Decode(pipe)]),
              ("+ CUDA graph of the UNet", lambda pipe: [Graphed.on(pipe.unet)]),
              ("+ CUDA graphs of the text encoders",
               lambda pipe: [Graphed.on(m) for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                             if m is not None])]
    for stage, install in stages:
        if "graph" in stage and not engine.device.startswith("cuda"):
            continue
        for name, (method, steps, size, repeats) in cases.items():
            pipe, kwargs = pipes[name]
            entry = {"stage": stage}
            try:
                fast.extend(install(pipe))
                seconds, image = timed(pipe, kwargs, size, repeats, engine.device)
                diff = abs(image - eager_images[name])
                entry.update(seconds, pixels_moved={"mean": round(float(diff.mean()), 3), "max": int(diff.max())})
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {e}"
            report["cases"][name]["stages"].append(entry)
            print(name, json.dumps(entry), flush=True)
            save()
    for f in reversed(fast):
        f.remove()

    print(markdown(report))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
