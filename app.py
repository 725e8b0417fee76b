"""FastGen web demo: fast text-to-image methods side by side with the 50-step baseline (SDXL Turbo, LCM,
LCM-LoRA, and on SDXL also SDXL-Lightning, Hyper-SD and DMD2: whatever the registry lists).

    python app.py                      # http://127.0.0.1:7860, default family for this machine
    python app.py --family sd15 --port 7861
    FASTGEN_FAMILY=mini python app.py

This file lays out the page and wires its events. Model work goes through fastgen.engine; what a panel
shows (captions, progress, run order, exports) is decided in fastgen.present.
"""

from __future__ import annotations

try:  # On a ZeroGPU Space, `spaces` must be imported before torch touches CUDA; model work then runs in
    import spaces  # its @spaces.GPU calls. Elsewhere the package is absent and model work runs in place.

    gpu_task = spaces.GPU(duration=120)
    ZERO_GPU = True
except ImportError:
    ZERO_GPU = False

    def gpu_task(fn):
        return fn

import argparse
import base64
import io
import logging
import os
import random
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import gradio as gr

from fastgen import present
from fastgen.engine import Engine, RunStopped, MissingWeightsError, default_family
from fastgen.present import Board, Draft
from fastgen.remote import RemoteEngine, RemoteFailure
from fastgen.doctor import family_state, page_families
from fastgen.registry import FAMILIES, get_family
from fastgen.request import (FIELDS, LIVE_FIELDS, MAX_LORAS, MAX_PROMPT_CHARS, MAX_SEED, PUBLIC, REFINE_FIELDS,
                             CompareRequest, LiveRequest, RefineRequest, RequestError, check_family, check_guidance,
                             check_steps, custom_refusal, custom_switch, live_steps, parse_size, shown)

log = logging.getLogger("fastgen.app")

# Errors whose message is meant for the user: bad input (ValueError), weights not on this machine, and a panel
# that failed on the serving backend.
KNOWN_ERRORS = (ValueError, MissingWeightsError, RemoteFailure)
QUEUE_SIZE = 16  # waiting runs beyond this get Gradio's "This application is currently busy"
REMOTE_SLOTS = 8  # jobs sent to a serving backend at once (python app.py --backend URL)
EXPORT_MAX_AGE = 3600  # seconds a download stays on disk
GPU = "gpu"  # the one concurrency group every model call joins: one job on the accelerator at a time
# Families cheap enough (seconds on any CPU) to run the first example as soon as the page opens. Not the
# full-size ones: on a shared GPU every page view would queue a job.
FILL_ON_OPEN = {"mini"}
# Per panel slot (present.panel_slots(): every registered method), the event outputs are these, in this order.
PANEL_OUTPUTS = ("image", "status", "caption", "code")
RUN_OUTPUTS = ("board", "left", "right", "slider", "grid_file", "json_file", "generate", "stop")
# The refine area's per-method panels ("refine.<method>.<output>") and its shared outputs.
REFINE_PANEL_OUTPUTS = ("column", "image", "status", "caption", "code")
REFINE_OUTPUTS = ("refine_board", "tradeoff", "refine_left", "refine_right", "refine_slider", "refine_button",
                  "refine_stop")
# "Refine this image": the panel's image becomes the editor's background, and the Refine tab opens.
TO_EDITOR = """(image) => {
    document.querySelector("#fg-tab-refine-button")?.click();
    return {background: image, layers: [], composite: image};
}"""
# The Your model tab's panels: "custom.<method>.<output>" with the visitor's LoRAs, "plain.<method>.<output>"
# without them; one panel per method that takes style LoRAs (present.style_slots()).
CUSTOM_PANEL_OUTPUTS = ("column", "title", "image", "status", "caption", "code")
CUSTOM_ROWS = ("custom", "plain")
# The Live tab's per-method panels ("live.<method>.<output>").
LIVE_PANEL_OUTPUTS = ("column", "image", "caption")
SIZE_FIELDS = {"width": "size", "height": "size"}  # the page's one size control sets both (see `validated`)
MAX_UPLOAD = "16mb"  # one upload: the largest allowed image (2048 x 2048 RGB) as PNG is about 12.6 MB at worst

def refused(error: RequestError) -> gr.Error:
    """Bad input: one INFO line (the field and why, never the whole value) and the message for the user."""
    log.info("refused %s: %s", error.field, error)
    return gr.Error(str(error), print_exception=False)


def failed(message: str) -> gr.Error:
    """An error the user sees; Gradio does not print a traceback for it (we log what needs one ourselves)."""
    return gr.Error(message, print_exception=False)


def verdicts(error: RequestError | None, fields: list[str]) -> list:
    """A validator's answer: gr.validate per input, the refused field's carrying the message."""
    refused_field = error.field if error is not None else None
    return [gr.validate(f != refused_field, str(error) if f == refused_field else "") for f in fields]


def validated(check, fields: list[str], shown_on: dict[str, str] | None = None) -> list:
    """Run `check()` for a validator: all inputs pass, or the refused field carries the message (one INFO line).
    `shown_on`: {field the schema names: the input that shows its error}, where one control carries several
    fields (the size control sets width and height) or a field follows another input."""
    try:
        check()
        return verdicts(None, fields)
    except RequestError as error:
        if error.field in (shown_on or {}):
            error = RequestError(shown_on[error.field], str(error))
        log.info("refused %s: %s", error.field, error)
        return verdicts(error, fields)


