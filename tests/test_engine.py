"""The engine against the fake Hub: each panel equals the plain diffusers recipe, components are shared by
content, the LCM-LoRA never leaks into other runs, eviction reloads, bad input gets a clear error."""

import functools
import json
import threading

import numpy as np
import pytest
import torch

from fastgen import engine as engine_module
from fastgen.engine import Engine, RunStopped, MissingWeightsError
from fastgen.registry import custom_family, family_available, get_family
from tests.fakehub import SD15_BASE, SDXL_BASE

PROMPT = "a red circle"
SIZE = dict(width=64, height=64)
STEPS = {"baseline": 3}  # the recipe holds for any step count; 3 keeps the 50-step baseline fast here


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(a, b, tolerance=2):
    """Equal within 2/255 per channel, the reproducibility contract's tolerance."""
    diff = np.abs(pixels(a) - pixels(b)).max()
    assert diff <= tolerance, f"images differ by {diff}/255"


# --- the plain diffusers recipes, written as the model cards write them --------------------------------------

@functools.lru_cache(maxsize=None)
def recipe_pipeline(family, method):
    from diffusers import (AutoPipelineForText2Image, DiffusionPipeline, EulerAncestralDiscreteScheduler,
                           LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

    if family == "sdxl":
        if method == "turbo":
            pipe = AutoPipelineForText2Image.from_pretrained("stabilityai/sdxl-turbo", variant="fp16")
            pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                         timestep_spacing="trailing")
        elif method == "lcm":
            unet = UNet2DConditionModel.from_pretrained("latent-consistency/lcm-sdxl", variant="fp16")
            pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_BASE, unet=unet, variant="fp16")
            pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_BASE, variant="fp16")
    else:
        if method == "turbo":
            pipe = AutoPipelineForText2Image.from_pretrained("stabilityai/sd-turbo", variant="fp16")
        elif method == "lcm":
            pipe = DiffusionPipeline.from_pretrained("SimianLuo/LCM_Dreamshaper_v7")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(SD15_BASE, variant="fp16")
    if method == "lcm-lora":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        lora = "latent-consistency/lcm-lora-sdxl" if family == "sdxl" else "latent-consistency/lcm-lora-sdv1-5"
        pipe.load_lora_weights(lora, weight_name="pytorch_lora_weights.safetensors", adapter_name="lcm")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recipe_image(family, method, steps, guidance, negative_prompt=None, seed=0):
    pipe = recipe_pipeline(family, method)
    return pipe(PROMPT, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed), **SIZE).images[0]


# --- equality with the recipe ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("method", ["turbo", "lcm", "lcm-lora", "baseline"])
def test_each_panel_equals_the_plain_recipe_and_its_snippet(engine, family, method, tmp_path, monkeypatch):
    spec = get_family(family).method(method)
    negative = "blue" if method == "baseline" else ""  # CFG on: the negative prompt takes part
    result = engine.run(family, method, PROMPT, negative_prompt=negative, seed=7, steps=STEPS.get(method), **SIZE)
    assert (result.steps, result.guidance, result.width, result.height) == (STEPS.get(method, spec.steps),
                                                                            spec.guidance, 64, 64)
    expected = recipe_image(family, method, result.steps, result.guidance, negative or None, seed=7)
    assert_same_image(result.image, expected)

    monkeypatch.chdir(tmp_path)  # the snippet saves <method>.png where it runs
    exec(compile(result.code, f"<{family}/{method} snippet>", "exec"), {})
    from PIL import Image

    assert_same_image(result.image, Image.open(tmp_path / f"{method}.png"))


