"""Style LoRAs stacked on the base model's methods, on the fake Hub's sd15 family: each image equals the plain
diffusers recipe with the LoRA loaded by hand and set with `set_adapters(..., adapter_weights=...)`, and equals
its own snippet; the style never leaks into later runs; distilled UNets run without it and say so."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.fakehub import _unet, write_lora, write_peft_lora
from fastgen.engine import Engine
from fastgen.registry import StyleLora
from fastgen.request import RequestError, check_loras
from tests.test_engine import PROMPT, SIZE, assert_same_image, recipe_pipeline

STEPS = {"baseline": 3, "lcm-lora": 4}


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    """A local folder holding one UNet-only LoRA for SD 1.5 in the peft key format, and one in kohya's."""
    folder = tmp_path_factory.mktemp("style-lora")
    write_peft_lora(folder / "style.safetensors", _unet("sd", 0, 32), seed=91, rank=4)
    write_lora(folder / "kohya.safetensors", _unet("sd", 0, 32), seed=92)
    return folder


def by_hand(method: str, lora: StyleLora, steps: int, guidance: float, seed: int = 5):
    pipe = recipe_pipeline("sd15", method)  # a fresh pipeline: the LCM-LoRA recipe loads its adapter as "lcm"
    pipe.load_lora_weights(lora.repo, weight_name=lora.weight_name, adapter_name="style")
    names = ["lcm", "style"] if method == "lcm-lora" else ["style"]
    weights = [1.0, lora.scale] if method == "lcm-lora" else [lora.scale]
    pipe.set_adapters(names, adapter_weights=weights)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed), **SIZE).images[0]


@pytest.mark.parametrize("method", ["baseline", "lcm-lora"])
def test_a_style_lora_equals_the_hand_made_recipe_and_its_snippet(fake_hub, style, method, tmp_path, monkeypatch):
    engine = Engine(device="cpu")
    lora = StyleLora(str(style), "style.safetensors", 0.8)
    plain = engine.run("sd15", method, PROMPT, seed=5, steps=STEPS[method], **SIZE)
    styled = engine.run("sd15", method, PROMPT, seed=5, steps=STEPS[method], loras=[lora], **SIZE)
    assert styled.loras == [lora.to_dict()] and styled.to_dict()["loras"] == [lora.to_dict()]
    assert "loras" not in plain.to_dict()
    diff = torch.tensor(list(styled.image.getdata())) - torch.tensor(list(plain.image.getdata()))
    assert diff.abs().max() > 2  # beyond assert_same_image's tolerance: the style shows
    assert_same_image(styled.image, by_hand(method, lora, styled.steps, styled.guidance))
    assert "set_adapters(" in styled.code and "adapter_weights=" in styled.code

    monkeypatch.chdir(tmp_path)  # the snippet saves <method>.png where it runs
    exec(compile(styled.code, f"<sd15/{method} styled snippet>", "exec"), {})
    assert_same_image(styled.image, Image.open(tmp_path / f"{method}.png"))

    again = engine.run("sd15", method, PROMPT, seed=5, steps=STEPS[method], **SIZE)  # no leak into a plain run
    assert_same_image(again.image, plain.image, tolerance=0)
    rows = [r for r in engine.cache.report() if r["kind"] == "lora" and r["sources"][0].endswith("style.safetensors")]
    assert len(rows) == 1 and rows[0]["used_by"] == [f"sd15/{method}"]  # the style, listed with its user


