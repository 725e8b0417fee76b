"""What the web demo shows, computed without Gradio: run order, captions, progress, exports.

    from fastgen.present import Board, stream
    board = Board.start("mini", ["turbo", "baseline"], steps={...}, guidance={...})
    for event in stream(lambda on_step, stop: engine.iter_compare(..., on_step=on_step, stop=stop)):
        board.apply(event)

app.py lays out the page and wires events; everything it displays about a run is decided here, so it
can be tested without a server. Nothing here imports gradio or holds a model.
"""

from __future__ import annotations

import hashlib
import html
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from fastgen.registry import get_family
from fastgen.results import MethodFailure



def panel_slots() -> tuple[str, ...]:
    """Every method of every registered family, once, in layout order: the page makes one panel per slot and
    shows a family's own. Read from the registry when the page is built, so a method added there is a panel."""
    from fastgen.registry import FAMILIES

    fast = [m for f in FAMILIES.values() for m in f.panel_order if m != f.reference]
    references = [f.reference for f in FAMILIES.values() if f.reference]
    return tuple(dict.fromkeys(fast + [r for r in references if r not in fast]))

NATIVE = "native"


# ---------------------------------------------------------------------------------------------------
# Per-method facts the panels state.


def cfg_on(spec, guidance: float) -> bool:
    """Classifier-free guidance runs (a second UNet pass per step) only for `cfg` methods above 1."""
    return spec.cfg_at(guidance)


def fixed_guidance(spec) -> bool:
    return spec.min_guidance == spec.max_guidance


def guidance_info(spec) -> str:
    """The line under a panel's guidance slider: what the number does for this method."""
    if fixed_guidance(spec):
        return f"Fixed at {spec.guidance:g}: this model was distilled to sample without classifier-free guidance."
    if spec.guidance_mode == "embedding":
        return "Fed to the UNet as an embedding: one pass per step, no CFG cost."
    return "Above 1 turns on classifier-free guidance, which doubles the cost of each step."


def negative_prompt_note(spec, guidance: float) -> str:
    """Why this method ignores the negative prompt at this guidance, or "" when it uses it."""
    why = spec.negative_prompt_ignored(guidance)
    return f"Ignores the negative prompt: {why}." if why else ""


def licence_note(spec) -> str:
    return f"Licence: {spec.licence}" if spec.licence else ""


def panel_note(spec, guidance: float) -> str:
    """The small print under a panel's sliders: negative-prompt use and the licence."""
    return "\n\n".join(n for n in (negative_prompt_note(spec, guidance), licence_note(spec)) if n)


def unet_passes(spec, steps: int, guidance: float) -> int:
    """A cost estimate for ordering panels: UNet evaluations, doubled under CFG."""
    return steps * (2 if cfg_on(spec, guidance) else 1)


def run_order(family: str, methods: Iterable[str], steps: dict, guidance: dict) -> list[str]:
    """Fastest first by UNet passes (ties keep the layout order); the reference always last,
    because every other panel's speed-up is measured against it."""
    fam = get_family(family)
    chosen = [m for m in panel_methods(family) if m in set(methods)]
    others = [m for m in chosen if m != fam.reference]
    others.sort(key=lambda m: unet_passes(fam.method(m), steps[m], guidance[m]))
    return others + ([fam.reference] if fam.reference in chosen else [])


def panel_methods(family: str) -> list[str]:
    """The family's methods in layout order: the registry's, the reference last."""
    return list(get_family(family).panel_order)


# ---------------------------------------------------------------------------------------------------
# Sizes.


def size_choices(family: str) -> list[tuple[str, str]]:
    """(label, value) pairs for the size control: each method's own size, or one square size for all."""
    fam = get_family(family)
    natives = sorted({m.native_size for m in fam.methods})
    native_label = "Native (" + ", ".join(f"{n}²" for n in natives) + ")"
    squares = sorted({*natives, *(s for s in (512, 768, 1024) if s <= max(natives))})
    return [(native_label, NATIVE)] + [(f"{s}×{s} for all", f"{s}x{s}") for s in squares]


