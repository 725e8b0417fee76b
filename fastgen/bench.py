"""Measure methods as users run them: cold load, warm generation, memory, sharing, and the engine's overhead.

    python -m fastgen bench --family synthetic-sd15 --size 256x256 --steps baseline=8 --repeats 3 --json out.json
    python -m fastgen bench --family synthetic-sdxl --meta          # what the cache holds, on the meta device

Per method: the seconds its first load added to the shared cache (components already there cost nothing), then
one warm-up run and `repeats` timed runs (median / min / max, split into text encoding, denoising and decoding as
the engine times them), steps per second, the speed-up over the family's reference when it ran too, and the peak
memory (CUDA `max_memory_allocated`; on a CPU the process's peak RSS, which counts every resident model). Per
run: the cache's bytes with sharing against the sum of each method's components as separate pipelines, the
engine's wall time against the plain diffusers call of the same recipe over the same modules (interleaved, so
both see the same machine), and the machine. The numbers are a benchmark's, never a test's assertions.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from fastgen import synthetic
from fastgen.registry import Family, get_family

logger = logging.getLogger(__name__)

PROMPT = "a photograph of an astronaut riding a horse on the moon"
TIMING_PARTS = ("text_encoding", "denoising", "decoding")


@dataclass
class MethodBench:
    """One method's measurements; `seconds` is generation time (load excluded), each a median/min/max."""

    method: str
    label: str
    steps: int
    width: int
    height: int
    load_seconds: float
    warmup_seconds: float  # the first run: with --compile, the compile lands here
    seconds: dict[str, float]  # median, min, max over the timed runs
    timings: dict[str, float]  # median seconds per part
    steps_per_second: float
    speedup: float | None  # the reference's median over this one's; None when the reference did not run
    peak_memory_bytes: int
    finite: dict | None = None  # with check_finite: {"ok", "first_nonfinite", "vae_force_upcast"}
    runs: list[float] = field(default_factory=list)


# --- the machine and its memory ------------------------------------------------------------------------------

def machine() -> dict:
    """What the numbers were measured on."""
    import diffusers
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # no /proc: the peak since the process started

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


# --- what the cache holds ------------------------------------------------------------------------------------

def sharing(report: list[dict], methods: list[str]) -> dict:
    """The cache's resident bytes for `methods` against the sum of what each would hold as a separate pipeline
    (its UNet, text encoders, VAE and LoRA counted once per method that uses them)."""
    resident = sum(row["bytes"] for row in report)
    separate = sum(row["bytes"] * len([m for m in row["used_by"] if m in methods]) for row in report)
    return {"resident_bytes": resident, "separate_bytes": separate,
            "ratio": round(resident / separate, 4) if separate else None,
            "components": [{k: row[k] for k in ("kind", "bytes", "used_by")} for row in report]}


# --- one method ----------------------------------------------------------------------------------------------