def slider_int(value):
    """A slider sends 4.0 for 4: the integral floats our own sliders make become ints; anything else is left for
    the schema to refuse."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def example_prompts(family: str) -> list[str]:
    """The prompt set the UI offers for a family: examples/prompts/<family>.txt, one prompt a line."""
    folder = Path(__file__).parent / "examples" / "prompts"
    path = folder / f"{family}.txt"
    if not path.exists():
        path = folder / "default.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


class Runs:
    """The event functions that touch the engine. Each yields {component: update} for what changed; the
    components are the page's, named "<method>.<PANEL_OUTPUTS>" and RUN_OUTPUTS (bound with `bind`)."""

    def __init__(self, engine: Engine, export_dir: Path | None = None, slots: tuple[str, ...] | None = None):
        self.engine = engine
        self.slots = tuple(slots or present.panel_slots())  # one panel per registered method
        self.components: dict[str, gr.components.Component] = {}  # set by `bind` when the page is built
        if export_dir is None:  # removed with this object (at the latest when the server exits)
            self._exports = tempfile.TemporaryDirectory(prefix="fastgen-exports-")
            export_dir = Path(self._exports.name)
        self.export_dir = export_dir
        self.switches = present.StopSwitches()

    # -- events ---------------------------------------------------------------------------------------

    def generate(self, request: gr.Request, family: str, prompt: str, negative_prompt: str, seed: float,
                 size: str, board: Board | None, *panel_values) -> Iterator[dict]:
        """Run every enabled panel on the same prompt and seed, fastest first, the baseline last."""
        try:
            req = self.page_request(family, prompt, negative_prompt, seed, size, panel_values)
        except RequestError as error:
            raise refused(error) from None
        settings = present.RunSettings(req.prompt, req.negative_prompt, req.seed, req.width, req.height)
        old = board
        board = Board.start(req.family.name, req.methods, req.steps, req.guidance, settings=settings)
        if isinstance(old, Board) and old.family == board.family:
            board.picks = old.picks  # the compare slider keeps the pair the user chose
        yield self.view(board, list(board.panels), running=True)

        def job(on_step, stop):
            return self.engine.iter_compare(req.family.name, req.prompt, board.order, **req.engine_kwargs(),
                                            on_step=on_step, on_preview=on_step, stop=stop)

        yield from self.follow(board, job, request)

    def rerun(self, method: str, request: gr.Request, board: Board | None, enabled: bool, steps: float,
              guidance: float) -> Iterator[dict]:
        """Rerun one panel with its new slider values and the last run's prompt, seed and size."""
        if not isinstance(board, Board) or not enabled or board.panels.get(method) is None:
            yield {}  # nothing changes
            return
        spec = get_family(board.family).method(method)
        try:
            steps, guidance = check_steps(spec, slider_int(steps)), check_guidance(spec, guidance)
        except RequestError as error:
            raise refused(error) from None
        board = Board.start(board.family, [method], {method: steps}, {method: guidance}, previous=board)
        s = board.settings
        yield self.view(board, [method], running=True)

        def job(on_step, stop):
            return [self.engine.run(board.family, method, s.prompt, negative_prompt=s.negative_prompt, seed=s.seed,
                                    width=s.width, height=s.height, steps=steps, guidance=guidance,
                                    on_step=on_step, on_preview=on_step, stop=stop)]

        yield from self.follow(board, job, request)

    def stop(self, request: gr.Request) -> None:
        self.switches.stop(request.session_hash if request else None)

    # -- helpers --------------------------------------------------------------------------------------

    def follow(self, board: Board, job, request: gr.Request | None, view=None) -> Iterator[dict]:
        """Stream `job` into the board, then settle it: finished panels stay, the rest say why they stopped.
        `view(board, changed, running, export)`: the updates for the board (default: the comparison's)."""
        view = view or self.view
        session = request.session_hash if request else None
        stop = self.switches.arm(session)
        try:
            for event in present.stream(job, stop):
                yield view(board, board.apply(event), running=True)
        except RunStopped:
            yield view(board, board.fail("stopped", "Stopped"), running=False, export=True)
            return
        except KNOWN_ERRORS as exc:  # the engine's errors say what was wrong and what is allowed
            yield view(board, board.fail("failed", str(exc)), running=False, export=True)
            raise failed(str(exc)) from None
        except Exception:
            log.exception("run failed: family=%s prompt=%s", board.family, shown(board.settings.prompt))
            yield view(board, board.fail("failed", "Failed"), running=False, export=True)
            raise failed("Something went wrong on the server; the error has been logged.") from None
        finally:
            self.switches.release(session, stop)
        yield view(board, [], running=False, export=True)

    def comparison(self, board: Board):
        """The board's finished panels as the engine's Comparison: the CLI's results.json and grid."""
        s = board.settings
        return self.engine.comparison(board.family, s.prompt, board.results(), negative_prompt=s.negative_prompt,
                                      seed=s.seed)

    def page_request(self, family, prompt, negative_prompt, seed, size, panel_values) -> CompareRequest:
        """The page's inputs as a CompareRequest, checked by the same schema as the API's. Raises RequestError."""
        fam = check_family(family)  # first: which panels count depends on it
        names = present.panel_methods(fam.name)
        methods, steps, guidance = [], {}, {}
        for i, method in enumerate(self.slots):
            if method in names:
                on, n, g = panel_values[3 * i: 3 * i + 3]
                if on is True:
                    methods.append(method)
                    steps[method], guidance[method] = slider_int(n), g
        if not methods:
            raise RequestError("methods", "Turn on at least one panel.")
        width, height = parse_size(size)
        return CompareRequest.parse(dict(prompt=prompt, negative_prompt=negative_prompt or None, seed=seed,
                                         methods=methods, width=width, height=height, steps=steps,
                                         guidance=guidance), family=fam)

    def validate_page(self, family, prompt, negative_prompt, seed, size, board, *panel_values) -> list:
        """Generate's validator: runs before the job is queued; an error is shown on the field it concerns."""
        fields = ["family", "prompt", "negative_prompt", "seed", "size", "board"]
        fields += [f for _ in self.slots for f in ("methods", "steps", "guidance")]
        return validated(lambda: self.page_request(family, prompt, negative_prompt, seed, size, panel_values),
                         fields, SIZE_FIELDS)

    # -- live ---------------------------------------------------------------------------------------

    def live(self, family: str, prompt: str, seed: float, vary: bool, methods: list[str], sketching: bool, sketch,
             strength: float, *_) -> dict:
        """One live frame: each chosen method draws the current prompt once (in sketch mode, refines the sketch
        at `strength`). The event runs always-last, so only the newest edit is drawn. Bad input (an empty
        prompt while typing, a strength that runs no step) goes into the captions: typing never pops errors."""
        family = check_family(family).name
        out = {}
        seed = random.randint(0, MAX_SEED) if vary is True else slider_int(seed)
        try:
            image = sketch_image(sketch) if sketching is True else None
        except RequestError as error:  # a sketch the canvas would never send: said in every panel
            return self.by_component({f"live.{m}.caption": f"⚠️ {error}" for m in self.slots
                                      if m in (methods or []) and m in present.live_methods(family)})
        for method in self.slots:
            if method not in (methods or []) or method not in present.live_methods(family):
                continue
            try:
                req = LiveRequest.parse(dict(prompt=prompt, seed=seed, method=method,
                                             strength=strength if image is not None else None), family=family)
                result = live_frame(self.engine, req, image)
            except KNOWN_ERRORS as error:  # RequestError, NotAvailable, missing weights: said in the panel
                out[f"live.{method}.caption"] = f"⚠️ {error}"
                continue
            out[f"live.{method}.image"] = result.image
            out[f"live.{method}.caption"] = present.live_caption(result, req.prompt, req.seed)
        return self.by_component(out)

    def live_columns(self, family: str, methods: list[str]) -> dict:
        names = set(present.live_methods(family))
        return self.by_component({f"live.{m}.column": gr.Column(visible=m in names and m in (methods or []))
                                  for m in self.slots})

    # -- your model -----------------------------------------------------------------------------------

    def custom_request(self, family, model, prompt, seed, size, lora_values) -> CompareRequest:
        """The Your model tab's inputs as a CompareRequest: `model` (a Hub id or folder; empty: `family`) and
        the LoRA rows ((repo, weight file, scale) each; empty rows skipped), run on the methods that take style
        LoRAs. Checked, and gated by the host's switch, as the API's `base` and `loras`. Raises RequestError."""
        loras = []
        for row in range(len(lora_values) // 3):
            repo, weight_name, scale = lora_values[3 * row: 3 * row + 3]
            repo, weight_name = (repo or "").strip(), (weight_name or "").strip()
            if not repo and not weight_name:
                continue
            if not repo or not weight_name:
                raise RequestError("loras", f"LoRA {row + 1}: give both its repo (a Hub id or folder) and the name "
                                            "of its weight file")
            loras.append({"repo": repo, "weight_name": weight_name, "scale": scale})
        model = (model or "").strip()
        if not model and not loras:
            raise RequestError("base", "Type a model (a Hub id or folder), add a LoRA, or both.")
        width, height = parse_size(size)
        req = CompareRequest.parse(dict(prompt=prompt, seed=slider_int(seed), width=width, height=height,
                                        base=model or None, loras=loras or None), family=check_family(family))
        return replace(req, methods=tuple(present.style_methods(req.family)))

    def validate_custom(self, family, model, prompt, seed, size, without, *lora_values) -> list:
        fields = ["family", "base", "prompt", "seed", "size", "without"]
        fields += [f for _ in range(len(lora_values) // 3) for f in ("loras", "lora_weight", "lora_scale")]
        return validated(lambda: self.custom_request(family, model, prompt, seed, size, lora_values), fields,
                         SIZE_FIELDS)

    def custom(self, request: gr.Request, family: str, model: str, prompt: str, seed: float, size: str,
               without: bool, *lora_values) -> Iterator[dict]:
        """Your model: the reference and the adapter methods (LCM-LoRA) of a custom checkpoint (or of the
        family) with the visitor's style LoRAs, then, when `without`, the same panels with no LoRA."""
        try:
            req = self.custom_request(family, model, prompt, seed, size, lora_values)
        except RequestError as error:
            raise refused(error) from None
        fam, methods = req.family, list(req.methods)
        steps = {m: fam.method(m).steps for m in methods}
        guidance = {m: fam.method(m).guidance for m in methods}
        settings = present.RunSettings(req.prompt, "", req.seed, req.width, req.height)
        rows = [("custom", Board.start(fam, methods, steps, guidance, settings=settings), req.loras)]
        if req.loras and without is True:
            rows.append(("plain", Board.start(fam, methods, steps, guidance, settings=settings), ()))
        with_loras = " with your LoRAs" if req.loras else ""
        out = {"custom_heading": gr.Markdown(f"**{fam.label}**{with_loras}", visible=True),
               "plain_heading": gr.Markdown(f"**{fam.label}** without them", visible=len(rows) == 2)}
        for name in CUSTOM_ROWS:  # a row that does not run this time is hidden
            suffix = " + LoRAs" if name == "custom" and req.loras else ""
            for method in present.style_slots():
                on = method in methods and any(row[0] == name for row in rows)
                out[f"{name}.{method}.column"] = gr.Column(visible=on)
                if on:
                    out[f"{name}.{method}.title"] = f"### {fam.method(method).label}{suffix}"
        yield {**self.by_component(out), **{k: v for row in rows for k, v in self.custom_view(
            row[1], list(row[1].panels), True, row[0]).items()}}

        for index, (name, board, loras) in enumerate(rows):
            last = index == len(rows) - 1

            def job(on_step, stop, board=board, loras=loras):
                return self.engine.iter_compare(fam, req.prompt, board.order, seed=req.seed, width=req.width,
                                                height=req.height, loras=loras, on_step=on_step, on_preview=on_step,
                                                stop=stop)

            def view(b, changed, running, export=False, name=name, last=last):
                return self.custom_view(b, changed, running or not last, name)

            yield from self.follow(board, job, request, view)
            if any(p.state == "stopped" for p in board.panels.values()):
                if not last:
                    yield self.custom_view(board, [], False, name)
                return

    def custom_view(self, board: Board, changed: list[str], running: bool, row: str) -> dict:
        """The updates for one row of the Your model tab ("custom": with the LoRAs, "plain": without)."""
        changed = [m for m in changed if m in present.style_slots()]
        out = {"custom_button": gr.Button(interactive=not running), "custom_stop": gr.Button(interactive=running)}
        out.update(self.panel_updates(board, changed, f"{row}.", lambda result: present.style_caption(board,
                                                                                                      result.method)))
        return self.by_component(out)

    # -- refine ---------------------------------------------------------------------------------------

    def pick_draft(self, method: str, board: Board | None) -> dict:
        """A panel's Refine button: its image becomes the refine source, with the run's prompt and seed; the
        refine methods default to the draft's own and the reference; the Refine tab opens."""
        panel = board.panels.get(method) if isinstance(board, Board) else None
        if panel is None or panel.result is None:
            raise failed("Generate first: Refine starts from a finished panel's image.")
        result, fam = panel.result, get_family(board.family)
        draft = Draft(board.family, result.image, method, result.label, result.seconds, board.settings.prompt,
                      board.settings.seed)
        methods = list(dict.fromkeys([method, *([fam.reference] if fam.reference else [])]))
        out = {"draft": draft, "refine_board": None,
               "refine_prompt": board.settings.prompt,
               "refine_methods": gr.CheckboxGroup(choices=method_choices(board.family), value=methods),
               "strength": fam.method(method).refine.strength,
               "draft_note": f"Source: the **{result.label}** draft ({result.seconds:.2f} s), seed {draft.seed}. "
                             "Paint over it to inpaint; leave it unpainted to refine all of it.",
               "tradeoff": "", "refine_slider": None}
        out.update(self.refine_columns(board.family, methods))
        return self.by_component(out)

    def refine_columns(self, family: str, methods: list[str]) -> dict:
        names = set(present.panel_methods(family))
        out = {}
        for method in self.slots:
            on = method in names and method in (methods or [])
            out[f"refine.{method}.column"] = gr.Column(visible=on)
            if on:
                out[f"refine.{method}.title"] = f"### {get_family(family).method(method).label}"
        return out

    def refine_request(self, family, editor, prompt, negative_prompt, seed, strength, methods, keep_outside,
                       resize, draft: Draft | None):
        """The refine area's inputs as (RefineRequest, source image, mask or None, the draft or None for an
        upload), checked for every method as the engine will run them. Raises RequestError."""
        draft = draft if isinstance(draft, Draft) else None
        fam = check_family(draft.family if draft is not None else family)
        image, mask, from_draft = editor_images(editor, draft if isinstance(draft, Draft) else None)
        if image is None:
            raise RequestError("image", "Choose a source: press Refine under a finished panel, or upload an image.")
        req = RefineRequest.parse(dict(prompt=prompt, negative_prompt=negative_prompt or None, seed=seed,
                                       strength=strength, methods=list(methods or []) or None,
                                       keep_outside=keep_outside, resize=resize), family=fam)
        if not methods:
            raise RequestError("methods", "Choose at least one method to refine with.")
        Engine.check_refine(fam, list(req.methods), image, mask, req.strength, keep_outside=req.keep_outside,
                            resize=req.resize)
        return req, image, mask, draft if from_draft else None

    def validate_refine(self, family, editor, prompt, negative_prompt, seed, strength, methods, keep_outside,
                        resize, draft, refine_board, board) -> list:
        fields = ["family", "image", "prompt", "negative_prompt", "seed", "strength", "methods", "keep_outside",
                  "resize", "draft", "refine_board", "board"]
        # the mask is painted on the image; steps follow strength
        return validated(lambda: self.refine_request(family, editor, prompt, negative_prompt, seed, strength, methods,
                                                     keep_outside, resize, draft),
                         fields, {"mask": "image", "steps": "strength"})

    def refine(self, request: gr.Request, family: str, editor, prompt: str, negative_prompt: str, seed: float,
               strength: float, methods: list[str], keep_outside: bool, resize: bool, draft: Draft | None,
               refine_board: Board | None, board: Board | None) -> Iterator[dict]:
        """Refine the source with each chosen method (same prompt, seed and strength), panel by panel."""
        try:
            req, image, mask, draft = self.refine_request(family, editor, prompt, negative_prompt, seed, strength,
                                                          methods, keep_outside, resize, draft)
        except RequestError as error:
            raise refused(error) from None
        draft = draft or Draft(req.family.name, image)  # an upload: no draft time to add
        baseline = reference_result(board, req.family.name)
        settings = present.RunSettings(req.prompt, req.negative_prompt, req.seed)
        recipes = {m: req.family.method(m).refine_recipe("img2img" if mask is None else "inpaint") for m in req.methods}
        steps = {m: r.steps if r else 1 for m, r in recipes.items()}  # the run order: fewest UNet passes first
        guidance = {m: r.guidance if r else 0.0 for m, r in recipes.items()}
        rboard = Board.start(req.family.name, req.methods, steps, guidance, settings=settings)

        def view(b, changed, running, export=False):
            return self.refine_view(b, changed, running, draft, baseline)

        yield {**view(rboard, list(rboard.panels), running=True),
               **self.by_component(self.refine_columns(req.family.name, list(req.methods)))}

        def job(on_step, stop):
            return self.engine.iter_refine(req.family.name, image, req.prompt, rboard.order, mask=mask,
                                           **req.engine_kwargs(), on_step=on_step, on_preview=on_step, stop=stop)

        yield from self.follow(rboard, job, request, view)

    def refine_view(self, board: Board, changed: list[str], running: bool, draft: Draft, baseline) -> dict:
        out = {"refine_board": board, "refine_button": gr.Button(interactive=not running),
               "refine_stop": gr.Button(interactive=running)}
        out.update(self.panel_updates(board, changed, "refine.", present.refine_caption))
        out["tradeoff"] = present.tradeoff(draft, board, baseline)
        if any(board.panels[m].state == "done" for m in changed if m in board.panels) or not running:
            choices = present.refine_pair_choices(draft, board, baseline)
            keys = [key for _, key in choices]
            left = "draft" if "draft" in keys else None
            right = next((k for k in keys if k not in ("draft", "baseline")), None)
            out.update(refine_left=gr.Dropdown(choices=choices, value=left),
                       refine_right=gr.Dropdown(choices=choices, value=right))
            images = present.refine_images(draft, board, baseline, left, right)
            if board.unsent("refine_slider", images):
                out["refine_slider"] = images
        return self.by_component(out)

    def panel_updates(self, board: Board, changed: list[str], prefix: str, caption) -> dict:
        """Image, status, caption (`caption(result)`) and code of each changed panel, named "<prefix><method>.*"."""
        out = {}
        for method in changed:
            panel = board.panels.get(method)
            if panel is None or method not in self.slots:
                continue
            result = panel.result
            out[f"{prefix}{method}.image"] = panel.image  # while it runs: the newest preview of its latents
            out[f"{prefix}{method}.status"] = board.status_html(method)
            out[f"{prefix}{method}.caption"] = caption(result) if result is not None else ""
            out[f"{prefix}{method}.code"] = result.code if result is not None else ""
        return out

    def view(self, board: Board, changed: list[str], running: bool, export: bool = False) -> dict:
        """The updates for `board`, by output (see `bind`): changed panels get new values; an output that is not
        in the dict stays as it is."""
        out = {"board": board, "generate": gr.Button(interactive=not running), "stop": gr.Button(interactive=running)}
        out.update(self.panel_updates(board, changed, "", lambda result: board.caption(result.method)))
        done = [p.method for p in board.panels.values() if p.result is not None]
        if any(board.panels[m].state == "done" for m in changed) or not running:
            left, right = present.compare_pair(board)
            offered = list(dict.fromkeys([*done, *(m for m in (left, right) if m)]))
            choices = [(get_family(board.family).method(m).label, m) for m in offered]
            out.update(left=gr.Dropdown(choices=choices, value=left), right=gr.Dropdown(choices=choices, value=right))
            images = present.compare_images(board, left, right)
            if board.unsent("slider", images):
                out["slider"] = images
        if export and done:
            present.prune(self.export_dir, EXPORT_MAX_AGE)
            grid_path, json_path = present.write_exports(self.comparison(board), self.export_dir)
            out.update(grid_file=gr.DownloadButton(value=str(grid_path), visible=True),
                       json_file=gr.DownloadButton(value=str(json_path), visible=True))
        elif running and len(changed) == len(board.panels):  # a fresh run: the old downloads are stale
            out.update(grid_file=gr.DownloadButton(value=None, visible=False),
                       json_file=gr.DownloadButton(value=None, visible=False))
        return self.by_component(out)

    def bind(self, components: dict[str, gr.components.Component]) -> None:
        """The page's components by output name: updates go to them as Gradio's {component: value} dicts."""
        self.components = components

    def by_component(self, updates: dict[str, object]) -> dict:
        """{name: value} -> {component: value} once the page is bound (handler tests read the names)."""
        if not self.components:
            return updates
        folder = page_files()
        return {self.components[name]: present.page_value(value, folder) for name, value in updates.items()}


def page_files() -> Path:
    """Where images sent to the page and the API are written (present.page_file): inside the folder Gradio serves
    its cache from, so a file there goes out as it is, and `delete_cache` ages it like Gradio's own."""
    return Path(gr.utils.get_upload_folder()) / "fastgen"


def compare_api(engine: Engine, default: str):
    """The `compare` API endpoint and its validator: keyword arguments in (see FIELDS), the images as PNG files
    and the results JSON out. Inputs arrive as plain JSON values and go through CompareRequest unchanged."""

    def validate(*values) -> list:
        return validated(lambda: CompareRequest.parse(dict(zip(FIELDS, values)), family=default), list(FIELDS))

    @gpu_task
    def compare(prompt: str, seed: int = 0, negative_prompt: str | None = None, methods: list[str] | None = None,
                width: int | None = None, height: int | None = None, family: str | None = None,
                steps: dict | None = None, guidance: dict | None = None, base: str | None = None,
                loras: list | None = None):
        """Run `methods` (default: all) on one prompt and seed. width/height None or 0: each method's native size;
        family None: the page's; steps/guidance: {method: value} for the methods to run off their defaults;
        base: a custom SDXL / SD 1.5 checkpoint (Hub id) run as the reference and with LCM-LoRA; loras: style
        LoRAs [{"repo", "weight_name", "scale"}] on the reference and adapter methods. base and loras only where
        the host allows them (FASTGEN_ALLOW_CUSTOM=1, or an allowlist in FASTGEN_CUSTOM_ALLOW)."""
        values = (prompt, seed, negative_prompt, methods, width, height, family, steps, guidance, base, loras)
        try:
            req = CompareRequest.parse(dict(zip(FIELDS, values)), family=default)
        except RequestError as error:
            raise refused(error) from None
        try:
            comparison = engine.compare(req.family, req.prompt, list(req.methods), **req.engine_kwargs())
        except KNOWN_ERRORS as exc:
            raise failed(str(exc)) from None
        except Exception:
            log.exception("compare failed: family=%s prompt=%s", req.family.name, shown(req.prompt))
            raise failed("Something went wrong on the server; the error has been logged.") from None
        if not comparison.results:  # every panel failed: their messages are the answer
            raise failed("; ".join(f"{f.label}: {f.message}" for f in comparison.failures))
        gallery = [(present.page_file(r.image, page_files()),
                    f"{r.label}: {r.steps} steps, guidance {r.guidance:g}, {r.seconds:.2f} s")
                   for r in comparison.results]
        return gallery, comparison.to_dict()

    return compare, validate


def refine_api(engine: Engine, default: str):
    """The `refine` API endpoint and its validator: the image (and optional mask) as files, then REFINE_FIELDS
    as keyword arguments; the refined images as PNG files and the results JSON out."""

    def check(image, mask, values) -> RefineRequest:
        req = RefineRequest.parse(dict(zip(REFINE_FIELDS, values)), family=default)
        Engine.check_refine(req.family, list(req.methods), image, mask, req.strength, req.steps, req.guidance,
                            req.keep_outside, req.resize)
        return req

    def validate(image, mask, *values) -> list:
        return validated(lambda: check(image, mask, values), ["image", "mask", *REFINE_FIELDS])

    @gpu_task
    def refine(image, mask=None, prompt: str = "", seed: int = 0, negative_prompt: str | None = None,
               methods: list[str] | None = None, family: str | None = None, steps: dict | None = None,
               guidance: dict | None = None, strength: float | None = None, keep_outside: bool = False,
               resize: bool = False):
        """Refine `image` (RGB, sides multiples of 8) with `methods`: image-to-image, or inpainting where `mask`
        (single channel, the image's size, white = repaint) is given. strength None: each method's default."""
        values = (prompt, seed, negative_prompt, methods, family, steps, guidance, strength, keep_outside, resize)
        try:
            req = check(image, mask, values)
        except RequestError as error:
            raise refused(error) from None
        try:
            comparison = engine.refine_compare(req.family, image, req.prompt, list(req.methods), mask=mask,
                                               **req.engine_kwargs())
        except KNOWN_ERRORS as exc:
            raise failed(str(exc)) from None
        except Exception:
            log.exception("refine failed: family=%s prompt=%s", req.family.name, shown(req.prompt))
            raise failed("Something went wrong on the server; the error has been logged.") from None
        if not comparison.results:
            raise failed("; ".join(f"{f.label}: {f.message}" for f in comparison.failures))
        gallery = [(present.page_file(r.image, page_files()), f"{r.label}: strength {r.strength:g}, "
                    f"{r.denoising_steps} of {r.steps} steps, {r.seconds:.2f} s") for r in comparison.results]
        return gallery, comparison.to_dict()

    return refine, validate


def editor_images(editor, draft: Draft | None):
    """(source, mask, from_draft) from the image editor. The source is the draft's own image (exact pixels) while
    the editor still shows it, else the visitor's upload (transparency flattened on white); the mask is whatever
    was painted (any colour; alpha >= 128) at the source's size, None when nothing was."""
    import numpy as np
    from PIL import Image

    editor = editor if isinstance(editor, dict) else {}
    background = editor.get("background")
    source = None
    if isinstance(background, Image.Image):
        source = present.flatten(background)  # transparent pixels become white, not black
    from_draft = draft is not None and (source is None or (
        source.size == draft.image.size and np.array_equal(np.asarray(source), np.asarray(draft.image.convert("RGB")))))
    if from_draft:
        source = draft.image
    if source is None:
        return None, None, False
    painted = None  # the layers' alpha, all strokes together
    for layer in (editor.get("layers") or []) if isinstance(editor, dict) else []:
        if isinstance(layer, Image.Image):
            alpha = np.asarray(layer.convert("RGBA"))[..., 3]
            painted = alpha if painted is None or painted.shape != alpha.shape else np.maximum(painted, alpha)
    if painted is None or painted.max() < 128:
        return source, None, from_draft
    mask = Image.fromarray(np.where(painted >= 128, 255, 0).astype(np.uint8))
    if mask.size != source.size:  # the canvas may show the image scaled
        mask = mask.resize(source.size, Image.NEAREST)
    return source, mask, from_draft


def live_frame(engine: Engine, req: LiveRequest, sketch=None):
    """The engine call for one live frame: text-to-image, or the sketch refined (fitted to the method's size)."""
    spec = req.family.method(req.method)
    if sketch is None:
        return engine.run(req.family, req.method, req.prompt, seed=req.seed, steps=req.steps or live_steps(spec))
    return engine.refine(req.family, req.method, sketch, req.prompt, seed=req.seed, strength=req.strength,
                         steps=req.steps or live_steps(spec, req.strength), resize=True)


def live_api(engine: Engine, default: str):
    """The `live` API endpoint: one frame of one method (LIVE_FIELDS, then an optional sketch image, flattened on
    white and fitted to the method's size), the image as PNG and the result's JSON out."""

    def validate(*values) -> list:
        return validated(lambda: LiveRequest.parse(dict(zip(LIVE_FIELDS, values)), family=default),
                         [*LIVE_FIELDS, "sketch"])

    @gpu_task
    def live(prompt: str, seed: int = 0, method: str | None = None, family: str | None = None,
             steps: int | None = None, strength: float | None = None, sketch=None):
        """One frame: `method` (default: the family's first) draws `prompt`, or refines `sketch` at `strength`
        (default 0.7); steps None: the method's live steps (1 for Turbo, 2 for LCM and LCM-LoRA)."""
        values = (prompt, seed, method, family, steps, strength)
        try:
            req = LiveRequest.parse(dict(zip(LIVE_FIELDS, values)), family=default)
            result = live_frame(engine, req, present.flatten(sketch) if sketch is not None else None)
        except RequestError as error:
            raise refused(error) from None
        except KNOWN_ERRORS as exc:
            raise failed(str(exc)) from None
        except Exception:
            log.exception("live frame failed: method=%s prompt=%s", method, shown(prompt))
            raise failed("Something went wrong on the server; the error has been logged.") from None
        return present.page_file(result.image, page_files()), result.to_dict()

    return live, validate


def sketch_image(sketch: str | None):
    """The sketch as RGB (transparent pixels white), or None when nothing is drawn: the canvas's drawing, as the
    page sends it (a PNG data URL; "" when the canvas is empty)."""
    from PIL import Image

    if not isinstance(sketch, str) or not sketch.startswith(SKETCH_PREFIX):
        return None
    data = sketch[len(SKETCH_PREFIX):]
    if len(data) > MAX_SKETCH_CHARS:
        raise RequestError("sketch", f"the sketch must be at most {MAX_SKETCH_CHARS} base64 characters")
    try:
        drawing = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        drawing.load()
    except Exception:
        raise RequestError("sketch", "the sketch is not a PNG image") from None
    if max(drawing.size) > SKETCH_SIZE:
        raise RequestError("sketch", f"the sketch must be at most {SKETCH_SIZE} pixels a side")
    return present.flatten(drawing)


def reference_result(board: Board | None, family: str):
    """The comparison's reference panel (the 50-step baseline) for `family`, if it has finished."""
    if not isinstance(board, Board) or board.family != family:
        return None
    panel = board.panels.get(get_family(family).reference or "")
    return panel.result if panel is not None else None


SKETCH_COLORS = ["#dc2828", "#28aa46", "#285adc", "#ebcd28", "#8c46be", "#f08c1e", "#191919", "#ebebeb"]

CSS = """
/* As many panels per row as fit at 240 px or more; the grid wraps the rest (N panels, any screen). */
.fg-panels { display: grid !important; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 12px; }
.fg-panel { min-width: 0 !important; }
.fg-panel .fg-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.fg-panel h3 { margin: 0; }
/* The compare sliders: the images are square (every size choice is), so the slider is as wide as it is high.
   At full width the image sat centred in a box three times its width, and most of the divider's travel
   fell outside it. */
.fg-compare .slider-wrap { max-width: 384px; margin: 0 auto; }
.fg-compare img { image-rendering: pixelated; }
.fg-caption { font-size: 0.9em; min-height: 3em; }
.fg-status { font-size: 0.85em; color: var(--body-text-color-subdued); min-height: 1.4em; }
.fg-failed { color: var(--error-text-color); }
.fg-bar { height: 6px; border-radius: 3px; background: var(--neutral-200); overflow: hidden; margin: 2px 0 4px; }
.fg-bar > div { height: 100%; background: var(--color-accent); transition: width 0.1s linear; }
.fg-note, .fg-note p { font-size: 0.8em !important; color: var(--body-text-color-subdued); }
.fg-sketchpad canvas { width: 100%; max-width: 300px; aspect-ratio: 1; background: white; touch-action: none;
  border: 1px solid var(--border-color-primary); border-radius: 4px; cursor: crosshair; display: block; }
.fg-swatches { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 6px; align-items: center; }
.fg-swatch { width: 22px; height: 22px; border-radius: 50%; border: 2px solid var(--border-color-primary); }
.fg-swatch.fg-picked { outline: 2px solid var(--color-accent); outline-offset: 1px; }
.fg-sketch-clear { font-size: 0.8em; padding: 2px 8px; margin-left: 6px; border-radius: 4px;
  border: 1px solid var(--border-color-primary); }
""" + "".join(f'.fg-swatch[data-colour="{c}"] {{ background: {c}; }}\n' for c in SKETCH_COLORS)
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="pink")


def create_demo(engine: Engine | None = None, family: str | None = None) -> gr.Blocks:
    """Build the page. Nothing loads here: weights load on the first Generate, through the engine's cache."""
    engine = engine or Engine()
    remote = isinstance(engine, RemoteEngine)
    if remote:  # the backend holds the weights: it serves one family, which the page shows
        family, notice = family or engine.health()["family"], ""
        selectable, unavailable = [family], ""
    else:
        family, notice = pick_family(family)
        selectable, unavailable = page_families(family)  # families that can run or be fetched now; why not the rest
    # Jobs that reach the engine at once: one on this machine's accelerator; a serving backend runs panels on its
    # own replicas, so the page lets several visitors' jobs through to it.
    gpu_jobs = REMOTE_SLOTS if remote else 1
    runs = Runs(engine)
    if ZERO_GPU and not notice and not remote:  # jobs run in workers that inherit what the main process loaded
        log.info("loading %s at start-up: %.1f s", family, engine.load(family))

    # delete_cache: generated files older than an hour go, checked hourly. No usage analytics leave the server
    # unless the host opts in (GRADIO_ANALYTICS_ENABLED=1).
    analytics = os.environ.get("GRADIO_ANALYTICS_ENABLED", "").lower() in ("1", "true", "yes")
    with gr.Blocks(title="FastGen", delete_cache=(EXPORT_MAX_AGE, EXPORT_MAX_AGE), analytics_enabled=analytics) as demo:
        gr.Markdown("# ⚡ FastGen\nFast text-to-image methods side by side with the 50-step baseline: same prompt, "
                    "same seed, honest timings, and the code that reproduces each image.")
        gr.Markdown(f"⚠️ {notice}", visible=bool(notice), elem_classes="fg-notice")
        with gr.Tabs(selected="compare") as tabs:
            with gr.Tab("Compare", id="compare"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=2, value=example_prompts(family)[0], autofocus=True,
                                            max_length=MAX_PROMPT_CHARS)
                        negative = gr.Textbox(label="Negative prompt", placeholder="what to steer away from (optional)",
                                              max_length=MAX_PROMPT_CHARS)
                        examples = gr.Dataset(label="Examples", components=[prompt],
                                              samples=[[p] for p in example_prompts(family)], samples_per_page=6)
                    with gr.Column(scale=2):
                        family_box = gr.Dropdown(selectable, value=family, label="Model family")
                        gr.Markdown(unavailable, visible=bool(unavailable), elem_classes="fg-note")
                        size = gr.Dropdown(present.size_choices(family), value=present.NATIVE, label="Size")
                        with gr.Row(equal_height=True):
                            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=3)
                            dice = gr.Button("Randomize", scale=1, min_width=90)
                        with gr.Row():
                            generate = gr.Button("Generate", variant="primary", scale=3)
                            stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, min_width=80)
                        run_status = gr.Markdown(elem_classes="fg-note")

                shown = gr.CheckboxGroup(method_choices(family), value=list(get_family(family).default_methods),
                                         label="Methods", info="Add or remove panels: the reference is what speed-ups "
                                                               "are measured against", elem_classes="fg-methods")
                board = gr.State(None)
                panels = {}
                with gr.Row(elem_classes="fg-panels"):
                    for method in runs.slots:
                        panels[method] = PanelView(family, method)

                with gr.Accordion("Compare two panels", open=True):
                    with gr.Row():
                        left = gr.Dropdown([], label="Left", scale=1)
                        right = gr.Dropdown([], label="Right", scale=1)
                    slider = gr.ImageSlider(label="Drag to compare", type="pil", interactive=False, max_height=384,
                                            slider_position=50, elem_classes="fg-compare")
                with gr.Row():
                    grid_file = gr.DownloadButton("Download grid (PNG, settings in metadata)", visible=False)
                    json_file = gr.DownloadButton("Download results (JSON)", visible=False)

            with gr.Tab("Refine", id="refine", elem_id="fg-tab-refine"):
                draft_note = gr.Markdown(DRAFT_NOTE, elem_classes=["fg-note", "fg-draft"])
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        editor = gr.ImageEditor(
                            label="Source (paint where to repaint)", type="pil", image_mode="RGBA", format="png",
                            sources=["upload", "clipboard"], transforms=(), layers=False, height=360,
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=6),
                            elem_classes="fg-editor")
                    with gr.Column(scale=2):
                        refine_prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS)
                        strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Strength",
                                             info="the share of the schedule redone: 0.3-0.6 keeps the draft's "
                                                  "layout; a new colour or shape in a mask needs 0.8-1")
                        refine_methods = gr.CheckboxGroup(method_choices(family), value=refine_default(family),
                                                          label="Refine with")
                        with gr.Row():
                            keep_outside = gr.Checkbox(True, label="Keep outside the mask",
                                                       info="paste the source back where nothing was painted")
                            resize = gr.Checkbox(False, label="Resize to the method's size",
                                                 info="longer side to the size it was trained at")
                        with gr.Row():
                            refine_button = gr.Button("Refine", variant="primary", scale=3, elem_id="fg-refine-run")
                            refine_stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, min_width=80)
                        refine_status = gr.Markdown(elem_classes="fg-note")
                        tradeoff = gr.Markdown(elem_classes="fg-tradeoff")
                refine_panels = {}
                with gr.Row(elem_classes="fg-panels"):
                    for method in runs.slots:
                        refine_panels[method] = OutputPanelView("refine", family, method,
                                                                method in refine_methods.value, details=True)
                with gr.Accordion("Compare draft, refined and baseline", open=True):
                    with gr.Row():
                        refine_left = gr.Dropdown([], label="Left", scale=1)
                        refine_right = gr.Dropdown([], label="Right", scale=1)
                    refine_slider = gr.ImageSlider(label="Drag to compare", type="pil", interactive=False,
                                                   max_height=384, slider_position=50, elem_classes="fg-compare")
                draft = gr.State(None)
                refine_board = gr.State(None)

            with gr.Tab("Live", id="live") as live_tab:
                gr.Markdown("Images as you type: every edit of the prompt (or, in sketch mode, every stroke) redraws "
                            "with the fast methods. Only the newest edit is drawn; frames for older ones are "
                            "dropped.", elem_classes="fg-note")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        live_prompt = gr.Textbox(label="Live prompt", lines=2, value=example_prompts(family)[0],
                                                 max_length=MAX_PROMPT_CHARS, elem_id="fg-live-prompt")
                        with gr.Row(equal_height=True):
                            live_seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=2)
                            live_vary = gr.Checkbox(False, label="Vary", info="a new seed every frame", scale=1)
                        live_methods_box = gr.CheckboxGroup(
                            [(get_family(family).method(m).label, m) for m in present.live_methods(family)],
                            value=present.live_default(family), label="Methods",
                            info="one-step Turbo by default; LCM and LCM-LoRA draw at 2 steps")
                    with gr.Column(scale=2):
                        live_sketching = gr.Checkbox(False, label="Sketch mode",
                                                     info="your strokes, refined by each method (image-to-image)")
                        gr.HTML(sketchpad_html(), elem_classes="fg-sketch")
                        sketch = gr.Textbox(visible="hidden", elem_id="fg-sketch-data")  # the canvas as PNG
                        live_strength = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Sketch strength",
                                                  info="how much of the sketch is redrawn; Turbo takes 2 steps "
                                                       "below 1.0, since steps x strength must reach 1")
                live_panels = {}
                with gr.Row(elem_classes="fg-panels"):
                    for method in runs.slots:
                        live_panels[method] = OutputPanelView("live", family, method,
                                                              method in present.live_default(family), details=False)

            custom = None
            if not remote:  # a serving backend runs the registered families only
                custom = CustomTab(family, runs)

        # The API: `compare` with keyword arguments (see README). Hidden inputs give it typed parameters.
        with gr.Column(visible=False):
            # JSON inputs pass the caller's values through untouched (a Textbox would turn a list into its repr,
            # a Number would round 2.7): CompareRequest alone decides what is valid.
            with warnings.catch_warnings():  # gr.JSON warns on a plain number as its value; 0 is the seed's default
                warnings.simplefilter("ignore", UserWarning)
                api_in = [gr.JSON(0 if name == "seed" else None, label=name) for name in FIELDS]
            api_out = [gr.Gallery(label="images", format="png"), gr.JSON(label="results")]  # PNG: lossless
            api_button = gr.Button()
            # `refine`: the image and mask as files (modes kept as sent: the schema refuses what is not RGB / L)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                api_refine_in = [gr.Image(type="pil", image_mode=None, label="image"),
                                 gr.Image(type="pil", image_mode=None, label="mask")]
                api_refine_in += [gr.JSON(0 if name == "seed" else False if name in ("keep_outside", "resize")
                                          else None, label=name) for name in REFINE_FIELDS]
            api_refine_out = [gr.Gallery(label="images", format="png"), gr.JSON(label="results")]
            api_refine_button = gr.Button()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                api_live_in = [gr.JSON(0 if name == "seed" else None, label=name) for name in LIVE_FIELDS]
            api_live_in.append(gr.Image(type="pil", image_mode=None, label="sketch"))
            api_live_out = [gr.Image(type="pil", format="png", label="image"), gr.JSON(label="result")]
            api_live_button = gr.Button()

        # -- wiring -----------------------------------------------------------------------------------
        slots = runs.slots
        named = {f"{m}.{o}": getattr(panels[m], o) for m in slots for o in PANEL_OUTPUTS}
        named.update(board=board, left=left, right=right, slider=slider, grid_file=grid_file, json_file=json_file,
                     generate=generate, stop=stop)
        runs.bind(named)
        outputs = list(named.values())
        panel_inputs = [c for m in slots for c in (panels[m].toggle, panels[m].steps, panels[m].guidance)]
        run_args = dict(outputs=outputs, concurrency_id=GPU, concurrency_limit=gpu_jobs, show_progress="minimal",
                        show_progress_on=run_status, api_visibility="private")

        gr.on([generate.click, prompt.submit], gpu_task(runs.generate),
              inputs=[family_box, prompt, negative, seed, size, board, *panel_inputs], validator=runs.validate_page,
              **run_args)
        if family in FILL_ON_OPEN:  # a visitor sees the comparison at once, not four empty frames
            demo.load(gpu_task(runs.generate), inputs=[family_box, prompt, negative, seed, size, board, *panel_inputs],
                      **run_args)
        stop.click(runs.stop, queue=False, api_visibility="private")
        dice.click(lambda: random.randint(0, MAX_SEED), outputs=seed, queue=False, api_visibility="private")
        examples.click(lambda sample: sample[0], inputs=examples, outputs=prompt, queue=False,
                       api_visibility="private")
        for method, panel in panels.items():
            gr.on([panel.steps.release, panel.guidance.release], gpu_task(rerun_handler(runs, method)),
                  inputs=[board, panel.toggle, panel.steps, panel.guidance], trigger_mode="always_last", **run_args)
            panel.guidance.change(panel_note_handler(method), inputs=[family_box, panel.guidance],
                                  outputs=panel.note, queue=False, api_visibility="private")
        gr.on([left.input, right.input], present.pick, inputs=[board, left, right], outputs=slider,
              queue=False, api_visibility="private")
        ui = {**named, "size": size, "examples": examples, "prompt": prompt, "shown": shown}
        ui.update({f"{m}.{name}": c for m in slots for name, c in panels[m].parts().items()})
        ui.update({f"refine.{m}.column": refine_panels[m].column for m in slots})
        ui.update(refine_methods=refine_methods, draft=draft, refine_board=refine_board, tradeoff=tradeoff,
                  refine_slider=refine_slider, draft_note=draft_note, live_methods=live_methods_box,
                  live_prompt=live_prompt)
        ui.update({f"live.{m}.column": live_panels[m].column for m in slots})
        family_box.change(family_handler(slots, ui), inputs=family_box, outputs=list(dict.fromkeys(ui.values())),
                          api_visibility="private")
        panel_switches = [c for m in slots for c in (panels[m].column, panels[m].toggle)]
        shown.input(shown_handler(slots, ui), inputs=[family_box, shown], outputs=panel_switches, queue=False,
                    api_visibility="private")
        # -- refine ---------------------------------------------------------------------------------------
        refine_named = {f"refine.{m}.{o}": getattr(refine_panels[m], o) for m in slots for o in REFINE_PANEL_OUTPUTS}
        refine_named.update({f"refine.{m}.title": refine_panels[m].title for m in slots})
        refine_named.update(refine_board=refine_board, tradeoff=tradeoff, refine_left=refine_left,
                            refine_right=refine_right, refine_slider=refine_slider, refine_button=refine_button,
                            refine_stop=refine_stop)
        picked = dict(draft=draft, refine_prompt=refine_prompt, refine_methods=refine_methods,
                      strength=strength, draft_note=draft_note)
        live_named = {f"live.{m}.{o}": getattr(live_panels[m], o) for m in slots for o in LIVE_PANEL_OUTPUTS}
        runs.bind({**named, **refine_named, **picked, **live_named})
        refine_outputs = list(refine_named.values())
        for method, panel in panels.items():
            # The draft reaches the editor and the Refine tab opens in the browser, not through the server: an
            # image editor or a tab set that was once a server event's output is re-read (its images re-uploaded)
            # on every later progress update of every event, which slowed refines and live frames many times.
            panel.refine.click(None, inputs=panel.image, outputs=editor, js=TO_EDITOR, queue=False,
                               api_visibility="private")
            panel.refine.click(pick_draft_handler(runs, method), inputs=board,
                               outputs=[*picked.values(), *refine_outputs], queue=False, api_visibility="private")
        refine_button.click(gpu_task(runs.refine), inputs=[family_box, editor, refine_prompt, negative, seed, strength,
                                                            refine_methods, keep_outside, resize, draft, refine_board,
                                                            board],
                            validator=runs.validate_refine, outputs=refine_outputs, concurrency_id=GPU,
                            concurrency_limit=gpu_jobs, show_progress="minimal", show_progress_on=refine_status,
                            api_name="refine_page", api_visibility="private")  # "refine" is the API's
        refine_stop.click(runs.stop, queue=False, api_visibility="private")
        refine_methods.input(lambda fam, d, chosen: runs.by_component(
                                 runs.refine_columns(d.family if isinstance(d, Draft) else fam, chosen)),
                             inputs=[family_box, draft, refine_methods],
                             outputs=[c for m in slots for c in (refine_panels[m].column, refine_panels[m].title)],
                             queue=False, api_visibility="private")
        gr.on([refine_left.input, refine_right.input], refine_pick, inputs=[draft, refine_board, board, refine_left,
                                                                            refine_right],
              outputs=refine_slider, queue=False, api_visibility="private")
        # -- live -----------------------------------------------------------------------------------------
        live_outputs = [getattr(live_panels[m], o) for m in slots for o in ("image", "caption")]
        live_inputs = [family_box, live_prompt, live_seed, live_vary, live_methods_box, live_sketching, sketch,
                       live_strength]
        # The sketch is a plain canvas whose drawing the browser writes, as a PNG data URL, into a hidden box at
        # the end of each stroke (SKETCH_JS); the box's change draws a frame. Gradio's image editor was tried
        # first: reading it re-uploads its images and re-renders it, which fired its own events again (frames
        # triggered themselves without end), and it handed over its last server value, not the strokes.
        gr.on([live_prompt.input, live_seed.input, live_vary.input, live_methods_box.input, live_sketching.input,
               sketch.change, live_strength.release, live_tab.select], gpu_task(runs.live),
              inputs=live_inputs,
              outputs=live_outputs, trigger_mode="always_last", concurrency_id=GPU, concurrency_limit=gpu_jobs,
              show_progress="hidden", api_name="live_page", api_visibility="private")
        live_methods_box.input(runs.live_columns, inputs=[family_box, live_methods_box],
                               outputs=[live_panels[m].column for m in slots], queue=False, api_visibility="private")
        # -- your model -------------------------------------------------------------------------------------
        if custom is not None:
            custom_named = {f"{row}.{m}.{o}": getattr(custom.panels[row][m], o)
                            for row in CUSTOM_ROWS for m in present.style_slots() for o in CUSTOM_PANEL_OUTPUTS}
            custom_named.update(custom_heading=custom.headings["custom"], plain_heading=custom.headings["plain"],
                                custom_button=custom.button, custom_stop=custom.stop)
            runs.bind({**runs.components, **custom_named})
            custom_inputs = [family_box, custom.model, custom.prompt, custom.seed, custom.size, custom.without,
                             *[c for row in custom.loras for c in row]]
            gr.on([custom.button.click, custom.prompt.submit], gpu_task(runs.custom), inputs=custom_inputs,
                  outputs=list(custom_named.values()), validator=runs.validate_custom, concurrency_id=GPU,
                  concurrency_limit=gpu_jobs, show_progress="minimal", show_progress_on=custom.status,
                  api_visibility="private")
            custom.stop.click(runs.stop, queue=False, api_visibility="private")
        api_live, api_live_validate = live_api(engine, family)
        api_live_button.click(api_live, inputs=api_live_in, outputs=api_live_out, api_name="live",
                              validator=api_live_validate, concurrency_id=GPU, concurrency_limit=gpu_jobs)
        api_refine, api_refine_validate = refine_api(engine, family)
        api_refine_button.click(api_refine, inputs=api_refine_in, outputs=api_refine_out, api_name="refine",
                                validator=api_refine_validate, concurrency_id=GPU, concurrency_limit=gpu_jobs)
        api_compare, api_validate = compare_api(engine, family)
        api_button.click(api_compare, inputs=api_in, outputs=api_out, api_name="compare", validator=api_validate,
                         concurrency_id=GPU, concurrency_limit=gpu_jobs)
    return demo


