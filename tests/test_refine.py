"""Refining an image: each method's image-to-image and inpainting equal the plain diffusers recipes (and their
snippets), built over the cached modules; the inputs are checked; on the mini family inpainting repaints the
masked shape as asked and "keep outside the mask" keeps the rest."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastgen.engine import Engine, NotAvailable
from fastgen.registry import get_family
from fastgen.request import RefineRequest, RequestError, fit
from tests.test_engine import assert_same_image, recipe_pipeline

PROMPT = "a blue square"
STEPS = {"baseline": 10}  # 3 of 10 steps run at the baseline's strength 0.3: quick, and still several steps


def source_image(size=64):
    """A fixed, structured RGB image: gradients and a block, so every method has something to refine."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    pixels[size // 4: size // 2, size // 4: size // 2] = (200, 30, 30)
    return Image.fromarray(pixels)


def centre_mask(size=64):
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def recipe_refine(family, method, mode, image, mask, **call):
    """The plain recipe: the text-to-image recipe's pipeline turned into AutoPipelineForImage2Image /
    AutoPipelineForInpainting, as diffusers' docs do it."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    base = recipe_pipeline(family, method)
    if mode == "img2img":
        pipe = AutoPipelineForImage2Image.from_pipe(base, dtype=torch.float32)
    else:
        pipe = AutoPipelineForInpainting.from_pipe(base, dtype=torch.float32)
        call.update(mask_image=mask, width=image.width, height=image.height)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, image=image, generator=torch.Generator("cpu").manual_seed(7), **call).images[0]
    return image, pipe.num_timesteps


CASES = [(f, m, mode) for f in ("sdxl", "sd15") for m in ("turbo", "lcm", "lcm-lora", "baseline")
         for mode in ("img2img", "inpaint") if not (f == "sd15" and m == "lcm" and mode == "inpaint")]


@pytest.mark.parametrize("family, method, mode", CASES)
def test_each_refine_equals_the_plain_recipe_and_its_snippet(engine, family, method, mode, tmp_path, monkeypatch):
    spec = get_family(family).method(method)
    recipe = spec.refine_recipe(mode)
    image, mask = source_image(), centre_mask() if mode == "inpaint" else None
    negative = "blurry" if method == "baseline" else ""
    result = engine.refine(family, method, image, PROMPT, mask=mask, seed=7, steps=STEPS.get(method),
                           negative_prompt=negative)
    steps = STEPS.get(method, recipe.steps)
    assert (result.mode, result.steps, result.strength, result.guidance) == (mode, steps, recipe.strength,
                                                                             recipe.guidance)
    assert (result.width, result.height) == image.size
    expected, ran = recipe_refine(family, method, mode, image, mask, num_inference_steps=steps, strength=recipe.strength,
                             guidance_scale=recipe.guidance, **({"negative_prompt": negative} if negative else {}))
    assert_same_image(result.image, expected)
    assert result.denoising_steps == ran >= recipe.denoising_steps(steps, recipe.strength) >= 1  # PNDM adds one

    monkeypatch.chdir(tmp_path)  # the snippet reads source.png (and mask.png) and writes <method>.png here
    image.save("source.png")
    if mask is not None:
        mask.save("mask.png")
    exec(compile(result.code, f"<{family}/{method} {mode} snippet>", "exec"), {})
    assert_same_image(result.image, Image.open(tmp_path / f"{method}.png"))


def test_refine_reuses_the_text_to_image_modules(fake_hub):
    """No second copy of any weight: refining after generating loads nothing new, in either mode."""
    engine = Engine(device="cpu")
    engine.run("sdxl", "lcm-lora", PROMPT, width=64, height=64)
    before = {(row["id"], row["bytes"]) for row in engine.cache.report()}
    engine.refine("sdxl", "lcm-lora", source_image(), PROMPT)
    engine.refine("sdxl", "lcm-lora", source_image(), PROMPT, mask=centre_mask())
    assert {(row["id"], row["bytes"]) for row in engine.cache.report()} == before


def test_sd15_lcm_spreads_its_steps_and_the_others_cut_the_schedule(engine):
    lcm = engine.refine("sd15", "lcm", source_image(), PROMPT, steps=4, strength=0.5)
    cut = engine.refine("sd15", "lcm-lora", source_image(), PROMPT, steps=4, strength=0.5)
    assert (lcm.denoising_steps, cut.denoising_steps) == (4, 2)


def test_a_method_without_an_inpaint_pipeline_says_so_and_the_others_run(engine):
    with pytest.raises(NotAvailable, match="inpainting is not available for this method"):
        engine.refine("sd15", "lcm", source_image(), PROMPT, mask=centre_mask())
    outcomes = list(engine.iter_refine("sd15", source_image(), PROMPT, ["lcm", "turbo"], mask=centre_mask()))
    assert [type(o).__name__ for o in outcomes] == ["MethodFailure", "MethodResult"]
    assert outcomes[0].kind == "not-available"


@pytest.mark.parametrize("kwargs, field, message", [
    (dict(steps={"turbo": 1}, strength=0.5), "steps", r"int\(1 x 0.5\) = 0 denoising steps .* at least 2 steps"),
    (dict(steps={"turbo": 3}, strength=0.3), "steps", "at least 4 steps at this strength"),
    (dict(steps={"turbo": 4}, strength=0.2), "strength", "at least 0.25"),
    (dict(strength=0.0), "strength", r"in \(0, 1\]"),
    (dict(strength=1.5), "strength", r"in \(0, 1\]"),
    (dict(strength="0.5"), "strength", r"in \(0, 1\]"),
    (dict(strength=float("nan")), "strength", r"in \(0, 1\]"),
    (dict(image=source_image().convert("RGBA")), "image", "must be an RGB image"),
    (dict(image=source_image().crop((0, 0, 60, 64))), "image", "multiple of 8"),
    (dict(image=Image.new("RGB", (32, 32))), "image", "multiple of 8 in"),
    (dict(image=np.zeros((64, 64, 3))), "image", "must be an image"),
    (dict(mask=centre_mask().convert("RGB")), "mask", "single-channel"),
    (dict(mask=centre_mask(32)), "mask", "the image's size 64x64"),
    (dict(mask=Image.new("L", (64, 64), 100)), "mask", "empty"),
    (dict(keep_outside=1), "keep_outside", "true or false"),
])
def test_bad_refine_input_is_refused_before_anything_runs(engine, kwargs, field, message):
    args = dict(image=source_image(), prompt=PROMPT, seed=0)
    args.update(kwargs)
    image = args.pop("image")
    with pytest.raises(RequestError, match=message) as caught:
        list(engine.iter_refine("sdxl", image, methods=["turbo", "baseline"], **args))
    assert caught.value.field == field


def test_resize_is_explicit_and_keeps_the_aspect_ratio(engine):
    odd = source_image(100).crop((0, 0, 100, 60))
    with pytest.raises(RequestError, match="resize it"):
        engine.refine("sdxl", "turbo", odd, PROMPT)
    result = engine.refine("sdxl", "turbo", odd, PROMPT, resize=True)
    native = get_family("sdxl").method("turbo").native_size
    assert (result.width, result.height) == (native, round(60 * native / 100 / 8) * 8)
    assert fit(Image.new("RGB", (64, 64)), 64).size == (64, 64)


def test_refine_request_schema():
    req = RefineRequest.parse({"prompt": "x", "methods": ["turbo"], "strength": 0.4, "keep_outside": True}, "mini")
    assert (req.strength, req.keep_outside, req.resize) == (0.4, True, False)
    for data, field in [({"prompt": "x", "width": 64}, "width"), ({"prompt": "x", "strength": True}, "strength"),
                        ({"prompt": "x", "resize": "yes"}, "resize"), ({"prompt": ""}, "prompt")]:
        with pytest.raises(RequestError) as caught:
            RefineRequest.parse(data, "mini")
        assert caught.value.field == field


def test_refine_compare_saves_the_source_mask_and_refine_fields(engine, tmp_path):
    comparison = engine.refine_compare("sdxl", source_image(), PROMPT, ["turbo", "lcm"], mask=centre_mask(),
                                       keep_outside=True)
    grid, path = comparison.save(tmp_path)
    data = json.loads(path.read_text())
    assert (data["mode"], data["strength"]) == ("inpaint", None)
    assert len(data["source_sha256"]) == 64
    assert [r["denoising_steps"] for r in data["results"]] == [1, 3]
    assert all(r["outside_change"] == {"mean": 0.0, "max": 0, "kept": True} for r in data["results"])
    assert {p.name for p in tmp_path.iterdir()} >= {"source.png", "mask.png", "turbo.png", "lcm.png", "grid.png"}
    assert Image.open(grid).width > 4 * 64  # source, mask and two panels


# --- on the mini family: the analyzer reads what inpainting drew ---------------------------------------------

def test_mini_inpainting_repaints_the_masked_shape_as_asked():
    from fastgen.mini.analyzer import analyze
    from fastgen.mini.world import PALETTE

    engine = Engine(device="cpu")
    draft = engine.run("mini", "baseline", "a large red circle on a blue background", seed=3).image
    assert analyze(np.asarray(draft)).color == "red"
    mask = Image.fromarray((np.abs(np.asarray(draft, dtype=int) - PALETTE["blue"]).sum(-1) > 90).astype(np.uint8) * 255)
    mask = fit(mask.filter(__import__("PIL.ImageFilter").ImageFilter.MaxFilter(5)), 64)  # the shape, a little grown
    for method in ("turbo", "baseline"):
        kept = engine.refine("mini", method, draft, "a large green circle on a blue background", mask=mask, seed=3,
                             keep_outside=True)
        loose = engine.refine("mini", method, draft, "a large green circle on a blue background", mask=mask, seed=3)
        assert analyze(np.asarray(kept.image)).color == "green", method
        assert kept.outside_change["max"] == 0
        assert loose.outside_change["max"] > 0  # the VAE round trip moves the outside when nothing is pasted back