@functools.lru_cache(maxsize=None)
def card_pipeline(method, steps):
    """SDXL-Lightning, Hyper-SDXL and DMD2 as their model cards run them (unfused here: fusing is the same
    arithmetic, and the engine never fuses into a shared UNet)."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline,
                           TCDScheduler, UNet2DConditionModel)
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    if method in ("lightning", "dmd2"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE, subfolder="unet"))
        if method == "lightning":
            name = f"sdxl_lightning_{steps}step_unet{'_x0' if steps == 1 else ''}.safetensors"
            unet.load_state_dict(load_file(hf_hub_download("ByteDance/SDXL-Lightning", name)))
        else:
            name = "dmd2_sdxl_1step_unet_fp16.bin" if steps == 1 else "dmd2_sdxl_4step_unet_fp16.safetensors"
            path = hf_hub_download("tianweiy/DMD2", name)
            unet.load_state_dict(torch.load(path, weights_only=True) if steps == 1 else load_file(path))
        pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_BASE, unet=unet, variant="fp16")
        if method == "lightning":
            extra = {"prediction_type": "sample"} if steps == 1 else {}
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                                **extra)
        else:
            pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_BASE, variant="fp16")
        name = f"Hyper-SDXL-{steps}step{'s' if steps > 1 else ''}-lora.safetensors"
        pipe.load_lora_weights(hf_hub_download("ByteDance/Hyper-SD", name))
        if steps == 1:
            pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
        else:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def card_image(method, steps, seed=7):
    extra = {}
    if method == "dmd2":
        extra["timesteps"] = [399] if steps == 1 else [999, 749, 499, 249]
    if method == "hyper-sd" and steps == 1:
        extra["eta"] = 1.0
    return card_pipeline(method, steps)(PROMPT, num_inference_steps=steps, guidance_scale=0.0,
                                        generator=torch.Generator("cpu").manual_seed(seed), **SIZE, **extra).images[0]


@pytest.mark.parametrize("method, steps", [("lightning", 1), ("lightning", 4), ("lightning", 8), ("hyper-sd", 1),
                                           ("hyper-sd", 2), ("hyper-sd", 4), ("dmd2", 1), ("dmd2", 4)])
def test_new_rows_equal_their_model_cards_and_their_snippets(engine, method, steps, tmp_path, monkeypatch):
    result = engine.run("sdxl", method, PROMPT, seed=7, steps=steps, **SIZE)
    assert (result.steps, result.guidance, result.cfg) == (steps, 0.0, False)
    expected = card_image(method, steps)
    assert_same_image(result.image, expected)
    monkeypatch.chdir(tmp_path)
    exec(compile(result.code, f"<sdxl/{method} snippet>", "exec"), {})
    from PIL import Image

    assert_same_image(result.image, Image.open(tmp_path / f"{method}.png"))


def test_the_step_count_picks_the_file(engine):
    """Each step count loads its own file: the 2-step Lightning UNet is not the 4-step one run twice as short."""
    four = engine.run("sdxl", "lightning", PROMPT, steps=4, **SIZE)
    with pytest.raises(ValueError, match=r"`steps` must be one of \(1, 2, 4, 8\) for lightning"):
        engine.run("sdxl", "lightning", PROMPT, steps=3, **SIZE)
    units = [r for r in engine.cache.report() if r["kind"] == "unet" and any("Lightning" in s for s in r["sources"])]
    assert len(units) >= 1
    assert four.scheduler == "EulerDiscreteScheduler" and four.timestep_spacing == "trailing"


def test_seed_changes_the_image_and_size_is_respected(engine):
    a = engine.run("sd15", "turbo", PROMPT, seed=0, **SIZE).image
    b = engine.run("sd15", "turbo", PROMPT, seed=1, **SIZE).image
    c = engine.run("sd15", "turbo", PROMPT, seed=0, width=96, height=64).image
    assert np.abs(pixels(a) - pixels(b)).max() > 10
    assert c.size == (96, 64)


# --- what a result carries ------------------------------------------------------------------------------

def test_result_fields(engine):
    result = engine.run("sdxl", "turbo", PROMPT, **SIZE)
    assert result.label == "SDXL Turbo" and result.cfg is False and result.guidance == 0.0
    assert result.scheduler == "EulerAncestralDiscreteScheduler" and result.timestep_spacing == "trailing"
    assert set(result.timings) == {"text_encoding", "denoising", "decoding"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.seconds == pytest.approx(sum(result.timings.values()), abs=1e-3)
    assert result.steps_per_second > 0 and "non-commercial" in result.licence
    baseline = engine.run("sdxl", "baseline", PROMPT, steps=2, guidance=3.0, **SIZE)
    assert baseline.cfg is True and baseline.scheduler == "EulerDiscreteScheduler"
    assert baseline.timestep_spacing == "leading"
    data = json.loads(json.dumps(result.to_dict()))
    assert data["image"] == "turbo.png" and "image" not in {k for k, v in data.items() if not isinstance(v, str)}


def test_pipelines_are_told_their_device_instead_of_searching_every_module(engine, monkeypatch):
    import diffusers
    import diffusers.hooks.group_offloading

    searched = []

    def search(module):
        searched.append(type(module).__name__)
        raise ValueError("no group offloading")

    monkeypatch.setattr(diffusers.hooks.group_offloading, "_get_group_onload_device", search)
    family = get_family("sdxl")
    pipe, *_ = engine._pipeline(family, family.method("turbo"))
    assert pipe._execution_device == torch.device("cpu") and searched == []
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert engine_module.plain_class(pipe) is diffusers.StableDiffusionXLPipeline
    plain = engine_module.plain_class(pipe)(**pipe.components)
    assert plain._execution_device == torch.device("cpu") and len(searched) >= 4  # every module component


def test_second_run_is_served_from_the_cache(fake_hub):
    fresh = Engine(device="cpu")
    first = fresh.run("sd15", "turbo", PROMPT, **SIZE)
    loads = fresh.cache.loads
    second = fresh.run("sd15", "turbo", PROMPT, **SIZE)
    assert fresh.cache.loads == loads and second.load_seconds < first.load_seconds


def test_warnings(engine):
    long_prompt = "a red circle on a blue background " * 4  # one token per character: past 77 tokens
    truncated = engine.run("sd15", "turbo", long_prompt, negative_prompt="green", **SIZE)
    assert any("prompt truncated" in w for w in truncated.warnings)
    assert "negative prompt ignored: it samples without classifier-free guidance" in truncated.warnings
    no_cfg = engine.run("sd15", "lcm-lora", PROMPT, negative_prompt="green", **SIZE)
    assert "negative prompt ignored: classifier-free guidance is off at guidance 1 or below" in no_cfg.warnings
    with_cfg = engine.run("sd15", "lcm-lora", PROMPT, negative_prompt="green", guidance=1.5, **SIZE)
    assert not any("negative prompt" in w for w in with_cfg.warnings)
    assert "negative_prompt='green'" in with_cfg.code
    native = engine.run("sd15", "turbo", PROMPT, width=512, height=512, steps=1)
    assert not any("was trained at" in w for w in native.warnings)


# --- sharing by content -------------------------------------------------------------------------------------

def test_identical_components_are_shared_and_different_ones_are_not(fake_hub):
    fresh = Engine(device="cpu")
    comparison = fresh.compare("sdxl", PROMPT, steps=STEPS, **SIZE)
    rows = {}
    for row in comparison.cache:
        rows.setdefault(row["kind"], []).append(row)
    assert [r["used_by"] for r in rows["unet"]] == [["lcm"], ["turbo"], ["lcm-lora", "baseline"]]
    assert rows["unet"][2]["sources"] == [f"{SDXL_BASE}/unet"]
    for kind in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
        assert len(rows[kind]) == 1, kind  # byte-identical in sdxl-turbo and SDXL base: loaded once
        assert rows[kind][0]["used_by"] == ["turbo", "lcm", "lcm-lora", "baseline"]
        assert rows[kind][0]["sources"] == [f"stabilityai/sdxl-turbo/{kind}", f"{SDXL_BASE}/{kind}"]
    assert [r["used_by"] for r in rows["lora"]] == [["lcm-lora"]]
    assert all(r["bytes"] > 0 for kind in ("unet", "vae", "text_encoder", "lora") for r in rows[kind])
    assert fresh.cache.loads == 3 + 5 + 1  # three UNets, the five shared parts, one LoRA

    sd15 = fresh.compare("sd15", PROMPT, steps=STEPS, **SIZE)
    encoders = [r for r in sd15.cache if r["kind"] == "text_encoder"]
    assert sorted(len(r["used_by"]) for r in encoders) == [1, 1, 2]  # SD-Turbo and LCM Dreamshaper share nothing


def test_a_local_checkpoint_shares_content_with_the_hub_copy(fake_hub, engine):
    snapshot = next((fake_hub / f"models--{SD15_BASE.replace('/', '--')}" / "snapshots").iterdir())
    family = custom_family(str(snapshot), arch="sd15", variant="fp16")
    hub_image = engine.run("sd15", "lcm-lora", PROMPT, **SIZE).image
    local = engine.run(family, "lcm-lora", PROMPT, **SIZE)
    assert_same_image(local.image, hub_image, tolerance=0)
    units = [r for r in engine.cache.report() if r["kind"] == "unet" and f"{SD15_BASE}/unet" in r["sources"]]
    assert len(units) == 1 and f"{snapshot}/unet" in units[0]["sources"]


def test_the_mini_layout_runs_and_shares_base_parts(fake_mini):
    fresh = Engine(device="cpu")
    comparison = fresh.compare(fake_mini, PROMPT, steps=STEPS)
    assert [r.image.size for r in comparison.results] == [(64, 64)] * 4
    by_kind = {}
    for row in comparison.cache:
        by_kind.setdefault(row["kind"], []).append(row["used_by"])
    assert by_kind["text_encoder"] == [["turbo", "lcm", "lcm-lora", "baseline"]]
    assert by_kind["vae"] == [["turbo", "lcm", "lcm-lora", "baseline"]]
    assert sorted(by_kind["unet"]) == [["lcm"], ["lcm-lora", "baseline"], ["turbo"]]


# --- LCM-LoRA: applied to its runs, invisible to all others --------------------------------------------------

@pytest.mark.parametrize("order", [("baseline", "lcm-lora", "baseline"), ("lcm-lora", "baseline", "lcm-lora")])
def test_lora_never_leaks_into_the_baseline(fake_hub, order):
    fresh = Engine(device="cpu")
    images = {}
    for i, method in enumerate(order):
        image = fresh.run("sdxl", method, PROMPT, steps=3, **SIZE).image
        images.setdefault(method, []).append(image)
        expected = recipe_image("sdxl", method, 3, get_family("sdxl").method(method).guidance)
        assert_same_image(image, expected)
    for same in images.values():
        assert_same_image(same[0], same[-1], tolerance=0)


def test_the_reference_runs_on_plain_layers_over_the_same_weights_once_an_adapter_is_attached(fake_hub):
    """peft's wrappers stay around the UNet's layers when its adapters are off: after an LCM-LoRA run the
    reference runs on the UNet's clean twin, whose layers are plain and whose tensors are the shared UNet's."""
    from peft.tuners.lora import LoraLayer

    engine = Engine(device="cpu")
    before = engine.run("sdxl", "baseline", PROMPT, steps=3, **SIZE).image
    engine.run("sdxl", "lcm-lora", PROMPT, steps=2, **SIZE)
    family = get_family("sdxl")
    wrapped = engine._pipeline(family, family.method("lcm-lora"))[0].unet
    plain = engine._pipeline(family, family.method("baseline"))[0].unet
    assert plain is not wrapped and any(isinstance(m, LoraLayer) for m in wrapped.modules())
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    shared = {p.data_ptr() for p in wrapped.parameters()}
    assert all(p.data_ptr() in shared for p in plain.parameters())  # the same weights, not a copy
    after = engine.run("sdxl", "baseline", PROMPT, steps=3, **SIZE).image
    assert_same_image(after, before, tolerance=0)


@functools.lru_cache(maxsize=None)
def alone_image(method, steps):
    """`method` run by an engine that has never loaded anything else."""
    return Engine(device="cpu").run("sdxl", method, PROMPT, steps=steps, **SIZE).image


@pytest.mark.parametrize("order", [("hyper-sd", "lcm-lora", "baseline", "hyper-sd"),
                                   ("lcm-lora", "hyper-sd", "lcm-lora", "baseline"),
                                   ("baseline", "hyper-sd", "stop:lcm-lora", "baseline", "lcm-lora")])
def test_two_adapters_on_one_unet_never_mix(fake_hub, engine, order):
    """LCM-LoRA and Hyper-SD's LoRA sit on the same base UNet: each run sees only its own adapter, the reference
    sees neither, in any order, a stopped run included. Each image equals that method run in a fresh engine."""
    fresh = Engine(device="cpu")
    steps = {"baseline": 3, "lcm-lora": 4, "hyper-sd": 4}
    alone = {m: alone_image(m, steps[m]) for m in steps}
    for step in order:
        if step.startswith("stop:"):
            stop = threading.Event()
            method = step.removeprefix("stop:")
            with pytest.raises(RunStopped):
                fresh.run("sdxl", method, PROMPT, steps=steps[method], stop=stop,
                          on_step=lambda *a: stop.set(), **SIZE)
            continue
        image = fresh.run("sdxl", step, PROMPT, steps=steps[step], **SIZE).image
        assert_same_image(image, alone[step], tolerance=0)
    loras = [r for r in fresh.cache.report() if r["kind"] == "lora"]
    assert len(loras) == 2  # two adapters, one UNet
    units = [r for r in fresh.cache.report() if r["kind"] == "unet"]
    assert len(units) == 1 and {"sdxl/baseline", "sdxl/lcm-lora", "sdxl/hyper-sd"} <= set(units[0]["used_by"])


def test_lora_is_really_applied(engine):
    with_lora = engine.run("sdxl", "lcm-lora", PROMPT, **SIZE).image
    pipe = recipe_pipeline("sdxl", "lcm-lora")
    pipe.disable_lora()
    try:
        without = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0,
                       generator=torch.Generator("cpu").manual_seed(0), **SIZE).images[0]
    finally:
        pipe.enable_lora()
    assert np.abs(pixels(with_lora) - pixels(without)).max() > 10


def test_a_stopped_lora_run_leaves_the_adapter_off(fake_hub):
    from peft.tuners.tuners_utils import BaseTunerLayer

    fresh = Engine(device="cpu")
    before = fresh.run("sdxl", "baseline", PROMPT, steps=2, **SIZE).image
    stop = threading.Event()

    def on_step(method, step, total):
        stop.set()

    with pytest.raises(RunStopped, match="lcm-lora stopped after step 1 of 4"):
        fresh.run("sdxl", "lcm-lora", PROMPT, on_step=on_step, stop=stop, **SIZE)
    unet = next(r for r in fresh.cache._items.values() if r.kind == "unet" and "baseline" in str(r.used_by))
    layers = [m for m in unet.module.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(layer.disable_adapters for layer in layers)
    assert_same_image(fresh.run("sdxl", "baseline", PROMPT, steps=2, **SIZE).image, before, tolerance=0)


def test_the_lora_needs_the_unet_lock(engine):
    engine.run("sd15", "lcm-lora", PROMPT, **SIZE)
    lora_key = next(k for k, i in engine.cache._items.items() if i.kind == "lora")
    with pytest.raises(RuntimeError, match="only be enabled by the run holding its UNet"):
        with engine.adapters.active([lora_key]):
            pass


# --- progress and stopping ---------------------------------------------------------------------------------

def test_on_step_reports_every_step_and_stop_ends_the_run(engine):
    calls = []
    engine.run("sdxl", "lcm", PROMPT, on_step=lambda *a: calls.append(a), **SIZE)
    assert calls == [("lcm", i, 4) for i in (1, 2, 3, 4)]
    stop = threading.Event()
    seen = []

    def on_step(method, step, total):
        seen.append(step)
        if step == 2:
            stop.set()

    with pytest.raises(RunStopped):
        list(engine.iter_compare("sdxl", PROMPT, ["lcm", "baseline"], on_step=on_step, stop=stop, **SIZE))
    assert seen == [1, 2]
    with pytest.raises(RunStopped, match="before it started"):
        engine.run("sdxl", "lcm", PROMPT, stop=stop, **SIZE)


# --- memory budget ------------------------------------------------------------------------------------------

def test_eviction_under_a_tiny_budget_and_reload(fake_hub):
    probe = Engine(device="cpu")
    probe.run("sdxl", "turbo", PROMPT, **SIZE)
    one_method = probe.cache.total_bytes
    budget = int(one_method * 1.3)  # room for one method's components, not two UNets
    small = Engine(device="cpu", memory_budget=budget)
    first = small.run("sdxl", "turbo", PROMPT, **SIZE).image
    small.run("sdxl", "lcm", PROMPT, **SIZE)
    assert small.cache.total_bytes <= budget
    assert [r["used_by"] for r in small.cache.report() if r["kind"] == "unet"] == [["sdxl/lcm"]]
    loads = small.cache.loads
    again = small.run("sdxl", "turbo", PROMPT, **SIZE).image
    assert small.cache.loads == loads + 1  # the turbo UNet came back; the shared parts never left
    assert small.cache.total_bytes <= budget
    assert_same_image(first, again, tolerance=0)
    lora = small.run("sdxl", "lcm-lora", PROMPT, **SIZE).image
    small.run("sdxl", "turbo", PROMPT, **SIZE)  # evicts the base UNet and its adapter with it
    assert not [r for r in small.cache.report() if r["kind"] == "lora"]
    assert_same_image(small.run("sdxl", "lcm-lora", PROMPT, **SIZE).image, lora, tolerance=0)


def test_a_budget_below_one_method_still_runs(fake_hub, caplog):
    tiny = Engine(device="cpu", memory_budget="1MB")
    assert tiny.run("sd15", "turbo", PROMPT, **SIZE).image.size == (64, 64)
    assert "going over it" in caplog.text


# --- bad input: a clear ValueError naming what is allowed ---------------------------------------------------

@pytest.mark.parametrize(
    "call, message",
    [
        (dict(family="sd3"), r"`family` must be one of \('sdxl', 'sd15', 'mini'"),
        (dict(method="hyper"), r"`method` must be one of \('turbo', 'lcm', 'lcm-lora', 'lightning', 'hyper-sd'"),
        (dict(method="lcm", steps=9), r"`steps` must be an integer in \[1, 8\] for lcm, got 9"),
        (dict(method="lcm", steps=51), r"\[1, 8\]"),
        (dict(method="baseline", steps=0), r"`steps` must be an integer in \[1, 100\] for baseline, got 0"),
        (dict(method="baseline", steps=2.5), r"`steps` must be an integer"),
        (dict(method="turbo", guidance=1.0), r"`guidance` must be in \[0, 0\] for turbo, got 1.0"),
        (dict(method="lcm-lora", guidance=3), r"`guidance` must be in \[1, 2\] for lcm-lora"),
        (dict(width=100), r"`width` must be a multiple of 8 in \[64, 2048\], got 100"),
        (dict(height=4096), r"`height` must be a multiple of 8 in \[64, 2048\], got 4096"),
        (dict(seed=-1), r"`seed` must be an integer in \[0, 4294967295\], got -1"),
        (dict(seed=2**32), r"`seed` must be an integer in \[0, 4294967295\]"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    call = {"family": "sdxl", "method": "turbo", **call}
    with pytest.raises(ValueError, match=message):
        Engine(device="cpu").run(call.pop("family"), call.pop("method"), PROMPT, **call)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(methods=[]), r"`methods` must name at least one of \('turbo', 'lcm', 'lcm-lora', 'lightning'"),
        (dict(methods=["turbo", "turbo"]), "must not repeat"),
        (dict(methods=["turbo"], steps={"baseline": 3}), r"names methods that are not run: \['baseline'\]"),
        (dict(methods=["turbo", "lcm"], steps={"lcm": 60}), r"\[1, 8\] for lcm, got 60"),
        (dict(width=64, height=60), r"`height` must be a multiple of 8"),
    ],
)
def test_bad_comparisons_fail_before_anything_runs(call, message, monkeypatch):
    fresh = Engine(device="cpu")
    monkeypatch.setattr(fresh, "run", lambda *a, **k: pytest.fail("ran before validating"))
    with pytest.raises(ValueError, match=message):
        fresh.compare("sdxl", PROMPT, **call)


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="`device` must be one of"):
        Engine(device="tpu")
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        Engine(device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="`memory_budget` must be"):
        Engine(device="cpu", memory_budget="lots")
    assert Engine(device="cpu").dtype == torch.float32


# --- missing weights ----------------------------------------------------------------------------------------

def test_missing_weights_offline_name_the_repos_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError) as error:
        Engine(device="cpu").run("sdxl", "lcm", PROMPT, **SIZE)
    message = str(error.value)
    assert SDXL_BASE in message and "latent-consistency/lcm-sdxl" in message
    assert "python -m fastgen download --family sdxl" in message
    assert not family_available("sdxl")


def test_a_failed_download_reads_as_missing_weights_not_a_crash(tmp_path, monkeypatch):
    """Online mode, but the Hub cannot be reached (or refuses): the same clear error as offline."""
    from fastgen import fetch

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(fetch, "endpoint", lambda: "http://127.0.0.1:9")  # nothing answers: no download is tried
    with pytest.raises(MissingWeightsError, match="python -m fastgen download --family sdxl") as error:
        Engine(device="cpu").run("sdxl", "turbo", PROMPT, **SIZE)
    assert error.value.__cause__ is None

    def refused(specs, listing):
        raise fetch.DownloadError("stabilityai/sdxl-turbo is gated")

    monkeypatch.setattr(fetch, "hub_problem", lambda *args, **kwargs: "")  # the Hub answers, but refuses
    monkeypatch.setattr(fetch, "plan", refused)
    with pytest.raises(MissingWeightsError, match="python -m fastgen download --family sdxl") as error:
        Engine(device="cpu").run("sdxl", "turbo", PROMPT, **SIZE)
    assert isinstance(error.value.__cause__, fetch.DownloadError)


def test_only_the_missing_repo_is_named(fake_hub, tmp_path, monkeypatch):
    import shutil

    partial = tmp_path / "hub"
    shutil.copytree(fake_hub, partial, symlinks=True)
    shutil.rmtree(partial / "models--latent-consistency--lcm-lora-sdv1-5")
    monkeypatch.setenv("HF_HUB_CACHE", str(partial))
    fresh = Engine(device="cpu")
    assert fresh.run("sd15", "turbo", PROMPT, **SIZE).image.size == (64, 64)
    with pytest.raises(MissingWeightsError, match=r"missing weights: latent-consistency/lcm-lora-sdv1-5;"):
        fresh.run("sd15", "lcm-lora", PROMPT, **SIZE)


def test_default_family(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine_module, "family_available", lambda name: name != "mini")
    assert engine_module.default_family() == "sdxl"
    monkeypatch.setattr(engine_module, "family_available", lambda name: name == "mini")
    assert engine_module.default_family() == "mini"
    monkeypatch.setattr(engine_module, "family_available", lambda name: False)
    with pytest.raises(MissingWeightsError, match="python -m fastgen download"):
        engine_module.default_family()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_module.default_family() == "sdxl"


# --- the comparison object ----------------------------------------------------------------------------------

def test_comparison_shape_speedup_and_grid(engine):
    comparison = engine.compare("sd15", PROMPT, ["turbo", "baseline"], seed=3, steps=STEPS, **SIZE)
    data = json.loads(json.dumps(comparison.to_dict()))
    assert {"family", "prompt", "seed", "device", "dtype", "results", "cache"} <= set(data)
    assert (data["family"], data["seed"], data["device"], data["dtype"]) == ("sd15", 3, "cpu", "float32")
    assert [r["method"] for r in data["results"]] == ["turbo", "baseline"]
    for row in data["results"]:
        assert {"method", "steps", "guidance", "cfg", "scheduler", "timestep_spacing", "width", "height",
                "seconds", "image", "code", "timings", "warnings", "load_seconds"} <= set(row)
    assert all({"id", "kind", "bytes", "used_by"} <= set(c) for c in data["cache"]["components"])
    assert {m for c in data["cache"]["components"] for m in c["used_by"]} == {"turbo", "baseline"}
    turbo, baseline = comparison.results
    assert comparison.speedup("turbo") == pytest.approx(baseline.seconds / turbo.seconds)
    grid = comparison.grid()
    assert grid.width >= 2 * 64 and grid.height > 64


def test_load_fills_the_cache_so_the_first_run_loads_nothing(fake_hub):
    fresh = Engine(device="cpu")
    seconds = fresh.load("sd15", ["turbo", "lcm-lora"])
    assert seconds > 0
    loaded = fresh.cache.loads
    result = fresh.run("sd15", "lcm-lora", PROMPT, **SIZE)
    assert fresh.cache.loads == loaded, "everything lcm-lora needs was already loaded"
    assert {"sd15/turbo", "sd15/lcm-lora"} <= {u for row in fresh.cache.report() for u in row["used_by"]}
    assert result.image.size == (64, 64)


# --- faults confined to one panel -----------------------------------------------------------------------------

@pytest.fixture
def own_mini(tmp_path):
    """A mini layout of this test's own, so a test may corrupt its files."""
    from tests.fakehub import build_mini, mini_family

    return mini_family(build_mini(tmp_path / "mini"))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return data