def pick_family(family: str | None = None) -> tuple[str, str]:
    """The family the page opens on (flag, else FASTGEN_FAMILY, else the engine's default) and a notice for
    the page when its weights are not here ("" when they are)."""
    family = family or os.environ.get("FASTGEN_FAMILY")
    if family is None:
        try:
            return default_family(), ""
        except MissingWeightsError as exc:
            return "mini", (f"No model family can run here yet ({exc}). Fetch one with `python -m fastgen "
                            f"download --family sdxl` while online.")
    label = get_family(family).label  # an unknown name fails at startup, with the allowed names
    state = family_state(family)
    if state.usable:
        return family, ""
    return family, f"{label} cannot run here, so Generate will fail: {state.reason}. Or pick another family."


class PanelView:
    """The components of one method's panel."""

    def __init__(self, family: str, method: str):
        spec = panel_spec(family, method)
        visible = spec is not None and spec.shown
        with gr.Column(elem_classes="fg-panel", variant="panel", visible=visible, min_width=200) as self.column:
            spec = spec or get_family(family).methods[0]  # placeholder values for a hidden panel
            with gr.Row(equal_height=True):
                self.title = gr.Markdown(f"### {spec.label}")
                self.toggle = gr.Checkbox(visible, label="On", container=False, min_width=60, scale=0)
            self.image = gr.Image(label=spec.label, type="pil", format="png", interactive=False, show_label=False,
                                  height=256, buttons=["download", "fullscreen"], elem_classes="fg-image")
            self.status = gr.HTML()
            self.caption = gr.Markdown(elem_classes="fg-caption")
            self.steps = gr.Slider(**steps_props(spec))
            self.guidance = gr.Slider(**guidance_props(spec))
            self.note = gr.Markdown(present.panel_note(spec, spec.guidance), elem_classes="fg-note")
            self.refine = gr.Button("Refine this image", size="sm", elem_classes="fg-refine")
            with gr.Accordion("Code", open=False):
                self.code = gr.Code(language="python", show_label=False, interactive=False)

    def parts(self) -> dict:
        """The panel's components by name: what the family switch updates."""
        return dict(column=self.column, title=self.title, toggle=self.toggle, image=self.image, status=self.status,
                    caption=self.caption, steps=self.steps, guidance=self.guidance, note=self.note, code=self.code)


