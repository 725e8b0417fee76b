"""The demo in a real browser: headless Debian Chromium driven by Playwright.

Opens the page (the mini family fills its panels on arrival), types a prompt, clicks Generate, waits for
the four panels and checks their captions; saves a screenshot
(to FASTGEN_SCREENSHOT if set, e.g. docs/screenshot.png, else into the test's tmp folder). Runs on the
shipped mini weights when they are in the checkout, else on random tiny ones of the same layout.
"""

from __future__ import annotations

import io
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from fastgen import registry
from fastgen.engine import Engine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a large yellow triangle on a purple background"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"),
]
playwright = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(fake_mini):
    mp = pytest.MonkeyPatch()
    if not (registry.MINI_WEIGHTS / "base" / "model_index.json").exists():
        mp.setitem(registry.FAMILIES, "mini", fake_mini)
    demo = app.create_demo(Engine(), family="mini")
    _, url, _ = app.launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()
    mp.undo()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:  # one Playwright per thread: every page of this module comes from it
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(url, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    yield page
    page.close()


def url_of(page, src: str) -> str:
    """An image's absolute URL from its src as the page holds it."""
    from urllib.parse import urljoin

    return urljoin(page.url, src)


def panel(page, label: str, refine: bool = False):
    """A comparison panel (or with `refine`, a refine panel) located by its title (### Turbo, ### LCM, ...)."""
    kind = ".fg-refine-panel" if refine else ".fg-panel:not(.fg-refine-panel)"
    return page.locator(kind).filter(has=page.get_by_role("heading", name=label, exact=True))


def test_page_opens_with_the_four_panels_filled(page):
    """On the mini family the first example runs as the page opens: no empty frames on arrival."""
    page.wait_for_function("document.querySelectorAll('.fg-panel:not(.fg-refine-panel) .fg-image img').length === 4",
                           timeout=90_000)
    playwright.expect(panel(page, "Baseline").locator(".block.fg-caption")).to_contain_text("reference",
                                                                                          timeout=90_000)
    playwright.expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_examples_fill_the_prompt(page):
    example = "a large white square on a black background"
    page.get_by_role("button", name=example).click()
    playwright.expect(page.get_by_label("Prompt", exact=True)).to_have_value(example)


def test_generate_fills_four_panels(page, tmp_path):
    # the run on opening first (run alone, this test comes before the opening test has waited for it)
    playwright.expect(page.get_by_role("button", name="Generate")).to_be_enabled(timeout=90_000)
    before = panel(page, "Turbo").locator(".fg-image img").get_attribute("src")
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_role("button", name="Generate").click()
    # Done when every panel shows a new image and the baseline, which runs last, has its caption.
    playwright.expect(panel(page, "Turbo").locator(".fg-image img")).not_to_have_attribute("src", before,
                                                                                          timeout=90_000)
    page.wait_for_function("document.querySelectorAll('.fg-panel:not(.fg-refine-panel) .fg-image img').length === 4",
                           timeout=90_000)
    baseline = panel(page, "Baseline")
    playwright.expect(baseline.locator(".block.fg-caption")).to_contain_text("reference", timeout=90_000)
    playwright.expect(page.get_by_role("button", name="Generate")).to_be_enabled()

    captions = {label: panel(page, label).locator(".block.fg-caption").inner_text()
                for label in ("Turbo", "LCM", "LCM-LoRA", "Baseline")}
    assert re.search(r"\b1 step\b.*CFG off", captions["Turbo"])
    assert re.search(r"\b4 steps\b.*CFG off", captions["LCM"])
    assert re.search(r"\b4 steps\b.*guidance 1\b.*CFG off", captions["LCM-LoRA"])
    assert re.search(r"\b50 steps\b.*CFG on", captions["Baseline"])
    for label in ("Turbo", "LCM", "LCM-LoRA"):
        assert re.search(r"[\d.]+× faster", captions[label]), captions[label]
        assert "steps/s" in captions[label]
    # The compare slider defaults to the fastest panel against the baseline; downloads are offered.
    playwright.expect(page.locator(".fg-compare img")).to_have_count(2)
    playwright.expect(page.locator(".fg-compare img").last).to_be_visible()
    # Both of the slider's images load (until the second has, the slider shows half of the first: a strip) ...
    page.wait_for_function("(() => { const imgs = [...document.querySelectorAll('.fg-compare img')];"
                           " return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0); })()",
                           timeout=30_000)
    # ... and are drawn as the square images they are, however small (64² on mini), not in a wide box.
    for box in (page.locator(".fg-compare img").nth(i).bounding_box() for i in range(2)):
        assert box["height"] >= 256 and abs(box["width"] - box["height"]) <= 0.05 * box["height"], box
    playwright.expect(page.get_by_role("button", name=re.compile("Download grid"))).to_be_visible()

    target = Path(os.environ.get("FASTGEN_SCREENSHOT") or tmp_path / "screenshot.png")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000


def test_slider_reruns_one_panel_and_stop_keeps_the_rest(page):
    """Changing the baseline's steps reruns only the baseline; Stop ends it between steps."""
    turbo_image = panel(page, "Turbo").locator(".fg-image img").get_attribute("src")
    steps = panel(page, "Baseline").get_by_label("number input for Steps")
    steps.fill("100")
    steps.blur()  # the number box sends the slider's release event when it loses focus
    baseline = panel(page, "Baseline")
    playwright.expect(baseline.locator(".fg-running")).to_be_visible(timeout=60_000)
    page.get_by_role("button", name="Stop").click()
    playwright.expect(baseline.locator(".fg-stopped")).to_contain_text("Stopped", timeout=30_000)
    playwright.expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    assert panel(page, "Turbo").locator(".fg-image img").get_attribute("src") == turbo_image
    playwright.expect(panel(page, "Turbo").locator(".block.fg-caption")).to_contain_text("1 step")


def test_refine_a_panel_with_a_painted_stroke(page, tmp_path):
    """Refine this image -> the Refine tab with the draft; a brush stroke makes it an inpainting; the refine
    panels (the draft's method and the baseline) fill with the steps that ran and the outside kept."""
    panel(page, "Turbo").get_by_role("button", name="Refine this image").click()
    editor = page.locator(".fg-editor")
    playwright.expect(editor.locator("canvas").first).to_be_visible(timeout=30_000)
    playwright.expect(page.locator(".block.fg-draft")).to_contain_text("the Turbo draft")
    editor.get_by_label("Brush", exact=True).click()
    box = editor.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 40, y)
    page.mouse.down()
    for dx in range(-40, 41, 8):
        page.mouse.move(x + dx, y + dx / 4)
    page.mouse.up()
    page.get_by_label("Strength").last.fill("0.9")  # the number box beside the slider
    page.locator("#fg-refine-run").click()
    for label in ("Turbo", "Baseline"):
        caption = panel(page, label, refine=True).locator(".block.fg-caption")
        playwright.expect(caption).to_contain_text("steps run", timeout=90_000)
        playwright.expect(caption).to_contain_text("outside the mask: kept")  # a stroke: inpainting
        playwright.expect(caption).to_contain_text("strength 0.9")
    playwright.expect(page.locator(".block.fg-tradeoff")).to_contain_text("Baseline alone, 50 steps")
    playwright.expect(page.locator("#fg-refine-run")).to_be_enabled()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(Path(os.environ.get("FASTGEN_SCREENSHOT_DIR") or tmp_path) / "screenshot-refine.png"),
                    full_page=True)


