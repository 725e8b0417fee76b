"""Handler-level tests of the web demo: the event functions of app.py, called directly, no server.

A fake engine stands in for fastgen.engine so these run in a second and can time Stop precisely;
tests/test_app_client.py and tests/test_app_browser.py drive the real engine.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

import app
from fastgen import present
from fastgen.engine import Engine, RunStopped
from fastgen.results import Comparison
from fastgen.registry import get_family

COLORS = {"turbo": (220, 60, 60), "lcm": (60, 160, 80), "lcm-lora": (60, 90, 220), "baseline": (200, 170, 40)}


@dataclass
class FakeResult:
    method: str
    label: str
    image: Image.Image
    steps: int
    guidance: float
    cfg: bool
    seconds: float
    steps_per_second: float
    load_seconds: float = 0.0
    warnings: list = field(default_factory=list)
    code: str = ""
    width: int = 64
    height: int = 64
    denoising_steps: int | None = None
    mode: str = "text2img"
    strength: float | None = None
    outside_change: dict | None = None

    def to_dict(self):
        return {k: v for k, v in self.__dict__.items() if k != "image"}


class FakeEngine:
    """Engine.run / iter_compare with the real signatures: sleeps per step, honours on_step and stop."""

    def __init__(self, step_seconds=0.0, fail=None, previews=False):
        self.step_seconds = step_seconds
        self.fail = fail  # {method: exception} raised when that method starts
        self.previews = previews  # call on_preview with a grey image at each step but the last
        self.calls = []

    def run(self, family, method, prompt, *, negative_prompt="", seed=0, width=None, height=None, steps=None,
            guidance=None, on_step=None, stop=None, on_preview=None):
        spec = get_family(family).method(method)
        steps = spec.steps if steps is None else steps
        guidance = spec.guidance if guidance is None else guidance
        self.calls.append((method, prompt, seed, steps, guidance, width, height))
        if self.fail and method in self.fail:
            raise self.fail[method]
        for i in range(steps):
            if stop is not None and stop.is_set():
                raise RunStopped(f"{method} stopped at step {i}")
            time.sleep(self.step_seconds)
            if self.previews and on_preview is not None and i + 1 < steps:
                on_preview(method, i + 1, steps, Image.new("RGB", (16, 16), (i, i, i)))
            on_step and on_step(method, i + 1, steps)
        seconds = 0.01 * steps * (2 if spec.cfg_at(guidance) else 1)  # deterministic "timings"
        size = (width or spec.native_size, height or spec.native_size)
        return FakeResult(method, spec.label, Image.new("RGB", size, COLORS[method]), steps, guidance,
                          spec.cfg_at(guidance), seconds, steps / seconds, code=f"# {method} seed={seed}")

    def iter_compare(self, family, prompt, methods=None, *, steps=None, guidance=None, **kw):
        for m in methods:
            yield self.run(family, m, prompt, steps=(steps or {}).get(m), guidance=(guidance or {}).get(m), **kw)

    def compare(self, family, prompt, methods=None, **kw):
        results = list(self.iter_compare(family, prompt, methods, **kw))
        return self.comparison(family, prompt, results, negative_prompt=kw.get("negative_prompt", ""),
                               seed=kw.get("seed", 0))

    def iter_refine(self, family, image, prompt, methods=None, *, mask=None, strength=None, steps=None,
                    guidance=None, on_step=None, stop=None, seed=0, on_preview=None, **kw):
        """Refines as the real engine reports them: each method's strength, the steps that ran; the image is the
        method's colour over the source (so a test sees which method drew it)."""
        for m in methods:
            recipe = get_family(family).method(m).refine_recipe("inpaint" if mask is not None else "img2img")
            s = recipe.strength if strength is None else strength
            self.calls.append(("refine", m, prompt, seed, s, mask is not None, image.size))
            ran = recipe.denoising_steps(recipe.steps, s)
            for i in range(ran):
                if stop is not None and stop.is_set():
                    raise RunStopped(f"{m} stopped at step {i}")
                time.sleep(self.step_seconds)
                on_step and on_step(m, i + 1, ran)
            out = Image.blend(image, Image.new("RGB", image.size, COLORS[m]), 0.5)
            yield FakeResult(m, get_family(family).method(m).label, out, recipe.steps, recipe.guidance, False,
                             0.01 * ran, 100.0, code=f"# refine {m}", width=image.width, height=image.height,
                             denoising_steps=ran, mode=recipe.mode, strength=s,
                             outside_change=None if mask is None else {"mean": 0.0, "max": 0, "kept": True})

    def refine(self, family, method, image, prompt, *, seed=0, strength=None, steps=None, resize=False, **kw):
        """One refine with the real engine's checks (steps x strength, image), then as iter_refine draws it."""
        fam = get_family(family)
        Engine._refine_args(fam, fam.method(method), image, None, strength, steps, None, False, resize)
        return next(self.iter_refine(family, image.resize((64, 64)), prompt, [method], strength=strength, seed=seed))

    def comparison(self, family, prompt, results, *, negative_prompt="", seed=0, **kw):
        return Comparison(family, prompt, negative_prompt, seed, "cpu", "float32", results, [])