# ---------------------------------------------------------------------------------------------------
# Streaming a run out of the engine's callbacks.


@dataclass(frozen=True)
class Step:
    method: str
    step: int
    total: int
    preview: Any = None  # a picture of the latents at this step (Engine's on_preview), when one was made


@dataclass(frozen=True)
class Done:
    result: Any  # fastgen.results.MethodResult, or MethodFailure for a panel that failed


def stream(job: Callable[[Callable, threading.Event], Iterable[Any]], stop: threading.Event | None = None,
           min_interval: float = 0.1) -> Iterator[Step | Done]:
    """Run `job(on_step, stop)` in a worker thread and yield its progress as it happens.

    `job` yields MethodResults (like Engine.iter_compare) and calls `on_step(method, step, total)`, or with a
    fourth argument, the step's preview (pass it as the engine's on_preview too). Step events are coalesced to
    at most one per `min_interval` seconds (a 64x64 run makes hundreds per second), a newer step keeping the
    newest preview; every result is yielded. The worker's exception (RunStopped included) is re-raised here
    after the events before it. If the consumer goes away early, the worker is stopped between steps
    and joined, so the GPU is free when this generator is closed.
    """
    stop = stop or threading.Event()
    events: queue.Queue = queue.Queue()
    end = object()
    failure: list[BaseException] = []

    def work():
        try:
            for result in job(lambda method, step, total, preview=None: events.put(Step(method, step, total, preview)),
                              stop):
                events.put(Done(result))
        except BaseException as exc:  # handed to the consumer, which decides what the user sees
            failure.append(exc)
        finally:
            events.put(end)

    worker = threading.Thread(target=work, name="fastgen-run", daemon=True)
    worker.start()
    finished = False
    try:
        shown_at, held = 0.0, None  # `held`: the newest step not yet shown, waiting for its slot
        while True:
            wait = None if held is None else max(0.0, shown_at + min_interval - time.monotonic())
            try:
                event = events.get(timeout=wait)
            except queue.Empty:
                event, held = held, None
            if event is end:
                finished = True
                break
            if isinstance(event, Step) and time.monotonic() - shown_at < min_interval:
                if event.preview is None and held is not None and held.method == event.method:
                    event = Step(event.method, event.step, event.total, held.preview)  # keep the newest picture
                held = event
                continue
            if isinstance(event, Done) and held is not None and held.method == event.result.method:
                held = None  # the finished result says more than its last step
            if isinstance(event, Step):
                shown_at, held = time.monotonic(), None
            yield event
    finally:
        if not finished:
            stop.set()
        worker.join()
    if failure:
        raise failure[0]