def test_live_follows_the_prompt_as_it_is_typed_and_the_sketch_as_it_is_drawn(page, tmp_path):
    """On the page that has just refined: the Live tab draws on arrival; typing redraws after each pause, and the
    caption names the prompt drawn; in sketch mode a stroke of red is refined into a red shape (read back by the
    mini analyzer). No request is refused on the way (frames that read the sketchpad they were triggered by
    re-triggered themselves and filled the queue until typed edits were refused with 503)."""
    refused = []
    page.on("response", lambda response: refused.append(response.url) if response.status >= 400 else None)
    page.get_by_role("tab", name="Live").click()
    turbo = page.locator(".fg-live-panel").filter(has=page.get_by_role("heading", name="Turbo", exact=True))
    playwright.expect(turbo.locator(".fg-image img")).to_have_count(1, timeout=60_000)
    first = turbo.locator(".fg-image img").get_attribute("src")
    box = page.locator("#fg-live-prompt textarea")
    box.fill("")
    box.press_sequentially("a small blue square on a yellow background", delay=5)
    caption = turbo.locator(".block.fg-caption")
    playwright.expect(caption).to_contain_text("“a small blue square on a yellow background”", timeout=30_000)
    playwright.expect(caption).to_contain_text("ms per frame")
    assert turbo.locator(".fg-image img").get_attribute("src") != first
    assert refused == []

    box.fill("a large red circle on a white background")  # the first brush colour is red
    page.get_by_label("Sketch mode").check()
    canvas = page.locator("#fg-sketch-canvas")
    bounds = canvas.bounding_box()
    x, y = bounds["x"] + bounds["width"] / 2, bounds["y"] + bounds["height"] / 2
    page.mouse.move(x - 45, y - 30)
    page.mouse.down()
    for row in range(-30, 31, 5):  # a filled blob, row by row, in one stroke
        page.mouse.move(x - 45, y + row, steps=3)
        page.mouse.move(x + 45, y + row, steps=3)
    page.mouse.up()
    playwright.expect(caption).to_contain_text("from the sketch at strength 0.7", timeout=30_000)
    playwright.expect(caption).to_contain_text("“a large red circle on a white background”")
    assert refused == []
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(Path(os.environ.get("FASTGEN_SCREENSHOT_DIR") or tmp_path) / "screenshot-live.png"),
                    full_page=True)
    if (registry.MINI_WEIGHTS / "base" / "model_index.json").exists():  # random weights draw no shape
        from fastgen.mini.analyzer import analyze

        src = turbo.locator(".fg-image img").get_attribute("src")
        png = page.request.get(src if src.startswith("http") else url_of(page, src)).body()
        assert analyze(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))).color == "red"


