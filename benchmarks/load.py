"""Load and soak test of the running demo: N clients x M `compare` requests through gradio_client, driven by locust.

    python benchmarks/load.py                              # starts `python app.py --family mini` on a free port
    python benchmarks/load.py --clients 8 --requests 25    # the reliability target: 200 requests
    python benchmarks/load.py --url http://127.0.0.1:7860/ --server-pid 1234   # an app you started yourself

Reports lost requests (errors other than a busy refusal), busy refusals ("Queue is full"), latency
percentiles, cross-talk (every image must equal the same request's image when it ran alone) and the server's
memory growth from after the warm-up to the end. Local only: the URL must be a loopback address.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"  # the client's telemetry thread deadlocks under gevent; also: local only
import httpcore  # noqa: F401  before locust's gevent patching, which removes select.epoll that trio (httpcore) needs
from gradio_client import Client
from locust import User, events, task
from locust.env import Environment
from locust.exception import StopUser

import argparse
import hashlib
import ipaddress
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import gevent
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a large red circle on a blue background", "a small green square on a white background",
           "a yellow triangle on a black background", "a large blue circle on a yellow background"]


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int) -> subprocess.Popen:
    env = {**os.environ, "FASTGEN_FAMILY": "mini", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "0"}
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--family", "mini", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the app exited with code {server.returncode} before it listened")
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the app did not listen within 120 s")


def requests_set(args) -> list[dict]:
    """The distinct requests the clients cycle through: different prompts and seeds, so a mix-up shows."""
    methods = args.methods.split(",") if args.methods else None
    return [dict(prompt=PROMPTS[i % len(PROMPTS)], seed=100 + i, methods=methods) for i in range(args.distinct)]


def fingerprints(images) -> list[str]:
    """sha256 of each image's pixels (the PNG file's bytes may differ in metadata; pixels may not)."""
    out = []
    for item in images:
        with Image.open(item["image"]) as image:
            out.append(hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest())
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running app (loopback only); default: start one on the mini family")
    parser.add_argument("--server-pid", type=int, help="with --url: the app's process, for its memory")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--distinct", type=int, default=8, help="distinct requests the clients cycle through")
    parser.add_argument("--methods", default="", help="comma-separated (default: all of the family's)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.clients * args.requests > 2000:
        parser.error("--clients and --requests must be positive, at most 2000 requests in all")

    server = None
    if args.url:
        if not loopback(args.url):
            parser.error(f"--url must be a loopback address (this is a load test), got {args.url}")
        url = args.url
    else:
        port = free_port()
        server = start_app(port)
        url, args.server_pid = f"http://127.0.0.1:{port}/", server.pid
    process = psutil.Process(args.server_pid) if args.server_pid else None

    def server_rss() -> int | None:
        if process is None:
            return None
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])

    try:
        catalogue = requests_set(args)
        solo_client = Client(url, verbose=False, analytics_enabled=False)
        solo = {}  # request index -> fingerprints of its images, run alone (this also warms every method up)
        for i, request in enumerate(catalogue):
            solo[i] = fingerprints(solo_client.predict(**request, api_name="/compare")[0])
        rss_start = server_rss()

        outcome = {"ok": 0, "lost": 0, "busy": 0, "crosstalk": 0}
        latencies: list[float] = []
        errors: list[str] = []
        rss_samples = [rss_start]

        class Visitor(User):
            """One client: its own gradio_client session, `args.requests` requests, then it stops."""

            wait_time = staticmethod(lambda: 0)
            counter = iter(range(10**9))

            def on_start(self):
                self.client = Client(url, verbose=False, analytics_enabled=False)
                self.index = next(Visitor.counter)
                self.sent = 0

            @task
            def compare(self):
                if self.sent >= args.requests:
                    raise StopUser()
                which = (self.index + self.sent) % len(catalogue)
                self.sent += 1
                start = time.perf_counter()
                failure = None
                try:
                    images, _ = self.client.predict(**catalogue[which], api_name="/compare")
                    if fingerprints(images) != solo[which]:
                        outcome["crosstalk"] += 1
                    outcome["ok"] += 1
                except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                    failure = exc
                    busy = "queue is full" in str(exc).lower()
                    outcome["busy" if busy else "lost"] += 1
                    if not busy:
                        errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                seconds = time.perf_counter() - start
                latencies.append(seconds)
                events.request.fire(request_type="gradio", name="/compare", response_time=seconds * 1000,
                                    response_length=0, exception=failure, context={})
                done = outcome["ok"] + outcome["lost"] + outcome["busy"]
                if done % 50 == 0:
                    rss_samples.append(server_rss())
                    print(f"  {done} / {args.clients * args.requests} requests", file=sys.stderr)

        env = Environment(user_classes=[Visitor], events=events)
        runner = env.create_local_runner()
        started = time.perf_counter()
        runner.start(user_count=args.clients, spawn_rate=args.clients)
        total = args.clients * args.requests
        while outcome["ok"] + outcome["lost"] + outcome["busy"] < total and time.perf_counter() - started < 3600:
            gevent.sleep(0.2)
        runner.quit()
        wall = time.perf_counter() - started
        rss_end = server_rss()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    report = {
        "url": url, "clients": args.clients, "requests_per_client": args.requests, "requests": total,
        "distinct_requests": len(catalogue), "methods": args.methods or "all", "ok": outcome["ok"],
        "lost": outcome["lost"], "busy": outcome["busy"], "crosstalk": outcome["crosstalk"],
        "latency_s": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                      "p99": percentile(latencies, 99), "max": max(latencies, default=float("nan"))},
        "throughput_rps": total / wall, "wall_s": wall,
        "server_rss_mb": {"after_warmup": rss_start and rss_start / 2**20, "end": rss_end and rss_end / 2**20,
                          "samples": [r and round(r / 2**20, 1) for r in rss_samples]},
        "memory_growth_pct": 100 * (rss_end - rss_start) / rss_start if rss_start and rss_end else None,
        "errors": errors[:10],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["lost"] == 0 and report["crosstalk"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
