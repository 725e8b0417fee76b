"""Serving on Ray Serve, measured on this machine: a local Ray, the mini family, one replica per group.

    python benchmarks/serve.py                 # 5 comparisons after a warm-up
    python benchmarks/serve.py --requests 10 --threads 1

Printed: each group's resident bytes (from GET /health's cache report); for the four-panel comparison over HTTP,
the wall time until the last panel arrived next to the sum of the panels' own seconds (the sum is what the
in-process page takes, one panel after another); and comparisons per second, one after another.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import httpx
    import ray
    from ray import serve

    from fastgen.serve import build

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="mini")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the local Ray may use")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(args.family, cpus_per_replica=0, threads=args.threads), name="fastgen", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=600) as client:
            def compare(seed: int) -> tuple[float, float]:
                start = time.perf_counter()
                seconds = 0.0
                with client.stream("POST", url + "/compare", json={"prompt": "a large red circle on a blue "
                                                                   "background", "seed": seed}) as reply:
                    for line in reply.iter_lines():
                        if line.strip():
                            seconds += json.loads(line).get("seconds", 0.0)
                return time.perf_counter() - start, seconds

            compare(0)  # loads every group's weights
            runs = [compare(seed) for seed in range(1, args.requests + 1)]
            health = client.get(url + "/health").json()
        for group, replica in health["replicas"].items():
            held = sum(row["bytes"] for row in replica.get("cache", []))
            print(f"group {group}: {held / 1e6:.1f} MB resident ({replica.get('device')})")
        walls, sums = [w for w, _ in runs], [s for _, s in runs]
        print(f"four-panel comparison over HTTP: {statistics.median(walls):.2f} s median wall "
              f"(min {min(walls):.2f}, max {max(walls):.2f}); the panels' own seconds add up to "
              f"{statistics.median(sums):.2f} s median")
        print(f"comparisons per second, one after another: {len(walls) / sum(walls):.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
