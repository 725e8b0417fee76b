"""`python -m fastgen doctor` and the page's family list on machines with all, some and no weights, offline,
with an unreachable Hub and online against the fake Hub server."""

import shutil

import pytest

from fastgen import doctor, fetch
from fastgen.__main__ import main
from fastgen.registry import family_available, get_family
from tests.fakehub import SD_TURBO, SDXL_BASE, SDXL_TURBO


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def some_weights(fake_hub, tmp_path, monkeypatch):
    """A cache holding only sdxl-turbo (copied with its blob symlinks)."""
    name = f"models--{SDXL_TURBO.replace('/', '--')}"
    shutil.copytree(fake_hub / name, tmp_path / name, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def unreachable(monkeypatch):
    """HF_HUB_OFFLINE unset, but nothing answers at the endpoint."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(fetch, "endpoint", lambda: "http://127.0.0.1:9")


def family_block(out: str, family: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{family} ("))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    return block


def test_doctor_with_all_weights(fake_hub, capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("Python", "torch", "CUDA", "MPS", "diffusers 0.42.1", "transformers ", "gradio "):
        assert name in out
    assert f"Hub cache  {fake_hub} (" in out and " free)" in out
    assert "HF_HUB_OFFLINE is set" in out
    for family in ("sdxl", "sd15", "mini"):
        block = family_block(out, family)
        assert block[0].endswith(": ready"), block
        assert len(block) == 1 + len(get_family(family).methods), block
        assert all(" present, " in line and " on disk" in line for line in block[1:]), block


def test_doctor_with_some_weights(some_weights, capsys):
    assert main(["doctor", "--family", "sdxl"]) == 0
    block = family_block(capsys.readouterr().out, "sdxl")
    assert "missing weights, cannot be fetched now (HF_HUB_OFFLINE is set" in block[0]
    assert block[1].startswith("turbo  present, ") and block[1].endswith(" MB on disk")
    assert block[2] == "lcm  missing stabilityai/stable-diffusion-xl-base-1.0, latent-consistency/lcm-sdxl"
    assert block[-1] == f"baseline  missing {SDXL_BASE}"


def test_doctor_with_no_weights(empty_cache, capsys):
    assert main(["doctor", "--family", "sdxl,sd15"]) == 0
    out = capsys.readouterr().out
    assert f"Hub cache  {empty_cache} (" in out
    for family in ("sdxl", "sd15"):
        block = family_block(out, family)
        assert "missing weights, cannot be fetched now" in block[0]
        assert all(" missing " in line for line in block[1:])
    assert f"turbo  missing {SD_TURBO}" in family_block(out, "sd15")


def test_doctor_with_an_unreachable_hub_names_it(empty_cache, unreachable, capsys):
    assert main(["doctor", "--family", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert "Hub  not usable now: the Hub at http://127.0.0.1:9 cannot be reached" in out
    assert "cannot be fetched now (the Hub at http://127.0.0.1:9 cannot be reached" in family_block(out, "sdxl")[0]


def test_doctor_online_says_what_a_download_would_fetch(online, server, capsys):
    assert main(["doctor", "--family", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert f"Hub  online: {server.endpoint} answers" in out
    block = family_block(out, "sdxl")
    assert block[0].endswith("can be fetched now: python -m fastgen download --family sdxl")
    assert block[1].startswith(f"turbo  missing {SDXL_TURBO}; download ") and block[1].endswith(" MB")


def test_page_offers_every_family_whose_weights_are_here(fake_hub):
    choices, note = doctor.page_families("sdxl")
    assert [name for _, name in choices] == ["sdxl", "sd15", "mini"] and note == ""


def test_page_lists_missing_families_as_unavailable_when_offline(empty_cache):
    choices, note = doctor.page_families("mini")
    assert [name for _, name in choices] == ["mini"]
    assert "Stable Diffusion XL is unavailable: its weights are not on this machine and HF_HUB_OFFLINE is set" in note
    assert "Stable Diffusion 1.5 is unavailable" in note and "python -m fastgen download --family sd15" in note
    assert not family_available("sdxl")


def test_page_lists_missing_families_as_unavailable_when_the_hub_does_not_answer(some_weights, unreachable):
    choices, note = doctor.page_families("mini")
    assert [name for _, name in choices] == ["mini"]
    assert "Stable Diffusion XL is unavailable" in note and "http://127.0.0.1:9 cannot be reached" in note
    assert not family_available("sdxl")


def test_page_offers_missing_families_that_can_be_fetched_now(online):
    choices, note = doctor.page_families("mini")
    assert [name for _, name in choices] == ["sdxl", "sd15", "mini"] and note == ""
    assert family_available("sdxl")


def test_a_family_the_page_opens_on_stays_listed(empty_cache):
    choices, _ = doctor.page_families("sd15")
    assert [name for _, name in choices] == ["sd15", "mini"]


def test_environment_names_each_gpu_and_its_memory(monkeypatch):
    """No GPU here: the CUDA calls are replaced by what a one-GPU machine answers."""
    from types import SimpleNamespace

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="NVIDIA H200"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (100_000_000_000, 150_000_000_000))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    rows = dict(doctor.environment())
    assert rows["CUDA 0"] == "NVIDIA H200, 150.00 GB memory (100.00 GB free), CUDA 12.8"
    assert rows["torch"] == torch.__version__ and "diffusers 0.42.1" in rows["libraries"]
