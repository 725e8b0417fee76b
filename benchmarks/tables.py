"""Rebuild the measured tables of docs/benchmarks.md from the JSON reports under docs/bench/.

    python benchmarks/tables.py

Each report that `python -m fastgen bench --json` wrote becomes its markdown (fastgen.bench.markdown), in file
name order, between the markers `<!-- measured:NAME -->` and `<!-- /measured:NAME -->`, where NAME is the folder
under docs/bench/ (cpu, gpu, sharing). A folder with no report leaves the words "not yet measured" there: the
page never holds a number no run produced.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastgen.bench import markdown  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
REPORTS = ROOT / "docs" / "bench"
UNMEASURED = {"gpu": "Not yet measured on a GPU: run `bash benchmarks/gpu.sh` on one, then this script.",
              "cpu": "Not yet measured on a CPU.", "sharing": "Not yet counted."}


def section(name: str) -> str:
    reports = sorted((REPORTS / name).glob("*.json"))
    if not reports:
        return UNMEASURED.get(name, "Not yet measured.")
    return "\n\n".join(markdown(json.loads(path.read_text())) + f"\n\n(from `docs/bench/{name}/{path.name}`)"
                       for path in reports)


def main() -> None:
    text = DOC.read_text()
    for name in re.findall(r"<!-- measured:([a-z0-9-]+) -->", text):
        text = re.sub(rf"(<!-- measured:{name} -->\n).*?(\n<!-- /measured:{name} -->)",
                      lambda m: m.group(1) + section(name) + m.group(2), text, flags=re.S)
    DOC.write_text(text)
    print(f"rebuilt {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