SLOTS = present.panel_slots()  # one panel per registered method, in the page's order
PANEL_ORDER = get_family("mini").panel_order  # the mini family's panels, which these tests run


def defaults(family="mini", off=()):
    """The flat (toggle, steps, guidance) per panel slot, at each method's defaults; slots the family lacks are
    hidden and off."""
    values = []
    fam = get_family(family)
    for m in SLOTS:
        if m not in fam.method_names:
            values += [False, 1, 0.0]
            continue
        spec = fam.method(m)
        values += [m not in off and spec.shown, spec.steps, spec.guidance]
    return values


def named(update: dict) -> dict:
    """A handler's update by output name, gr.skip() for what it leaves as it is."""
    names = [f"{m}.{o}" for m in SLOTS for o in app.PANEL_OUTPUTS] + list(app.RUN_OUTPUTS)
    assert set(update) <= set(names), set(update) - set(names)
    return {name: update.get(name, gr.skip()) for name in names}


def download(button) -> str:
    """The file a DownloadButton update offers (Gradio keeps it as FileData)."""
    return button.value["path"]


def changed(value) -> bool:
    return not (isinstance(value, dict) and value == gr.skip())


@pytest.fixture
def runs(tmp_path):
    return app.Runs(FakeEngine(), tmp_path)


def generate(runs, prompt="a large red circle on a blue background", seed=7, size="native", off=(), values=None):
    return [named(u) for u in runs.generate(None, "mini", prompt, "", seed, size, None, *(values or defaults(off=off)))]


def test_generate_fills_panels_fastest_first_baseline_last(tmp_path):
    runs = app.Runs(FakeEngine(step_seconds=0.004), tmp_path)
    updates = generate(runs)
    assert "Starting" in updates[0]["turbo.status"] and "Waiting" in updates[0]["baseline.status"]
    assert updates[0]["generate"].interactive is False and updates[0]["stop"].interactive is True
    # The order images arrive in: each update that carries a new image names one method.
    arrivals = [m for u in updates[1:] for m in PANEL_ORDER
                if changed(u[f"{m}.image"]) and u[f"{m}.image"] is not None]
    assert arrivals[-1] == "baseline"
    assert arrivals[0] == "turbo"  # 1 step beats 4
    assert sorted(dict.fromkeys(arrivals)) == sorted(PANEL_ORDER)
    # Progress shows step by step for the running panel, at most ~10 updates a second.
    progress = [u["baseline.status"] for u in updates
                if changed(u["baseline.status"]) and "/ 50" in u["baseline.status"]]
    assert 1 < len(progress) < 15
    final = updates[-1]
    board = final["board"]
    assert [board.panels[m].state for m in PANEL_ORDER] == ["done"] * 4
    # Captions, re-rendered when the baseline lands, carry the speed-up over the baseline.
    last_caption = {m: next(u[f"{m}.caption"] for u in reversed(updates) if changed(u[f"{m}.caption"]))
                    for m in PANEL_ORDER}
    assert "**100.0×** faster" in last_caption["turbo"]  # 50 steps x 2 CFG passes x 0.01 s / 0.01 s
    assert "CFG **on**" in last_caption["baseline"] and "reference" in last_caption["baseline"]
    assert "CFG **off**" in last_caption["lcm"]
    # Buttons: Generate back on, Stop off; downloads offered; slider compares fastest vs baseline.
    assert final["generate"].interactive is True and final["stop"].interactive is False
    assert final["left"].value == "turbo" and final["right"].value == "baseline"
    sliders = [u["slider"] for u in updates if changed(u["slider"])]
    assert sliders[-1][1].getpixel((0, 0)) == COLORS["baseline"]
    assert runs.engine.calls[0][2] == 7  # the seed reached the engine


