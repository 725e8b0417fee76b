"""The demo served for real on a free local port, called through gradio_client, with the real engine.

The `mini` family points at random tiny weights (the `fake_mini` fixture); `sdxl` loads from the fake Hub
cache (`fake_hub`: HF_HUB_CACHE, HF_HUB_OFFLINE=1) through the same from_pretrained calls users hit.
"""

from __future__ import annotations

import socket
import time

import pytest
from gradio_client import Client
from gradio_client.utils import Status
from PIL import Image

import app
from fastgen import registry
from fastgen.engine import Engine
from tests.test_app import FakeEngine

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(fake_hub, fake_mini):
    """The app on 127.0.0.1:<free port>, opened on a fake mini family, with the fake Hub cache."""
    mp = pytest.MonkeyPatch()
    mp.setitem(registry.FAMILIES, "mini", fake_mini)
    demo = app.create_demo(Engine(), family="mini")
    _, url, _ = app.launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, demo
    demo.close()
    mp.undo()


def test_compare_returns_four_images(served):
    url, _ = served
    images, results = Client(url, verbose=False).predict(prompt="a red circle", seed=0, api_name="/compare")
    assert len(images) == 4
    assert [r["method"] for r in results["results"]] == ["turbo", "lcm", "lcm-lora", "baseline"]
    for item, result in zip(images, results["results"]):
        assert Image.open(item["image"]).size == (64, 64) == (result["width"], result["height"])
        assert result["label"] in item["caption"]
    assert results["family"] == "mini" and results["seed"] == 0 and results["device"] == "cpu"


def test_compare_keywords_reach_the_engine(served):
    url, _ = served
    asked_steps, asked_guidance = {"lcm": 2, "baseline": 3}, {"lcm-lora": 1.5, "baseline": 2.0}
    images, results = Client(url, verbose=False).predict(
        prompt="a red circle", seed=7, negative_prompt="blurry", methods=["turbo", "lcm", "lcm-lora", "baseline"],
        width=64, height=64, family="sdxl", steps=asked_steps, guidance=asked_guidance, api_name="/compare")
    assert len(images) == 4
    by_method = {r["method"]: r for r in results["results"]}
    sdxl = registry.get_family("sdxl")
    for method, result in by_method.items():
        assert result["steps"] == asked_steps.get(method, sdxl.method(method).steps)
        assert result["guidance"] == asked_guidance.get(method, sdxl.method(method).guidance)
        assert (result["width"], result["height"]) == (64, 64)
    assert by_method["baseline"]["cfg"] is True and by_method["lcm-lora"]["cfg"] is True
    assert by_method["lcm"]["cfg"] is False  # guidance is an embedding for LCM
    assert results["negative_prompt"] == "blurry" and results["seed"] == 7


def test_bad_input_is_an_error_with_the_engines_message(served):
    url, _ = served
    with pytest.raises(Exception, match=r"steps.*\[1, 8\]"):
        Client(url, verbose=False).predict(prompt="a red circle", methods=["lcm"], steps={"lcm": 60},
                                           api_name="/compare")


def test_only_compare_is_public(served):
    url, _ = served
    info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
    assert list(info["named_endpoints"]) == ["/compare"]
    params = [p["parameter_name"] for p in info["named_endpoints"]["/compare"]["parameters"]]
    assert params[:6] == ["prompt", "seed", "negative_prompt", "methods", "width", "height"]


def test_a_full_queue_says_the_demo_is_busy(monkeypatch):
    """One job runs, QUEUE_SIZE wait, the next is turned away (the page shows "currently busy")."""
    monkeypatch.setattr(app, "QUEUE_SIZE", 1)
    demo = app.create_demo(FakeEngine(step_seconds=0.04), family="mini")  # a 50-step baseline takes 2 s
    _, url, _ = app.launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        jobs = [client.submit(prompt="a red circle", methods=["baseline"], api_name="/compare")]
        deadline = time.monotonic() + 30
        while jobs[0].status().code != Status.PROCESSING and time.monotonic() < deadline:
            time.sleep(0.02)
        jobs += [client.submit(prompt="a red circle", methods=["baseline"], api_name="/compare") for _ in range(2)]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(len(job.result(timeout=60)[0]))
            except Exception as exc:  # gradio_client raises its own error type for a rejected job
                outcomes.append(str(exc))
    finally:
        demo.close()
    assert outcomes.count(1) == 2, outcomes
    assert any("Queue is full" in str(o) for o in outcomes), outcomes