class CustomTab:
    """The Your model tab: a custom checkpoint and style LoRAs, its panels with the LoRAs and without them."""

    def __init__(self, family: str, runs: Runs):
        with gr.Tab("Your model", id="custom"):
            gr.Markdown(custom_intro(), elem_classes="fg-note")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self.model = gr.Textbox(label="Model", placeholder="a Hub id, e.g. someone/sdxl-finetune, or a "
                                            "folder on this machine",
                                            info="an SDXL or SD 1.5 checkpoint in diffusers layout (its architecture "
                                                 "is read from it); empty: the family on the Compare tab",
                                            elem_id="fg-custom-model")
                    self.prompt = gr.Textbox(label="Prompt", lines=2, value=example_prompts(family)[0],
                                             max_length=MAX_PROMPT_CHARS, elem_id="fg-custom-prompt")
                    with gr.Row(equal_height=True):
                        self.seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=2)
                        self.size = gr.Dropdown([("Native", present.NATIVE)] + [(f"{s}×{s}", f"{s}x{s}")
                                                                               for s in (512, 768, 1024)],
                                                value=present.NATIVE, label="Size", scale=2)
                    with gr.Row(equal_height=True):
                        self.without = gr.Checkbox(True, label="Also without the LoRAs", scale=3,
                                                   info="the same panels with no LoRA, to see what the style does")
                    with gr.Row():
                        self.button = gr.Button("Run your model", variant="primary", scale=3)
                        self.stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, min_width=80)
                    self.status = gr.Markdown(elem_classes="fg-note")
                with gr.Column(scale=3):
                    gr.Markdown("**Style LoRAs**: UNet LoRAs, applied to the reference and to LCM-LoRA alike, "
                                "each at its scale", elem_classes="fg-note")
                    self.loras = []
                    for row in range(MAX_LORAS):
                        with gr.Row(equal_height=True):
                            self.loras.append((
                                gr.Textbox(label=f"LoRA {row + 1}", placeholder="Hub id or folder", scale=3,
                                           elem_classes="fg-lora-repo"),
                                gr.Textbox(label="Weight file", placeholder="style.safetensors", scale=3,
                                           elem_classes="fg-lora-file"),
                                gr.Slider(-2, 2, value=1.0, step=0.05, label="Scale", scale=2,
                                          elem_classes="fg-lora-scale")))
            self.headings, self.panels = {}, {}
            for row in CUSTOM_ROWS:
                self.headings[row] = gr.Markdown(visible=False)
                self.panels[row] = {}
                with gr.Row(elem_classes="fg-panels"):
                    for method in present.style_slots():
                        self.panels[row][method] = OutputPanelView(row, family, method, False,
                                                                   details=True)


