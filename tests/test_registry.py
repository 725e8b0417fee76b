"""The registry holds the recipes table as validated data and imports nothing heavy."""

import subprocess
import sys
from dataclasses import replace

import pytest

from fastgen import registry
from fastgen.registry import FAMILIES, Family, MethodSpec, custom_family, family_available, get_family

# (family, method) -> (weights, scheduler, steps (default, min, max), guidance (default, min, max), mode, size)
RECIPES = {
    ("sdxl", "baseline"): ("stabilityai/stable-diffusion-xl-base-1.0", "default", (50, 1, 100), (5.0, 1, 15), "cfg", 1024),
    ("sdxl", "turbo"): ("stabilityai/sdxl-turbo", "euler_ancestral", (1, 1, 4), (0.0, 0, 0), "none", 512),
    ("sdxl", "lcm"): ("latent-consistency/lcm-sdxl", "lcm", (4, 1, 8), (8.0, 1, 15), "embedding", 1024),
    ("sdxl", "lcm-lora"): ("latent-consistency/lcm-lora-sdxl", "lcm", (4, 1, 8), (1.0, 1, 2), "cfg", 1024),
    ("sd15", "baseline"): ("stable-diffusion-v1-5/stable-diffusion-v1-5", "default", (50, 1, 100), (7.5, 1, 15), "cfg", 512),
    ("sd15", "turbo"): ("stabilityai/sd-turbo", "default", (1, 1, 4), (0.0, 0, 0), "none", 512),
    ("sd15", "lcm"): ("SimianLuo/LCM_Dreamshaper_v7", "lcm", (4, 1, 8), (8.0, 1, 15), "embedding", 768),
    ("sd15", "lcm-lora"): ("latent-consistency/lcm-lora-sdv1-5", "lcm", (4, 1, 8), (1.0, 1, 2), "cfg", 512),
    ("mini", "baseline"): ("base", "default", (50, 1, 100), (2.0, 1, 10), "cfg", 64),
    ("mini", "turbo"): ("turbo", "euler_ancestral", (1, 1, 4), (0.0, 0, 0), "none", 64),
    ("mini", "lcm"): ("lcm", "lcm", (4, 1, 8), (4.0, 1, 8), "embedding", 64),
    ("mini", "lcm-lora"): ("lcm-lora", "lcm", (4, 1, 8), (1.0, 1, 2), "cfg", 64),
}


@pytest.mark.parametrize("key", sorted(RECIPES))
def test_rows_follow_the_recipes_table(key):
    weights, scheduler, steps, guidance, mode, size = RECIPES[key]
    spec = get_family(key[0]).method(key[1])
    where = spec.lora_repo or spec.unet_repo or spec.repo
    assert where == weights if key[0] != "mini" else where.endswith(f"/mini/weights/{weights}")
    assert spec.scheduler == scheduler
    assert (spec.steps, spec.min_steps, spec.max_steps) == steps
    assert (spec.guidance, spec.min_guidance, spec.max_guidance) == guidance
    assert (spec.guidance_mode, spec.native_size) == (mode, size)


def test_families_hold_their_methods_in_comparison_order():
    assert set(FAMILIES) >= {"sdxl", "sd15", "mini"}
    for family in FAMILIES.values():  # the page opens with the four the product is known for
        assert family.default_methods == ("turbo", "lcm", "lcm-lora", "baseline")
        assert family.reference == "baseline" and family.panel_order[-1] == "baseline"
    assert get_family("sdxl").panel_order == ("turbo", "lcm", "lcm-lora", "lightning", "hyper-sd", "dmd2", "baseline")
    assert get_family("mini").method_names == ("turbo", "lcm", "lcm-lora", "baseline")  # the rows it has models for


def test_a_step_count_picks_its_file_scheduler_and_call_arguments():
    sdxl = get_family("sdxl")
    one = sdxl.method("lightning").at_steps(1)
    assert one.unet_weight_name == "sdxl_lightning_1step_unet_x0.safetensors"
    assert dict(one.scheduler_kwargs) == {"timestep_spacing": "trailing", "prediction_type": "sample"}
    assert dict(sdxl.method("lightning").at_steps(8).scheduler_kwargs) == {"timestep_spacing": "trailing"}
    hyper = sdxl.method("hyper-sd").at_steps(1)
    assert (hyper.lora_weight_name, hyper.scheduler, dict(hyper.call_kwargs)) == (
        "Hyper-SDXL-1step-lora.safetensors", "tcd", {"eta": 1.0})
    assert sdxl.method("hyper-sd").at_steps(2).scheduler == "ddim"
    assert dict(sdxl.method("dmd2").at_steps(4).call_kwargs) == {"timesteps": (999, 749, 499, 249)}
    assert sdxl.method("dmd2").at_steps(1).unet_weight_name.endswith(".bin")
    assert sdxl.method("dmd2").allowed_steps == (1, 4)
    with pytest.raises(ValueError, match=r"`steps` must be one of \(1, 4\) for dmd2"):
        sdxl.method("dmd2").at_steps(2)