def test_two_styles_stack_and_distilled_unets_run_without_them(fake_hub, style):
    engine = Engine(device="cpu")
    loras = [StyleLora(str(style), "style.safetensors", 0.5), StyleLora(str(style), "kohya.safetensors", 0.7)]
    one = engine.run("sd15", "baseline", PROMPT, steps=3, loras=loras[:1], **SIZE)
    both = engine.run("sd15", "baseline", PROMPT, steps=3, loras=loras, **SIZE)
    assert both.loras == [lora.to_dict() for lora in loras]
    assert list(both.image.getdata()) != list(one.image.getdata())
    turbo = engine.run("sd15", "turbo", PROMPT, loras=loras, **SIZE)
    assert turbo.loras == [] and any("LoRAs not applied" in w for w in turbo.warnings)
    assert_same_image(turbo.image, engine.run("sd15", "turbo", PROMPT, **SIZE).image, tolerance=0)


def test_a_lora_with_text_encoder_weights_is_refused(fake_hub, tmp_path):
    from safetensors.torch import load_file, save_file

    write_lora(tmp_path / "base.safetensors", _unet("sd", 0, 32), seed=93)
    tensors = load_file(tmp_path / "base.safetensors")
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 4)
    save_file(tensors, tmp_path / "te.safetensors")
    outcomes = Engine(device="cpu").compare("sd15", PROMPT, ["baseline"], steps={"baseline": 2},
                                            loras=[StyleLora(str(tmp_path), "te.safetensors")], **SIZE)
    assert [f.method for f in outcomes.failures] == ["baseline"]
    assert "also changes the text encoder" in outcomes.failures[0].message


def test_a_missing_lora_names_its_repo(fake_hub, tmp_path):
    outcomes = Engine(device="cpu").compare("sd15", PROMPT, ["baseline"], steps={"baseline": 2},
                                            loras=[StyleLora(str(tmp_path), "absent.safetensors")], **SIZE)
    assert outcomes.failures[0].kind == "missing-weights" and str(tmp_path) in outcomes.failures[0].message


@pytest.mark.parametrize("value, message", [
    ("someone/style", "must be a list"),
    ([{"repo": "a/b"}], "`loras` must be a string"),
    ([{"repo": "a/b", "weight_name": "x.safetensors", "scale": 3}], r"scales must be numbers in \[-2, 2\]"),
    ([{"repo": "a/b", "weight_name": "../x.safetensors"}], "weight_name is a file name in the repo"),
    ([{"repo": "a/b", "weight_name": "x.safetensors", "rank": 4}], "items are"),
    ([{"repo": "a/b", "weight_name": "x.safetensors"}] * 5, "at most 4"),
])
def test_bad_loras_are_refused_with_the_field(value, message):
    with pytest.raises(RequestError, match=message) as error:
        check_loras(value)
    assert error.value.field == "loras"


def test_the_cli_takes_repeatable_loras():
    from fastgen.__main__ import parser

    args = parser().parse_args(["compare", "x", "--lora", "someone/style", "--lora", "/tmp/f:pixel.safetensors@0.8"])
    assert args.lora == [("someone/style", "pytorch_lora_weights.safetensors", 1.0),
                         ("/tmp/f", "pixel.safetensors", 0.8)]


# --- your model and your LoRAs through the API: the host's switch, the allowlist, a fine-tune --------------------

@pytest.fixture(scope="module")
def finetune(fake_hub, tmp_path_factory):
    """A "fine-tune": the sd15 base repo with other UNet weights, published on the fake Hub under another id."""
    import shutil

    from tests.fakehub import SD15_BASE, publish

    snapshot = next((fake_hub / f"models--{SD15_BASE.replace('/', '--')}" / "snapshots").iterdir())
    work = tmp_path_factory.mktemp("finetune") / "repo"
    shutil.copytree(snapshot, work, symlinks=False)
    unet = _unet("sd", 41, 32)
    for old in (work / "unet").glob("diffusion_pytorch_model*"):
        old.unlink()
    unet.save_pretrained(work / "unet", variant="fp16")
    unet.save_pretrained(work / "unet")
    publish(fake_hub, "someone/sd15-finetune", work)
    return "someone/sd15-finetune"


def api(engine):
    import app

    return app.compare_api(engine, "sd15")[0]


