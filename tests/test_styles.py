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


# --- your model on the page: the Your model tab's handler ---------------------------------------------------

def custom_run(runs, family, model, loras=(), without=True, seed=5, size="64x64") -> dict:
    """Every update of one Your model run, the last value of each output kept (by output name)."""
    rows = [value for lora in loras for value in (lora.repo, lora.weight_name, lora.scale)]
    rows += ["", "", 1.0] * (4 - len(loras))
    final = {}
    for update in runs.custom(None, family, model, PROMPT, seed, size, without, *rows):
        final.update(update)
    return final


def test_the_page_shows_your_model_with_and_without_the_style(fake_hub, finetune, style, monkeypatch):
    import app
    from fastgen import request

    monkeypatch.setenv("FASTGEN_ALLOW_CUSTOM", "1")
    monkeypatch.setitem(request.PUBLIC, "bind", False)
    engine = Engine(device="cpu")
    lora = StyleLora(str(style), "style.safetensors", 0.8)
    final = custom_run(app.Runs(engine), "sd15", finetune, [lora])
    family = request.custom_base(finetune)
    for method in ("lcm-lora", "baseline"):
        styled = engine.run(family, method, PROMPT, seed=5, loras=[lora], **SIZE)
        plain = engine.run(family, method, PROMPT, seed=5, **SIZE)
        assert_same_image(final[f"custom.{method}.image"], styled.image, tolerance=0)
        assert_same_image(final[f"plain.{method}.image"], plain.image, tolerance=0)
        assert list(styled.image.getdata()) != list(plain.image.getdata())  # the style shows
        assert "style.safetensors @ 0.8" in final[f"custom.{method}.caption"]
        assert "LoRAs" not in final[f"plain.{method}.caption"]
        assert "set_adapters(" in final[f"custom.{method}.code"] and finetune in final[f"custom.{method}.code"]
    assert "faster" in final["custom.lcm-lora.caption"] and "reference" in final["custom.baseline.caption"]
    assert final["custom.lcm-lora.title"] == "### LCM-LoRA + LoRAs"
    assert final["custom_button"].interactive is True and final["custom_stop"].interactive is False


def test_the_page_refuses_your_model_unless_the_host_allows_it(fake_hub, finetune, style, monkeypatch):
    import gradio as gr

    import app
    from fastgen import request

    monkeypatch.setitem(request.PUBLIC, "bind", True)
    runs = app.Runs(Engine(device="cpu"))
    with pytest.raises(gr.Error, match="off on this server"):
        custom_run(runs, "sd15", finetune)
    assert "Off on this server" in app.custom_intro()
    monkeypatch.setenv("FASTGEN_ALLOW_CUSTOM", "1")
    with pytest.raises(gr.Error, match="local folders are not offered"):  # a public bind: no folders
        custom_run(runs, "sd15", "", [StyleLora(str(style), "style.safetensors")])
    verdicts = runs.validate_custom("sd15", "", PROMPT, 0, "native", True, "someone/style", "", 1.0,
                                    *["", "", 1.0] * 3)
    assert [v["is_valid"] for v in verdicts][:7] == [True] * 6 + [False]  # the first LoRA's repo box says why
    assert "weight file" in verdicts[6]["message"]
    nothing = runs.validate_custom("sd15", " ", PROMPT, 0, "native", True, *["", "", 1.0] * 4)
    assert not nothing[1]["is_valid"] and "Type a model" in nothing[1]["message"]


# --- single-file checkpoints, and the host's cap on what a visitor's model may download ----------------------

@pytest.fixture(scope="module")
def single_file(fake_hub, finetune, tmp_path_factory):
    """The fine-tune as one LDM-layout .safetensors: a local file, and published as someone/single-file."""
    from fastgen import hub
    from tests.fakehub import publish, write_single_file

    work = tmp_path_factory.mktemp("single-file")
    path = write_single_file(hub.local_folder(finetune), work / "my-finetune.safetensors")
    publish(fake_hub, "someone/single-file", work)
    return path


def test_a_single_file_checkpoint_runs_as_the_model_it_holds(fake_hub, finetune, single_file, monkeypatch):
    from fastgen import request

    family = request.custom_base(str(single_file))
    assert family.label == "my-finetune.safetensors (Stable Diffusion 1.5)"
    assert family.name == f"sd15:{single_file}" and family.method_names == ("lcm-lora", "baseline")
    engine = Engine(device="cpu")
    result = engine.run(family, "baseline", PROMPT, seed=5, steps=3, **SIZE)
    same = engine.run(request.custom_base(finetune), "baseline", PROMPT, seed=5, steps=3, **SIZE)
    assert_same_image(result.image, same.image)  # the same weights, whichever way they were shared
    assert request.custom_base(str(single_file)).method("baseline").repo == family.method("baseline").repo  # once
    from fastgen.__main__ import _family, parser

    args = parser().parse_args(["compare", "a red circle", "--base", str(single_file)])
    assert _family(args).label == family.label  # the CLI reads the architecture from the file too
    hub_id = "someone/single-file/my-finetune.safetensors"  # the same file on the Hub: allowed with its repo
    monkeypatch.setenv("FASTGEN_CUSTOM_ALLOW", "someone/single-file")
    assert request.custom_refusal(hub_id) is None and request.custom_refusal("someone/other/x.safetensors")
    assert request.custom_base(hub_id).method("baseline").repo != family.method("baseline").repo  # its own file


def test_single_files_that_are_not_checkpoints_are_refused_with_the_reason(fake_hub, tmp_path):
    from safetensors.torch import save_file

    from fastgen import request

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    for name, message in (("model.ckpt", "pickled checkpoint"), ("missing.safetensors", "no checkpoint file"),
                          ("other.safetensors", "not an SDXL or SD 1.5 checkpoint"),
                          ("broken.safetensors", "not a readable .safetensors")):
        with pytest.raises(RequestError, match=message) as caught:
            request.custom_base(str(tmp_path / name))
        assert caught.value.field == "base"


def test_a_visitors_model_over_the_hosts_cap_is_refused_before_the_first_byte(finetune, single_file, online, server,
                                                                             monkeypatch):
    from fastgen import request

    monkeypatch.setenv("FASTGEN_CUSTOM_MAX_GB", "0.0001")  # 100 kB: less than any of these
    family = request.custom_base(finetune)  # its model_index.json only
    engine = Engine(device="cpu")
    failure = engine.compare(family, PROMPT, ["baseline"], steps={"baseline": 2}, **SIZE).failures[0]
    assert "over this server's cap of 100.0 kB" in failure.message and "FASTGEN_CUSTOM_MAX_GB" in failure.message
    with pytest.raises(RequestError, match="over this server's cap"):
        request.custom_base("someone/single-file/my-finetune.safetensors")
    lora = StyleLora("someone/single-file", "my-finetune.safetensors")  # any file over the cap: refused alike
    failure = engine.compare("sd15", PROMPT, ["baseline"], steps={"baseline": 2}, loras=[lora], **SIZE).failures[0]
    assert "over this server's cap" in failure.message
    visitors = sum(p.stat().st_size for p in online.glob("models--someone--*/blobs/*"))
    assert visitors < 2_000  # of the visitor's repos, only the model_index.json was fetched
    monkeypatch.setenv("FASTGEN_CUSTOM_MAX_GB", "1")
    assert engine.run(family, "baseline", PROMPT, steps=2, **SIZE).image.size == (64, 64)
