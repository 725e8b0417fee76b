"""The shipped mini family: standard formats, shared components, and the quality claims it exists to show.

The quality tests generate images with the shipped weights through the engine and score them with the
analyzer in the test itself (CPU, float32, fixed seeds), so a retrained model that loses a claim fails here.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgen.engine import Engine
from fastgen.mini.evaluate import evaluation_scenes, score_images
from fastgen.registry import MINI_WEIGHTS, get_family

pytestmark = pytest.mark.skipif(not (MINI_WEIGHTS / "base" / "model_index.json").exists(),
                                reason="the mini family's weights are not in this checkout")

PROMPTS = 20  # per split: 20 seen + 20 held-out combinations


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture(scope="module")
def scores(engine):
    """Accuracy and distance per (method, steps), on the fixed prompt set, computed once for this module."""
    cache = {}

    def score(method, steps):
        if (method, steps) not in cache:
            result = {}
            for split, scenes in evaluation_scenes(PROMPTS).items():
                images = batch(engine, method, steps, [s.prompt for s in scenes])
                result[split] = score_images(images, scenes)
            cache[method, steps] = result
        return cache[method, steps]

    return score


def batch(engine, method: str, steps: int, prompts: list[str]) -> list[np.ndarray]:
    """The engine's images for prompts[i] at seed i, drawn in one batched call of the engine's own pipeline (its
    modules, scheduler and adapters; several times faster than one call each on a CPU). Checked against
    engine.run on the first prompt, so the scores stay the engine's."""
    from fastgen.engine import call_kwargs

    family = get_family("mini")
    spec = family.method(method).at_steps(steps)
    pipe, keys, loras, scales = engine._pipeline(family, spec)
    with engine.cache.hold(keys), engine.adapters.active(loras, scales):
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=spec.guidance, width=spec.native_size,
                      height=spec.native_size, generator=[torch.Generator("cpu").manual_seed(i)
                                                          for i in range(len(prompts))],
                      **call_kwargs(spec)).images
    alone = np.asarray(engine.run("mini", method, prompts[0], seed=0, steps=steps).image, dtype=int)
    assert np.abs(np.asarray(images[0], dtype=int) - alone).max() <= 2, "the batched call left the engine's recipe"
    return [np.asarray(image) for image in images]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_are_standard_diffusers_folders_that_load_with_from_pretrained():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base = StableDiffusionPipeline.from_pretrained(MINI_WEIGHTS / "base", dtype=torch.float32)
    assert base.unet.config.sample_size == 16 and base.vae.config.latent_channels == 4
    lcm_unet = UNet2DConditionModel.from_pretrained(MINI_WEIGHTS / "lcm", dtype=torch.float32)
    assert lcm_unet.config.time_cond_proj_dim is not None, "LCM takes guidance as an embedding"
    turbo = StableDiffusionPipeline.from_pretrained(MINI_WEIGHTS / "turbo", dtype=torch.float32)
    assert type(turbo.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert turbo.scheduler.config.timestep_spacing == "trailing"

    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    text = base.text_encoder(base.tokenizer(["a large red circle on a blue background"], padding="max_length",
                                            return_tensors="pt").input_ids).last_hidden_state
    with torch.no_grad():
        before = base.unet(x, t, text).sample
        base.load_lora_weights(MINI_WEIGHTS / "lcm-lora", weight_name="pytorch_lora_weights.safetensors",
                               adapter_name="lcm")
        after = base.unet(x, t, text).sample
    assert (before - after).abs().max() > 1e-3, "the LCM-LoRA adapter must change the base UNet"


def test_shipped_weights_fit_in_20_mb():
    total = sum(f.stat().st_size for f in MINI_WEIGHTS.rglob("*") if f.is_file())
    assert total <= 20 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


def test_turbo_shares_the_base_text_encoder_and_vae_byte_for_byte_and_the_cache_loads_them_once(engine):
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _sha(MINI_WEIGHTS / "turbo" / part) == _sha(MINI_WEIGHTS / "base" / part)
    report = engine.compare("mini", "a small green square on a white background", steps={"baseline": 2}).cache
    for kind in ("vae", "text_encoder"):
        rows = [row for row in report if row["kind"] == kind]
        assert len(rows) == 1 and set(rows[0]["used_by"]) == {"turbo", "lcm", "lcm-lora", "baseline"}, rows
    unets = {frozenset(row["used_by"]) for row in report if row["kind"] == "unet"}
    assert unets == {frozenset({"baseline", "lcm-lora"}), frozenset({"lcm"}), frozenset({"turbo"})}


def test_registry_recipes_match_the_shipped_scheduler_configs():
    family = get_family("mini")
    assert [m.name for m in family.methods] == ["turbo", "lcm", "lcm-lora", "baseline"]
    assert family.method("turbo").max_steps == 4 and family.method("turbo").guidance == 0.0
    assert family.method("lcm").guidance_mode == "embedding"


@pytest.mark.slow
def test_base_at_50_steps_meets_its_accuracy_target(scores):
    result = scores("baseline", 50)
    seen, _ = result["seen"]
    held, _ = result["held-out"]
    assert seen["all"] >= 0.95, seen
    assert held["all"] >= 0.85, held
    # Crisp, in the strict reading: 0.90 / 0.80 on these 20 prompts at its default guidance of 2; at the old 4,
    # which bent the outlines, 0.70 / 0.60 (docs/mini.md, part 3).
    assert seen["strict"] >= 0.8 and held["strict"] >= 0.75, (seen, held)


@pytest.mark.slow
@pytest.mark.parametrize("fast, slow, lead", [
    # At 2 steps: with its default guidance of 2, the base at 4 Euler steps already reads right on ~0.9 of this
    # world's prompts (docs/mini.md), so 4 steps no longer separates the distilled models from it; 2 does. At 2
    # steps the base's shapes are there about half the time but blurred: LCM-LoRA's lead is in the distance (4x
    # closer on 34 prompts) more than in all-correct accuracy (+0.21 / +0.38 on 34 prompts, +0.05 on these 20).
    (("lcm", 2), ("baseline", 2), 0.15),
    (("lcm-lora", 2), ("baseline", 2), 0.0),
    (("turbo", 1), ("baseline", 1), 0.15),
])
def test_distilled_methods_beat_the_base_at_the_same_few_steps(scores, fast, slow, lead):
    for split in ("seen", "held-out"):
        fast_acc, fast_dist = scores(*fast)[split]
        slow_acc, slow_dist = scores(*slow)[split]
        assert fast_acc["all"] >= slow_acc["all"] + lead, (split, fast, fast_acc, slow, slow_acc)
        assert fast_dist < slow_dist / 2, (split, fast_dist, slow_dist)


@pytest.mark.slow
@pytest.mark.parametrize("method, steps, floors", [
    # Strict reading, seen / held-out, on these 20 + 20 prompts (the baseline at 50: 0.95 / 0.90). Measured:
    # LCM 0.75 / 0.95, LCM-LoRA 0.80 / 0.85 (the rank-16 adapter before it: 0.70 / 0.80), Turbo 0.60 / 0.75
    # (before part 3's fifth round: 0.50 / 0.80; before its fourth: 0.40 / 0.70; before its third: 0.25 / 0.45).
    # docs/mini.md has the 68-prompt targets.
    ("lcm", 4, (0.70, 0.70)),
    ("lcm-lora", 4, (0.75, 0.75)),
    ("turbo", 1, (0.55, 0.70)),
])
def test_distilled_methods_draw_crisp_outlines(scores, method, steps, floors):
    for split, floor in zip(("seen", "held-out"), floors):
        accuracy, _ = scores(method, steps)[split]
        assert accuracy["strict"] >= floor, (method, split, accuracy)


def test_cli_compare_offline_draws_the_asked_scene(tmp_path, monkeypatch):
    """`python -m fastgen compare ... --family mini --methods baseline` with an empty Hub cache and offline."""
    from PIL import Image

    from fastgen.__main__ import main
    from fastgen.mini.analyzer import analyze
    from fastgen.mini.world import Scene

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompt = "a large red circle on a blue background"
    assert main(["compare", prompt, "--family", "mini", "--methods", "baseline", "--out", str(tmp_path)]) == 0
    reading = analyze(np.asarray(Image.open(tmp_path / "baseline.png").convert("RGB")))
    assert all(reading.matches(Scene.from_prompt(prompt)).values()), reading


def test_cli_evaluate_prints_both_splits(capsys):
    from fastgen.__main__ import main

    assert main(["evaluate", "--family", "mini", "--method", "lcm", "--steps", "4", "--prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert "lcm at 4 steps, guidance 4" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("seen", "held-out"))}
    assert set(rows) == {"seen", "held-out"} and all(row[1] == "2" for row in rows.values())
    assert main(["evaluate", "--family", "sdxl", "--method", "lcm"]) == 2  # only the mini world has an analyzer


@pytest.mark.slow
def test_a_refined_fast_draft_matches_the_baseline_in_less_time(engine, scores):
    """The workflow's claim on the shipped weights: an LCM draft at 2 steps refined by LCM at strength 0.5 reads
    as accurately as the baseline at 50 steps (within 0.05, all attributes, on the same prompts and seeds) in
    less time, draft and refine together (the full table: docs/mini.md)."""
    from fastgen.mini.evaluate import evaluate_refine

    baseline = scores("baseline", 50)
    refined = {s.split: s for s in evaluate_refine(engine, "lcm", 2, "lcm", 0.5, prompts=PROMPTS)}
    baseline_seconds = min(engine.run("mini", "baseline", s.prompt, seed=i).seconds
                           for i, s in enumerate(evaluation_scenes(2)["seen"]))
    for split in ("seen", "held-out"):
        accuracy, _ = baseline[split]
        assert refined[split].accuracy["all"] >= accuracy["all"] - 0.05, split
        assert refined[split].seconds_per_image < baseline_seconds, split


@pytest.mark.parametrize("colour", ["green", "red"])
def test_a_sketched_blob_becomes_a_shape_in_the_strokes_colour(engine, colour):
    """Live sketch mode on the shipped weights: a rough blob of colour on the white canvas, refined by Turbo,
    is read back in that colour."""
    import app
    from PIL import Image, ImageDraw

    from fastgen.mini.analyzer import analyze
    from fastgen.mini.world import PALETTE
    from tests.test_app import data_url

    canvas = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).polygon([(70, 90), (150, 60), (200, 120), (170, 200), (90, 180)], fill=PALETTE[colour])
    runs = app.Runs(engine)
    out = runs.live("mini", f"a large {colour} circle on a white background", 0, False, ["turbo"], True,
                    data_url(canvas), 0.7)
    assert "2 steps" not in out["live.turbo.caption"] and "ms** per frame" in out["live.turbo.caption"]
    assert "from the sketch at strength 0.7" in out["live.turbo.caption"]
    assert analyze(np.asarray(out["live.turbo.image"])).color == colour


def test_previews_show_the_latents_while_denoising_and_cost_the_run_no_time(engine):
    """on_preview: a picture of the latents at every step but the last (the mini family's 16 x 16 latents), at
    the image's size, nearing the final image as the steps go; a slow preview never counts in the time."""
    import time

    prompt = "a large red circle on a blue background"
    shown = []

    def slow(method, step, total, image):
        shown.append((step, total, np.asarray(image.convert("RGB"), dtype=float)))
        time.sleep(0.05)

    start = time.perf_counter()
    result = engine.run("mini", "baseline", prompt, seed=1, on_preview=slow)
    wall = time.perf_counter() - start
    assert [(s, t) for s, t, _ in shown] == [(s, 50) for s in range(1, 50)]
    assert wall - result.seconds >= 49 * 0.05 * 0.9  # the previews' time is not the method's
    final = np.asarray(result.image, dtype=float)
    error = [np.abs(image - final).mean() / 255 for _, _, image in shown]
    assert shown[-1][2].shape == final.shape and error[-1] < 0.2 and error[-1] < error[0] - 0.2, error[::8]
    plain = engine.run("mini", "baseline", prompt, seed=1)
    assert np.array_equal(np.asarray(plain.image), np.asarray(result.image))  # previews change no pixel