def test_a_slider_is_not_sent_again_with_the_images_it_already_shows(runs):
    """Each pair goes out once: sent again, the browser fetches both images anew and redraws the slider."""
    updates = generate(runs)
    sent = [tuple(u["slider"]) for u in updates if changed(u["slider"]) and u["slider"] is not None]
    assert sent and len({tuple(map(id, pair)) for pair in sent}) == len(sent), [list(map(id, p)) for p in sent]
    assert not changed(updates[-1]["slider"])  # the settling update: the pair was sent when the baseline landed
    board = updates[-1]["board"]
    draft = runs.pick_draft("turbo", board)["draft"]
    refined = refine(runs, board, {"background": draft.image, "layers": []}, draft=draft)
    sent = [tuple(u["refine_slider"]) for u in refined if u.get("refine_slider") is not None
            and changed(u["refine_slider"])]
    assert sent and len({tuple(map(id, pair)) for pair in sent}) == len(sent)


def test_an_image_goes_to_the_page_as_a_file_written_once(runs, tmp_path, monkeypatch):
    """Two outputs (or two visitors) showing the same image: Gradio would rewrite its cache file for each, and a
    browser fetching the first copy then gets a truncated image. As a file named by its pixels the image is
    written once, served from where it lies, and never rewritten."""
    from gradio import processing_utils

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    saves = []
    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", lambda self, *a, **k: (saves.append(a[0]), original(self, *a, **k)))
    red, blue = Image.new("RGB", (64, 64), (220, 40, 40)), Image.new("RGB", (64, 64), (40, 90, 220))
    first = present.page_file(red, app.page_files())
    assert len(saves) == 1 and Path(first).parent == tmp_path / "cache" / "fastgen"
    again = present.page_value((red.copy(), blue), app.page_files())  # the same pixels, a new object
    assert again[0] == first and len(saves) == 2  # only blue was written
    with Image.open(first) as back:
        assert back.format == "PNG" and list(back.convert("RGB").getdata()) == list(red.getdata())  # lossless
    assert not [p for p in Path(first).parent.iterdir() if p.name.startswith(".")]  # no staging file left
    indexed = [Image.new("P", (8, 8), 0) for _ in range(2)]  # the same indices into two palettes
    indexed[0].putpalette([255, 0, 0] * 256)
    indexed[1].putpalette([0, 0, 255] * 256)
    assert present.page_file(indexed[0], app.page_files()) != present.page_file(indexed[1], app.page_files())
    # Gradio serves the file from where it lies: no copy of it is made, so none is rewritten either
    component = gr.Image(type="pil", format="png")
    served = processing_utils.move_files_to_cache(component.postprocess(first), component, postprocess=True)
    assert served["path"] == first
    assert present.page_value("text", app.page_files()) == "text" and present.page_value(None, app.page_files()) is None
    # on the page, every update's images go out so: a panel's image and a slider's pair
    slider = gr.ImageSlider(type="pil")
    runs.bind({"turbo.image": component, "slider": slider, "turbo.caption": gr.Markdown()})
    out = runs.by_component({"turbo.image": red, "slider": (blue, red), "turbo.caption": "x"})
    assert out[component] == first and out[slider] == (again[1], first) and len(saves) == 4


def test_disabled_panels_do_not_run(runs):
    updates = generate(runs, off=("lcm", "baseline"))
    assert [c[0] for c in runs.engine.calls] == ["turbo", "lcm-lora"]
    board = updates[-1]["board"]
    assert board.panels["lcm"].state == "off"
    assert "speed-up: run the baseline" in board.caption("turbo")


def test_stop_keeps_finished_panels(tmp_path):
    runs = app.Runs(FakeEngine(step_seconds=0.05), tmp_path)
    stream = runs.generate(None, "mini", "a small green circle on an orange background", "", 0, "native", None,
                           *defaults())
    updates = []
    for update in map(named, stream):
        updates.append(update)
        board = update["board"]
        if board.panels["lcm"].state == "running":  # turbo done, lcm under way: press Stop
            runs.stop(None)
    board = updates[-1]["board"]
    assert board.panels["turbo"].state == "done"
    assert board.panels["lcm"].state == "stopped"
    assert board.panels["baseline"].state == "idle" and board.panels["baseline"].result is None
    assert [c[0] for c in runs.engine.calls] == ["turbo", "lcm"]
    assert updates[-1]["lcm.status"].count("Stopped") == 1
    assert updates[-1]["generate"].interactive is True
    assert updates[-1]["grid_file"].value  # what finished can still be downloaded


