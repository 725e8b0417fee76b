"""The request schema: every field a caller sends, typed and checked once, before any work is queued.

    from fastgen.request import CompareRequest
    request = CompareRequest.parse({"prompt": "a red circle", "seed": 0, "methods": ["turbo"]}, family="mini")

The page, the `compare` API and the CLI all build a `CompareRequest`; the engine runs the same checks on its
own arguments, so a library caller gets the same messages. The rule is one for every field: a value of the
wrong type is an error, never coerced (a float seed, a bool width, a list prompt, a string step count). A
bad value raises `RequestError`, a `ValueError` whose message names the field and what is allowed, and whose
`field` attribute says which input it was.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastgen.registry import Family, MethodSpec, RefineRecipe, StyleLora, as_folder, get_family

MAX_PROMPT_CHARS = 2000  # the text encoders read 77 tokens (a few hundred characters); this only stops abuse
MAX_SIZE = 2048  # pixels per side: past this SDXL on a 24 GB card runs out of memory, and no method was trained there
MIN_SIZE = 64
MAX_SEED = 2**32 - 1  # torch.Generator.manual_seed accepts any int, but the UI and results.json promise this range
FIELDS = ("prompt", "seed", "negative_prompt", "methods", "width", "height", "family", "steps", "guidance", "base",
          "loras")
# A refine request: an image (and optional mask) as files, and these fields (as compare's, with no size: the
# image sets it).
REFINE_FIELDS = ("prompt", "seed", "negative_prompt", "methods", "family", "steps", "guidance", "strength",
                 "keep_outside", "resize")
# One live frame: one method, its steps (None: its live default), and for a sketch the strength.
LIVE_FIELDS = ("prompt", "seed", "method", "family", "steps", "strength")


class RequestError(ValueError):
    """Bad input: `field` names the request field, the message says what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def shown(value, limit: int = 40) -> str:
    """A value as it goes into a message or a log line: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _visible(ch: str) -> bool:
    """Not white space, a control or an invisible format character (zero-width space, direction marks)."""
    return not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- one check per kind of field ---------------------------------------------------------------------------

def check_int(name: str, value, low: int, high: int, what: str = "") -> int:
    if not _is_int(value) or not low <= value <= high:
        raise RequestError(name, f"`{name}` must be an integer in [{low}, {high}]{what}, got {shown(value)}")
    return value


def check_text(name: str, value, *, required: bool) -> str:
    """A prompt: a string of at most MAX_PROMPT_CHARS characters, valid Unicode, not blank when required."""
    if not isinstance(value, str):
        raise RequestError(name, f"`{name}` must be a string, got {type(value).__name__} {shown(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(name, f"`{name}` must be at most {MAX_PROMPT_CHARS} characters, got {len(value)} "
                                 "(the text encoders read the first 77 tokens)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(name, f"`{name}` must be valid Unicode text, got a lone surrogate") from None
    if "\x00" in value:
        raise RequestError(name, f"`{name}` must not contain NUL characters")
    if required and not any(_visible(ch) for ch in value):
        raise RequestError(name, f"`{name}` must not be empty, got {shown(value)}")
    return value


def check_size(name: str, value) -> int:
    if not _is_int(value) or value % 8 or not MIN_SIZE <= value <= MAX_SIZE:
        raise RequestError(name, f"`{name}` must be a multiple of 8 in [{MIN_SIZE}, {MAX_SIZE}], got {shown(value)}")
    return value


def check_sizes(family: Family, methods, width, height) -> None:
    """Every method can run at the asked size (None: each method's native size)."""
    for name in methods:
        spec = family.method(name)
        check_size("width", spec.native_size if width is None else width)
        check_size("height", spec.native_size if height is None else height)


def check_steps(spec: MethodSpec, steps) -> int:
    if spec.step_files and (not _is_int(steps) or steps not in spec.allowed_steps):
        # one file per step count: only those counts exist
        raise RequestError("steps", f"`steps` must be one of {spec.allowed_steps} for {spec.name} (one model file "
                                    f"each), got {shown(steps)}")
    return check_int("steps", steps, spec.min_steps, spec.max_steps, f" for {spec.name}")


def check_guidance(spec: MethodSpec, guidance) -> float:
    if not _is_number(guidance) or not spec.min_guidance <= guidance <= spec.max_guidance:
        raise RequestError("guidance", f"`guidance` must be in [{spec.min_guidance:g}, "
                                       f"{spec.max_guidance:g}] for {spec.name}, got {shown(guidance)}")
    return float(guidance)


def check_family(value) -> Family:
    if isinstance(value, Family):
        return value
    if not isinstance(value, str):
        raise RequestError("family", f"`family` must be a string, got {shown(value)}")
    try:
        return get_family(value)
    except ValueError as error:
        raise RequestError("family", str(error).replace(repr(value), shown(value))) from None


def check_methods(family: Family, methods) -> list[str]:
    """None: the family's default methods (its `shown` ones), in panel order. Otherwise a non-empty list of
    distinct names."""
    if methods is None:
        return list(family.default_methods)
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
        raise RequestError("methods", f"`methods` must be a list of method names from {family.method_names}, "
                                      f"got {shown(methods)}")
    if not methods:
        raise RequestError("methods", f"`methods` must name at least one of {family.method_names}, got an empty list")
    for name in methods:
        if name not in family.method_names:
            raise RequestError("methods", f"`methods` must be chosen from {family.method_names} for family "
                                          f"{family.name!r}, got {shown(name)}")
    if len(set(methods)) != len(methods):
        raise RequestError("methods", f"`methods` must not repeat a method, got {shown(list(methods), 80)}")
    return list(methods)


def check_per_method(name: str, value, family: Family, methods: list[str]) -> dict:
    """`steps` or `guidance`: None, or {method: value} for methods that run; each value checked for its method."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise RequestError(name, f"`{name}` must be a dict of method -> value, got {shown(value)}")
    unknown = [m for m in value if m not in methods]
    if unknown:
        raise RequestError(name, f"`{name}` names methods that are not run: {shown(unknown)}; methods run: {methods}")
    check = check_steps if name == "steps" else check_guidance
    return {m: check(family.method(m), v) for m, v in value.items()}


MAX_LORAS = 4  # style LoRAs stacked on one run
PUBLIC = {"bind": True}  # whether the server answers beyond this machine (app.launch sets it from its host)


def custom_switch(env: Mapping[str, str] | None = None) -> tuple[bool, tuple[str, ...]]:
    """The host's switch for visitors' models and LoRAs, read from `env` (default: this process's environment):
    (FASTGEN_ALLOW_CUSTOM=1: any Hub id, the repo ids listed in FASTGEN_CUSTOM_ALLOW=a/b,c/d, in their order)."""
    env = os.environ if env is None else env
    allow_all = env.get("FASTGEN_ALLOW_CUSTOM", "").strip().lower() in ("1", "true", "yes")
    allowlist = tuple(dict.fromkeys(r.strip() for r in env.get("FASTGEN_CUSTOM_ALLOW", "").split(",") if r.strip()))
    return allow_all, allowlist


def custom_refusal(repo: str) -> str | None:
    """Why a request from a visitor may not load `repo` (a custom model or LoRA), or None when it may. A server
    loads none unless its host opts in: FASTGEN_ALLOW_CUSTOM=1 for any Hub id, or FASTGEN_CUSTOM_ALLOW=a/b,c/d
    for those alone; a local folder only with FASTGEN_ALLOW_CUSTOM=1 on a server bound to this machine."""
    allow_all, allowlist = custom_switch()
    if as_folder(repo) is not None:
        if allow_all and not PUBLIC["bind"]:
            return None
        return "local folders are not offered by this server (only with FASTGEN_ALLOW_CUSTOM=1 on 127.0.0.1)"
    from fastgen.single_file import hub_file

    remote = hub_file(repo)  # owner/repo/model.safetensors: the repo's place on the allowlist covers its files
    if allow_all or repo in allowlist or (remote is not None and remote[0] in allowlist):
        return None
    if allowlist:
        return f"{repo} is not on this server's list of custom models (FASTGEN_CUSTOM_ALLOW)"
    return "custom models and LoRAs are off on this server; its host turns them on with FASTGEN_ALLOW_CUSTOM=1"


def check_loras(value) -> tuple:
    """Style LoRAs as StyleLora: each given as one, or as {"repo", "weight_name", "scale" (default 1)}."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise RequestError("loras", f"`loras` must be a list of {{repo, weight_name, scale}}, got {shown(value)}")
    if len(value) > MAX_LORAS:
        raise RequestError("loras", f"`loras` holds at most {MAX_LORAS} LoRAs, got {len(value)}")
    styles = []
    for item in value:
        if isinstance(item, StyleLora):
            styles.append(item)
            continue
        if not isinstance(item, Mapping) or set(item) - {"repo", "weight_name", "scale"}:
            raise RequestError("loras", f"`loras` items are {{repo, weight_name, scale}}, got {shown(item)}")
        repo = check_text("loras", item.get("repo"), required=True)
        weight_name = check_text("loras", item.get("weight_name"), required=True)
        scale = item.get("scale", 1.0)
        if not _is_number(scale) or not -2 <= scale <= 2:
            raise RequestError("loras", f"`loras` scales must be numbers in [-2, 2], got {shown(scale)}")
        if "/" in weight_name.replace("\\", "/") or weight_name.startswith("."):
            raise RequestError("loras", f"`loras` weight_name is a file name in the repo, got {shown(weight_name)}")
        styles.append(StyleLora(repo.strip(), weight_name.strip(), float(scale)))
    return tuple(styles)


def check_strength(value) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise RequestError("strength", f"`strength` must be a number in (0, 1] (the share of the schedule redone), "
                                       f"got {shown(value)}")
    return float(value)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise RequestError(name, f"`{name}` must be true or false, got {shown(value)}")
    return value


def check_image(name: str, image):
    """A source image: a PIL image in RGB whose sides are multiples of 8 within the size limits."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise RequestError(name, f"`{name}` must be an image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise RequestError(name, f"`{name}` must be an RGB image, got mode {image.mode} (convert it first)")
    for side, value in zip(("width", "height"), image.size):
        if value % 8 or not MIN_SIZE <= value <= MAX_SIZE:
            raise RequestError(name, f"`{name}` {side} must be a multiple of 8 in [{MIN_SIZE}, {MAX_SIZE}], got "
                                     f"{image.width}x{image.height}: resize it (the CLI's --resize, the page's "
                                     "\"resize to the method's size\")")
    return image


def check_mask(mask, size: tuple[int, int]):
    """An inpainting mask: single channel (mode L), the source's size, white (>= 128) where to repaint, and
    something to repaint."""
    from PIL import Image

    if not isinstance(mask, Image.Image):
        raise RequestError("mask", f"`mask` must be an image, got {type(mask).__name__}")
    if mask.mode != "L":
        raise RequestError("mask", f"`mask` must be single-channel (mode L, white = repaint), got mode {mask.mode}")
    if mask.size != tuple(size):
        raise RequestError("mask", f"`mask` must be the image's size {size[0]}x{size[1]}, got "
                                   f"{mask.width}x{mask.height}")
    if mask.getextrema()[1] < 128:
        raise RequestError("mask", "`mask` is empty: paint the region to repaint in white")
    return mask


def check_refine_steps(spec: MethodSpec, recipe: RefineRecipe, steps: int, strength: float) -> int:
    """At least one denoising step runs. The schedule-cutting pipelines run int(steps * strength) of `steps`
    (0 crashes diffusers: #11092); LCM's own img2img spreads `steps` over the first strength x 50 of its
    original schedule, so it needs that many."""
    if recipe.spreads_steps:
        if int(50 * strength) < steps:
            raise RequestError("strength", f"`strength` {strength:g} leaves {int(50 * strength)} of {spec.label}'s 50 "
                                           f"original steps, fewer than the {steps} asked: raise it to at least "
                                           f"{steps / 50:g}")
        return steps
    if recipe.denoising_steps(steps, strength) >= 1:
        return steps
    fewest = next((n for n in spec.allowed_steps if int(n * strength) >= 1), None)
    if fewest is None:
        lowest = min(v / 100 for v in range(1, 101) if int(spec.max_steps * v / 100) >= 1)
        raise RequestError("strength", f"`strength` {strength:g} runs no denoising step with {spec.label} (it runs "
                                       f"int(steps x strength) steps, at most {spec.max_steps} steps): use a "
                                       f"strength of at least {lowest:g}")
    raise RequestError("steps", f"`steps` {steps} at strength {strength:g} runs int({steps} x {strength:g}) = 0 "
                                f"denoising steps with {spec.label}: use at least {fewest} steps at this strength")


def fit(image, size: int, resample=None):
    """`image` resized for a method trained at `size` x `size`: the longer side becomes `size`, the other keeps the
    aspect ratio, both rounded to multiples of 8 (LANCZOS; pass Image.NEAREST for a mask). The explicit resize
    that the CLI's --resize and the page offer; nothing resizes silently."""
    from PIL import Image

    scale = size / max(image.size)
    width, height = (max(MIN_SIZE, round(side * scale / 8) * 8) for side in image.size)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.LANCZOS if resample is None else resample)


def parse_size(value: str | None) -> tuple[int | None, int | None]:
    """The page's and the CLI's size text: "native" (or nothing) -> (None, None); "512x768" -> (512, 768). The
    numbers are checked with the rest of the request."""
    if value is None or value == "" or value == "native":
        return None, None
    parts = value.lower().split("x") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise RequestError("width", f"`size` must be native or WIDTHxHEIGHT (like 512x512), got {shown(value)}")
    return int(parts[0]), int(parts[1])


# --- the request ---------------------------------------------------------------------------------------------

def _head(data: Mapping, fields: tuple[str, ...], family) -> tuple:
    """What every request starts with, checked in the order the APIs list it: (family, prompt, seed). `fields`
    are the request's own; any other key is refused."""
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise RequestError(str(unknown[0]), f"unknown field {shown(unknown[0])}; fields are {fields}")
    chosen = data.get("family")
    fam = check_family(family if chosen is None or chosen == "" else chosen)
    prompt = check_text("prompt", data.get("prompt"), required=True)
    return fam, prompt, check_int("seed", data.get("seed", 0), 0, MAX_SEED)


def _shared_fields(data: Mapping, fields: tuple[str, ...], family) -> tuple:
    """A comparison's or a refine's common fields: (family, prompt, seed, negative prompt, methods)."""
    fam, prompt, seed = _head(data, fields, family)
    negative = data.get("negative_prompt")
    negative = "" if negative is None else check_text("negative_prompt", negative, required=False)
    return fam, prompt, seed, negative, check_methods(fam, data.get("methods"))


@dataclass(frozen=True)
class CompareRequest:
    """One comparison: a prompt and seed for `methods` of `family`. width/height None: each method's native size;
    `steps` / `guidance`: per-method values off the defaults."""

    family: Family
    prompt: str
    methods: tuple[str, ...]
    negative_prompt: str = ""
    seed: int = 0
    width: int | None = None
    height: int | None = None
    steps: dict[str, int] = field(default_factory=dict)
    guidance: dict[str, float] = field(default_factory=dict)
    loras: tuple[StyleLora, ...] = ()

    @classmethod
    def parse(cls, data: Mapping, family: str | Family | None = None, trusted: bool = False) -> CompareRequest:
        """Check a request's fields (as sent: JSON values) in the order the API lists them. `family` is the
        default for a request that names none. Missing fields take their defaults; None means "not given"
        for the optional ones (negative_prompt, methods, width, height, family, steps, guidance, base, loras).
        `base`: a custom checkpoint (Hub id or folder) whose family (its reference and LCM-LoRA) replaces
        `family`; `loras`: style LoRAs. Both only when `trusted` (the CLI, the library) or the host allows them
        (custom_refusal)."""
        data = dict(data)
        loras = check_loras(data.pop("loras", None))
        base = data.pop("base", None)
        for name, repo in [("base", base)] * (base is not None) + [("loras", lora.repo) for lora in loras]:
            if name == "base" and (not isinstance(repo, str) or not repo.strip()):
                raise RequestError("base", f"`base` must be a Hub id or a folder, got {shown(repo)}")
            why = None if trusted else custom_refusal(repo.strip())
            if why:
                raise RequestError(name, f"`{name}` refused: {why}")
        if base is not None:
            family = custom_base(base.strip())
            data.pop("family", None)
        fam, prompt, seed, negative, methods = _shared_fields(data, FIELDS, family)
        sizes = {}
        for name in ("width", "height"):
            value = data.get(name)
            if value is None or (_is_int(value) and value == 0):  # 0: the API's "native" (a Number's default)
                sizes[name] = None
                continue
            sizes[name] = check_size(name, value)
        check_sizes(fam, methods, sizes["width"], sizes["height"])
        steps = check_per_method("steps", data.get("steps"), fam, methods)
        guidance = check_per_method("guidance", data.get("guidance"), fam, methods)
        return cls(fam, prompt, tuple(methods), negative, seed, sizes["width"], sizes["height"], steps, guidance,
                   loras)

    def engine_kwargs(self) -> dict:
        """Keyword arguments for Engine.compare / iter_compare after (family, prompt, methods)."""
        return dict(negative_prompt=self.negative_prompt, seed=self.seed, width=self.width, height=self.height,
                    steps=dict(self.steps) or None, guidance=dict(self.guidance) or None,
                    **({"loras": self.loras} if self.loras else {}))


def custom_base(base: str) -> Family:
    """The family of a custom checkpoint: its reference and LCM-LoRA, the architecture read from its
    model_index.json (on disk, or that one small file fetched from the Hub). A single .safetensors (a path, or
    owner/repo/file.safetensors on the Hub) is converted once into a diffusers folder (fastgen.single_file)."""
    from fastgen import hub, single_file
    from fastgen.registry import custom_family

    if single_file.is_single_file(base):  # one .safetensors: converted once into a diffusers folder
        try:
            path = single_file.locate(base)
            arch = single_file.architecture(path)
            folder = single_file.converted(path, arch)
        except ValueError as error:
            raise RequestError("base", str(error)) from None
        return custom_family(str(folder), arch=arch, name=f"{arch}:{base}", label=path.name)
    base = as_folder(base) or base
    folder = hub.local_folder(base)
    index = folder / "model_index.json" if folder is not None else None
    if index is None or not index.is_file():
        if hub.is_local(base):
            raise RequestError("base", f"{shown(base)} is not a diffusers folder (no model_index.json)")
        try:
            from huggingface_hub import hf_hub_download

            from fastgen import fetch

            index = Path(hf_hub_download(base, "model_index.json", cache_dir=hub.cache_dir(), endpoint=fetch.endpoint(),
                                         etag_timeout=fetch.LIST_TIMEOUT))
        except Exception as error:  # offline, no such repo, gated
            raise RequestError("base", f"cannot read {shown(base)}'s model_index.json: {error}") from None
    pipeline = hub.read_json(index).get("_class_name", "")
    arch = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd15"}.get(pipeline)
    if arch is None:
        raise RequestError("base", f"{shown(base)} is a {pipeline or 'pipeline of unknown kind'}; custom models "
                                   "are SDXL or SD 1.5 checkpoints")
    return custom_family(base, arch=arch)


@dataclass(frozen=True)
class RefineRequest:
    """Refine one image with `methods` of `family`: img2img, or inpaint when a mask is given. `strength` None:
    each method's default for the mode; `steps` / `guidance`: per-method values off the refine defaults."""

    family: Family
    prompt: str
    methods: tuple[str, ...]
    negative_prompt: str = ""
    seed: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    guidance: dict[str, float] = field(default_factory=dict)
    strength: float | None = None
    keep_outside: bool = False
    resize: bool = False

    @classmethod
    def parse(cls, data: Mapping, family: str | Family | None = None) -> RefineRequest:
        """Check a refine request's fields (REFINE_FIELDS, as JSON values); the image and mask are checked by
        the engine, which knows each method's size."""
        fam, prompt, seed, negative, methods = _shared_fields(data, REFINE_FIELDS, family)
        steps = check_per_method("steps", data.get("steps"), fam, methods)
        guidance = check_per_method("guidance", data.get("guidance"), fam, methods)
        strength = data.get("strength")
        strength = None if strength is None else check_strength(strength)
        flags = {name: check_flag(name, data.get(name, False)) for name in ("keep_outside", "resize")}
        return cls(fam, prompt, tuple(methods), negative, seed, steps, guidance, strength, **flags)

    def engine_kwargs(self) -> dict:
        """Keyword arguments for Engine.refine_compare / iter_refine after (family, image, prompt, methods)."""
        return dict(negative_prompt=self.negative_prompt, seed=self.seed, steps=dict(self.steps) or None,
                    guidance=dict(self.guidance) or None, strength=self.strength, keep_outside=self.keep_outside,
                    resize=self.resize)



def live_steps(spec: MethodSpec, strength: float | None = None) -> int:
    """A method's steps for a live frame: one where it was distilled for one step, else the fewest of 2 or more it
    allows (LCM, LCM-LoRA at 2); for a sketch (`strength`), raised to the fewest that run a denoising step."""
    wanted = 1 if spec.steps == 1 else 2
    counts = [n for n in spec.allowed_steps if n >= wanted] or [spec.max_steps]
    if strength is not None:
        recipe = spec.refine_recipe("img2img")
        if recipe is not None and not recipe.spreads_steps:
            counts = [n for n in counts if int(n * strength) >= 1] or [spec.max_steps]
    return counts[0]


@dataclass(frozen=True)
class LiveRequest:
    """One live frame: `method` of `family` on a prompt and seed; with a sketch, image-to-image at `strength`."""

    family: Family
    prompt: str
    method: str
    seed: int = 0
    steps: int | None = None
    strength: float = 0.7

    @classmethod
    def parse(cls, data: Mapping, family: str | Family | None = None) -> LiveRequest:
        fam, prompt, seed = _head(data, LIVE_FIELDS, family)
        method = data.get("method")
        if method is None:
            method = fam.default_methods[0]
        check_methods(fam, [method])
        steps = data.get("steps")
        steps = None if steps is None else check_steps(fam.method(method), steps)
        strength = data.get("strength")
        strength = 0.7 if strength is None else check_strength(strength)
        return cls(fam, prompt, method, seed, steps, strength)
