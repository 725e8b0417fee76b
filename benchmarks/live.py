"""Live mode, measured: generation time per frame, and how long another visitor's Generate waits behind live use.

    python benchmarks/live.py                  # the shipped mini family, on this machine
    python benchmarks/live.py --frames 50 --family mini

1. Frames in process (the engine alone): each live method on changing prompts (text mode), then on a sketch
   (sketch mode, strength 0.7), after one warm-up frame; median / p90 / max generation milliseconds and the
   frames per second the median allows.
2. Served (the page's app on a loopback port, as `python app.py` serves it): one client sends live frames back
   to back, as the Live tab does while someone types; another submits `compare` three times. Printed: each
   compare's wait in the queue (submit -> processing) next to the longest live round trip.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def frames_in_process(family: str, frames: int) -> None:
    from PIL import Image, ImageDraw

    from fastgen import present
    from fastgen.engine import Engine
    from fastgen.registry import get_family
    from fastgen.request import live_steps

    engine = Engine(device="cpu")
    sketch = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(sketch).ellipse((60, 60, 190, 190), fill=(40, 170, 70))
    fam = get_family(family)
    print(f"| method | mode | steps | median ms | p90 ms | max ms | frames/s at the median |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method in present.live_methods(family):
        spec = fam.method(method)
        for mode in ("text", "sketch"):
            steps = live_steps(spec) if mode == "text" else live_steps(spec, 0.7)
            times = []
            for i in range(frames + 1):
                prompt = f"a large green circle on a white background{' ' * (i % 3)}"
                if mode == "text":
                    result = engine.run(fam, method, prompt, seed=i, steps=steps)
                else:
                    result = engine.refine(fam, method, sketch, prompt, seed=i, strength=0.7, steps=steps,
                                           resize=True)
                if i:  # the first frame loads the weights
                    times.append(1000 * result.seconds)
            median = statistics.median(times)
            print(f"| {spec.label} | {mode} | {steps} | {median:.0f} | {percentile(times, 0.9):.0f} | "
                  f"{max(times):.0f} | {1000 / median:.1f} |", flush=True)


def queue_waits(url: str, compares: int = 3, pause: float = 0.3) -> tuple[list[float], list[float]]:
    """One client sends live frames back to back (the next after the last came back, as the Live tab's
    always-last events do while someone types); another submits `compare` `compares` times. Returns (the live
    round trips, each compare's wait in the queue: submit -> processing), in seconds."""
    from gradio_client import Client
    from gradio_client.utils import Status

    typist, other = Client(url, verbose=False), Client(url, verbose=False)
    frames, stop = [], threading.Event()

    def typing():
        i = 0
        while not stop.is_set():
            start = time.perf_counter()
            typist.predict(prompt=f"a red circle {i}", seed=i, method="turbo", api_name="/live")
            frames.append(time.perf_counter() - start)
            i += 1

    thread = threading.Thread(target=typing, daemon=True)
    thread.start()
    waits = []
    try:
        while len(frames) < 3:  # frames are flowing
            time.sleep(0.05)
        for _ in range(compares):
            job = other.submit(prompt="a blue square", methods=["turbo"], api_name="/compare")
            submitted = time.perf_counter()
            while job.status().code not in (Status.PROCESSING, Status.FINISHED):
                time.sleep(0.002)
            waits.append(time.perf_counter() - submitted)
            job.result(timeout=120)
            time.sleep(pause)
    finally:
        stop.set()
        thread.join(timeout=60)
    return frames, waits


def served_waits(family: str) -> None:
    from gradio_client import Client

    import app
    from fastgen.engine import Engine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.create_demo(Engine(device="cpu"), family=family)
    _, url, _ = app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        Client(url, verbose=False).predict(prompt="a blue square", methods=["turbo"], api_name="/compare")  # load
        frames, waits = queue_waits(url)
        print(f"live round trips while typing: {len(frames)} frames, median {1000 * statistics.median(frames):.0f} ms, "
              f"max {1000 * max(frames):.0f} ms")
        print("compare's wait in the queue behind live use: " + ", ".join(f"{1000 * w:.0f} ms" for w in waits))
    finally:
        demo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="mini")
    parser.add_argument("--frames", type=int, default=30, help="timed frames per method and mode")
    parser.add_argument("--no-serve", action="store_true", help="skip the served two-visitor measurement")
    args = parser.parse_args()
    frames_in_process(args.family, args.frames)
    if not args.no_serve:
        served_waits(args.family)


if __name__ == "__main__":
    main()