def custom_intro() -> str:
    """What the Your model tab does, and whether this server's host has turned it on."""
    what = ("Your own SDXL or SD 1.5 checkpoint, and your style LoRAs, at 50 steps and with LCM-LoRA at 4 steps: "
            "the same seed, with the style and without it.")
    _, allowlist = custom_switch()
    if custom_refusal("any/hub-model") is None:
        return f"{what} Any Hub id can be loaded here; folders only when the app runs on 127.0.0.1."
    if allowlist:
        return f"{what} This server loads only these: {', '.join(allowlist)}."
    return (f"{what} **Off on this server**: its host turns custom models and LoRAs on with FASTGEN_ALLOW_CUSTOM=1 "
            "(any Hub id) or FASTGEN_CUSTOM_ALLOW=a/b,c/d (those alone). The family's own methods work as before.")


class OutputPanelView:
    """One method's panel in the Refine or Live tab: shown when the method is chosen there. `details`: a status
    line (progress) and the code, as refine panels have; live panels have image and caption only."""

    def __init__(self, kind: str, family: str, method: str, visible: bool, details: bool):
        spec = panel_spec(family, method)
        with gr.Column(elem_classes=["fg-panel", f"fg-{kind}-panel"], variant="panel", visible=visible,
                       min_width=200) as self.column:
            self.title = gr.Markdown(f"### {spec.label if spec else method}")
            self.image = gr.Image(type="pil", format="png", interactive=False, show_label=False, height=256,
                                  buttons=["download", "fullscreen"], elem_classes="fg-image")
            self.status = gr.HTML() if details else None
            self.caption = gr.Markdown(elem_classes="fg-caption")
            self.code = None
            if details:
                with gr.Accordion("Code", open=False):
                    self.code = gr.Code(language="python", show_label=False, interactive=False)


