"""The methods on Ray Serve (a local Ray on this machine's CPUs) serving the shipped mini family: HTTP answers
equal the in-process engine pixel for pixel, panels run in parallel and stream as they finish, bad input gets
the schema's message, a replica killed mid-request fails its panel only, and the page runs against it."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from fastgen.registry import MINI_WEIGHTS
from fastgen.serve import from_png64, groups

pytestmark = pytest.mark.slow
PROMPT = "a large red circle on a blue background"


def test_groups_follow_the_unet_each_method_runs_on():
    assert groups("mini") == {"turbo": ["turbo"], "lcm": ["lcm"], "lcm-lora+baseline": ["lcm-lora", "baseline"]}
    sdxl = groups("sdxl")
    assert sdxl["lcm-lora+hyper-sd+baseline"] == ["lcm-lora", "hyper-sd", "baseline"]
    assert {"turbo", "lcm", "lightning", "dmd2"} <= set(sdxl)  # each distilled UNet alone
    assert groups("sdxl", ["turbo", "baseline"]) == {"turbo": ["turbo"], "baseline": ["baseline"]}


@pytest.fixture(scope="module")
def served():
    if not (MINI_WEIGHTS / "base" / "model_index.json").exists():
        pytest.skip("the mini family's weights are not in this checkout")
    import ray
    from ray import serve

    from fastgen.serve import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # cpus_per_replica 0: four deployments on two CPUs; one torch thread each keeps them from thrashing. The host
    # allows custom models (read when the app is built), so the custom-models deployment is there too.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTGEN_ALLOW_CUSTOM", "1")
        app = build("mini", cpus_per_replica=0, threads=1, public=False)
    serve.run(app, name="fastgen", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The replicas run torch on one thread; so does this process's engine while it checks them, so that sums
    are taken in the same order and images agree bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def post(url, path, body):
    import httpx

    with httpx.Client(timeout=300) as client:
        with client.stream("POST", url + path, json=body) as reply:
            lines = []
            for line in reply.iter_lines():
                if line.strip():  # with its arrival, on the clock the replicas stamp `served` with
                    lines.append((time.time(), json.loads(line)))
            return reply.status_code, lines


def test_compare_streams_the_in_process_images_as_they_finish(served, one_thread):
    from fastgen.engine import Engine

    # Each replica loads its methods on its first request, and on a fast day a load outlasts the baseline's
    # steps, so the order is asserted on warm replicas only.
    status, cold = post(served, "/compare", {"prompt": PROMPT, "seed": 4, "steps": {"baseline": 1}})
    assert status == 200 and sorted(line["method"] for _, line in cold) == ["baseline", "lcm", "lcm-lora", "turbo"]
    status, lines = post(served, "/compare", {"prompt": PROMPT, "seed": 5, "steps": {"baseline": 30}})
    assert status == 200
    order = [line["method"] for _, line in lines]
    assert sorted(order) == ["baseline", "lcm", "lcm-lora", "turbo"]
    assert order[-1] == "baseline"  # the 30-step baseline finishes last
    # each line arrives when its panel finishes, not when the slowest does (which one of the three fast panels
    # comes first can change with this 2-core machine's scheduling, so their order is not asserted)
    slowest = lines[-1][1]["served"]["end"]
    assert all(arrived < slowest for arrived, line in lines[:-1])
    assert lines[0][0] < lines[-1][0] - 0.2
    # warm now: two panels of one comparison, on two replicas, run at the same time
    status, warm = post(served, "/compare", {"prompt": PROMPT, "seed": 6, "methods": ["lcm", "baseline"]})
    lcm, baseline = ({line["method"]: line["served"] for _, line in warm}[m] for m in ("lcm", "baseline"))
    assert max(lcm["start"], baseline["start"]) < min(lcm["end"], baseline["end"])
    assert lcm["pid"] != baseline["pid"]
    engine = Engine(device="cpu")
    for _, line in lines:
        own = engine.run("mini", line["method"], PROMPT, seed=5, steps=line["steps"])
        assert np.array_equal(np.asarray(from_png64(line["image"]).convert("RGB")), np.asarray(own.image))
        assert line["code"] == own.code


def test_bad_input_gets_the_schemas_message_and_field(served):
    from fastgen.request import CompareRequest, RequestError

    status, lines = post(served, "/compare", {"prompt": PROMPT, "seed": 2.7})
    assert status == 400
    with pytest.raises(RequestError) as expected:
        CompareRequest.parse({"prompt": PROMPT, "seed": 2.7}, family="mini")
    assert lines[0][1] == {"error": str(expected.value), "field": "seed"}
    status, lines = post(served, "/refine", {"prompt": PROMPT, "image": "not base64"})
    assert status == 400 and lines[0][1]["field"] == "image"


def test_refine_over_http_equals_the_engine(served, one_thread):
    from fastgen.engine import Engine
    from fastgen.serve import png64
    from tests.test_refine import centre_mask, source_image

    status, lines = post(served, "/refine", {"prompt": PROMPT, "seed": 2, "methods": ["turbo", "lcm"],
                                             "strength": 0.9, "keep_outside": True,
                                             "image": png64(source_image()), "mask": png64(centre_mask())})
    assert status == 200 and len(lines) == 2
    engine = Engine(device="cpu")
    for _, line in lines:
        own = engine.refine("mini", line["method"], source_image(), PROMPT, mask=centre_mask(), seed=2,
                            strength=0.9, keep_outside=True)
        assert np.array_equal(np.asarray(from_png64(line["image"]).convert("RGB")), np.asarray(own.image))
        assert line["mode"] == "inpaint" and line["outside_change"]["max"] == 0


def test_a_replica_killed_mid_request_fails_its_panel_and_the_others_complete(served):
    import threading

    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "methods-lcm-lora+baseline" in a["name"] and "REPLICA" in a["name"].upper()]
    assert names, ray.util.list_named_actors(all_namespaces=True)
    replica = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    timer = threading.Timer(1.0, lambda: ray.kill(replica, no_restart=False))
    timer.start()
    status, lines = post(served, "/compare", {"prompt": PROMPT, "seed": 1, "steps": {"baseline": 100},
                                              "methods": ["turbo", "lcm", "baseline"]})
    timer.join()
    by_method = {line["method"]: line for _, line in lines}
    assert by_method["baseline"]["failed"] is True and by_method["baseline"]["kind"] == "replica-died"
    assert "image" in by_method["turbo"] and "image" in by_method["lcm"]
    deadline = time.monotonic() + 120  # Serve starts a new replica: the next request is served
    while True:
        status, lines = post(served, "/run", {"prompt": PROMPT, "method": "baseline", "steps": {"baseline": 2}})
        if status == 200 and "image" in lines[0][1]:
            break
        assert time.monotonic() < deadline, lines
        time.sleep(2)


def test_the_page_with_a_backend_fills_its_panels(served):
    """python app.py --backend URL: the page's own API answers with the backend's four panels."""
    from gradio_client import Client
    from PIL import Image

    import app
    from fastgen.remote import RemoteEngine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.create_demo(RemoteEngine(served), family="mini")
    _, url, _ = app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        images, results = Client(url, verbose=False).predict(prompt=PROMPT, seed=0, api_name="/compare")
    finally:
        demo.close()
    assert [r["method"] for r in results["results"]] == ["turbo", "lcm", "lcm-lora", "baseline"]
    assert all(Image.open(item["image"]).size == (64, 64) for item in images)


def test_the_page_runs_on_the_backend(served):
    import app
    from fastgen.remote import RemoteEngine

    engine = RemoteEngine(served)
    runs = app.Runs(engine)
    comparison = engine.compare("mini", PROMPT, ["turbo", "baseline"], seed=3, steps={"baseline": 5})
    assert [r.method for r in comparison.results] == ["turbo", "baseline"] and not comparison.failures
    updates = list(runs.rerun("turbo", None, None, True, 1, 0.0))  # no board yet: nothing to rerun
    assert updates == [{}]
    frame = runs.live("mini", PROMPT, 0, False, ["turbo"], False, None, 0.7)
    assert "ms** per frame" in frame["live.turbo.caption"]
    health = engine.health()
    assert health["ok"] and health["family"] == "mini"
    assert set(health["groups"]) == {*groups("mini"), "custom-models"}


def test_visitors_base_models_run_on_the_multiplexed_deployment(served, one_thread, tmp_path):
    """`base`: the model runs on the custom-models deployment, equal to the in-process engine; asked again it is
    already held (no load); a replica keeps the last two models it used."""
    import shutil

    import httpx

    from fastgen.engine import Engine
    from fastgen.request import custom_base
    from fastgen.serve import CUSTOM_MODELS_PER_REPLICA

    models = []
    for i in range(CUSTOM_MODELS_PER_REPLICA + 1):  # "fine-tunes": copies of the mini base, each its own model
        shutil.copytree(MINI_WEIGHTS / "base", tmp_path / f"finetune-{i}")
        models.append(str(tmp_path / f"finetune-{i}"))
    body = {"prompt": PROMPT, "seed": 3, "methods": ["baseline"], "steps": {"baseline": 4}, "width": 64, "height": 64}
    status, lines = post(served, "/compare", {**body, "base": models[0]})
    assert status == 200 and len(lines) == 1, lines
    first = lines[0][1]
    own = Engine(device="cpu").run(custom_base(models[0]), "baseline", PROMPT, seed=3, steps=4, width=64, height=64)
    assert np.array_equal(np.asarray(from_png64(first["image"]).convert("RGB")), np.asarray(own.image))
    assert first["code"] == own.code and first["load_seconds"] > 0
    _, again = post(served, "/compare", {**body, "base": models[0]})
    assert again[0][1]["load_seconds"] < 0.05 and again[0][1]["served"]["pid"] == first["served"]["pid"]
    for model in models[1:]:
        status, lines = post(served, "/compare", {**body, "base": model})
        assert status == 200 and "image" in lines[0][1], lines
    health = httpx.get(served + "/health", timeout=60).json()
    assert health["replicas"]["custom-models"]["models"] == models[1:]  # the least recently used one went
    status, lines = post(served, "/compare", {**body, "base": str(tmp_path / "no-such-model")})
    assert status == 400 and lines[0][1]["field"] == "base"


def test_style_loras_run_on_the_groups_own_deployments(served, one_thread, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from fastgen.engine import Engine
    from fastgen.registry import StyleLora
    from tests.fakehub import write_peft_lora

    unet = UNet2DConditionModel.from_pretrained(MINI_WEIGHTS / "base" / "unet")
    write_peft_lora(tmp_path / "style.safetensors", unet, seed=5, rank=4)
    lora = {"repo": str(tmp_path), "weight_name": "style.safetensors", "scale": 0.8}
    status, lines = post(served, "/compare", {"prompt": PROMPT, "seed": 4, "methods": ["lcm-lora", "turbo"],
                                              "loras": [lora]})
    assert status == 200, lines
    by_method = {line["method"]: line for _, line in lines}
    assert by_method["lcm-lora"]["loras"] == [lora] and "loras" not in by_method["turbo"]
    own = Engine(device="cpu").run("mini", "lcm-lora", PROMPT, seed=4, loras=[StyleLora(**lora)])
    assert np.array_equal(np.asarray(from_png64(by_method["lcm-lora"]["image"]).convert("RGB")), np.asarray(own.image))
    from fastgen import request
    from fastgen.remote import RemoteEngine  # the page's client sends them on too (its own host's switch first)

    monkeypatch.setenv("FASTGEN_ALLOW_CUSTOM", "1")
    monkeypatch.setitem(request.PUBLIC, "bind", False)
    remote = RemoteEngine(served).run("mini", "lcm-lora", PROMPT, seed=4, loras=[StyleLora(**lora)])
    assert remote.loras == [lora] and np.array_equal(np.asarray(remote.image), np.asarray(own.image))
