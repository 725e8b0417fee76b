"""Every training stage runs end to end (a few steps each) and writes what the next stage and the engine load."""

import hashlib

import numpy as np
import pytest
import torch

from fastgen.mini import train
from fastgen.mini.train import _guidance_embedding, _lcm_scalings


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    weights, work = tmp_path_factory.mktemp("weights"), tmp_path_factory.mktemp("work")
    presets = dict(train.PRESETS)
    train.PRESETS["turbo"] = train.replace(presets["turbo"], teacher_samples=8)  # the pairs are the slow part
    try:
        for stage in train.STAGES:
            train.main([stage, "--steps", "2", "--images", "96", "--batch", "4", "--device", "cpu",
                        "--weights", str(weights), "--work", str(work)])
    finally:
        train.PRESETS.update(presets)
    return weights


def test_stages_write_standard_folders_that_load(trained):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(trained / "base", dtype=torch.float32)
    image = pipe("a large red circle on a blue background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    assert UNet2DConditionModel.from_pretrained(trained / "lcm").config.time_cond_proj_dim == 256
    assert (trained / "lcm-lora" / "pytorch_lora_weights.safetensors").exists()
    turbo = StableDiffusionPipeline.from_pretrained(trained / "turbo", dtype=torch.float32)
    assert type(turbo.scheduler).__name__ == "EulerAncestralDiscreteScheduler"


@pytest.mark.parametrize("family", ["trained", "shipped"])
def test_the_family_loads_without_diffusers_deprecation_warnings(trained, family):
    """A scheduler config with `steps_offset` other than 1 makes every pipeline load print a FutureWarning; what
    training writes and what ships load clean."""
    import warnings

    from diffusers import StableDiffusionPipeline

    weights = trained if family == "trained" else train.WEIGHTS
    for folder in ("base", "turbo"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            StableDiffusionPipeline.from_pretrained(weights / folder, dtype=torch.float32)
        assert not [w for w in caught if "steps_offset" in str(w.message)], folder


def test_turbo_ships_the_base_vae_and_text_encoder_byte_for_byte(trained):
    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert sha(trained / "turbo" / part) == sha(trained / "base" / part)


def test_lora_keys_load_into_every_targeted_layer(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained / "base", dtype=torch.float32)
    pipe.load_lora_weights(trained / "lcm-lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="lcm")
    layers = [name for name, module in pipe.unet.named_modules() if hasattr(module, "lora_A") and "lcm" in module.lora_A]
    from safetensors.torch import load_file

    saved = {k.rsplit(".lora_", 1)[0].removeprefix("unet.") for k in load_file(
        trained / "lcm-lora" / "pytorch_lora_weights.safetensors")}
    assert saved and set(layers) == saved


def test_boundary_condition_and_guidance_embedding_match_diffusers():
    from diffusers import LCMScheduler, StableDiffusionPipeline

    scheduler = LCMScheduler()
    for t in (0, 19, 499, 999):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        ours_skip, ours_out = _lcm_scalings(torch.tensor([t]))
        assert float(ours_skip) == pytest.approx(float(c_skip)) and float(ours_out) == pytest.approx(float(c_out))
    w = torch.tensor([0.0, 3.0, 7.0])
    reference = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert np.allclose(_guidance_embedding(w, 256).numpy(), reference.numpy(), atol=1e-5)


def test_the_vae_loss_can_weigh_the_shapes_edges():
    from fastgen.mini.world import Scene, render

    image = render(Scene("large", "white", "square", "black"), np.random.default_rng(0))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    edges = train.edge_map(x)[0, 0].numpy().astype(bool)
    ys, xs = np.nonzero(image[..., 0] > 128)
    assert edges[ys.min(), (xs.min() + xs.max()) // 2]  # the top side
    assert not edges[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2] and not edges[1, 1]  # inside, outside
    at_edge, inside = x.clone(), x.clone()
    at_edge[..., ys.min(), xs.min():xs.max()] -= 0.5
    inside[..., (ys.min() + ys.max()) // 2, xs.min():xs.max()] -= 0.5  # the same error, away from the edges
    plain = [train.reconstruction_loss(r, x) for r in (at_edge, inside)]
    weighted = [train.reconstruction_loss(r, x, edge_weight=4.0) for r in (at_edge, inside)]
    assert torch.isclose(plain[0], plain[1]) and weighted[0] > 2 * weighted[1]


def test_a_decoder_only_vae_keeps_the_latent_space_and_replaces_every_shipped_copy(trained, tmp_path):
    """`train vae --decoder-only`: the encoder and scaling factor stay, so every model trained on the latents still
    fits; the decoder changes; base and Turbo ship the new VAE byte for byte."""
    import shutil

    from diffusers import AutoencoderKL

    weights = tmp_path / "weights"
    shutil.copytree(trained, weights)
    before = AutoencoderKL.from_pretrained(weights / "base" / "vae")
    train.main(["vae", "--decoder-only", "--steps", "2", "--images", "96", "--batch", "4", "--lr", "1e-2",
                "--device", "cpu", "--weights", str(weights), "--work", str(tmp_path / "work")])
    after = AutoencoderKL.from_pretrained(weights / "base" / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    old, new = before.state_dict(), after.state_dict()
    encoder = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in old if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(old[k], new[k]) for k in encoder)
    assert any(not torch.equal(old[k], new[k]) for k in decoder)
    shipped = "vae/diffusion_pytorch_model.safetensors"
    assert (weights / "turbo" / shipped).read_bytes() == (weights / "base" / shipped).read_bytes()
    assert (weights / "base" / shipped).read_bytes() != (trained / "base" / shipped).read_bytes()


def test_a_unet_only_base_fine_tune_rewrites_the_base_unet_alone(trained, tmp_path):
    """`train base --unet-only`: training goes on from the shipped UNet; the text encoder and VAE that LCM and
    Turbo share with it stay byte for byte, and no other folder changes."""
    import shutil

    from diffusers import UNet2DConditionModel

    weights = tmp_path / "weights"
    shutil.copytree(trained, weights)
    train.main(["base", "--unet-only", "--steps", "2", "--images", "96", "--batch", "4", "--lr", "1e-2",
                "--device", "cpu", "--weights", str(weights), "--work", str(tmp_path / "work")])
    files = sorted(p.relative_to(trained) for p in trained.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(weights) for p in weights.rglob("*") if p.is_file())
    changed = {f for f in files if (weights / f).read_bytes() != (trained / f).read_bytes()}
    assert changed == {train.Path("base/unet/diffusion_pytorch_model.safetensors")}, changed
    before = UNet2DConditionModel.from_pretrained(trained / "base" / "unet")
    after = UNet2DConditionModel.from_pretrained(weights / "base" / "unet")
    assert {k: v for k, v in before.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in after.config.items() if k != "_name_or_path"}
    assert not [f for f in weights.rglob("*.json") if "_name_or_path" in f.read_text()]  # no training paths
    old, new = before.state_dict(), after.state_dict()
    moved = [k for k in old if not torch.equal(old[k], new[k])]
    # continued from the shipped weights (a fresh UNet would differ everywhere by far more than two small steps)
    assert moved and max((old[k].float() - new[k].float()).abs().max().item() for k in moved) < 0.1


def _turbo_on_a_copy(trained, tmp_path, name, *extra):
    """Two steps of `train turbo` on a copy of the trained family (one work folder per test); its new UNet."""
    import shutil

    from safetensors.torch import load_file

    weights = tmp_path / name
    shutil.copytree(trained, weights)
    train.main(["turbo", "--steps", "2", "--images", "96", "--batch", "4", "--teacher-samples", "8",
                "--lr", "1e-2", "--device", "cpu", "--weights", str(weights), "--work", str(tmp_path / "work"),
                *extra])
    return load_file(weights / "turbo" / "unet" / "diffusion_pytorch_model.safetensors")


def test_turbo_s_pixel_term_reaches_the_student(trained, tmp_path):
    """`train turbo --pixel-weight W`: the distillation term in decoded pixels changes what the student learns
    (with it off, two runs from the same seed give the same weights, so the difference is the term's)."""
    plain = _turbo_on_a_copy(trained, tmp_path, "plain", "--pixel-weight", "0")
    again = _turbo_on_a_copy(trained, tmp_path, "again", "--pixel-weight", "0")
    pixels = _turbo_on_a_copy(trained, tmp_path, "pixels", "--pixel-weight", "5", "--edge-weight", "4")
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert any(not torch.equal(plain[k], pixels[k]) for k in plain)


def _perturbed_copy(trained, weights, stage_unet: str):
    """A copy of the trained family whose `stage_unet` weights are moved far from the base's, so a run that
    starts from them and one that starts from the base end up far apart."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(trained, weights)
    file = weights / stage_unet / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    generator = torch.Generator().manual_seed(3)
    moved = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=generator)).to(v.dtype) for k, v in state.items()}
    save_file(moved, file)
    return moved


@pytest.mark.parametrize("stage, unet", [("turbo", "turbo/unet"), ("lcm", "lcm")])
def test_a_second_round_resumes_from_the_stage_s_shipped_weights(trained, tmp_path, stage, unet):
    """`train lcm|turbo --resume`: the student starts from the stage's shipped UNet, not from the base."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("resumed", ["--resume"]), ("fresh", [])):
        weights = tmp_path / name
        shipped = _perturbed_copy(trained, weights, unet)
        train.main([stage, "--steps", "2", "--images", "96", "--batch", "4", "--teacher-samples", "8",
                    "--lr", "1e-5", "--seed", "1", "--device", "cpu", "--weights", str(weights),
                    "--work", str(tmp_path / "work"), *extra])
        runs[name] = load_file(weights / unet / "diffusion_pytorch_model.safetensors")

    def farthest(state):
        return max((state[k].float() - shipped[k].float()).abs().max().item() for k in shipped)

    assert farthest(runs["resumed"]) < 0.01  # two small steps from the shipped weights
    assert farthest(runs["fresh"]) > 0.1  # from the base: the perturbation is gone
    assert any(not torch.equal(runs["resumed"][k], shipped[k]) for k in shipped)  # and it did train


def test_resuming_refuses_what_it_cannot_continue(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train._shipped_unet(tmp_path / "turbo" / "unet", "cpu")
    # the shipped Turbo predicts v: continuing it as an epsilon model would relearn its output from scratch
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        train._shipped_unet(trained / "turbo" / "unet", "cpu", "epsilon", trained / "turbo" / "scheduler")
    with pytest.raises(SystemExit):
        train.main(["vae", "--resume", "--weights", str(tmp_path)])
    with pytest.raises(SystemExit):
        train.main(["turbo", "--one-step-odds", "0", "--weights", str(tmp_path)])


def test_turbo_s_teacher_pairs_are_drawn_once_and_reused_exactly(trained, tmp_path, monkeypatch):
    """The pairs are kept in the work folder: a second run with the same seed reads them instead of sampling the
    teacher again, and trains to the very same weights as the first."""
    first = _turbo_on_a_copy(trained, tmp_path, "first")
    assert len(list((tmp_path / "work").glob("turbo-pairs-*.pt"))) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("the teacher was sampled again")

    monkeypatch.setattr(train, "_draw_teacher_samples", no_sampling)
    second = _turbo_on_a_copy(trained, tmp_path, "second")
    assert all(torch.equal(first[k], second[k]) for k in first)