SKETCH_SIZE = 256  # the canvas's pixels a side; each method's image-to-image fits it to its own size
SKETCH_PREFIX = "data:image/png;base64,"
MAX_SKETCH_CHARS = 1_000_000  # a 256 x 256 RGBA PNG is at most ~350 kB in base64


def sketchpad_html() -> str:
    """The Live tab's sketchpad: a plain canvas, colour swatches and Clear (SKETCH_JS does the drawing)."""
    swatches = "".join(f'<button type="button" class="fg-swatch{" fg-picked" if i == 0 else ""}" data-colour="{c}" '
                       f'aria-label="brush colour {c}"></button>' for i, c in enumerate(SKETCH_COLORS))
    return ('<div class="fg-sketchpad"><div class="fg-note">Sketch</div>'
            f'<canvas id="fg-sketch-canvas" width="{SKETCH_SIZE}" height="{SKETCH_SIZE}" aria-label="Sketch canvas">'
            f'</canvas><div class="fg-swatches">{swatches}'
            '<button type="button" class="fg-sketch-clear">Clear</button></div></div>')


# Drawing on the sketchpad, with listeners on the document (the Live tab's content may mount later): a round
# brush in the picked colour; at the end of each stroke (and on Clear) the canvas goes to the hidden
# #fg-sketch-data box as a PNG data URL, whose input event draws a frame.
SKETCH_JS = """() => {
    const pen = {colour: "%s", width: 16, down: false, last: null};
    const canvas = () => document.getElementById("fg-sketch-canvas");
    const at = (c, e) => { const r = c.getBoundingClientRect();
        return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height]; };
    const brush = (c) => { const x = c.getContext("2d"); x.lineCap = "round"; x.lineJoin = "round";
        x.lineWidth = pen.width; x.strokeStyle = pen.colour; x.fillStyle = pen.colour; return x; };
    const send = (c) => { const box = document.querySelector("#fg-sketch-data textarea, #fg-sketch-data input");
        if (!box) return;
        box.value = c.dataset.drawn === "1" ? c.toDataURL("image/png") : "";
        box.dispatchEvent(new Event("input", {bubbles: true})); };
    document.addEventListener("pointerdown", (e) => {
        const c = canvas(); if (!c || e.target !== c) return;
        e.preventDefault(); c.setPointerCapture(e.pointerId); pen.down = true; pen.last = at(c, e);
        const x = brush(c); x.beginPath(); x.arc(pen.last[0], pen.last[1], pen.width / 2, 0, 2 * Math.PI); x.fill();
        c.dataset.drawn = "1"; });
    document.addEventListener("pointermove", (e) => {
        const c = canvas(); if (!c || !pen.down) return;
        const p = at(c, e), x = brush(c); x.beginPath(); x.moveTo(pen.last[0], pen.last[1]); x.lineTo(p[0], p[1]);
        x.stroke(); pen.last = p; });
    document.addEventListener("pointerup", () => { const c = canvas(); if (!c || !pen.down) return;
        pen.down = false; send(c); });
    document.addEventListener("click", (e) => {
        const swatch = e.target.closest && e.target.closest(".fg-swatch");
        if (swatch) { pen.colour = swatch.dataset.colour;
            document.querySelectorAll(".fg-swatch").forEach((b) => b.classList.toggle("fg-picked", b === swatch)); }
        const clear = e.target.closest && e.target.closest(".fg-sketch-clear");
        if (clear && canvas()) { const c = canvas(); c.getContext("2d").clearRect(0, 0, c.width, c.height);
            c.dataset.drawn = "0"; send(c); } });
}""" % SKETCH_COLORS[0]