def test_rerun_changes_only_that_panel(runs):
    board = generate(runs)[-1]["board"]
    updates = [named(u) for u in runs.rerun("lcm", None, board, True, 2, 3.0)]
    final = updates[-1]
    assert runs.engine.calls[-1][:5] == ("lcm", "a large red circle on a blue background", 7, 2, 3.0)
    assert final["lcm.image"] is not None and not changed(final["turbo.image"])
    new = final["board"]
    assert new.panels["lcm"].result.steps == 2
    assert new.panels["turbo"].result is board.panels["turbo"].result  # untouched panels keep their results
    data = json.loads(open(download(final["json_file"])).read())
    assert {r["method"]: r["steps"] for r in data["results"]} == {"turbo": 1, "lcm": 2, "lcm-lora": 4,
                                                                  "baseline": 50}


def test_a_stopped_rerun_keeps_the_previous_image(tmp_path):
    runs = app.Runs(FakeEngine(), tmp_path)
    board = generate(runs)[-1]["board"]
    runs.engine.step_seconds = 0.02
    updates = []
    for update in map(named, runs.rerun("baseline", None, board, True, 80, 4.0)):
        updates.append(update)
        if update["board"].panels["baseline"].step > 2:
            runs.stop(None)
    final = updates[-1]["board"].panels["baseline"]
    assert final.state == "stopped" and final.result is board.panels["baseline"].result
    assert "previous run" in updates[-1]["baseline.status"]
    assert updates[-1]["baseline.image"] is final.result.image


def test_rerun_before_any_run_does_nothing(runs):
    (update,) = list(runs.rerun("lcm", None, None, True, 2, 3.0))
    assert all(not changed(v) for v in update) and runs.engine.calls == []


def test_downloads_carry_settings(runs):
    final = generate(runs, seed=123)[-1]
    grid = Image.open(download(final["grid_file"]))
    meta = json.loads(grid.text["fastgen"])
    assert meta["seed"] == 123 and meta["family"] == "mini"
    assert [r["method"] for r in meta["results"]] == list(PANEL_ORDER)
    assert grid.width >= 4 * 64
    data = json.loads(open(download(final["json_file"])).read())
    assert data == meta


@pytest.mark.parametrize("prompt, values, message", [
    ("  ", None, "`prompt` must not be empty"),
    ("a red circle", defaults(off=PANEL_ORDER), "Turn on at least one panel"),
])
def test_bad_input_is_a_gr_error(runs, prompt, values, message):
    with pytest.raises(gr.Error, match=message):
        generate(runs, prompt=prompt, values=values)


