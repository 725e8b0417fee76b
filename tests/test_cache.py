"""The component cache on its own: content keys, locks, LRU eviction, the report."""

import json
import threading

import pytest
import torch

from fastgen import hub
from fastgen.cache import ComponentCache, parse_bytes


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return folder


def key_of(folder, subfolder=None, variant=None):
    source = hub.Source(str(folder), subfolder, variant)
    return ComponentCache.key(source, folder, hub.select_files(hub.list_files(folder), source), torch.float32)


def test_identical_content_in_different_repos_has_one_key(tmp_path):
    weights = {"config.json": {"hidden": 4, "_name_or_path": "a"}, "model.safetensors": b"\x01" * 64}
    a = write(tmp_path / "a" / "text_encoder", weights)
    b = write(tmp_path / "b" / "text_encoder", {**weights, "config.json": {"hidden": 4, "_name_or_path": "b",
                                                                           "transformers_version": "9"}})
    c = write(tmp_path / "c" / "text_encoder", {**weights, "model.safetensors": b"\x02" * 64})
    d = write(tmp_path / "d" / "text_encoder", {**weights, "config.json": {"hidden": 8}})
    assert key_of(a.parent, "text_encoder") == key_of(b.parent, "text_encoder")  # provenance keys don't count
    assert key_of(a.parent, "text_encoder") != key_of(c.parent, "text_encoder")  # other weights
    assert key_of(a.parent, "text_encoder") != key_of(d.parent, "text_encoder")  # other config
    source = hub.Source("x", "text_encoder")
    files = hub.select_files(hub.list_files(a.parent), source)
    assert ComponentCache.key(source, a.parent, files, torch.float32) != \
        ComponentCache.key(source, a.parent, files, torch.float16)


def test_hub_blobs_are_keyed_by_their_sha256_without_reading_them(fake_hub):
    turbo = hub.local_folder("stabilityai/sdxl-turbo")
    base = hub.local_folder("stabilityai/stable-diffusion-xl-base-1.0")
    for kind in ("text_encoder", "vae", "tokenizer_2"):
        assert key_of(turbo, kind, "fp16") == key_of(base, kind, "fp16")
    assert key_of(turbo, "unet", "fp16") != key_of(base, "unet", "fp16")
    assert key_of(base, "unet", "fp16") != key_of(base, "unet", None)  # fp16 files are other weights here
    blob = (base / "unet" / "diffusion_pytorch_model.fp16.safetensors").resolve()
    assert hub.file_digest(base / "unet" / "diffusion_pytorch_model.fp16.safetensors") == blob.name


def test_file_selection_follows_the_variant_rules():
    files = ["model_index.json", "sd_xl_base_1.0.safetensors", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "config.json", "diffusion_pytorch_model.fp16.safetensors", "README.md", "lora.safetensors"]
    select = hub.select_files
    assert select(files, hub.Source("r", "unet", "fp16")) == [
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert select(files, hub.Source("r", "unet", None)) == [
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert select(files, hub.Source("r", "vae", "fp16")) == [  # no fp16 file: the plain one, as diffusers does
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert select(files, hub.Source("r", None, "fp16")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert select(files, hub.Source("r", None, None, "lora.safetensors")) == ["lora.safetensors"]
    assert hub.weight_variant("text_encoder/model.fp16-00001-of-00002.safetensors") == "fp16"


def test_parse_bytes():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes(10) == 10
    assert parse_bytes(None) is None
    for bad in ("lots", "8 parsecs", 0, -5):
        with pytest.raises(ValueError, match="`memory_budget` must be"):
            parse_bytes(bad)


def linear(n):
    return torch.nn.Linear(n, n, bias=False)  # n*n*4 bytes


def test_lru_eviction_and_reload():
    cache = ComponentCache(budget=3 * 400)
    loads = []

    def get(name, user="f/m", pinned=()):
        return cache.get(name, "unet", name, lambda: loads.append(name) or linear(10), user, pinned)

    get("a"), get("b"), get("c")
    assert cache.total_bytes == 1200 and loads == ["a", "b", "c"]
    get("a")  # touch a: b is now the least recently used
    get("d")
    assert "b" not in cache and {"a", "c", "d"} <= {r["sources"][0] for r in cache.report()}
    get("b")
    assert loads == ["a", "b", "c", "d", "b"] and "c" not in cache and cache.total_bytes <= 1200


def test_held_and_pinned_components_are_never_evicted(caplog):
    cache = ComponentCache(budget=2 * 400)
    for name in ("a", "b"):
        cache.get(name, "vae", name, lambda: linear(10), "f/m")
    with cache.hold(["a", "b"]):
        cache.get("c", "vae", "c", lambda: linear(10), "f/m")
        assert "a" in cache and "b" in cache and "going over it" in caplog.text
    cache.get("d", "vae", "d", lambda: linear(10), "f/m", pinned={"d", "c"})
    assert "c" in cache and "d" in cache and cache.total_bytes <= 800


def test_hold_blocks_a_second_run_until_released():
    cache = ComponentCache()
    cache.get("a", "unet", "a", lambda: linear(2), "f/m")
    entered = threading.Event()

    def second_run():
        with cache.hold(["a"]):
            entered.set()

    with cache.hold(["a"]):
        worker = threading.Thread(target=second_run)
        worker.start()
        worker.join(0.2)
        assert not entered.is_set()
    worker.join(2)
    assert entered.is_set()


def test_report_lists_users_in_run_order():
    cache = ComponentCache()
    cache.get("t", "text_encoder", "repo/text_encoder", lambda: linear(4), "sdxl/baseline")
    cache.get("t", "text_encoder", "other/text_encoder", lambda: linear(4), "sdxl/turbo")
    cache.get("u", "unet", "repo/unet", lambda: linear(4), "sdxl/turbo")
    rows = cache.report(["sdxl/turbo", "sdxl/baseline"])
    assert rows[0] == {"id": "t", "kind": "text_encoder", "bytes": 64, "used_by": ["turbo", "baseline"],
                       "sources": ["other/text_encoder", "repo/text_encoder"]}
    assert cache.report(["sdxl/baseline"]) == [{**rows[0], "used_by": ["baseline"]}]
    assert {r["id"] for r in cache.report()} == {"t", "u"}
    assert cache.loads == 2