def panel_spec(family: str, method: str):
    return get_family(family).method(method) if method in present.panel_methods(family) else None


def steps_props(spec) -> dict:
    info = (f"{', '.join(map(str, spec.allowed_steps))}: one model file each" if spec.step_files else None)
    return dict(minimum=spec.min_steps, maximum=spec.max_steps, value=spec.steps, step=1, label="Steps",
                interactive=spec.min_steps < spec.max_steps, info=info)


def method_choices(family: str) -> list[tuple[str, str]]:
    """(label, name) for the Methods control, in panel order; the reference says so."""
    fam = get_family(family)
    return [(f"{fam.method(m).label}{' (reference)' if m == fam.reference else ''}", m) for m in fam.panel_order]


def shown_handler(slots: tuple[str, ...], ui: dict | None = None):
    def show(family: str, chosen: list[str]) -> dict:
        """Adding a method shows its panel, switched on; removing one hides it and switches it off."""
        names = set(present.panel_methods(family))
        out = {}
        for method in slots:
            on = method in names and method in (chosen or [])
            out.update({f"{method}.column": gr.Column(visible=on), f"{method}.toggle": on})
        return {ui[name]: value for name, value in out.items()} if ui else out
    return show


def guidance_props(spec) -> dict:
    fixed = present.fixed_guidance(spec)
    return dict(minimum=spec.min_guidance, maximum=spec.max_guidance + (1 if fixed else 0), value=spec.guidance,
                step=0.1, label="Guidance", info=present.guidance_info(spec), interactive=not fixed)