# --- N panels: the page built from the registry, on the fake Hub's sdxl family (seven methods) ----------------

def at_64(family: str):
    """The registered family with every method's native size 64: the fake Hub's tiny models at SDXL's own 512
    and 1024 take minutes a panel for nothing the layout tests need."""
    from dataclasses import replace

    fam = registry.FAMILIES[family]
    return replace(fam, methods=tuple(replace(m, native_size=64) for m in fam.methods))


@pytest.fixture(scope="module")
def sdxl_url(fake_hub):
    mp = pytest.MonkeyPatch()
    mp.setitem(registry.FAMILIES, "sdxl", at_64("sdxl"))
    demo = app.create_demo(Engine(), family="sdxl")
    _, url, _ = app.launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()
    mp.undo()


COMPARE_PANELS = ".fg-panel:not(.fg-refine-panel):visible"


def shots(name: str, tmp_path: Path) -> Path:
    """Where a layout screenshot goes: FASTGEN_SCREENSHOT_DIR (e.g. docs/) when set, else the test's tmp."""
    return Path(os.environ.get("FASTGEN_SCREENSHOT_DIR") or tmp_path) / name


def rows(page) -> list[list[dict]]:
    """The visible panels' boxes grouped into rows by their top edge."""
    boxes = [b for b in (p.bounding_box() for p in page.locator(COMPARE_PANELS).all()) if b and b["width"] > 0]
    grouped: dict[int, list[dict]] = {}
    for box in boxes:
        grouped.setdefault(round(box["y"] / 10), []).append(box)
    return [grouped[k] for k in sorted(grouped)]