@pytest.mark.parametrize("method, file", [
    ("lcm", "lcm/diffusion_pytorch_model.safetensors"),
    ("lcm-lora", "lcm-lora/pytorch_lora_weights.safetensors"),
    ("turbo", "turbo/unet/diffusion_pytorch_model.safetensors"),
])
def test_a_corrupt_weight_file_fails_its_panel_alone_and_loads_afresh_once_fixed(own_mini, method, file, caplog):
    from pathlib import Path

    path = Path(own_mini.method("lcm").unet_repo).parent / file
    fresh = Engine(device="cpu")
    # the reference last: it shares the LoRA's UNet, so it would show a half-loaded adapter
    methods = [method, "lcm-lora" if method == "turbo" else "turbo", "baseline"]
    steps = {m: n for m, n in STEPS.items() if m in methods}
    clean = fresh.compare(own_mini, PROMPT, methods, steps=steps)  # the reference images, all components cached
    fresh.cache.clear()
    original = truncate(path)
    broken = fresh.compare(own_mini, PROMPT, methods, steps=steps)
    assert [f.method for f in broken.failures] == [method]
    failure = broken.failures[0]
    assert failure.kind == "load-failed" and "corrupt or truncated" in failure.message
    assert str(path.parent.parent) not in failure.message  # the folder's name, not the server's path
    assert [r.method for r in broken.results] == methods[1:]
    for result in broken.results:  # the others are untouched, the reference never sees a half-loaded LoRA
        assert_same_image(result.image, clean.result(result.method).image, tolerance=0)
    assert not any("Traceback" in r.getMessage() or r.exc_info for r in caplog.records)
    path.write_bytes(original)
    again = fresh.run(own_mini, method, PROMPT, steps=STEPS.get(method))
    assert_same_image(again.image, clean.result(method).image, tolerance=0)