def panel_note_handler(method: str):
    def note(family: str, guidance: float) -> str:
        spec = panel_spec(family, method)
        return present.panel_note(spec, float(guidance)) if spec is not None else ""
    return note


DRAFT_NOTE = ("Press **Refine this image** under a finished panel to refine it here, or upload an image. Paint over "
              "it to inpaint that region; leave it unpainted to refine all of it.")


def refine_default(family: str) -> list[str]:
    """The methods an upload is refined with until a draft is picked: the reference (the 50-step baseline)."""
    fam = get_family(family)
    return [fam.reference or fam.default_methods[0]]


def pick_draft_handler(runs: Runs, method: str):
    def pick(board: Board | None):
        return runs.pick_draft(method, board)
    return pick


def refine_pick(draft: Draft | None, refine_board: Board | None, board: Board | None, left: str | None,
                right: str | None):
    """The refine slider's pair, as the visitor chose it."""
    family = draft.family if isinstance(draft, Draft) else None
    return present.refine_images(draft if isinstance(draft, Draft) else None,
                                 refine_board if isinstance(refine_board, Board) else None,
                                 reference_result(board, family) if family else None, left, right)


def rerun_handler(runs: Runs, method: str):
    def rerun(request: gr.Request, board: Board | None, enabled: bool, steps: float, guidance: float):
        yield from runs.rerun(method, request, board, enabled, steps, guidance)
    return rerun


def family_handler(slots: tuple[str, ...], ui: dict | None = None):
    """The family switch: updates by output name, or by component when `ui` (name -> component) is given."""

    def switch(family: str) -> dict:
        """Switching family resets the page to that family's methods, ranges, sizes and examples."""
        prompts = example_prompts(family)
        fam = get_family(family)
        out = dict(size=gr.Dropdown(choices=present.size_choices(family), value=present.NATIVE),
                   examples=gr.Dataset(samples=[[p] for p in prompts]), prompt=prompts[0], board=None, slider=None,
                   left=gr.Dropdown(choices=[], value=None), right=gr.Dropdown(choices=[], value=None),
                   grid_file=gr.DownloadButton(value=None, visible=False),
                   json_file=gr.DownloadButton(value=None, visible=False),
                   shown=gr.CheckboxGroup(choices=method_choices(family), value=list(fam.default_methods)),
                   refine_methods=gr.CheckboxGroup(choices=method_choices(family), value=refine_default(family)),
                   draft=None, refine_board=None, tradeoff="", refine_slider=None, draft_note=DRAFT_NOTE,
                   live_prompt=prompts[0], live_methods=gr.CheckboxGroup(
                       choices=[(fam.method(m).label, m) for m in present.live_methods(family)],
                       value=present.live_default(family)))
        out.update({f"live.{m}.column": gr.Column(visible=m in present.live_default(family)) for m in slots})
        out.update({f"refine.{m}.column": gr.Column(visible=m in refine_default(family)) for m in slots})
        for method in slots:
            spec = panel_spec(family, method)
            if spec is None:  # not this family's: hidden and off
                out.update({f"{method}.column": gr.Column(visible=False), f"{method}.toggle": False})
                continue
            out.update({f"{method}.{name}": value for name, value in dict(
                column=gr.Column(visible=spec.shown), title=f"### {spec.label}", toggle=spec.shown, image=None,
                status="", caption="", steps=gr.Slider(**steps_props(spec)), guidance=gr.Slider(**guidance_props(spec)),
                note=present.panel_note(spec, spec.guidance), code="").items()})
        return {ui[name]: value for name, value in out.items()} if ui else out
    return switch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FastGen web demo")
    parser.add_argument("--family", default=None, help=f"one of {', '.join(FAMILIES)} (default: FASTGEN_FAMILY, "
                        "else sdxl with CUDA, mini without)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--backend", default=os.environ.get("FASTGEN_BACKEND"),
                        help="URL of `python -m fastgen serve`: model work runs there (default: in this process)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    if args.backend:
        app = create_demo(RemoteEngine(args.backend), family=args.family)
    else:
        app = demo if args.family is None else create_demo(family=args.family)
    launch(app, host=args.host, port=args.port)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Serve `app` the one way this project serves it: bounded queue, no share link, small uploads."""
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    PUBLIC["bind"] = host not in ("127.0.0.1", "localhost", "::1")  # local folders only on a loopback bind
    return app.launch(server_name=host, server_port=port, share=False, max_file_size=MAX_UPLOAD, theme=THEME, css=CSS,
                      js=SKETCH_JS, footer_links=["api"], **kwargs)


demo = create_demo(RemoteEngine(os.environ["FASTGEN_BACKEND"]) if os.environ.get("FASTGEN_BACKEND") else None)

if __name__ == "__main__":
    main()