def _finite_hooks(modules: dict, seen: list):
    """Forward hooks on every submodule of `modules` that note the first one returning NaN or inf."""
    import torch

    def check(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                tensors = [output]
            elif isinstance(output, dict):  # diffusers' and transformers' outputs
                tensors = list(output.values())
            else:
                tensors = list(output) if isinstance(output, (tuple, list)) else []
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not seen \
                        and not bool(torch.isfinite(t).all()):
                    seen.append(name)
        return hook

    return [sub.register_forward_hook(check(f"{part}.{name}" if name else part))
            for part, module in modules.items() for name, sub in module.named_modules()]


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def compile_unet(unet) -> None:
    """Regional compilation: torch.compile each of the UNet's repeated transformer blocks, in place (the cached
    module, so every later run uses it). The block's code is compiled once and reused by every block, which
    diffusers documents as a fraction of a whole-model compile's time for most of its speed. A UNet without
    transformer blocks is compiled whole."""
    if getattr(unet, "_fastgen_compiled", False):
        return
    blocks = set(getattr(unet, "_repeated_blocks", None) or ())
    if any(type(m).__name__ in blocks for m in unet.modules()):
        unet.compile_repeated_blocks(fullgraph=True)
    else:
        unet.compile()
    unet._fastgen_compiled = True


def bench_method(engine, family: Family, method: str, *, width: int, height: int, steps: int, repeats: int,
                 prompt: str, seed: int, compile: bool = False, channels_last: bool = False,
                 check_finite: bool = False,
                 tick: Callable[[], None] = lambda: None) -> MethodBench:
    """Load one method into `engine`'s cache, run it once to warm up, then `repeats` times."""
    import torch

    spec = family.method(method)
    _reset_peak(engine.device)
    load_seconds = engine.load(family, [method])
    tick()
    pipe, *_ = engine._pipeline(family, spec.at_steps(steps))  # the modules the runs use (cached: no load)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)  # in place: the cached module, so every later run uses it
    if compile:
        compile_unet(pipe.unet)
    seen, hooks = [], []
    if check_finite:
        modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
        hooks = _finite_hooks(modules, seen)
    args = dict(prompt=prompt, seed=seed, width=width, height=height, steps=steps)
    try:
        start = time.perf_counter()
        warm = engine.run(family, method, **args)
        warmup_seconds = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    tick()
    finite = None
    if check_finite:
        import numpy as np

        pixels = np.asarray(warm.image)
        finite = {"ok": not seen and bool(pixels.std() > 0), "first_nonfinite": seen[0] if seen else None,
                  "vae_force_upcast": bool(pipe.vae.config.get("force_upcast", False))}
    results = []
    for _ in range(repeats):
        results.append(engine.run(family, method, **args))
        tick()
    return MethodBench(
        method=method, label=spec.label, steps=steps, width=width, height=height,
        load_seconds=round(load_seconds, 4), warmup_seconds=round(warmup_seconds, 4),
        seconds=_spread([r.seconds for r in results]),
        timings={part: round(statistics.median(r.timings[part] for r in results), 4) for part in TIMING_PARTS},
        steps_per_second=round(statistics.median(r.steps_per_second for r in results), 3), speedup=None,
        peak_memory_bytes=_peak(engine.device), finite=finite, runs=[r.seconds for r in results])


def overhead(engine, family: Family, method: str, *, width: int, height: int, steps: int, repeats: int,
             prompt: str, seed: int, tick: Callable[[], None] = lambda: None) -> dict:
    """The engine's wall time for a run (resolve, assemble from the cache, hold, time, build the result) against
    the plain diffusers pipeline call of the same recipe over the same modules, alternating the two."""
    import torch

    from fastgen.engine import call_kwargs, plain_class

    spec = family.method(method).at_steps(steps)
    pipe, *_ = engine._pipeline(family, spec)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its own: schedulers hold run state
    plain = plain_class(pipe)(**{**pipe.components, "scheduler": scheduler})
    plain.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=steps, guidance_scale=spec.guidance, width=width, height=height,
                  **call_kwargs(spec))
    engine_seconds, plain_seconds = [], []
    for _ in range(repeats):
        sync(engine.device)
        start = time.perf_counter()
        engine.run(family, method, prompt, seed=seed, width=width, height=height, steps=steps)
        sync(engine.device)
        engine_seconds.append(time.perf_counter() - start)
        tick()
        start = time.perf_counter()
        plain(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
        sync(engine.device)
        plain_seconds.append(time.perf_counter() - start)
        tick()
    ratio = statistics.median(engine_seconds) / statistics.median(plain_seconds)
    return {"method": method, "steps": steps, "engine_seconds": _spread(engine_seconds),
            "plain_seconds": _spread(plain_seconds), "ratio": round(ratio, 4)}


# --- a run ---------------------------------------------------------------------------------------------------

def run(family: str | Family, methods: list[str] | None = None, *, size: tuple[int | None, int | None] = (None, None),
        steps: dict[str, int] | None = None, repeats: int = 3, device: str | None = None, dtype=None,
        compile: bool = False, channels_last: bool = False, cuda_graphs: bool | None = None,
        traced: bool | None = None, memory_budget=None, check_finite: bool = False, measure_overhead: bool = True,
        prompt: str = PROMPT, seed: int = 0, engine=None,
        progress: Callable[[int], Callable[[], None]] | None = None
        ) -> dict:
    """Bench `methods` (default: the family's shown ones, the reference last) and return the report as a dict
    (what --json writes). `progress(total)` returns a tick called once per load or run."""
    from fastgen.engine import Engine
    from fastgen.request import check_methods, check_per_method, check_sizes, check_steps

    family = get_family(family)
    methods = list(check_methods(family, methods))
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1, got {repeats}")
    steps = check_per_method("steps", steps, family, methods)
    width, height = size
    check_sizes(family, methods, width, height)
    if compile and (cuda_graphs or traced):
        raise ValueError("`compile` and `cuda_graphs` or `traced` are measured apart: choose one")
    engine = engine or Engine(device=device, dtype=dtype, memory_budget=memory_budget, cuda_graphs=cuda_graphs,
                              traced=traced)
    chosen = {m: check_steps(family.method(m), steps.get(m, family.method(m).steps)) for m in methods}
    timed = next((m for m in methods if family.method(m).lora_repo is None), None) if measure_overhead else None
    total = len(methods) * (2 + repeats) + (2 * repeats if timed else 0)
    tick = progress(total) if progress else (lambda: None)
    results = []
    for m in methods:
        spec = family.method(m)
        results.append(bench_method(engine, family, m, width=width or spec.native_size,
                                    height=height or spec.native_size, steps=chosen[m], repeats=repeats,
                                    prompt=prompt, seed=seed, compile=compile, channels_last=channels_last,
                                    check_finite=check_finite, tick=tick))
    reference = next((r for r in results if r.method == family.reference), None)
    for r in results:
        if reference is not None:
            r.speedup = round(reference.seconds["median"] / r.seconds["median"], 3)
    users = [f"{family.name}/{m}" for m in methods]
    cost = None
    if timed:
        spec = family.method(timed)
        cost = overhead(engine, family, timed, width=width or spec.native_size, height=height or spec.native_size,
                        steps=chosen[timed], repeats=repeats, prompt=prompt, seed=seed, tick=tick)
    return {
        "machine": machine(), "family": family.name, "synthetic": synthetic.family_is_synthetic(family),
        "device": engine.device, "dtype": engine.dtype_name, "compile": compile, "channels_last": channels_last,
        "cuda_graphs": engine.cuda_graphs, "traced": engine.traced, "repeats": repeats,
        "results": [asdict(r) for r in results],
        "cache": {**sharing(engine.cache.report(users), methods),
                  # loads beyond the components held: evicted under the memory budget, so the ratio is of what is left
                  "evicted": engine.cache.loads - len(engine.cache.report())},
        "overhead_ratio": cost["ratio"] if cost else None, "overhead": cost,
    }


def meta_run(family: str | Family, methods: list[str] | None = None, dtype="float16") -> dict:
    """What the cache would hold with `methods` loaded (default: the family's shown ones) in `dtype`: the same
    engine and cache, with a synthetic family's modules left on the meta device, so nothing is allocated and
    nothing can run. Only for synthetic families (real weights would be read from disk)."""
    from fastgen.engine import Engine
    from fastgen.request import check_methods

    family = get_family(family)
    if not synthetic.family_is_synthetic(family):
        raise ValueError(f"`family` must be a synthetic family for a meta-device load, got {family.name!r}")
    methods = list(check_methods(family, methods))
    engine = Engine(device="cpu", dtype=dtype)
    with synthetic.on_meta():
        engine.load(family, methods)
    users = [f"{family.name}/{m}" for m in methods]
    return {"machine": machine(), "family": family.name, "synthetic": True, "device": "meta",
            "dtype": engine.dtype_name, "results": [], "cache": sharing(engine.cache.report(users), methods),
            "overhead_ratio": None, "overhead": None}


# --- markdown --------------------------------------------------------------------------------------------------

def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def markdown(report: dict) -> str:
    """The report as the tables docs/benchmarks.md shows."""
    results = report["results"]
    lines = []
    sizes = sorted({f"{r['width']}x{r['height']}" for r in results})
    title = f"{report['family']} on {report['device']}, {report['dtype']}"
    if sizes:
        title += f", {', '.join(sizes)}"
    if report.get("compile"):
        title += ", compiled (regional)"
    if report.get("cuda_graphs"):
        title += ", CUDA graphs"
    if report.get("traced"):
        title += ", traced UNets"
    if report.get("channels_last"):
        title += ", channels_last"
    lines.append(f"### {title}")
    if report.get("synthetic"):
        lines.append("\nSynthetic weights: for timing only (the real architectures with random weights; images are "
                     "noise).")
    if results:
        lines += ["", "| method | steps | load s | first run s | median s | min s | max s | text s | denoise s "
                      "| decode s | steps/s | speed-up | peak memory |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            t, s = r["timings"], r["seconds"]
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
            lines.append(f"| {r['label']} | {r['steps']} | {r['load_seconds']:.2f} | {r['warmup_seconds']:.2f} | "
                         f"{s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {t['text_encoding']:.3f} | "
                         f"{t['denoising']:.3f} | {t['decoding']:.3f} | {r['steps_per_second']:.2f} | {speedup} | "
                         f"{_gb(r['peak_memory_bytes'])} |")
        finite = [r for r in results if r.get("finite")]
        for r in finite:
            f = r["finite"]
            state = "finite everywhere" if f["ok"] else f"NOT finite (first: {f['first_nonfinite']})"
            lines.append(f"\n{r['label']}: {state}; VAE force_upcast {f['vae_force_upcast']}")
    cache = report["cache"]
    lines.append("")
    lines.append(f"cache: {_gb(cache['resident_bytes'])} resident with sharing, {_gb(cache['separate_bytes'])} as "
                 f"separate pipelines (ratio {cache['ratio']})")
    if cache.get("evicted"):
        lines[-1] += f"; {cache['evicted']} loads were evicted under the memory budget: the ratio is of what was left"
    cost = report.get("overhead")
    if cost:
        lines.append(f"engine overhead: {cost['ratio']:.3f}x the plain diffusers call ({cost['method']}, "
                     f"{cost['steps']} steps, median {cost['engine_seconds']['median']:.3f} s against "
                     f"{cost['plain_seconds']['median']:.3f} s)")
    m = report["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
                 f"GPU {m['gpu'] or 'none'}; torch {m['torch']}, diffusers {m['diffusers']}")
    return "\n".join(lines)
