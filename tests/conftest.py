"""Shared fixtures. Every test runs offline against a fake Hub cache (see tests/fakehub.py):

    def test_something(fake_hub):      # the cache path; HF_HUB_CACHE points at it, HF_HUB_OFFLINE=1
        Engine().run("sdxl", "turbo", "a red circle", width=64, height=64)

    def test_download(online, server): # online against the fake Hub served over HTTP, into an empty cache

The environment is set when this file is imported, before any test imports huggingface_hub or diffusers
(both read it once at import), so no test can reach the Hub or the user's own cache.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

_HUB = Path(tempfile.mkdtemp(prefix="fastgen-fakehub-"))
os.environ["HF_HUB_CACHE"] = str(_HUB)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["FASTGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastgen-cache-")  # converted checkpoints, never ~/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _point_libraries_at(cache: Path) -> None:
    """In case a plugin imported them before this file: their constants were read at import."""
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as constants

        constants.HF_HUB_CACHE = str(cache)
        constants.HF_HUB_OFFLINE = True
    if "diffusers" in sys.modules:
        import diffusers.utils.constants

        diffusers.utils.constants.HF_HUB_OFFLINE = True


@pytest.fixture(scope="session")
def fake_hub() -> Path:
    """The fake Hub cache with the sdxl and sd15 repos, built once per session (about 10 s)."""
    from tests.fakehub import build_fake_hub

    if not (_HUB / ".built").exists():
        build_fake_hub(_HUB)
        (_HUB / ".built").touch()
    _point_libraries_at(_HUB)
    return _HUB


@pytest.fixture
def server(fake_hub):
    """The fake Hub's repos served over HTTP (tests/fakehub.py `HubServer`); switch failures on through it."""
    from tests.fakehub import HubServer

    with HubServer(fake_hub) as running:
        yield running


@pytest.fixture
def online(server, tmp_path, monkeypatch):
    """This process online against `server`, with an empty Hub cache (returned) to download into."""
    import huggingface_hub.constants

    from fastgen import fetch

    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(fetch, "endpoint", lambda: server.endpoint)
    return cache


@pytest.fixture(scope="session")
def fake_mini(tmp_path_factory):
    """The mini family's layout with random weights, as a registry Family pointing at it."""
    from tests.fakehub import build_mini, mini_family

    return mini_family(build_mini(tmp_path_factory.mktemp("mini-weights")))


@pytest.fixture(scope="session")
def engine(fake_hub):
    """One CPU float32 engine shared by the tests that only read from it (its cache stays warm)."""
    from fastgen.engine import Engine

    return Engine(device="cpu")


@pytest.fixture(autouse=True)
def _no_custom_models_allowed(monkeypatch):
    """Every test starts on a server whose host allows no custom model or LoRA (tests that need it say so)."""
    monkeypatch.delenv("FASTGEN_ALLOW_CUSTOM", raising=False)
    monkeypatch.delenv("FASTGEN_CUSTOM_ALLOW", raising=False)


@pytest.fixture(scope="session")
def style(tmp_path_factory):
    """A local folder holding one UNet-only LoRA for SD 1.5 in the peft key format, and one in kohya's."""
    from tests.fakehub import _unet, write_lora, write_peft_lora

    folder = tmp_path_factory.mktemp("style-lora")
    write_peft_lora(folder / "style.safetensors", _unet("sd", 0, 32), seed=91, rank=4)
    write_lora(folder / "kohya.safetensors", _unet("sd", 0, 32), seed=92)
    return folder


@pytest.fixture(scope="session")
def finetune(fake_hub, tmp_path_factory):
    """A "fine-tune": the sd15 base repo with other UNet weights, published on the fake Hub under another id."""
    import shutil

    from tests.fakehub import SD15_BASE, _unet, publish

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