def test_out_of_memory_fails_its_panel_alone(own_mini, monkeypatch):
    fresh = Engine(device="cpu")
    real = Engine._generate

    def lcm_runs_out(self, pipe, spec, *args, **kwargs):  # a test double for an allocator that gives up
        if spec.name == "lcm":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(self, pipe, spec, *args, **kwargs)

    monkeypatch.setattr(Engine, "_generate", lcm_runs_out)
    comparison = fresh.compare(own_mini, PROMPT, steps=STEPS)
    assert [(f.method, f.kind) for f in comparison.failures] == [("lcm", "out-of-memory")]
    assert "out of memory at 64x64" in comparison.failures[0].message
    assert [r.method for r in comparison.results] == ["turbo", "lcm-lora", "baseline"]
    assert comparison.to_dict()["failures"][0]["method"] == "lcm"
    monkeypatch.setattr(Engine, "_generate", real)
    assert fresh.run(own_mini, "lcm", PROMPT).image.size == (64, 64)


def test_an_unexpected_error_fails_its_panel_and_keeps_its_traceback_in_the_log(own_mini, monkeypatch, caplog):
    real = Engine._generate

    def broken(self, pipe, spec, *args, **kwargs):
        if spec.name == "turbo":
            raise RuntimeError("something nobody planned for")
        return real(self, pipe, spec, *args, **kwargs)

    monkeypatch.setattr(Engine, "_generate", broken)
    comparison = Engine(device="cpu").compare(own_mini, PROMPT, ["turbo", "lcm"])
    assert comparison.failures[0].kind == "error" and "RuntimeError" in comparison.failures[0].message
    assert "nobody planned" not in comparison.failures[0].message  # internals stay in the log
    assert any(r.exc_info and "nobody planned" in str(r.exc_info[1]) for r in caplog.records)
    assert [r.method for r in comparison.results] == ["lcm"]


def test_a_stop_still_ends_the_whole_comparison(own_mini):
    stop = threading.Event()
    stop.set()
    with pytest.raises(RunStopped):
        list(Engine(device="cpu").iter_compare(own_mini, PROMPT, ["turbo", "lcm"], stop=stop))
