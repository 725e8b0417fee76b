"""Rebuild the measured tables of docs/benchmarks.md from the JSON reports under docs/bench/.

    python benchmarks/tables.py

Each report that `python -m fastgen bench --json` (or, under fastpaths/, benchmarks/gpu_fastpaths.py) wrote
becomes its markdown, in file name order, between the markers `<!-- measured:NAME -->` and
`<!-- /measured:NAME -->`, where NAME is the folder under docs/bench/ (cpu, gpu, fastpaths, sharing). A folder
with no report leaves the words "not yet measured" there: the page never holds a number no run produced.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_fastpaths  # noqa: E402
from fastgen.bench import markdown  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
REPORTS = ROOT / "docs" / "bench"
UNMEASURED = {"gpu": "Not yet measured on a GPU: run `bash benchmarks/gpu.sh` on one, then this script.",
              "cpu": "Not yet measured on a CPU.", "sharing": "Not yet counted.",
              "fastpaths": "Not yet measured on a GPU: run `python benchmarks/gpu_fastpaths.py --json "
                           "docs/bench/fastpaths/NAME.json` on one."}


def section(name: str) -> str:
    reports = sorted((REPORTS / name).glob("*.json"))
    if not reports:
        return UNMEASURED.get(name, "Not yet measured.")
    render = gpu_fastpaths.markdown if name == "fastpaths" else markdown  # its own report: stages, not methods
    return "\n\n".join(render(json.loads(path.read_text())) + f"\n\n(from `docs/bench/{name}/{path.name}`)"
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