def test_custom_models_and_loras_are_off_unless_the_host_allows_them(fake_hub, finetune, style, monkeypatch):
    import gradio as gr

    from fastgen import request

    monkeypatch.delenv("FASTGEN_ALLOW_CUSTOM", raising=False)
    monkeypatch.delenv("FASTGEN_CUSTOM_ALLOW", raising=False)
    compare = api(Engine(device="cpu"))
    lora = {"repo": "someone/style", "weight_name": "style.safetensors", "scale": 0.8}
    for kwargs, message in ((dict(base=finetune), "off on this server"), (dict(loras=[lora]), "off on this server")):
        with pytest.raises(gr.Error, match=message):
            compare(PROMPT, 0, None, ["baseline"], 64, 64, None, {"baseline": 2}, None, **kwargs)
    monkeypatch.setenv("FASTGEN_CUSTOM_ALLOW", "someone/other-model")
    with pytest.raises(gr.Error, match="not on this server's list"):
        compare(PROMPT, 0, None, ["baseline"], 64, 64, None, {"baseline": 2}, None, base=finetune)
    monkeypatch.setenv("FASTGEN_ALLOW_CUSTOM", "1")
    monkeypatch.setitem(request.PUBLIC, "bind", True)
    with pytest.raises(gr.Error, match="local folders are not offered"):
        compare(PROMPT, 0, None, ["baseline"], 64, 64, None, {"baseline": 2}, None,
                loras=[{"repo": str(style), "weight_name": "style.safetensors"}])


def test_a_fine_tune_with_a_style_through_the_api_equals_its_recipe(fake_hub, finetune, style, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from fastgen import request

    monkeypatch.setenv("FASTGEN_ALLOW_CUSTOM", "1")
    monkeypatch.setitem(request.PUBLIC, "bind", False)  # a local folder (the LoRA) only on a loopback bind
    engine = Engine(device="cpu")
    lora = {"repo": str(style), "weight_name": "style.safetensors", "scale": 0.8}
    _, data = api(engine)(PROMPT, 5, None, ["lcm-lora", "baseline"], 64, 64, None, {"baseline": 3}, None,
                          base=finetune, loras=[lora])
    assert data["family"] == f"sd15:{finetune}" and [r["method"] for r in data["results"]] == ["lcm-lora", "baseline"]
    assert all(r["loras"] == [lora] for r in data["results"])
    image = engine.run(request.custom_base(finetune), "baseline", PROMPT, seed=5, steps=3,
                       loras=[StyleLora(**lora)], **SIZE).image
    pipe = StableDiffusionPipeline.from_pretrained(finetune)
    pipe.load_lora_weights(str(style), weight_name="style.safetensors", adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(5),
                    **SIZE).images[0]
    assert_same_image(image, expected)
    plain = engine.run("sd15", "baseline", PROMPT, seed=5, steps=3, **SIZE).image  # the family itself: untouched
    assert list(plain.getdata()) != list(image.getdata())
    assert_same_image(plain, Engine(device="cpu").run("sd15", "baseline", PROMPT, seed=5, steps=3, **SIZE).image,
                      tolerance=0)


def test_a_relative_folder_is_a_folder_for_the_gate_and_the_loras(tmp_path, monkeypatch):
    """A folder named without ./ (an existing "my-model") is not a Hub id: the host's switch treats it as a
    local folder, and a LoRA's ./folder resolves to its absolute path, as custom_family resolves a base."""
    from fastgen import request

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    monkeypatch.setenv("FASTGEN_ALLOW_CUSTOM", "1")
    monkeypatch.setitem(request.PUBLIC, "bind", True)
    assert "local folders" in request.custom_refusal("my-model")
    assert request.custom_refusal("someone/my-model") is None
    assert StyleLora("./my-model", "s.safetensors").repo == str(tmp_path / "my-model")
    assert StyleLora("someone/style", "s.safetensors").repo == "someone/style"