@pytest.mark.parametrize("change, field", [
    (dict(prompt="x" * 2001), "prompt"),
    (dict(prompt="\u200b"), "prompt"),
    (dict(negative="x" * 5000), "negative_prompt"),
    (dict(seed=2.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(seed=-3), "seed"),
    (dict(size="4096x4096"), "width"),
    (dict(size="64x100"), "height"),
    (dict(family="../sdxl"), "family"),
    (dict(steps=2.5), "steps"),
    (dict(steps=99), "steps"),
    (dict(off=PANEL_ORDER), "methods"),
])
def test_generate_validator_marks_the_field_before_anything_is_queued(runs, change, field, caplog):
    """Private page events are reachable over raw HTTP too: the page's inputs go through the same schema."""
    inputs = dict(family="mini", prompt="a red circle", negative="", seed=7, size="native")
    values = defaults(off=change.pop("off", ()))
    if "steps" in change:
        values[SLOTS.index("lcm") * 3 + 1] = change.pop("steps")
    inputs.update(change)
    with caplog.at_level(logging.INFO, logger="fastgen.app"):
        checks = runs.validate_page(inputs["family"], inputs["prompt"], inputs["negative"], inputs["seed"],
                                    inputs["size"], None, *values)
    refused = [i for i, c in enumerate(checks) if not c["is_valid"]]
    assert refused and all(f"`{field}`" in checks[i]["message"] or field == "methods" for i in refused)
    names = ["family", "prompt", "negative_prompt", "seed", "width", "board"]
    if field in names or field == "height":
        assert refused == [names.index("width" if field == "height" else field)]
    assert [r.levelname for r in caplog.records if r.getMessage().startswith("refused")] == ["INFO"]
    assert runs.engine.calls == []
    ok = runs.validate_page("mini", "a red circle", "", 7, "native", None, *defaults())
    assert all(c["is_valid"] for c in ok)


def test_a_running_panel_shows_its_latest_preview_then_its_image(tmp_path):
    runs = app.Runs(FakeEngine(step_seconds=0.01, previews=True), tmp_path)
    updates = generate(runs)
    shown = [u["baseline.image"] for u in updates if changed(u["baseline.image"]) and u["baseline.image"] is not None]
    previews = [image for image in shown if image.size == (16, 16)]
    assert 2 < len(previews) < 15  # coalesced with the progress, about ten a second over the baseline's 0.5 s
    levels = [image.getpixel((0, 0))[0] for image in previews]
    assert levels == sorted(levels) and levels[-1] >= 30  # newer steps replace older ones
    assert shown[-1].getpixel((0, 0)) == COLORS["baseline"] and shown[-1].size != (16, 16)  # then the image
    assert updates[-1]["board"].panels["baseline"].preview is None


def test_a_failed_panel_says_why_and_the_others_finish(tmp_path):
    from fastgen.results import MethodFailure

    class OneFails(FakeEngine):
        def iter_compare(self, family, prompt, methods=None, **kw):
            for outcome in super().iter_compare(family, prompt, methods, **kw):
                if outcome.method == "lcm":
                    yield MethodFailure("lcm", "LCM", "out-of-memory", "LCM ran out of memory at 64x64 on cpu")
                else:
                    yield outcome

    updates = generate(app.Runs(OneFails(), tmp_path))
    final = updates[-1]
    assert "ran out of memory" in final["lcm.status"] or any("ran out of memory" in str(u["lcm.status"])
                                                             for u in updates)
    board = final["board"]
    assert board.panels["lcm"].state == "failed" and board.panels["lcm"].result is None
    assert [m for m, p in board.panels.items() if p.state == "done"] == ["turbo", "lcm-lora", "baseline"]


def test_engine_value_error_reaches_the_user(tmp_path):
    runs = app.Runs(FakeEngine(fail={"lcm": ValueError("`steps` for lcm must be in [1, 8], got 9")}), tmp_path)
    with pytest.raises(gr.Error, match=r"must be in \[1, 8\], got 9"):
        generate(runs)


def test_unexpected_error_is_logged_not_leaked(tmp_path, caplog):
    runs = app.Runs(FakeEngine(fail={"turbo": RuntimeError("CUDA error: secret/path/to/model")}), tmp_path)
    with caplog.at_level(logging.ERROR, logger="fastgen.app"), pytest.raises(gr.Error) as err:
        generate(runs)
    assert "secret" not in str(err.value) and "logged" in str(err.value)
    assert "secret/path/to/model" in caplog.text


def test_closing_the_stream_stops_the_worker():
    started, stopped = threading.Event(), threading.Event()

    def job(on_step, stop):
        started.set()
        while not stop.wait(0.01):
            on_step("baseline", 1, 50)
        stopped.set()
        raise RunStopped("stopped")
        yield  # a generator, like Engine.iter_compare

    events = present.stream(job)
    next(events)
    events.close()  # the browser went away mid-run
    assert started.is_set() and stopped.is_set()


def test_run_order_counts_cfg_passes():
    spec = get_family("mini").method
    steps = {m: spec(m).steps for m in PANEL_ORDER}
    guidance = {m: spec(m).guidance for m in PANEL_ORDER}
    assert present.run_order("mini", PANEL_ORDER, steps, guidance) == ["turbo", "lcm", "lcm-lora", "baseline"]
    guidance["lcm-lora"], steps["lcm-lora"], steps["lcm"] = 2.0, 3, 5  # CFG on: 6 passes beat LCM's 5
    assert present.run_order("mini", PANEL_ORDER, steps, guidance) == ["turbo", "lcm", "lcm-lora", "baseline"]
    steps["lcm"] = 8
    assert present.run_order("mini", PANEL_ORDER, steps, guidance) == ["turbo", "lcm-lora", "lcm", "baseline"]


def test_panels_say_when_the_negative_prompt_is_ignored():
    sdxl = get_family("sdxl")
    assert "embedding" in present.negative_prompt_note(sdxl.method("lcm"), 8.0)
    assert "without classifier-free guidance" in present.negative_prompt_note(sdxl.method("turbo"), 0.0)
    assert "guidance 1 or below" in present.negative_prompt_note(sdxl.method("lcm-lora"), 1.0)
    assert present.negative_prompt_note(sdxl.method("lcm-lora"), 1.5) == ""
    assert present.negative_prompt_note(sdxl.method("baseline"), 5.0) == ""


def test_family_switch_sets_ranges_and_licence():
    out = app.family_handler(SLOTS)("sdxl")
    assert out["size"].value == present.NATIVE and ("1024×1024 for all", "1024x1024") in out["size"].choices
    methods = out["shown"]
    assert [name for _, name in methods.choices] == list(get_family("sdxl").panel_order)
    assert methods.value == ["turbo", "lcm", "lcm-lora", "baseline"]  # the others are a click away
    steps, guidance, note = out["turbo.steps"], out["turbo.guidance"], out["turbo.note"]
    assert (steps.minimum, steps.maximum, steps.value) == (1, 4, 1)
    assert guidance.interactive is False and "Fixed at 0" in guidance.info
    assert "non-commercial" in note
    assert (out["lcm.steps"].maximum, out["lcm.guidance"].value) == (8, 8.0)
    assert out["lightning.column"].visible is False and out["lightning.toggle"] is False  # off until added
    assert "1, 2, 4, 8: one model file each" in out["lightning.steps"].info
    assert "openrail++" in out["lightning.note"]
    mini = app.family_handler(SLOTS)("mini")
    assert mini["dmd2.column"].visible is False and "dmd2.steps" not in mini


def test_adding_and_removing_a_method_shows_and_switches_its_panel():
    out = app.shown_handler(SLOTS)("sdxl", ["turbo", "lightning", "baseline"])
    state = {m: (out[f"{m}.column"].visible, out[f"{m}.toggle"]) for m in SLOTS}
    assert state["lightning"] == (True, True) and state["turbo"] == (True, True)
    assert state["lcm"] == (False, False) and state["dmd2"] == (False, False)
    out = app.shown_handler(SLOTS)("mini", ["turbo", "lightning"])  # not a mini method: stays hidden
    assert out["lightning.column"].visible is False


def test_model_work_shares_one_gpu_slot():
    """Every event that reaches the engine is in the one concurrency group, limited to a single job."""
    gpu = [f for f in app.demo.fns.values() if f.concurrency_id == app.GPU]
    fills_on_open = app.pick_family()[0] in app.FILL_ON_OPEN  # then generate also runs as the page loads
    # generate, compare, refine and live (page and API each), the Your model run, one rerun per panel slot
    assert len(gpu) == 7 + len(SLOTS) + fills_on_open
    assert all(f.concurrency_limit == 1 for f in gpu)
    for name in ("compare", "refine", "live"):
        assert next(f for f in gpu if f.api_name == name).api_visibility == "public"
    public = {f.api_name for f in app.demo.fns.values() if f.api_visibility == "public"}
    assert public == {"compare", "refine", "live"}
    live_page = next(f for f in gpu if f.api_name == "live_page")
    assert live_page.trigger_mode == "always_last"  # only the newest edit is drawn


def test_example_script_runs(fake_mini, tmp_path, monkeypatch, capsys):
    """examples/compare.py end to end on random mini weights, run in this process (a fresh interpreter
    would spend most of a minute importing torch and diffusers again)."""
    import runpy
    from pathlib import Path

    from fastgen import registry

    monkeypatch.setitem(registry.FAMILIES, "mini", fake_mini)
    script = Path(app.__file__).parent / "examples" / "compare.py"
    monkeypatch.setattr("sys.argv", [str(script), "a red circle", "--family", "mini", "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if "steps" in line]
    assert [line.split()[0] for line in lines] == ["Turbo", "LCM", "LCM-LoRA", "Baseline"]
    assert "faster" in lines[0] and Image.open(tmp_path / "grid.png").width >= 4 * 64


def test_family_list_offers_only_what_can_run_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # no sdxl/sd15 weights here, and HF_HUB_OFFLINE=1
    blocks = app.create_demo(FakeEngine(), family="mini").blocks.values()
    dropdown = next(b for b in blocks if isinstance(b, gr.Dropdown) and b.label == "Model family")
    assert [value for _, value in dropdown.choices] == ["mini"]
    note = next(b for b in blocks if isinstance(b, gr.Markdown) and "is unavailable" in (b.value or ""))
    assert note.visible and "Stable Diffusion XL is unavailable" in note.value and "HF_HUB_OFFLINE" in note.value


def test_opening_on_a_family_that_cannot_run_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    family, notice = app.pick_family("sd15")
    assert family == "sd15" and "Generate will fail" in notice and "python -m fastgen download --family sd15" in notice


def test_the_compare_pair_the_user_picked_survives_the_next_run(runs):
    first = generate(runs)[-1]
    board = first["board"]
    assert (first["left"].value, first["right"].value) == ("turbo", "baseline")  # the default pair
    images = present.pick(board, "lcm", "lcm-lora")
    assert images[0] is board.panels["lcm"].result.image
    updates = [named(u) for u in runs.generate(None, "mini", "a blue square", "", 3, "native", board, *defaults())]
    pairs = {(u["left"].value, u["right"].value) for u in updates if changed(u["left"])}
    assert pairs == {("lcm", "lcm-lora")}  # kept as each panel finished, not reset


# --- refine -----------------------------------------------------------------------------------------------

REFINE_NAMES = ([f"refine.{m}.{o}" for m in SLOTS for o in (*app.REFINE_PANEL_OUTPUTS, "title")]
                + list(app.REFINE_OUTPUTS))


def refine(runs, board, editor=None, methods=("turbo", "baseline"), strength=0.5, draft=None, prompt="a red square"):
    updates = list(runs.refine(None, "mini", editor, prompt, "", 7, strength, list(methods), True, False, draft,
                               None, board))
    assert all(set(u) <= set(REFINE_NAMES) for u in updates), set().union(*updates) - set(REFINE_NAMES)
    return updates


def test_refine_this_image_opens_the_refine_tab_with_the_draft(runs):
    board = generate(runs)[-1]["board"]
    out = runs.pick_draft("turbo", board)  # the editor's image and the tab switch happen in the browser
    assert "editor" not in out and "tabs" not in out
    draft = out["draft"]
    assert (draft.method, draft.prompt, draft.seed) == ("turbo", "a large red circle on a blue background", 7)
    assert draft.image is board.panels["turbo"].result.image
    assert out["refine_methods"].value == ["turbo", "baseline"]  # its own method and the reference
    assert out["strength"] == get_family("mini").method("turbo").refine.strength
    assert out["refine.turbo.column"].visible and out["refine.baseline.column"].visible
    assert not out["refine.lcm.column"].visible
    with pytest.raises(gr.Error, match="Generate first"):
        runs.pick_draft("turbo", None)


def test_refine_streams_panels_with_the_steps_run_and_the_tradeoff(runs):
    board = generate(runs)[-1]["board"]
    draft = runs.pick_draft("turbo", board)["draft"]
    updates = refine(runs, board, {"background": draft.image, "layers": []}, draft=draft)
    assert updates[0]["refine_button"].interactive is False
    final = updates[-1]
    rboard = final["refine_board"]
    assert [rboard.panels[m].state for m in ("turbo", "baseline")] == ["done", "done"]
    assert runs.engine.calls[-2:] == [("refine", "turbo", "a red square", 7, 0.5, False, (64, 64)),
                                      ("refine", "baseline", "a red square", 7, 0.5, False, (64, 64))]
    caption = next(u["refine.turbo.caption"] for u in reversed(updates) if "refine.turbo.caption" in u)
    assert "strength **0.5**" in caption and "**1** of 2 steps run" in caption
    # draft 0.01 s + refine 0.01 s against the baseline's own 50-step time (1.00 s with CFG in the fake)
    assert "Turbo draft 0.01 s + Turbo refine 0.01 s = **0.02 s**" in final["tradeoff"]
    assert "Baseline alone, 50 steps: **1.00 s**" in final["tradeoff"]
    assert final["refine_left"].value == "draft" and final["refine_right"].value == "turbo"
    slider = next(u["refine_slider"] for u in reversed(updates) if changed(u.get("refine_slider", gr.skip())))
    assert slider[0] is draft.image


def test_a_painted_stroke_inpaints_and_an_upload_is_refined_as_it_is(runs):
    board = generate(runs)[-1]["board"]
    draft = runs.pick_draft("lcm", board)["draft"]
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (10, 10, 30, 30))
    refine(runs, board, {"background": draft.image, "layers": [layer]}, methods=["lcm"], strength=0.9, draft=draft)
    assert runs.engine.calls[-1][5] is True  # a mask went to the engine
    source, mask, from_draft = app.editor_images({"background": draft.image.convert("RGBA"),
                                                  "layers": [layer.resize((128, 128))]}, draft)
    assert source is draft.image and from_draft
    assert mask.size == (64, 64) and mask.getpixel((20, 20)) == 255 and mask.getpixel((40, 40)) == 0
    upload = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent: refined as white, not black
    source, mask, from_draft = app.editor_images({"background": upload, "layers": []}, draft)
    assert source.mode == "RGB" and source.getpixel((0, 0)) == (255, 255, 255) and mask is None
    assert not from_draft  # another image replaced the draft: refined as an upload


@pytest.mark.parametrize("editor, kwargs, field, message", [
    (None, {}, "image", "Choose a source"),
    ("draft", {"methods": []}, "methods", "at least one method"),
    ("draft", {"strength": 0.0}, "strength", r"in \(0, 1\]"),
    ("draft", {"methods": ["turbo"], "strength": 0.2}, "strength", "at least 0.25"),
    ("odd", {}, "image", "multiple of 8"),
])
def test_refine_validator_marks_the_field(runs, editor, kwargs, field, message):
    board = generate(runs)[-1]["board"]
    draft = runs.pick_draft("turbo", board)["draft"] if editor == "draft" else None
    value = {"background": Image.new("RGB", (60, 64)), "layers": []} if editor == "odd" else None
    args = dict(methods=["turbo", "baseline"], strength=0.5)
    args.update(kwargs)
    verdicts = runs.validate_refine("mini", value, "a red square", "", 7, args["strength"], args["methods"], True,
                                    False, draft, None, board)
    fields = ["family", "image", "prompt", "negative_prompt", "seed", "strength", "methods", "keep_outside",
              "resize", "draft", "refine_board", "board"]
    bad = [f for f, v in zip(fields, verdicts) if not v["is_valid"]]
    assert bad == [field]
    assert __import__("re").search(message, verdicts[fields.index(field)]["message"])


# --- live ---------------------------------------------------------------------------------------------------

def live(runs, prompt="a small green circle on an orange background", seed=3, vary=False, methods=("turbo",),
         sketching=False, sketch=None, strength=0.7):
    out = runs.live("mini", prompt, seed, vary, list(methods), sketching, sketch, strength)
    names = {f"live.{m}.{o}" for m in SLOTS for o in app.LIVE_PANEL_OUTPUTS}
    assert set(out) <= names, set(out) - names
    return out


def test_a_live_frame_draws_each_chosen_method_once_and_names_the_prompt(runs):
    out = live(runs, methods=("turbo", "lcm", "baseline"))  # the reference is not a live method
    assert [c[0] for c in runs.engine.calls] == ["turbo", "lcm"]
    assert [c[3] for c in runs.engine.calls] == [1, 2]  # live steps: Turbo 1, LCM 2
    assert set(out) == {"live.turbo.image", "live.turbo.caption", "live.lcm.image", "live.lcm.caption"}
    assert "“a small green circle on an orange background” · seed 3 · 1 step" in out["live.turbo.caption"]
    assert "ms** per frame (up to" in out["live.turbo.caption"]


def data_url(image) -> str:
    """An image as the page's canvas sends it: a PNG data URL."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return app.SKETCH_PREFIX + base64.b64encode(buffer.getvalue()).decode()


def test_live_input_problems_stay_in_the_caption(runs):
    out = live(runs, prompt="   ")
    assert "live.turbo.image" not in out and "must not be empty" in out["live.turbo.caption"]
    out = live(runs, sketching=True, sketch=data_url(Image.new("RGBA", (256, 256), (255, 0, 0, 255))), strength=0.2)
    assert "at least 0.25" in out["live.turbo.caption"]  # Turbo: steps x strength must reach 1 within 4 steps
    assert runs.engine.calls == []


def test_the_canvas_sketch_arrives_as_a_png_data_url_flattened_on_white(runs):
    """The page's canvas sends its drawing as a PNG data URL: transparent pixels become white, strokes keep
    their colour; anything else that is not a drawing says so in the caption and runs nothing."""
    drawing = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    drawing.paste((220, 40, 40, 255), (80, 80, 180, 180))
    flat = app.sketch_image(data_url(drawing))
    assert flat.mode == "RGB" and flat.getpixel((10, 10)) == (255, 255, 255)
    assert flat.getpixel((120, 120)) == (220, 40, 40)
    assert app.sketch_image("") is None  # nothing drawn (or cleared): text-to-image
    live(runs, sketching=True, sketch=data_url(drawing))
    assert [call[0] for call in runs.engine.calls] == ["refine"]
    runs.engine.calls.clear()
    for bad, message in ((app.SKETCH_PREFIX + "not base64!", "not a PNG"),
                         (data_url(Image.new("RGB", (1024, 1024))), "at most 256 pixels")):
        out = live(runs, sketching=True, sketch=bad)
        assert message in out["live.turbo.caption"] and "live.turbo.image" not in out
    assert runs.engine.calls == []


def test_vary_draws_a_new_seed_each_frame(runs):
    seeds = {live(runs, vary=True) and runs.engine.calls[-1][2] for _ in range(3)}
    assert len(seeds) == 3
    live(runs, vary=False, seed=11)
    assert runs.engine.calls[-1][2] == 11
