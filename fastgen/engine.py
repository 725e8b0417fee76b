"""Run a comparison: validate -> load (through the shared cache) -> generate -> timings.

    from fastgen.engine import Engine
    comparison = Engine().compare("sdxl", "a red circle", seed=0)
    comparison.grid().save("grid.png")

Device and dtype are picked in `pick_device` / `pick_dtype` and nowhere else. A seed means
`torch.Generator("cpu").manual_seed(seed)`, so on CPU in float32 each panel equals the plain diffusers recipe
its `code` shows. Runs are serialised: one job uses the accelerator at a time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from fastgen import fetch, graphs, hub, synthetic
from fastgen.adapters import Adapters
from fastgen.cache import ComponentCache, component_class, default_budget
from fastgen.hub import MissingWeightsError
from fastgen.registry import FAMILIES, SCHEDULERS, Family, MethodSpec, StyleLora, family_available, get_family
from fastgen.request import (MAX_SEED, MAX_SIZE, check_flag, check_guidance, check_image, check_int, check_mask,
                             check_loras, check_methods, check_per_method, check_refine_steps, check_size,
                             check_sizes, check_steps, check_strength, check_text, fit)
from fastgen.results import Comparison, MethodFailure, MethodResult
from fastgen.snippets import method_code

__all__ = ["Engine", "MethodResult", "MethodFailure", "Comparison", "RunStopped", "ComponentLoadError", "NotAvailable",
           "MissingWeightsError", "default_family",
           "pick_device", "pick_dtype", "MAX_SIZE", "MAX_SEED"]

logger = logging.getLogger(__name__)

OnStep = Callable[[str, int, int], None]
OnPreview = Callable[[str, int, int, object], None]  # (method, step, total, a PIL image of the latents so far)
PREVIEW_FIT_IMAGES = 16  # random colour-block images a VAE encodes to fit its latent preview map
PREVIEW_MAX_SIDE = 256  # a preview is shown in a panel; its size is what is sent, not what is drawn


def pixels_per_latent(vae_config) -> int:
    """How many pixels one latent pixel covers a side: the VAE halves the image at each block but the last."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def preview_map(vae):
    """A linear map (latent channels + 1, 3) from a latent pixel (unscaled: as the VAE encodes) to RGB in [0, 1],
    fitted to this VAE by least squares: it encodes images of random colour blocks (two latent pixels a side) and
    matches each latent pixel to the average colour it covers. Other tools ship such factors fixed per model;
    here they are measured for whichever VAE runs (one small encode). None when the fit is not finite."""
    import torch

    scale = pixels_per_latent(vae.config)
    block = 2 * scale
    side = max(64, 4 * block)
    seeded = torch.Generator().manual_seed(0)
    colours = torch.rand(PREVIEW_FIT_IMAGES, 3, side // block, side // block, generator=seeded)
    images = colours.repeat_interleave(block, 2).repeat_interleave(block, 3)
    with torch.no_grad():
        latents = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
    covered = torch.nn.functional.avg_pool2d(images, scale)
    design = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    design = torch.cat([design, torch.ones(len(design), 1)], dim=1)
    solution = torch.linalg.lstsq(design, covered.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return solution if bool(torch.isfinite(solution).all()) else None


def latent_preview(latents, vae, weights):
    """The first latent of a batch as a PIL image through `weights` (preview_map), at the latent's size scaled up
    to the VAE's pixel size (at most PREVIEW_MAX_SIDE a side)."""
    import torch
    from PIL import Image

    config = vae.config
    z = latents[0].float().cpu() / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    rgb = torch.einsum("chw,cd->hwd", z, weights[:-1]) + weights[-1]
    image = Image.fromarray((rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    side = min(max(image.size) * pixels_per_latent(config), PREVIEW_MAX_SIDE)  # the longer side, in pixels
    size = tuple(int(n * side / max(image.size)) for n in image.size)
    return image.resize(size, Image.NEAREST if max(image.size) <= 32 else Image.BILINEAR)


def preview_due(step: int, total: int, latent_side: int) -> bool:
    """Whether step `step` (1-based, before the last) shows a preview: every step for small latents (the mini
    family's 16 x 16), else about eight per run."""
    if step >= total:
        return False
    return latent_side <= 32 or step % max(1, total // 8) == 0


class RunStopped(Exception):
    """A run was stopped between two steps through its `stop` event."""


class NotAvailable(ValueError):
    """The method cannot refine in this mode: diffusers has no pipeline for it (FastGen does not improvise one)."""


MODE_LABELS = {"text2img": "text-to-image", "img2img": "image-to-image", "inpaint": "inpainting"}


class ComponentLoadError(RuntimeError):
    """A component's files are on disk but do not load (corrupt, truncated, wrong format)."""


# --- device and dtype: the one place they are chosen ------------------------------------------------------

def pick_device(device: str | None = None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`device` must be one of cpu, cuda, cuda:N, mps, got {device!r}")
    return device


def pick_dtype(device: str, dtype=None):
    """float32 on CPU (half precision is slow there and breaks the equal-to-the-recipe promise); float16 on
    CUDA and MPS. The SDXL VAE overflows in float16: its `force_upcast` config makes diffusers decode in float32,
    and the engine sets it where a checkpoint lacks it (see `Engine._vae_safe`)."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.float16
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"`dtype` must be one of {tuple(names)}, got {dtype!r}")
        return names[dtype]
    if dtype not in names.values():
        raise ValueError(f"`dtype` must be one of {tuple(names)}, got {dtype!r}")
    return dtype


def default_family() -> str:
    """sdxl with CUDA; otherwise the embedded mini family if its weights are there; else the first available."""
    import torch

    if torch.cuda.is_available():
        return "sdxl"
    if family_available("mini"):
        return "mini"
    for name in FAMILIES:
        if family_available(name):
            return name
    raise MissingWeightsError([r for f in FAMILIES.values() for r in f.repos], family="sdxl")


def _loading(name: str, source: hub.Source, family: Family, load: Callable) -> Callable:
    """`load`, with any failure to read files that are on disk turned into one ComponentLoadError that says
    which component, from where, and how to get a good copy."""

    def guarded(*args):
        try:
            return load(*args)
        except MissingWeightsError:
            raise
        except Exception as error:
            if hub.is_local(source.repo):  # the folder's name only: a server's paths are not for its visitors
                where = Path(source.repo).name
                fix = f"the files in {where}/ may be corrupt or truncated: restore them"
            else:
                where = source.label
                cmd = "python -m fastgen download" + (f" --family {family.name}" if family.name in FAMILIES else "")
                fix = f"the files may be corrupt or truncated: delete them from the Hub cache and run `{cmd}`"
            raise ComponentLoadError(f"could not load {name} from {where} ({type(error).__name__}); {fix}") from error

    return guarded


def call_kwargs(spec: MethodSpec) -> dict:
    """The recipe's extra pipeline-call arguments; tuples in the registry (frozen data) become the lists
    diffusers expects."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.call_kwargs}


@functools.cache
def placed(pipeline_cls):
    """`pipeline_cls` with its execution device given rather than searched for. diffusers looks for offloading
    hooks in every submodule of every component on each call (4.8 ms a call for the mini family on this
    project's CPU, 24 ms for SDXL), and the engine never offloads: its modules are on its device. Same name, same
    behaviour otherwise; `plain_class` gives the class back."""
    return type(pipeline_cls.__name__, (pipeline_cls,), {
        "__module__": pipeline_cls.__module__, "__doc__": pipeline_cls.__doc__, "fastgen_plain": pipeline_cls,
        "_execution_device": property(lambda self: self.fastgen_device)})


def plain_class(pipe):
    """The diffusers class an engine pipeline was made from."""
    return getattr(type(pipe), "fastgen_plain", type(pipe))


def _is_module(cls) -> bool:
    import torch

    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


# --- the engine -----------------------------------------------------------------------------------------

class Engine:
    """Loads methods through a shared `ComponentCache` and runs them with their recipes.

    `memory_budget`: bytes (or "8GB") the cache may hold; default 80% of GPU memory on CUDA, of RAM on CPU.
    `cuda_graphs`: replay the UNets and text encoders as CUDA graphs (fastgen.graphs; no pixel changes); default
    FASTGEN_CUDA_GRAPHS=1 on a CUDA device.
    `traced`: run the UNets as TorchScript traces on a CPU (fastgen.graphs; no pixel changes); default
    FASTGEN_TRACED=1 on the CPU. It adds a warm-up run, where the traces are made, to each method's first load
    (on CUDA every first load has one).
    """

    def __init__(self, device: str | None = None, dtype=None, memory_budget: int | str | None = None,
                 cuda_graphs: bool | None = None, traced: bool | None = None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        on_cuda, on_cpu = self.device.startswith("cuda"), self.device == "cpu"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"`cuda_graphs` needs a CUDA device, got {self.device!r}")
        if traced and not on_cpu:
            raise ValueError(f"`traced` is for the CPU (on CUDA, use `cuda_graphs`), got {self.device!r}")
        self.cuda_graphs = on_cuda and (os.environ.get("FASTGEN_CUDA_GRAPHS") == "1" if cuda_graphs is None
                                        else cuda_graphs)
        self.traced = on_cpu and (os.environ.get("FASTGEN_TRACED") == "1" if traced is None else traced)
        budget = default_budget(self.device) if memory_budget is None else memory_budget
        self.cache = ComponentCache(budget=budget, device=self.device)
        self.adapters = Adapters(self.cache)  # LoRAs on the cache's shared UNets
        self._schedulers: dict[tuple, object] = {}  # (family, method, scheduler, kwargs) -> its own instance
        self._warm: set[tuple[str, str, int, int]] = set()
        self._run_lock = threading.Lock()
        self._preview_maps = weakref.WeakKeyDictionary()  # VAE module -> its fitted preview map (or None)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    # 1. Resolve the files --------------------------------------------------------------------------------
    def _folders(self, spec: MethodSpec, family: Family, lister=None) -> dict[str, Path]:
        """repo -> the folder holding its files, downloading what is missing unless offline."""
        missing = hub.missing_files(spec, lister)
        if missing and not fetch.hub_problem() and not any(hub.is_local(r) for r in missing):
            try:
                plan = fetch.plan([spec], fetch.HubListing())
                if family.name not in FAMILIES:  # a visitor's model: the host caps what it may download
                    fetch.check_cap(f"{spec.repo} ({spec.label})", plan.needed_bytes)
                fetch.download(plan)
            except fetch.OverCap as error:
                raise NotAvailable(str(error)) from None
            except Exception as error:  # no network, Hub down, gated repo: all mean "not here, fetch them"
                logger.warning("downloading %s failed: %s", ", ".join(missing), error)
                raise MissingWeightsError(missing, family=family.name if family.name in FAMILIES else None) from error
            if lister is not None:  # the download changed what the folders hold
                lister.cache_clear()
            missing = hub.missing_files(spec, lister)
        if missing:
            raise MissingWeightsError(missing, family=family.name if family.name in FAMILIES else None)
        return {repo: hub.local_folder(repo) for repo in spec.repos}

    def _preview_map(self, vae):
        """The VAE's latent preview map, fitted on its first use (one small encode) and kept while it is cached."""
        if vae not in self._preview_maps:
            try:
                self._preview_maps[vae] = preview_map(vae)
            except Exception as error:  # previews are a nicety: a VAE that cannot be fitted shows none
                logger.warning("no latent previews for this VAE: %s", error)
                self._preview_maps[vae] = None
        return self._preview_maps[vae]

    # 2. Assemble the method's pipeline from cached components ---------------------------------------------
    def _pipeline(self, family: Family, spec: MethodSpec, pipeline: str | None = None,
                  styles: tuple[StyleLora, ...] = ()):
        """The method's pipeline (a light wrapper over cached modules), the cache keys it holds, and its LoRAs'
        adapter keys with their scales for this run (its own, then `styles`). `pipeline`: another class over the
        same modules (a refine recipe's img2img or inpaint pipeline)."""
        import diffusers

        listed = functools.lru_cache(maxsize=None)(hub.list_files)  # this run's listings: each folder once
        folders = self._folders(spec, family, listed)
        folder = folders[spec.repo]
        model_index = hub.read_json(folder / "model_index.json")
        classes = hub.components(model_index)
        user = f"{family.name}/{spec.name}"
        plan = {}  # name -> (key, source, folder, files, class)
        for name, source in hub.method_sources(spec, model_index).items():
            if name in ("scheduler", "lora"):
                continue
            where = folders[source.repo]
            files = hub.select_files(listed(where), source)
            if name in classes:
                cls = component_class(*classes[name])
            else:  # a UNet from another repo: its config names its class
                config = hub.read_json(where / (f"{source.subfolder}/config.json" if source.subfolder else "config.json"))
                cls = getattr(diffusers, config.get("_class_name", "UNet2DConditionModel"))
            dtype = self.dtype if _is_module(cls) else None
            key = ComponentCache.key(source, where, files, dtype)
            if source.weight_name is not None:  # a state dict: its module is the base UNet's config plus the file
                key = f"{key}+{hub.file_digest(folder / 'unet' / 'config.json')[:16]}"
            plan[name] = (key, source, where, files, cls)

        pinned = {key for key, *_ in plan.values()}
        parts = {}
        for name, (key, source, where, files, cls) in plan.items():
            if source.weight_name is not None:
                load = lambda where=where, source=source: self._load_state_dict_unet(folder, where / source.weight_name)
            else:
                load = lambda source=source, where=where, files=files, cls=cls: self._load(cls, where, source, files)
            load = _loading(name, source, family, load)
            estimate = sum((where / f).stat().st_size for f in files) * self._widening(source, files)
            parts[name] = self.cache.get(key, name, source.label, load, user, pinned, int(estimate))
        if spec.fp16_unsafe_vae and "vae" in parts:
            self._vae_safe(parts["vae"])
        pipe = self._construct(getattr(diffusers, pipeline or spec.pipeline), model_index, parts,
                               self._scheduler(family, spec, folder))

        # (repo, weight name, scale, folder, unet only): the method's own adapter, then the styles stacked on it
        loras = [(spec.lora_repo, spec.lora_weight_name, spec.lora_scale, folders[spec.lora_repo], False)
                 ] if spec.lora_repo is not None else []
        loras += [(s.repo, s.weight_name, s.scale, self._style_folder(s, family), True) for s in styles]
        keys = [self._attach(pipe, family, plan["unet"][0], repo, weight_name, where, user, pinned, scale, listed,
                             unet_only=unet_only) for repo, weight_name, scale, where, unet_only in loras]
        unet = self.cache.entry(plan["unet"][0]) if not keys and "unet" in plan else None
        if unet is not None and unet.clean is not None:  # no adapter this run: the UNet's plain layers
            pipe.register_modules(unet=unet.clean)
        if self.cuda_graphs or self.traced:
            graphs.attach(pipe, traced=self.traced)
        return pipe, sorted(pinned), keys, [scale for _, _, scale, _, _ in loras]

    def _attach(self, pipe, family: Family, unet_key: str, repo: str, weight_name: str, where: Path, user: str,
                pinned: set[str], scale: float, listed=hub.list_files, unet_only: bool = False) -> str:
        """One LoRA file as a named adapter on the pipeline's (cached, shared) UNet; its adapter key. `listed`:
        hub.list_files or the run's memo of it. `unet_only`: refuse a file that also holds text-encoder weights
        (a visitor's style LoRA)."""
        source = hub.Source(repo, None, None, weight_name)
        files = hub.select_files(listed(where), source)
        digest = hub.content_key(where, files, None)

        if unet_only and any(k.startswith(("text_encoder", "lora_te")) for k in self._lora_keys(where / weight_name)):
            # a text encoder is shared by every method of the family: an adapter there would leak into all
            raise NotAvailable(f"{source.label} also changes the text encoder; only LoRAs of the UNet can be "
                               "stacked on a shared model")

        def load_lora(adapter):
            if synthetic.is_synthetic(where):
                synthetic.attach_lora(pipe.unet, where / weight_name, adapter)
            else:
                pipe.load_lora_weights(str(where), weight_name=weight_name, adapter_name=adapter)

        return self.adapters.attach(unet_key, digest, source.label, _loading("lora", source, family, load_lora),
                                    user, pinned, scale=scale)

    @staticmethod
    def _lora_keys(path: Path) -> list[str]:
        """The tensor names in a LoRA file (kohya: lora_unet_* / lora_te*_*; diffusers: unet.* / text_encoder*.*)."""
        if path.suffix != ".safetensors":
            import torch

            return list(torch.load(path, map_location="meta", weights_only=True))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())

    def _style_folder(self, style: StyleLora, family: Family) -> Path:
        """Where a style LoRA's file is: a local folder, or the Hub cache (downloaded first when missing)."""
        where = hub.local_folder(style.repo)
        if where is None or not (where / style.weight_name).is_file():
            if not hub.is_local(style.repo) and not fetch.hub_problem():
                try:
                    fetch.visitor_file(style.repo, style.weight_name)
                    where = hub.local_folder(style.repo)
                except fetch.OverCap as error:
                    raise NotAvailable(str(error)) from None
                except Exception as error:  # no network, no such repo or file: not here, fetch it
                    logger.warning("downloading %s/%s failed: %s", style.repo, style.weight_name, error)
            if where is None or not (where / style.weight_name).is_file():
                raise MissingWeightsError([style.repo], family=None)
        return where

    def _construct(self, pipeline_cls, model_index: dict, parts: dict, scheduler):
        """The pipeline object over cached modules: what from_pretrained builds, minus the loading. Empty
        slots (safety_checker: [null, null]) stay None; flags such as requires_safety_checker come from
        model_index.json. Its class is `pipeline_cls` told the engine's device (`placed`)."""
        import torch

        accepted = inspect.signature(pipeline_cls.__init__).parameters
        kwargs = {name: None for name in model_index if name in accepted and isinstance(model_index[name], list)}
        kwargs.update({k: v for k, v in model_index.items() if k in accepted and not isinstance(v, list)})
        kwargs.update(parts, scheduler=scheduler)
        pipe = placed(pipeline_cls)(**kwargs)
        pipe.fastgen_device = torch.device(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _load(self, cls, folder: Path, source: hub.Source, files: list[str]):
        kwargs = {"subfolder": source.subfolder} if source.subfolder else {}
        if not _is_module(cls):  # tokenizers, image processors
            return cls.from_pretrained(folder, **kwargs)
        if synthetic.is_synthetic(folder):  # the real architecture, random weights: built, not read
            return synthetic.build(cls, folder, source.subfolder, self.dtype, self.device)
        variant = source.variant if any(hub.weight_variant(f) == source.variant for f in files) else None
        return cls.from_pretrained(folder, variant=variant, dtype=self.dtype, **kwargs).to(self.device)

    def _load_state_dict_unet(self, base: Path, path: Path):
        """A UNet shipped as one state-dict file (SDXL-Lightning, DMD2), in the base pipeline's UNet config, as
        the model cards build it. Made on the meta device and filled from the file: no random init, no second
        copy. A file for another architecture fails here (strict keys), never loads half."""
        import torch
        from diffusers import UNet2DConditionModel

        config = UNet2DConditionModel.load_config(base, subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:  # a torch pickle: tensors only, never arbitrary objects
            state = torch.load(path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in itertools.chain(unet.named_parameters(), unet.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"{path.name} leaves {len(left)} tensors unset, e.g. {left[0]}")
        return unet.to(device=self.device, dtype=self.dtype).eval()

    def _widening(self, source: hub.Source, files: list[str]) -> float:
        """Memory per byte on disk: fp16 files loaded in float32 take twice their size."""
        half_files = any(hub.weight_variant(f) in ("fp16", "bf16") for f in files)
        return 2.0 if half_files and self.dtype_name == "float32" else 1.0

    def _vae_safe(self, vae) -> None:
        if self.dtype_name != "float32" and not vae.config.get("force_upcast", False):
            logger.info("the SDXL VAE overflows in %s: decoding in float32 (force_upcast)", self.dtype_name)
            vae.register_to_config(force_upcast=True)

    def _scheduler(self, family: Family, spec: MethodSpec, folder: Path):
        """This method's own scheduler instance: schedulers hold per-run state and are not thread-safe."""
        key = (family.name, spec.name, spec.scheduler, spec.scheduler_kwargs)  # step files may change the recipe
        if key not in self._schedulers:
            import diffusers

            config = hub.read_json(folder / "scheduler" / "scheduler_config.json")
            cls = getattr(diffusers, SCHEDULERS[spec.scheduler] or config["_class_name"])
            base = getattr(diffusers, config["_class_name"]).from_pretrained(folder, subfolder="scheduler")
            self._schedulers[key] = cls.from_config(base.config, **dict(spec.scheduler_kwargs))
        return self._schedulers[key]

    def load(self, family: str | Family, methods: list[str] | None = None) -> float:
        """Load `methods` (default: all of the family's) into the cache without generating; returns seconds.
        For hosts that must load at start-up (a ZeroGPU Space loads in the main process, then runs each job in
        a worker that inherits what is loaded)."""
        family = get_family(family)
        start = time.perf_counter()
        with self._run_lock:
            for name in check_methods(family, methods):
                self._pipeline(family, family.method(name))
        return time.perf_counter() - start

    # 3. Generate ----------------------------------------------------------------------------------------------
    def run(self, family: str | Family, method: str, prompt: str, *, negative_prompt: str = "", seed: int = 0,
            width: int | None = None, height: int | None = None, steps: int | None = None,
            guidance: float | None = None, on_step: OnStep | None = None,
            stop: threading.Event | None = None, loras=(), on_preview: OnPreview | None = None) -> MethodResult:
        """Generate one panel. `loras`: StyleLora (or dicts of repo, weight_name, scale) stacked on the methods
        that take them (spec.takes_styles; the others run without, and say so). `on_preview(method, step, total,
        image)`: a cheap picture of the latents while denoising (see preview_due), never counted in the time.
        Raises ValueError on bad input, MissingWeightsError, or RunStopped."""
        family = get_family(family)
        spec = family.method(method)
        styles = check_loras(loras)
        width = check_size("width", spec.native_size if width is None else width)
        height = check_size("height", spec.native_size if height is None else height)
        steps = check_steps(spec, spec.steps if steps is None else steps)
        guidance = check_guidance(spec, spec.guidance if guidance is None else guidance)
        check_int("seed", seed, 0, MAX_SEED)
        check_text("prompt", prompt, required=True)
        check_text("negative_prompt", negative_prompt, required=False)
        spec = spec.at_steps(steps)  # the file, scheduler and call arguments of this step count
        args = dict(spec=spec, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                    guidance=guidance, width=width, height=height)
        applied = styles if spec.takes_styles else ()
        pipe, image, timings, loop_steps, flagged, load_seconds = self._execute(
            family, spec, None, args, (family.name, spec.name, width, height), spec.min_steps, on_step, stop,
            applied, on_preview)
        result = self._result(spec, pipe, image, timings, loop_steps, flagged, load_seconds, prompt=prompt,
                              negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, width=width,
                              height=height, styles=applied)
        if styles and not applied:
            result.warnings.append(f"LoRAs not applied: {spec.label} runs its own distilled UNet, not the base "
                                   "model's that they were trained on")
        return result

    def _result(self, spec: MethodSpec, pipe, image, timings: dict, loop_steps: int, flagged: bool,
                load_seconds: float, *, prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float,
                width: int, height: int, refine: dict | None = None, styles: tuple[StyleLora, ...] = (),
                **fields) -> MethodResult:
        """A finished run as its MethodResult: timings, warnings and the snippet (`refine`: a refine's, see
        method_code); `fields`: a refine's own (mode, strength, outside_change)."""
        cfg = spec.cfg_at(guidance)
        scheduler = pipe.scheduler
        return MethodResult(
            method=spec.name, label=spec.label, image=image, steps=steps, guidance=guidance, cfg=cfg,
            scheduler=type(scheduler).__name__, timestep_spacing=scheduler.config.get("timestep_spacing"),
            width=width, height=height, seconds=round(sum(timings.values()), 4),
            load_seconds=round(load_seconds, 4), timings={k: round(v, 4) for k, v in timings.items()},
            steps_per_second=round(loop_steps / max(timings["denoising"], 1e-9), 3),
            warnings=self._warnings(pipe, spec, prompt, negative_prompt, guidance, cfg, width, height, flagged),
            code=method_code(spec, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                             guidance=guidance, width=width, height=height, device=self.device,
                             dtype=self.dtype_name, scheduler_class=type(scheduler).__name__, refine=refine,
                             styles=styles),
            licence=spec.licence, denoising_steps=loop_steps, loras=[style.to_dict() for style in styles], **fields,
        )

    def _execute(self, family: Family, spec: MethodSpec, pipeline: str | None, args: dict, warm_key: tuple,
                 warm_steps: int, on_step, stop, styles: tuple[StyleLora, ...] = (), on_preview=None):
        """Under the run lock: assemble the pipeline, hold its parts (and enable its LoRA), warm up on a first CUDA
        or traced run, generate. Returns (pipe, image, timings, steps run, flagged, load seconds)."""
        # a first CUDA run pays kernel selection; graphs and traces are captured per batch, which guidance sets
        warm_key = (*warm_key, spec.cfg_at(args["guidance"]))
        with self._run_lock:
            if stop is not None and stop.is_set():
                raise RunStopped(f"{spec.name} stopped before it started")
            start = time.perf_counter()
            pipe, keys, loras, scales = self._pipeline(family, spec, pipeline, styles)
            with self.cache.hold(keys), self.adapters.active(loras, scales):
                if (self.device != "cpu" or self.traced) and warm_key not in self._warm:
                    self._generate(pipe, **{**args, "steps": warm_steps}, on_step=None, stop=stop)
                    self._warm.add(warm_key)
                load_seconds = time.perf_counter() - start
                image, timings, loop_steps, flagged = self._generate(pipe, **args, on_step=on_step, stop=stop,
                                                                     on_preview=on_preview)
        return pipe, image, timings, loop_steps, flagged, load_seconds

    def _generate(self, pipe, spec, prompt, negative_prompt, seed, steps, guidance, on_step, stop, on_preview=None,
                  **inputs):
        """One pipeline call, timed at the step boundaries: text encoding (and for a refine, encoding the source
        image) runs until the UNet's first call, denoising until the last step's callback, decoding (VAE, safety
        checker, to PIL) after it; previews are made in the step callbacks and their time is taken out of the
        denoising. `inputs`: width and height, or a refine's image, mask_image and strength."""
        import torch

        marks = {"preview": 0.0}
        weights = self._preview_map(pipe.vae) if on_preview is not None else None

        def sync():
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)

        def first_unet_call(module, args):
            if "denoise" not in marks:
                sync()
                marks["denoise"] = time.perf_counter()

        def step_end(pipeline, i, t, tensors):
            total = pipeline.num_timesteps
            if i + 1 == total:
                sync()
                marks["decode"] = time.perf_counter()
            marks["steps"] = i + 1
            if weights is not None and preview_due(i + 1, total, tensors["latents"].shape[-1]):
                started = time.perf_counter()
                on_preview(spec.name, i + 1, total, latent_preview(tensors["latents"], pipeline.vae, weights))
                marks["preview"] += time.perf_counter() - started
            if on_step is not None:
                on_step(spec.name, i + 1, total)
            if stop is not None and stop.is_set():
                # diffusers' `interrupt` would still decode, and LatentConsistencyModelPipeline has none
                raise RunStopped(f"{spec.name} stopped after step {i + 1} of {total}")
            return tensors

        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, **inputs,
                      generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=step_end)
        if spec.cfg_at(guidance) and negative_prompt:
            kwargs["negative_prompt"] = negative_prompt
        kwargs.update(call_kwargs(spec))
        hook = pipe.unet.register_forward_pre_hook(first_unet_call)
        try:
            sync()
            start = time.perf_counter()
            output = pipe(prompt, **kwargs)
            sync()
            end = time.perf_counter()
        finally:
            hook.remove()
        timings = {
            "text_encoding": marks["denoise"] - start,
            "denoising": marks["decode"] - marks["denoise"] - marks["preview"],
            "decoding": end - marks["decode"],
        }
        flagged = bool(getattr(output, "nsfw_content_detected", None) and any(output.nsfw_content_detected))
        return output.images[0], timings, marks["steps"], flagged

    @staticmethod
    def _warnings(pipe, spec, prompt, negative_prompt, guidance, cfg, width, height, flagged) -> list[str]:
        warnings = []
        tokenizer = pipe.tokenizer
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt if cfg else "")):
            count = len(tokenizer(text).input_ids)
            if count > tokenizer.model_max_length:
                warnings.append(f"{name} truncated: {count} tokens, the text encoder reads the first "
                                f"{tokenizer.model_max_length}")
        why = spec.negative_prompt_ignored(guidance)
        if negative_prompt and why:
            warnings.append(f"negative prompt ignored: {why}")
        if (width, height) != (spec.native_size, spec.native_size):
            warnings.append(f"{spec.label} was trained at {spec.native_size}x{spec.native_size}; "
                            f"{width}x{height} may look worse")
        if flagged:
            warnings.append("the safety checker flagged this image and replaced it with a black one")
        return warnings

    # 4. Compare ----------------------------------------------------------------------------------------------
    def iter_compare(self, family: str | Family, prompt: str, methods: list[str] | None = None, *,
                     negative_prompt: str = "", seed: int = 0, width: int | None = None,
                     height: int | None = None, steps: dict[str, int] | None = None,
                     guidance: dict[str, float] | None = None, on_step: OnStep | None = None,
                     stop: threading.Event | None = None, loras=(),
                     on_preview: OnPreview | None = None) -> Iterator[MethodResult | MethodFailure]:
        """Run `methods` (default: all of the family's, in its order) on one prompt and seed; yield each result
        as it is ready. Every argument is checked before the first run starts. A panel that fails (weights
        missing or corrupt, out of memory, any error) yields a MethodFailure and the next one runs; a stop
        raises RunStopped."""
        family = get_family(family)
        methods = check_methods(family, methods)
        steps = check_per_method("steps", steps, family, methods)
        guidance = check_per_method("guidance", guidance, family, methods)
        check_sizes(family, methods, width, height)
        check_int("seed", seed, 0, MAX_SEED)
        check_text("prompt", prompt, required=True)
        check_text("negative_prompt", negative_prompt, required=False)
        loras = check_loras(loras)
        for name in methods:
            spec = family.method(name)
            try:
                outcome = self.run(family, name, prompt, negative_prompt=negative_prompt, seed=seed, width=width,
                                   height=height, steps=steps.get(name), guidance=guidance.get(name),
                                   on_step=on_step, stop=stop, loras=loras, on_preview=on_preview)
            except RunStopped:
                raise
            except Exception as error:  # one panel's fault: say what failed, and run the others
                outcome = self._failure(family, spec, error, width or spec.native_size, height or spec.native_size)
            yield outcome

    def _failure(self, family: Family, spec: MethodSpec, error: Exception, width: int, height: int) -> MethodFailure:
        """A failed panel, with the message its user needs. Known faults log one line; others their traceback."""
        import torch

        if isinstance(error, MissingWeightsError):
            kind, message = "missing-weights", str(error)
        elif isinstance(error, NotAvailable):
            kind, message = "not-available", str(error)
        elif isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            kind = "out-of-memory"
            message = (f"{spec.label} ran out of memory at {width}x{height} on {self.device}: try a smaller size "
                       "or fewer panels")
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        elif isinstance(error, ComponentLoadError):
            kind, message = "load-failed", str(error)
        else:
            kind, message = "error", f"{spec.label} failed ({type(error).__name__}); the error has been logged"
            logger.error("%s/%s failed", family.name, spec.name, exc_info=error)
        if kind != "error":
            logger.warning("%s/%s failed: %s", family.name, spec.name, message)
        return MethodFailure(method=spec.name, label=spec.label, kind=kind, message=message)

    def compare(self, family: str | Family, prompt: str, methods: list[str] | None = None, **kwargs) -> Comparison:
        family = get_family(family)
        outcomes = list(self.iter_compare(family, prompt, methods, **kwargs))
        return self.comparison(family, prompt, outcomes, negative_prompt=kwargs.get("negative_prompt", ""),
                               seed=kwargs.get("seed", 0))

    def comparison(self, family: str | Family, prompt: str, outcomes: list[MethodResult | MethodFailure], *,
                   negative_prompt: str = "", seed: int = 0, source=None, mask=None,
                   strength: float | None = None) -> Comparison:
        """Gather what `iter_compare` (or, with `source`, `iter_refine`) yielded into a Comparison with the cache
        report for the methods that ran."""
        family = get_family(family)
        results = [r for r in outcomes if isinstance(r, MethodResult)]
        failures = [r for r in outcomes if isinstance(r, MethodFailure)]
        users = [f"{family.name}/{r.method}" for r in results]
        return Comparison(family=family.name, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                          device=self.device, dtype=self.dtype_name, results=results,
                          cache=self.cache.report(users), failures=failures, reference=family.reference,
                          strength=strength, source=source, mask=mask)

    # 5. Refine an image (image-to-image, inpainting) ---------------------------------------------------------
    def refine(self, family: str | Family, method: str, image, prompt: str, *, mask=None,
               strength: float | None = None, steps: int | None = None, guidance: float | None = None,
               negative_prompt: str = "", seed: int = 0, keep_outside: bool = False, resize: bool = False,
               on_step: OnStep | None = None, stop: threading.Event | None = None,
               on_preview: OnPreview | None = None) -> MethodResult:
        """Refine `image` (PIL, RGB) with one method: image-to-image, or inpainting where `mask` (PIL, mode L,
        white = repaint) is given, over the same cached modules as text-to-image. strength/steps/guidance None:
        the method's refine defaults (its model card's). `keep_outside` pastes the source back outside the mask;
        `resize` fits image and mask to the method's native size first (nothing is resized otherwise). Raises
        ValueError on bad input, NotAvailable where diffusers has no pipeline for the method and mode,
        MissingWeightsError, or RunStopped."""
        family = get_family(family)
        spec = family.method(method)
        recipe, source, mask, strength, steps, guidance = self._refine_args(
            family, spec, image, mask, strength, steps, guidance, keep_outside, resize)
        check_int("seed", seed, 0, MAX_SEED)
        check_text("prompt", prompt, required=True)
        check_text("negative_prompt", negative_prompt, required=False)
        spec = spec.at_steps(steps)
        inputs = dict(image=source, strength=strength)
        if mask is not None:  # the inpaint pipelines otherwise draw at the UNet's sample size, resizing the source
            inputs.update(mask_image=mask, width=source.width, height=source.height)
        args = dict(spec=spec, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                    guidance=guidance, **inputs)
        pipe, out, timings, loop_steps, flagged, load_seconds = self._execute(
            family, spec, recipe.pipeline, args, (family.name, spec.name, recipe.mode, *source.size), steps,
            on_step, stop, on_preview=on_preview)
        outside = None
        if mask is not None:
            if keep_outside:  # a 4-channel UNet blends in latent space: the VAE round trip moves the outside
                out = pipe.image_processor.apply_overlay(mask, source, out)
            outside = {**outside_change(source, out, mask), "kept": keep_outside}
        return self._result(spec, pipe, out, timings, loop_steps, flagged, load_seconds, prompt=prompt,
                            negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance,
                            width=source.width, height=source.height,
                            refine=dict(pipeline=recipe.pipeline, strength=strength, mask=mask is not None,
                                        keep_outside=keep_outside, resize=source.size if resize else None),
                            mode=recipe.mode, strength=strength, outside_change=outside)

    @staticmethod
    def _refine_args(family: Family, spec: MethodSpec, image, mask, strength, steps, guidance, keep_outside, resize):
        """A refine's inputs, checked for one method: (recipe, source, mask, strength, steps, guidance), the source
        and mask fitted to the method when `resize`. Raises NotAvailable or RequestError."""
        from PIL import Image

        mode = "img2img" if mask is None else "inpaint"
        recipe = spec.refine_recipe(mode)
        if recipe is None:
            raise NotAvailable(f"{MODE_LABELS[mode]} is not available for this method: diffusers has no {mode} "
                               f"pipeline for {spec.label} ({spec.pipeline})")
        check_flag("keep_outside", keep_outside)
        if check_flag("resize", resize) and isinstance(image, Image.Image):
            image = fit(image, spec.native_size)
            if isinstance(mask, Image.Image):
                mask = fit(mask, spec.native_size, Image.NEAREST)
        source = check_image("image", image)
        if mask is not None:
            mask = check_mask(mask, source.size)
        strength = recipe.strength if strength is None else check_strength(strength)
        steps = check_steps(spec, recipe.steps if steps is None else steps)
        guidance = check_guidance(spec, recipe.guidance if guidance is None else guidance)
        check_refine_steps(spec, recipe, steps, strength)
        return recipe, source, mask, strength, steps, guidance

    @classmethod
    def check_refine(cls, family: Family, methods: list[str], image, mask=None, strength=None, steps=None,
                     guidance=None, keep_outside=False, resize=False) -> dict[str, NotAvailable]:
        """Check a refine's inputs for each of `methods` (steps / guidance: {method: value}) without running
        anything: raises RequestError on the first bad one; returns the methods that cannot refine in this mode,
        with why."""
        unavailable = {}
        for name in methods:
            try:
                cls._refine_args(family, family.method(name), image, mask, strength, (steps or {}).get(name),
                                 (guidance or {}).get(name), keep_outside, resize)
            except NotAvailable as error:
                unavailable[name] = error
        return unavailable

    def iter_refine(self, family: str | Family, image, prompt: str, methods: list[str] | None = None, *,
                    mask=None, strength: float | None = None, steps: dict[str, int] | None = None,
                    guidance: dict[str, float] | None = None, negative_prompt: str = "", seed: int = 0,
                    keep_outside: bool = False, resize: bool = False, on_step: OnStep | None = None,
                    stop: threading.Event | None = None,
                    on_preview: OnPreview | None = None) -> Iterator[MethodResult | MethodFailure]:
        """Refine one image with `methods` (default: the family's shown ones) on one prompt, seed and strength
        (None: each method's default); yield each result as it is ready, as iter_compare does. Every argument
        is checked for every method before the first run starts; a method with no pipeline for the mode yields
        a "not-available" MethodFailure, as does any panel that fails."""
        family = get_family(family)
        methods = check_methods(family, methods)
        steps = check_per_method("steps", steps, family, methods)
        guidance = check_per_method("guidance", guidance, family, methods)
        check_int("seed", seed, 0, MAX_SEED)
        check_text("prompt", prompt, required=True)
        check_text("negative_prompt", negative_prompt, required=False)
        unavailable = self.check_refine(family, methods, image, mask, strength, steps, guidance, keep_outside, resize)
        for name in methods:
            spec = family.method(name)
            try:
                if name in unavailable:
                    raise unavailable[name]
                outcome = self.refine(family, name, image, prompt, mask=mask, strength=strength,
                                      steps=steps.get(name), guidance=guidance.get(name),
                                      negative_prompt=negative_prompt, seed=seed, keep_outside=keep_outside,
                                      resize=resize, on_step=on_step, stop=stop, on_preview=on_preview)
            except RunStopped:
                raise
            except Exception as error:
                outcome = self._failure(family, spec, error, *image.size)
            yield outcome

    def refine_compare(self, family: str | Family, image, prompt: str, methods: list[str] | None = None,
                       **kwargs) -> Comparison:
        """`iter_refine` gathered into a Comparison (mode, strength, the source and mask, as results.json says)."""
        family = get_family(family)
        outcomes = list(self.iter_refine(family, image, prompt, methods, **kwargs))
        return self.comparison(family, prompt, outcomes, negative_prompt=kwargs.get("negative_prompt", ""),
                               seed=kwargs.get("seed", 0), source=image, mask=kwargs.get("mask"),
                               strength=kwargs.get("strength"))


def outside_change(source, image, mask) -> dict:
    """How far the pixels outside the mask (< 128) moved from the source: mean and max absolute difference per
    channel, in 0-255 units."""
    import numpy as np

    outside = np.asarray(mask) < 128
    if not outside.any():
        return {"mean": 0.0, "max": 0}
    diff = np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - np.asarray(source, dtype=np.int16))[outside]
    return {"mean": round(float(diff.mean()), 3), "max": int(diff.max())}
