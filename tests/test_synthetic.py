"""Synthetic families: the real architectures at their published sizes, built without downloading anything,
going through the engine and cache like any other family (fastgen/synthetic)."""

import pytest

from fastgen import synthetic
from fastgen.registry import get_family

# Published parameter counts (DESIGN.md): SDXL UNet, CLIP ViT-L, OpenCLIP bigG, the VAE, the SD 1.5 UNet.
SDXL_UNET, VIT_L, BIGG, VAE, SD15_UNET = 2_567_463_684, 123_060_480, 694_659_840, 83_653_863, 859_520_964


def built(repo: str, subfolder: str | None, class_name: str):
    """One component of a synthetic repo, on the meta device (no memory, no init)."""
    import diffusers
    import torch
    import transformers

    cls = getattr(diffusers, class_name, None) or getattr(transformers, class_name)
    with synthetic.on_meta():
        module = synthetic.build(cls, synthetic.repo(repo), subfolder, torch.float16, "cpu")
    assert all(p.is_meta for p in module.parameters())
    return module


@pytest.mark.parametrize("repo, subfolder, class_name, count", [
    ("sdxl-base", "unet", "UNet2DConditionModel", SDXL_UNET),
    ("sdxl-turbo", "unet", "UNet2DConditionModel", SDXL_UNET),
    ("sdxl-base", "text_encoder", "CLIPTextModel", VIT_L),
    ("sdxl-base", "text_encoder_2", "CLIPTextModelWithProjection", BIGG),
    ("sdxl-base", "vae", "AutoencoderKL", VAE),
    ("sd15-base", "unet", "UNet2DConditionModel", SD15_UNET),
    ("sd15-base", "text_encoder", "CLIPTextModel", VIT_L),
    ("sd15-base", "vae", "AutoencoderKL", VAE),
])
def test_components_have_the_published_parameter_counts(repo, subfolder, class_name, count):
    assert synthetic.parameter_count(built(repo, subfolder, class_name)) == count


def test_sdxl_lcm_lora_has_the_real_shape_on_the_reference_unet():
    unet = built("sdxl-base", "unet", "UNet2DConditionModel")
    with synthetic.on_meta():
        synthetic.attach_lora(unet, synthetic.REPOS / "lcm-lora-sdxl" / "adapter_config.json", "lcm")
    lora = sum(p.numel() for n, p in unet.named_parameters() if ".lcm." in n)
    assert lora == 196_751_360  # rank 64 on the real target modules: the card's "197M"
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in unet.named_parameters() if ".lcm." in n} >= {
        "to_q", "to_k", "to_v", "0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj"}


def test_families_mirror_the_real_recipes_with_synthetic_repos():
    for name, real in (("synthetic-sdxl", "sdxl"), ("synthetic-sd15", "sd15")):
        family, original = get_family(name), get_family(real)
        assert family.method_names == ("turbo", "lcm", "lcm-lora", "baseline") and family.reference == "baseline"
        assert synthetic.family_is_synthetic(family) and not synthetic.family_is_synthetic(original)
        assert synthetic.NOTE in family.label
        for spec in family.methods:
            same = original.method(spec.name)
            assert (spec.pipeline, spec.scheduler, spec.steps, spec.guidance) == (
                same.pipeline, same.scheduler, same.steps, same.guidance)
    sdxl = get_family("synthetic-sdxl")
    assert sdxl.method("lcm-lora").repo == sdxl.method("baseline").repo  # LCM-LoRA sits on the reference UNet


def test_seeded_weights_are_deterministic_and_depend_on_the_seed():
    import torch

    def made(seed):
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Conv2d(2, 4, 3))
        synthetic.fill(module, seed)
        return torch.cat([p.flatten() for p in module.parameters()])

    assert torch.equal(made(1), made(1)) and not torch.equal(made(1), made(2))
    layer = torch.nn.Linear(400, 3)
    synthetic.fill(layer, 0)
    assert torch.all(layer.bias == 0) and abs(layer.weight.std().item() - 400 ** -0.5) < 0.01


def test_synthetic_sd15_runs_through_the_engine_with_real_bytes_and_sharing(tmp_path):
    """Full-size SD 1.5 modules (float32, about 4.5 GB) at a tiny image: LCM-LoRA on the reference's UNet."""
    from fastgen.engine import Engine

    family = get_family("synthetic-sd15")
    engine = Engine(device="cpu")
    comparison = engine.compare(family, "a red circle", ["lcm-lora", "baseline"], width=64, height=64,
                                steps={"lcm-lora": 1, "baseline": 1})
    assert not comparison.failures
    assert [r.image.size for r in comparison.results] == [(64, 64), (64, 64)]
    rows = {(row["kind"], tuple(row["used_by"])): row["bytes"] for row in comparison.cache}
    assert rows[("unet", ("lcm-lora", "baseline"))] == SD15_UNET * 4  # one UNet, both methods
    assert rows[("text_encoder", ("lcm-lora", "baseline"))] == VIT_L * 4 + 77 * 8  # + CLIP's int64 position ids
    assert rows[("lora", ("lcm-lora",))] == 67_252_224 * 4
    assert engine.cache.loads == 5  # text encoder, tokenizer, UNet, VAE, LoRA: each once
    comparison.save(tmp_path)
    assert (tmp_path / "results.json").is_file()
