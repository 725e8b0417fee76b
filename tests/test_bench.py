"""python -m fastgen bench: its report's fields and arithmetic, on the embedded mini family (seconds), and the
sharing of all four synthetic SDXL methods counted on the meta device."""

import json

import pytest

from fastgen import bench
from fastgen.__main__ import main

RESULT_FIELDS = {"method", "steps", "load_seconds", "seconds", "timings", "steps_per_second", "speedup",
                 "peak_memory_bytes"}


def test_bench_measures_each_method_the_cache_and_the_engine_overhead():
    ticks = []
    report = bench.run("mini", ["turbo", "lcm-lora", "baseline"], steps={"baseline": 2}, repeats=2, size=(64, 64),
                       progress=lambda total: lambda: ticks.append(total))
    assert {"machine", "family", "device", "dtype", "results", "cache", "overhead_ratio"} <= set(report)
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"] and report["machine"]["cpu"]
    assert (report["family"], report["device"], report["dtype"]) == ("mini", "cpu", "float32")
    assert len(ticks) == ticks[0] == 3 * (2 + 2) + 2 * 2  # a load, a warm-up and two runs each; two overhead pairs
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["turbo", "lcm-lora", "baseline"]
    for r in results.values():
        assert RESULT_FIELDS <= set(r) and set(r["timings"]) == {"text_encoding", "denoising", "decoding"}
        assert r["seconds"]["min"] <= r["seconds"]["median"] <= r["seconds"]["max"] and len(r["runs"]) == 2
        assert r["peak_memory_bytes"] > 0 and r["steps_per_second"] > 0
    assert [results[m]["steps"] for m in results] == [1, 4, 2]
    assert results["baseline"]["speedup"] == 1.0
    assert results["turbo"]["speedup"] == round(results["baseline"]["seconds"]["median"]
                                                / results["turbo"]["seconds"]["median"], 3)
    assert results["baseline"]["load_seconds"] < results["lcm-lora"]["load_seconds"]  # its modules were cached
    cache = report["cache"]
    unets = [c for c in cache["components"] if c["kind"] == "unet"]
    assert sorted(map(tuple, (c["used_by"] for c in unets))) == [("lcm-lora", "baseline"), ("turbo",)]
    shared = next(c for c in unets if len(c["used_by"]) == 2)
    assert cache["separate_bytes"] - cache["resident_bytes"] >= shared["bytes"]  # the shared UNet counted twice
    assert cache["ratio"] == round(cache["resident_bytes"] / cache["separate_bytes"], 4) < 1
    assert report["overhead"]["method"] == "turbo" and report["overhead_ratio"] > 0


def test_sharing_counts_each_component_once_resident_and_once_per_user_separately():
    report = [{"kind": "unet", "bytes": 100, "used_by": ["lcm-lora", "baseline"]},
              {"kind": "lora", "bytes": 10, "used_by": ["lcm-lora"]},
              {"kind": "unet", "bytes": 100, "used_by": ["turbo"]},
              {"kind": "vae", "bytes": 5, "used_by": ["turbo", "lcm-lora", "baseline"]}]
    numbers = bench.sharing(report, ["turbo", "lcm-lora", "baseline"])
    assert (numbers["resident_bytes"], numbers["separate_bytes"], numbers["ratio"]) == (215, 325, round(215 / 325, 4))


def test_finite_check_names_the_first_module_that_returns_nan():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 2)))
    with torch.no_grad():
        model[1][1].weight.fill_(float("nan"))
    seen = []
    hooks = bench._finite_hooks({"unet": model}, seen)
    model(torch.ones(1, 2))
    for hook in hooks:
        hook.remove()
    assert seen == ["unet.1.1"]


def test_cli_prints_markdown_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--family", "mini", "--methods", "turbo", "--repeats", "1", "--size", "64x64",
                 "--check-finite", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| Turbo | 1 |" in out and "engine overhead:" in out and "cache:" in out
    report = json.loads(path.read_text())
    assert report["results"][0]["finite"] == {"ok": True, "first_nonfinite": None, "vae_force_upcast": True}
    assert report["cache"]["ratio"] == 1.0  # one method shares with no one


def test_cli_refuses_bad_arguments_before_loading_anything(capsys):
    assert main(["bench", "--family", "mini", "--repeats", "0"]) == 2
    assert "`repeats` must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--family", "mini", "--meta"]) == 2  # real weights are never loaded on the meta device


@pytest.mark.slow
def test_all_four_synthetic_sdxl_methods_with_sharing_hold_under_065_of_separate_pipelines():
    """The issue's target for the real sharing structure, counted on the meta device (no memory, ~20 s)."""
    report = bench.meta_run("synthetic-sdxl", dtype="float16")
    cache = report["cache"]
    unets = [c for c in cache["components"] if c["kind"] == "unet"]
    assert len(unets) == 3 and {"lcm-lora", "baseline"} in [set(c["used_by"]) for c in unets]
    encoders = [c for c in cache["components"] if c["kind"] in ("text_encoder", "text_encoder_2", "vae")]
    assert all(c["used_by"] == ["turbo", "lcm", "lcm-lora", "baseline"] for c in encoders)
    lora = next(c for c in cache["components"] if c["kind"] == "lora")
    assert lora["bytes"] == 196_751_360 * 2 and lora["used_by"] == ["lcm-lora"]
    assert cache["ratio"] <= 0.65
