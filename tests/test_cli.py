"""`python -m fastgen compare` and `download` end to end against the fake Hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastgen.__main__ import main, parser
from tests.fakehub import SDXL_BASE
from tests.test_engine import assert_same_image, recipe_image

ROOT = Path(__file__).resolve().parent.parent


def test_compare_writes_images_grid_and_results(fake_hub, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastgen", "compare", "a red circle", "--family", "sdxl", "--size", "64x64",
               "--steps", "baseline=3", "--guidance", "lcm=6.5", "--negative", "blue", "--seed", "5",
               "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4/4" in done.stderr and "3/3" in done.stderr  # the progress bar, on stderr
    assert "SDXL Turbo" in done.stdout and "results.json" in done.stdout

    data = json.loads((out / "results.json").read_text())
    assert (data["family"], data["prompt"], data["seed"], data["device"], data["dtype"]) == (
        "sdxl", "a red circle", 5, "cpu", "float32")
    assert [r["method"] for r in data["results"]] == ["turbo", "lcm", "lcm-lora", "baseline"]
    for row in data["results"]:
        assert {"method", "steps", "guidance", "cfg", "scheduler", "timestep_spacing", "width", "height",
                "seconds", "image", "code"} <= set(row)
        assert (row["width"], row["height"], row["image"]) == (64, 64, f"{row['method']}.png")
        expected = recipe_image("sdxl", row["method"], row["steps"], row["guidance"],
                                "blue" if row["cfg"] else None, seed=5)
        assert_same_image(Image.open(out / row["image"]), expected)
    lcm = data["results"][1]
    assert (lcm["guidance"], lcm["cfg"], lcm["scheduler"]) == (6.5, False, "LCMScheduler")
    assert data["results"][3]["steps"] == 3 and data["results"][3]["cfg"] is True

    components = data["cache"]["components"]
    assert all(set(c) >= {"id", "kind", "bytes", "used_by"} for c in components)
    base_unet = [c for c in components if c["kind"] == "unet" and f"{SDXL_BASE}/unet" in c["sources"]]
    assert [c["used_by"] for c in base_unet] == [["lcm-lora", "baseline"]]
    for kind in ("text_encoder", "text_encoder_2", "vae"):
        assert len([c for c in components if c["kind"] == kind]) == 1
    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 64 and grid.height > 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "turbo,hyper"], "`methods` must be chosen from"),
        (["--steps", "lcm=60", "--methods", "lcm"], r"[1, 8]"),
        (["--size", "100x100"], "multiple of 8"),
        (["--seed", "-3"], "`seed` must be an integer in [0, 4294967295]"),
    ],
)
def test_bad_input_exits_with_a_message(fake_hub, tmp_path, capsys, argv, message):
    code = main(["compare", "x", "--family", "sdxl", "--out", str(tmp_path), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_unparseable_options_are_usage_errors(capsys):
    for argv in (["compare", "x", "--size", "big"], ["compare", "x", "--steps", "lcm"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "METHOD=VALUE" in capsys.readouterr().err


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["compare", "x", "--family", "sd15", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "stabilityai/sd-turbo" in err and "python -m fastgen download --family sd15" in err


def test_download_offline_and_local_families(fake_hub, fake_mini, tmp_path, monkeypatch, capsys):
    assert main(["download", "--family", "sd15"]) == 0  # offline, but the fake Hub holds every file
    assert "sd15: every file is already in " in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert main(["download", "--family", "sd15"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.setattr("fastgen.__main__.get_family", lambda name: fake_mini)
    assert main(["download", "--family", "mini"]) == 0
    assert "nothing to download (present)" in capsys.readouterr().out


def test_evaluate_is_registered():
    args = parser().parse_args(["evaluate", "--method", "lcm", "--steps", "2", "--guidance", "3", "--prompts",
                                "12", "--seed", "1"])
    assert (args.family, args.method, args.steps, args.guidance, args.prompts, args.seed) == (
        "mini", "lcm", 2, 3.0, 12, 1)
    with pytest.raises(SystemExit):  # --prompts counts prompts per split
        parser().parse_args(["evaluate", "--prompts", "p.txt"])


def test_the_new_rows_side_by_side_share_the_base_unet_and_encoders(fake_hub, tmp_path):
    """Turbo vs SDXL-Lightning vs Hyper-SDXL vs DMD2 vs the baseline: five panels, each its model card's image;
    the base UNet serves the baseline and Hyper-SD's adapter, and the text encoders and VAE load once."""
    from fastgen.__main__ import main

    out = tmp_path / "out"  # in this process: test_compare_writes_images_grid_and_results runs the entry point
    assert main(["compare", "a red circle", "--family", "sdxl", "--methods", "turbo,lightning,hyper-sd,dmd2,lcm-lora,"
                 "baseline", "--size", "64x64", "--steps", "baseline=3", "--seed", "7", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["results"]] == ["turbo", "lightning", "hyper-sd", "dmd2", "lcm-lora",
                                                      "baseline"]
    from tests.test_engine import card_image

    for method in ("lightning", "hyper-sd", "dmd2"):
        assert_same_image(Image.open(out / f"{method}.png"), card_image(method, 4))
    rows = data["cache"]["components"]
    unets = [r for r in rows if r["kind"] == "unet"]
    base = next(r for r in unets if "baseline" in r["used_by"])
    assert {"baseline", "lcm-lora", "hyper-sd"} <= set(base["used_by"])
    assert len(unets) == 4  # base, turbo, lightning's 4-step, dmd2's 4-step
    for kind in ("text_encoder", "text_encoder_2", "vae"):
        assert len([r for r in rows if r["kind"] == kind]) == 1


def test_refine_writes_images_grid_and_results_equal_to_the_plain_recipes(fake_hub, tmp_path, capsys):
    from tests.test_refine import centre_mask, recipe_refine, source_image

    source_image().convert("RGBA").save(tmp_path / "draft.png")  # with alpha, as editors save: flattened on white
    centre_mask().convert("RGB").save(tmp_path / "mask.png")  # a mask saved as RGB: read as one channel
    out = tmp_path / "out"
    code = main(["refine", str(tmp_path / "draft.png"), "a blue square", "--family", "sdxl", "--mask",
                 str(tmp_path / "mask.png"), "--methods", "turbo,lcm-lora,baseline", "--steps", "baseline=10",
                 "--strength", "0.6", "--seed", "7", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "outside the mask moved" in printed and "1 of 2 steps" in printed
    data = json.loads((out / "results.json").read_text())
    assert (data["mode"], data["strength"], data["prompt"]) == ("inpaint", 0.6, "a blue square")
    assert {"grid.png", "source.png", "mask.png", "turbo.png", "lcm-lora.png", "baseline.png"} <= {
        p.name for p in out.iterdir()}
    for row in data["results"]:
        expected, ran = recipe_refine("sdxl", row["method"], "inpaint", source_image(), centre_mask(),
                                      num_inference_steps=row["steps"], strength=0.6, guidance_scale=row["guidance"])
        assert row["denoising_steps"] == ran
        assert_same_image(Image.open(out / row["image"]), expected)


def test_refine_refuses_a_bad_image_with_a_message(tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["refine", str(tmp_path / "notes.png"), "a red circle", "--family", "mini"]) == 2
    assert "is not a readable image" in capsys.readouterr().err
    assert main(["refine", str(tmp_path / "notes.png"), "a red circle", "--family", "mini", "--strength", "2"]) == 2
    assert "`strength` must be a number in (0, 1]" in capsys.readouterr().err