def test_recipe_details():
    sdxl, sd15, mini = (get_family(n) for n in ("sdxl", "sd15", "mini"))
    assert dict(sdxl.method("turbo").scheduler_kwargs) == {"timestep_spacing": "trailing"}
    assert dict(sd15.method("turbo").scheduler_kwargs) == {"timestep_spacing": "trailing"}
    assert sdxl.method("lcm").repo == sdxl.method("baseline").repo == sdxl.method("lcm-lora").repo
    assert sdxl.method("lcm").unet_subfolder is None and sdxl.method("lcm").unet_variant == "fp16"
    assert {m.variant for m in sdxl.methods} == {"fp16"}
    assert sd15.method("lcm").variant is None and sd15.method("lcm").pipeline == "LatentConsistencyModelPipeline"
    for family in (sdxl, sd15, mini):
        assert family.method("lcm-lora").lora_weight_name == "pytorch_lora_weights.safetensors"
        assert "non-commercial" in (family.method("turbo").licence or "") or family.name == "mini"
        assert family.method("baseline").licence is None
    assert all(m.variant is None and m.pipeline == "StableDiffusionPipeline" for m in mini.methods)
    assert mini.method("lcm").unet_subfolder is None and mini.method("lcm").unet_repo.endswith("weights/lcm")


def test_negative_prompt_is_ignored_without_cfg():
    sdxl = get_family("sdxl")
    assert sdxl.method("turbo").ignores_negative_prompt and sdxl.method("lcm").ignores_negative_prompt
    assert not sdxl.method("baseline").ignores_negative_prompt
    lcm_lora = sdxl.method("lcm-lora")
    assert not lcm_lora.ignores_negative_prompt and not lcm_lora.cfg_at(1.0) and lcm_lora.cfg_at(1.5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(name="Fast One"), "`name` must be lower-case letters, digits and dashes"),
        (dict(scheduler="dpm"), "`scheduler` must be one of"),
        (dict(guidance_mode="both"), "`guidance_mode` must be one of"),
        (dict(steps=0), "`steps` must satisfy"),
        (dict(steps=9), "`steps` must satisfy"),
        (dict(guidance=20.0), "`guidance` must satisfy"),
        (dict(native_size=100), "`native_size` must be a multiple of 8"),
        (dict(pipeline="FluxPipeline"), "`pipeline` must be one of"),
        (dict(lora_weight_name=None), "`lora_weight_name` must be given exactly when"),
        (dict(scheduler_kwargs=(("timestep_spacing",),)), "`scheduler_kwargs` must be a tuple of"),
    ],
)
def test_bad_rows_fail_on_creation(change, message):
    good = get_family("sdxl").method("lcm-lora")
    with pytest.raises(ValueError, match=message):
        replace(good, **change)


def test_lcm_never_above_50_steps():
    lcm = get_family("sdxl").method("lcm")
    assert replace(lcm, max_steps=50).max_steps == 50
    with pytest.raises(ValueError, match="`max_steps` must be at most 50 with the LCM scheduler, got 51"):
        replace(lcm, max_steps=51)


def test_turbo_guidance_is_fixed_at_zero():
    with pytest.raises(ValueError, match="fixed at 0.0"):
        replace(get_family("sdxl").method("turbo"), max_guidance=1.0)


def test_family_lookup_and_validation():
    assert get_family("sd15") is FAMILIES["sd15"] and get_family(FAMILIES["mini"]) is FAMILIES["mini"]
    with pytest.raises(ValueError, match=r"`family` must be one of \('sdxl', 'sd15', 'mini'.*got 'sd3'"):
        get_family("sd3")
    with pytest.raises(ValueError, match=r"`method` must be one of \('turbo', 'lcm', 'lcm-lora', 'lightning'"):
        get_family("sdxl").method("hyper")
    baseline = get_family("sdxl").method("baseline")
    with pytest.raises(ValueError, match="unique names"):
        Family(name="x", label="X", methods=(baseline, baseline))
    with pytest.raises(ValueError, match="at least one method"):
        Family(name="x", label="X", methods=())


def test_custom_family_puts_lcm_lora_on_any_base(tmp_path):
    family = custom_family("someone/my-sdxl-finetune", arch="sdxl")
    assert family.name == "sdxl:someone/my-sdxl-finetune" and family.method_names == ("lcm-lora", "baseline")
    lora, baseline = family.method("lcm-lora"), family.method("baseline")
    assert lora.repo == baseline.repo == "someone/my-sdxl-finetune" and baseline.variant is None
    assert lora.lora_repo == "latent-consistency/lcm-lora-sdxl" and lora.scheduler == "lcm"
    local = custom_family(str(tmp_path), arch="sd15", variant="fp16")
    assert local.method("baseline").repo == str(tmp_path) and local.method("baseline").variant == "fp16"
    assert local.method("lcm-lora").lora_repo == "latent-consistency/lcm-lora-sdv1-5"
    with pytest.raises(ValueError, match="`arch` must be one of"):
        custom_family("x/y", arch="flux")


def test_mini_is_unavailable_without_its_folders(tmp_path):
    moved = Family("mini", "Mini", tuple(replace(m, repo=str(tmp_path / "nope")) for m in registry.MINI.methods))
    assert family_available(moved) is False


def test_fake_mini_is_available(fake_mini):
    assert family_available(fake_mini) is True


def test_importing_the_registry_loads_no_torch():
    code = "import sys, fastgen.registry as r; r.family_available('mini'); " \
           "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=registry.Path(registry.__file__).parent.parent)