def test_every_method_of_the_family_can_be_added_and_the_grid_wraps(sdxl_url, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(sdxl_url)
    playwright.expect(page.locator(COMPARE_PANELS)).to_have_count(4, timeout=30_000)  # opens with the known four
    for label in ("SDXL-Lightning", "Hyper-SDXL", "DMD2"):
        page.locator(".fg-methods").get_by_label(label, exact=True).check()
    playwright.expect(page.locator(COMPARE_PANELS)).to_have_count(7, timeout=30_000)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_role("button", name="Generate").click()
    playwright.expect(panel(page, "Baseline").locator(".block.fg-caption")).to_contain_text("reference",
                                                                                          timeout=240_000)
    page.wait_for_function("document.querySelectorAll('.fg-panel:not(.fg-refine-panel) .fg-image img').length === 7",
                           timeout=60_000)
    for label in ("SDXL-Lightning", "Hyper-SDXL", "DMD2"):
        playwright.expect(panel(page, label).locator(".block.fg-caption")).to_contain_text("faster")
    wide = rows(page)
    assert len(wide) >= 2 and sum(map(len, wide)) == 7 and max(map(len, wide)) >= 4, wide
    assert all(box["width"] >= 230 for row in wide for box in row)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shots("screenshot-methods.png", tmp_path)), full_page=True)

    page.set_viewport_size({"width": 600, "height": 1000})  # a phone-sized screen: the grid wraps further
    page.wait_for_timeout(500)
    narrow = rows(page)
    assert max(map(len, narrow)) <= 2 and sum(map(len, narrow)) == 7, narrow
    assert all(box["x"] + box["width"] <= 600 for row in narrow for box in row)  # nothing off-screen
    page.screenshot(path=str(shots("screenshot-narrow.png", tmp_path)), full_page=True)

    page.locator(".fg-methods").get_by_label("DMD2", exact=True).uncheck()
    playwright.expect(page.locator(COMPARE_PANELS)).to_have_count(6, timeout=30_000)
    page.close()


# --- Your model: a fine-tune with a style LoRA, on the fake Hub's sd15 family --------------------------------

def test_your_model_with_a_style_lora_with_and_without_it(fake_hub, finetune, style, browser, tmp_path, monkeypatch):
    """With FASTGEN_ALLOW_CUSTOM=1 on 127.0.0.1: type a model id, add a style LoRA, run; the reference and
    LCM-LoRA panels fill with the style and without it, each naming what it ran with."""
    monkeypatch.setenv("FASTGEN_ALLOW_CUSTOM", "1")
    monkeypatch.setitem(registry.FAMILIES, "sd15", at_64("sd15"))  # at SD 1.5's 512, 50 steps take ~90 s here
    demo = app.create_demo(Engine(), family="sd15")
    _, url, _ = app.launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.get_by_role("tab", name="Your model").click()
        playwright.expect(page.get_by_text("Any Hub id can be loaded here")).to_be_visible(timeout=30_000)
        page.locator("#fg-custom-model textarea, #fg-custom-model input").first.fill(finetune)
        page.get_by_label("LoRA 1", exact=True).fill(str(style))
        page.locator(".fg-lora-file textarea, .fg-lora-file input").first.fill("style.safetensors")
        page.locator(".fg-lora-scale input[type=number]").first.fill("0.8")
        page.get_by_role("button", name="Run your model").click()
        styled = page.locator(".fg-custom-panel").filter(has=page.get_by_role("heading", name="Baseline + LoRAs"))
        plain = page.locator(".fg-plain-panel").filter(has=page.get_by_role("heading", name="Baseline", exact=True))
        playwright.expect(styled.locator(".block.fg-caption")).to_contain_text("style.safetensors @ 0.8",
                                                                               timeout=180_000)
        playwright.expect(plain.locator(".block.fg-caption")).to_contain_text("reference", timeout=180_000)
        fast = page.locator(".fg-custom-panel").filter(has=page.get_by_role("heading", name="LCM-LoRA + LoRAs"))
        playwright.expect(fast.locator(".block.fg-caption")).to_contain_text("faster")
        playwright.expect(page.get_by_text(f"{finetune} (Stable Diffusion 1.5) without them")).to_be_visible()
        images = [p.locator(".fg-image img").get_attribute("src") for p in (styled, plain)]
        assert all(images) and images[0] != images[1]
        playwright.expect(page.get_by_role("button", name="Run your model")).to_be_enabled()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots("screenshot-custom.png", tmp_path)), full_page=True)
    finally:
        page.close()
        demo.close()
