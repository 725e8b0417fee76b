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
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastgen.registry import Family, MethodSpec, get_family

MAX_PROMPT_CHARS = 2000  # the text encoders read 77 tokens (a few hundred characters); this only stops abuse
MAX_SIZE = 2048  # pixels per side: past this SDXL on a 24 GB card runs out of memory, and no method was trained there
MIN_SIZE = 64
MAX_SEED = 2**32 - 1  # torch.Generator.manual_seed accepts any int, but the UI and results.json promise this range
FIELDS = ("prompt", "seed", "negative_prompt", "methods", "width", "height", "family", "steps", "guidance")


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

    @classmethod
    def parse(cls, data: Mapping, family: str | Family | None = None) -> CompareRequest:
        """Check a request's fields (as sent: JSON values) in the order the API lists them. `family` is the
        default for a request that names none. Missing fields take their defaults; None means "not given"
        for the optional ones (negative_prompt, methods, width, height, family, steps, guidance)."""
        unknown = [k for k in data if k not in FIELDS]
        if unknown:
            raise RequestError(str(unknown[0]), f"unknown field {shown(unknown[0])}; fields are {FIELDS}")
        chosen = data.get("family")
        fam = check_family(family if chosen is None or chosen == "" else chosen)
        prompt = check_text("prompt", data.get("prompt"), required=True)
        seed = check_int("seed", data.get("seed", 0), 0, MAX_SEED)
        negative = data.get("negative_prompt")
        negative = "" if negative is None else check_text("negative_prompt", negative, required=False)
        methods = check_methods(fam, data.get("methods"))
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
        return cls(fam, prompt, tuple(methods), negative, seed, sizes["width"], sizes["height"], steps, guidance)

    def engine_kwargs(self) -> dict:
        """Keyword arguments for Engine.compare / iter_compare after (family, prompt, methods)."""
        return dict(negative_prompt=self.negative_prompt, seed=self.seed, width=self.width, height=self.height,
                    steps=dict(self.steps) or None, guidance=dict(self.guidance) or None)