class StopSwitches:
    """One stop flag per browser session, so Stop ends this visitor's run and nobody else's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._switches: dict[str, threading.Event] = {}

    def arm(self, session: str | None) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._switches[session or ""] = event
        return event

    def stop(self, session: str | None) -> bool:
        with self._lock:
            event = self._switches.get(session or "")
        if event is None:
            return False
        event.set()
        return True

    def release(self, session: str | None, event: threading.Event) -> None:
        with self._lock:
            if self._switches.get(session or "") is event:
                del self._switches[session or ""]


# ---------------------------------------------------------------------------------------------------
# The board: what each panel shows during and after a run.


@dataclass
class Panel:
    method: str
    state: str = "idle"  # idle | off | waiting | running | done | stopped | failed
    step: int = 0
    total: int = 0
    result: Any = None
    message: str = ""
    preview: Any = None  # the running step's picture of the latents, until the result replaces it

    @property
    def image(self):
        """What the panel shows: the newest preview while it runs (a rerun's old image until the first one), else
        the result's image."""
        if self.state == "running" and self.preview is not None:
            return self.preview
        return self.result.image if self.result is not None else None


@dataclass(frozen=True)
class RunSettings:
    """What every panel of a run shares; a one-panel rerun reuses the last run's."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    width: int | None = None  # None: each method's native size
    height: int | None = None


@dataclass
class Board:
    """The panels of one run plus the settings they share. `apply` returns the methods whose view changed.
    `picks` is the user's choice for the compare slider, kept across runs while both panels have images."""

    family: str
    settings: RunSettings
    order: list[str]
    panels: dict[str, Panel] = field(default_factory=dict)
    picks: tuple[str | None, str | None] = (None, None)
    sent: dict = field(default_factory=dict, compare=False, repr=False)  # slot -> the images last sent there

    def unsent(self, slot: str, images) -> bool:
        """False when `images` are the very images this board last sent to `slot`; else remember them, True.
        An unchanged slider is not sent again: the browser would fetch both images anew and redraw the slider
        under the visitor's drag. (Images go out as files written once, `page_file`, so a resend rewrites none.)"""
        last = self.sent.get(slot)
        if images is not None and last is not None and len(last) == len(images) and \
                all(a is b for a, b in zip(last, images)):
            return False
        self.sent[slot] = images
        return True

    @classmethod
    def start(cls, family: str, methods: Iterable[str], steps: dict, guidance: dict, previous: "Board | None" = None,
              settings: RunSettings | None = None) -> "Board":
        """A board for a fresh run; when `previous` is given (a one-panel rerun) the other panels keep
        their results."""
        order = run_order(family, methods, steps, guidance)
        panels = {m: Panel(m, state="waiting" if m in order else "off") for m in panel_methods(family)}
        if previous is not None and previous.family == family:
            for m, panel in previous.panels.items():
                if m in panels and m not in order:
                    panels[m] = panel
                elif m in panels:  # a rerun shows the previous image until the new one replaces it
                    panels[m].result = panel.result
            settings = settings or previous.settings
        picks = previous.picks if previous is not None and previous.family == family else (None, None)
        board = cls(family, settings or RunSettings(), order, panels, picks=picks)
        board._start_next()
        return board

    def _start_next(self) -> str | None:
        """Mark the first waiting panel as running (it loads and encodes before its first step)."""
        upcoming = next((m for m in self.order if self.panels[m].state == "waiting"), None)
        if upcoming is not None:
            self.panels[upcoming].state = "running"
        return upcoming

    def apply(self, event: Step | Done) -> list[str]:
        if isinstance(event, Step):
            panel = self.panels[event.method]
            panel.state, panel.step, panel.total = "running", event.step, event.total
            if event.preview is not None:
                panel.preview = event.preview
            return [event.method]
        result = event.result
        panel = self.panels[result.method]
        panel.preview = None
        if isinstance(result, MethodFailure):  # this panel failed; the run goes on with the next
            kept = " (the image is from the previous run)" if panel.result is not None else ""
            panel.state, panel.message = "failed", result.message + kept
            upcoming = self._start_next()
            return [result.method] + ([upcoming] if upcoming else [])
        panel.state, panel.result, panel.step, panel.total = "done", result, result.steps, result.steps
        upcoming = self._start_next()
        # A new reference time changes every panel's speed-up.
        if result.method == get_family(self.family).reference:
            return list(self.panels)
        return [result.method] + ([upcoming] if upcoming else [])

    def fail(self, state: str, message: str) -> list[str]:
        """Mark the panel that was running (or the next waiting one) stopped/failed; later ones stay empty."""
        changed = []
        current = next((m for m in self.order if self.panels[m].state in ("running", "waiting")), None)
        for m in self.order:
            panel = self.panels[m]
            panel.preview = None
            if m == current:
                kept = " (the image is from the previous run)" if panel.result is not None else ""
                panel.state, panel.message = state, message + kept
                changed.append(m)
            elif panel.state in ("waiting", "running"):
                panel.state, panel.message = "idle", ""
                changed.append(m)
        return changed

    def results(self) -> list:
        """Finished results in layout order."""
        return [p.result for p in self.panels.values() if p.result is not None]

    def baseline_seconds(self) -> float | None:
        """The reference panel's time, which every speed-up divides."""
        base = self.panels.get(get_family(self.family).reference or "")
        return base.result.seconds if base is not None and base.result is not None else None

    # -- text -----------------------------------------------------------------------------------------

    def status_html(self, method: str) -> str:
        panel = self.panels[method]
        if panel.state == "running" and panel.total:
            pct = 100 * panel.step / panel.total
            return (f'<div class="fg-status fg-running"><div class="fg-bar"><div style="width:{pct:.0f}%"></div></div>'
                    f"step {panel.step} / {panel.total}</div>")
        text = {
            "idle": "", "off": "Off", "waiting": "Waiting…", "running": "Starting (loading weights on first use)…",
            "done": "", "stopped": panel.message or "Stopped", "failed": panel.message or "Failed",
        }[panel.state]
        return f'<div class="fg-status fg-{panel.state}">{html.escape(text)}</div>' if text else ""

    def caption(self, method: str) -> str:
        panel = self.panels[method]
        if panel.result is None:
            return ""
        return caption(panel.result, self.baseline_seconds(), method == get_family(self.family).reference)


def caption(result, baseline_seconds: float | None, reference: bool = False) -> str:
    """One panel's caption (Markdown): steps, guidance, CFG, time, speed-up, steps/s, then any warnings."""
    parts = [
        f"**{result.steps}** step{'s' if result.steps != 1 else ''}",
        f"guidance **{result.guidance:g}**",
        f"CFG **{'on' if result.cfg else 'off'}**",
        f"**{result.seconds:.2f} s**",
    ]
    if reference:
        parts.append("reference")
    elif baseline_seconds and result.seconds > 0:
        parts.append(f"**{baseline_seconds / result.seconds:.1f}×** faster")
    else:
        parts.append("speed-up: run the baseline")
    if result.steps_per_second and math.isfinite(result.steps_per_second):
        parts.append(f"{result.steps_per_second:.1f} steps/s")
    lines = [" · ".join(parts)]
    if result.load_seconds >= 0.05:  # loading weights (first use) is reported apart, never in the time above
        lines.append(f"<small>first load {result.load_seconds:.1f} s, not counted</small>")
    lines += [f"⚠️ {w}" for w in result.warnings]
    return "\n\n".join(lines)


def compare_pair(board: Board) -> tuple[str | None, str | None]:
    """The pair for the image slider: the user's picks while both are panels of this board (the slider shows
    them once both have images), else the fastest finished panel against the reference."""
    if all(m in board.panels for m in board.picks):
        return board.picks
    done = [m for m in board.order if board.panels[m].result is not None]
    done += [m for m, p in board.panels.items() if p.result is not None and m not in done]
    if not done:
        return None, None
    reference = get_family(board.family).reference
    right = reference if reference in done else done[-1]
    left = next((m for m in done if m != right), right)
    return left, right


def pick(board: Board | None, left: str | None, right: str | None):
    """The user chose a pair for the slider: remember it on the board (later runs keep it) and show it."""
    if board is not None and left and right:
        board.picks = (left, right)
    return compare_images(board, left, right)


def compare_images(board: Board | None, left: str | None, right: str | None):
    """(left image, right image) for the slider, or None until both panels have one."""
    panels = board.panels if board is not None else {}
    images = [panels[m].result.image if m in panels and panels[m].result is not None else None for m in (left, right)]
    return tuple(images) if all(i is not None for i in images) else None


# ---------------------------------------------------------------------------------------------------
# Images on the page: as files named by their content, written once.


def page_file(image, folder: Path) -> str:
    """`image` as a PNG in `folder`, named by its pixels, written once and atomically; the file's path.

    Gradio saves an image sent as pixels to a cache file named by its bytes and writes that file again each time
    the same image is sent, so a browser still fetching the earlier copy gets a truncated image (two outputs, or
    two visitors, showing the same prompt and seed). A path already in its cache is served as it is: here a
    file, once written, is never rewritten, and one that exists is touched, so a cache that ages files by time
    keeps it while it is still being handed out."""
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    digest.update(bytes(image.getpalette() or []))  # a palette image's pixels are indices into it
    path = folder / f"{digest.hexdigest()[:40]}.png"
    try:
        os.utime(path)
        return str(path)
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{path.name}.{uuid.uuid4().hex}"
    try:
        image.save(staging, format="png", compress_level=1)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return str(path)


def page_value(value, folder: Path):
    """An output's value with each image in it (alone, or in a slider's pair) replaced by its `page_file`."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return page_file(value, folder)
    if isinstance(value, tuple) and value and all(isinstance(v, Image.Image) for v in value):
        return tuple(page_file(v, folder) for v in value)
    return value


# ---------------------------------------------------------------------------------------------------
# Exports: the same results.json and grid as `python -m fastgen compare`, so a download reads like the CLI's.


def write_exports(result, directory: Path) -> tuple[Path, Path]:
    """Write the captioned grid (results.json in the PNG's text metadata) and the JSON; return both paths.

    Names are unique per run, so two visitors never get each other's files."""
    stem = f"fastgen-{result.family}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    return result.save(directory, stem=stem, images=False)


def prune(directory: Path, max_age_seconds: float) -> None:
    """Delete exports older than `max_age_seconds`: downloads are made per run and nobody needs old ones."""
    cutoff = time.time() - max_age_seconds
    for path in directory.glob("fastgen-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------
# Refine: a draft, refined by several methods, against the 50-step baseline.


@dataclass(frozen=True)
class Draft:
    """The image a refine starts from: a finished panel's (with its method, time, prompt and seed), or an upload
    (method None)."""

    family: str
    image: Any
    method: str | None = None
    label: str = "Upload"
    seconds: float = 0.0
    prompt: str = ""
    seed: int = 0


def refine_caption(result) -> str:
    """A refine panel's caption (Markdown): strength, the steps that ran, guidance, time, the outside's drift."""
    ran = result.denoising_steps
    parts = [f"strength **{result.strength:g}**",
             f"**{ran}** of {result.steps} step{'s' if result.steps != 1 else ''} run",
             f"guidance **{result.guidance:g}**", f"**{result.seconds:.2f} s**"]
    lines = [" · ".join(parts)]
    change = result.outside_change
    if change is not None:
        kept = "kept" if change["kept"] else f"moved {change['mean']:.1f} on average, {change['max']} at most (0-255)"
        lines.append(f"<small>outside the mask: {kept}</small>")
    if result.load_seconds >= 0.05:
        lines.append(f"<small>first load {result.load_seconds:.1f} s, not counted</small>")
    lines += [f"⚠️ {w}" for w in result.warnings]
    return "\n\n".join(lines)


def tradeoff(draft: Draft | None, board: Board | None, baseline) -> str:
    """The claim in numbers (Markdown): draft + refine seconds for each refined panel, next to the baseline's own
    text-to-image time (`baseline`: its MethodResult from the comparison, or None)."""
    if draft is None or board is None:
        return ""
    done = [p.result for p in board.panels.values() if p.result is not None]
    if not done:
        return ""
    lines = []
    for result in done:
        total = draft.seconds + result.seconds
        lines.append(f"- {draft.label} draft {draft.seconds:.2f} s + {result.label} refine {result.seconds:.2f} s = "
                     f"**{total:.2f} s**")
    if baseline is not None:
        lines.append(f"- {baseline.label} alone, {baseline.steps} steps: **{baseline.seconds:.2f} s**")
    else:
        lines.append("- the baseline's own time: run it in the comparison to see it here")
    return "**Draft + refine vs the baseline**\n\n" + "\n".join(lines)


def refine_pair_choices(draft: Draft | None, board: Board | None, baseline) -> list[tuple[str, str]]:
    """What the refine slider can show: the draft, each refined image, the baseline's text-to-image image."""
    choices = [(f"Draft ({draft.label})", "draft")] if draft is not None else []
    if board is not None:
        choices += [(f"{p.result.label}, refined", m) for m, p in board.panels.items() if p.result is not None]
    if baseline is not None:
        choices.append((f"{baseline.label}, {baseline.steps} steps (text-to-image)", "baseline"))
    return choices


def refine_images(draft: Draft | None, board: Board | None, baseline, left: str | None, right: str | None):
    """(left, right) images for the refine slider, or None until both exist."""
    def image(key):
        if key == "draft":
            return draft.image if draft is not None else None
        if key == "baseline":
            return baseline.image if baseline is not None else None
        panel = board.panels.get(key) if board is not None and key else None
        return panel.result.image if panel is not None and panel.result is not None else None

    images = (image(left), image(right))
    return images if all(i is not None for i in images) else None


# ---------------------------------------------------------------------------------------------------
# Your model: a custom checkpoint and style LoRAs on the methods that run the base model's own UNet.


def style_methods(family) -> list[str]:
    """The family's methods that take style LoRAs (the reference and the adapter methods), in layout order."""
    fam = get_family(family)
    return [m for m in fam.panel_order if fam.method(m).takes_styles]


def style_slots() -> tuple[str, ...]:
    """Every registered method that takes style LoRAs, once, in layout order: the Your model tab's panels."""
    from fastgen.registry import FAMILIES

    return tuple(m for m in panel_slots()
                 if any(m in f.method_names and f.method(m).takes_styles for f in FAMILIES.values()))


def style_caption(board: "Board", method: str) -> str:
    """A Your model panel's caption: the comparison caption, then the LoRAs it ran with (each with its scale)."""
    from fastgen.registry import StyleLora

    text = board.caption(method)
    result = board.panels[method].result
    if result is not None and result.loras:
        text += "\n\nLoRAs: " + ", ".join(html.escape(StyleLora(**lora).label) for lora in result.loras)
    return text


# ---------------------------------------------------------------------------------------------------
# Live: one frame per edit, from the fast methods.


def live_methods(family: str) -> list[str]:
    """The methods a live frame can use: every one but the reference (50 steps is not live), in panel order."""
    fam = get_family(family)
    return [m for m in fam.panel_order if m != fam.reference]


def live_default(family: str) -> list[str]:
    """What the Live tab opens with: the one-step methods (Turbo), else the first fast one."""
    fam = get_family(family)
    one_step = [m for m in live_methods(family) if fam.method(m).steps == 1 and fam.method(m).shown]
    return one_step or live_methods(family)[:1]


def live_caption(result, prompt: str, seed: int) -> str:
    """A live frame's caption (Markdown): the prompt it shows (and the sketch's strength when it refined the
    sketch), its seed, steps, and its generation time as milliseconds per frame and the frame rate that allows."""
    text = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    ms = 1000 * result.seconds
    rate = f" (up to {1000 / ms:.0f} frames/s)" if ms > 0 else ""
    steps = result.denoising_steps or result.steps
    source = f" · from the sketch at strength {result.strength:g}" if result.strength is not None else ""
    return (f"“{html.escape(text)}”{source} · seed {seed} · {steps} step{'s' if steps != 1 else ''} · "
            f"**{ms:.0f} ms** per frame{rate}")


def flatten(image):
    """An RGB image of a drawing: transparent pixels become white (a sketch's empty canvas)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        flat = Image.new("RGBA", image.size, "white")
        flat.alpha_composite(image.convert("RGBA"))
        image = flat
    return image.convert("RGB")
