"""What this machine can run, in one screen: the software, the accelerator, the Hub cache, and per family which
methods' weights are here, which are missing, their sizes, and whether they could be fetched now.

    python -m fastgen doctor

The page asks the same question through `page_families`: it offers only the families that can run or be
fetched now, and says why the others cannot. Imports torch only in `environment()`.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata

from fastgen import fetch, hub, synthetic
from fastgen.registry import FAMILIES, Family, get_family


@dataclass(frozen=True)
class MethodState:
    name: str
    label: str
    missing: tuple[str, ...]  # repos whose needed files are not on disk
    bytes_on_disk: int  # what the method loads, as far as it is here

    @property
    def present(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class FamilyState:
    name: str
    label: str
    methods: tuple[MethodState, ...]
    hub_problem: str  # why the Hub cannot be used now; "" when it can

    @property
    def ready(self) -> bool:
        return all(m.present for m in self.methods)

    @property
    def missing_repos(self) -> list[str]:
        return list(dict.fromkeys(r for m in self.methods for r in m.missing))

    @property
    def fetchable(self) -> bool:
        """Missing weights that a download could bring now (Hub repos, and the Hub answers)."""
        missing = self.missing_repos
        return bool(missing) and not self.hub_problem and not any(hub.is_local(r) for r in missing)

    @property
    def usable(self) -> bool:
        return self.ready or self.fetchable

    @property
    def reason(self) -> str:
        """Why the family cannot be used now ("" when it can)."""
        if self.usable:
            return ""
        missing = self.missing_repos
        if any(hub.is_local(r) for r in missing):
            return f"its weights are missing from {', '.join(r for r in missing if hub.is_local(r))}"
        return (f"its weights are not on this machine and {self.hub_problem}; run `python -m fastgen download "
                f"--family {self.name}` while online")


def method_state(spec) -> MethodState:
    missing = tuple(hub.missing_files(spec))
    return MethodState(spec.name, spec.label, missing, bytes_on_disk(spec))


def bytes_on_disk(spec) -> int:
    """Bytes of the files the method loads that are on disk now (each file counted once)."""
    folder = hub.local_folder(spec.repo)
    model_index = hub.read_json(folder / "model_index.json") if folder and (folder / "model_index.json").is_file() \
        else None
    seen = {}
    for source in hub.method_sources(spec, model_index).values():
        where = hub.local_folder(source.repo)
        if where is None:
            continue
        for name in hub.select_files(hub.list_files(where), source):
            path = (where / name).resolve()
            seen[path] = path.stat().st_size
    if folder is not None and model_index is not None:
        path = (folder / "model_index.json").resolve()
        seen[path] = path.stat().st_size
    return sum(seen.values())


def family_state(family: str | Family, problem: str | None = None) -> FamilyState:
    """`problem`: why the Hub cannot be used ("" when it can); probed (and remembered a minute) when None."""
    family = get_family(family)
    states = tuple(method_state(spec) for spec in family.methods)
    if problem is None:
        needs_hub = any(not hub.is_local(r) for s in states for r in s.missing)
        problem = fetch.hub_problem() if needs_hub else ""
    return FamilyState(family.name, family.label, states, problem)


def page_families(current: str | None = None, problem: str | None = None) -> tuple[list[tuple[str, str]], str]:
    """The family dropdown's (label, name) choices, the families that can run or be fetched now (and
    `current`, the one the page opens on), and a note naming each family left out and why ("" if none)."""
    choices, notes = [], []
    for name, family in FAMILIES.items():
        if synthetic.family_is_synthetic(family) and name != current:
            continue  # noise images: offered only on a page opened on one (python app.py --family synthetic-sd15)
        state = family_state(family, problem)  # the Hub is probed once a minute at most
        if state.usable or name == current:
            choices.append((family.label, name))
        else:
            notes.append(f"{family.label} is unavailable: {state.reason}.")
    return choices, " ".join(notes)


# --- the report --------------------------------------------------------------------------------------------

def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> list[tuple[str, str]]:
    """(name, value) rows: Python, torch, the accelerator and its memory, library versions."""
    rows = [("Python", f"{platform.python_version()} ({sys.executable}, {platform.system()} {platform.machine()})")]
    try:
        import torch
    except ImportError:
        return rows + [("torch", "not installed")]
    rows.append(("torch", torch.__version__))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            rows.append((f"CUDA {i}", f"{props.name}, {fetch.size_text(total)} memory ({fetch.size_text(free)} free), "
                                      f"CUDA {torch.version.cuda}"))
    else:
        rows.append(("CUDA", "not available"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        memory = getattr(torch.mps, "recommended_max_memory", None)
        rows.append(("MPS", f"available ({fetch.size_text(memory())} recommended maximum)" if memory else "available"))
    else:
        rows.append(("MPS", "not available"))
    rows.append(("libraries", ", ".join(f"{p} {version(p)}" for p in
                                        ("diffusers", "transformers", "gradio", "huggingface_hub", "peft"))))
    return rows


def report(families=None, plan_sizes: bool = True) -> str:
    """The doctor's screen. With the Hub reachable and `plan_sizes`, missing methods show what they would fetch."""
    families = [get_family(f) for f in (families or FAMILIES)]
    lines = [f"{name:>10}  {value}" for name, value in environment()]
    cache = hub.cache_dir()
    lines.append(f"{'Hub cache':>10}  {cache} ({fetch.size_text(fetch.free_bytes(cache))} free)")
    problem = fetch.hub_problem()
    hub_line = f"not usable now: {problem}" if problem else f"online: {fetch.endpoint()} answers"
    lines.append(f"{'Hub':>10}  {hub_line}")
    lines.append("")
    for family in families:
        state = family_state(family, problem)
        if state.ready:
            status = "ready"
        elif state.fetchable:
            status = f"missing weights, can be fetched now: python -m fastgen download --family {family.name}"
        else:
            status = f"missing weights, cannot be fetched now ({problem or state.reason})"
        lines.append(f"{family.name} ({family.label}): {status}")
        sizes = _fetch_sizes(family, state) if plan_sizes and state.fetchable else {}
        for method in state.methods:
            if method.present:
                text = f"present, {fetch.size_text(method.bytes_on_disk)} on disk"
            else:
                text = f"missing {', '.join(method.missing)}"
                if method.name in sizes:
                    text += f"; download {fetch.size_text(sizes[method.name])}"
            lines.append(f"  {method.name:>9}  {text}")
    return "\n".join(lines)


def _fetch_sizes(family: Family, state: FamilyState) -> dict[str, int]:
    """Method -> bytes a download would fetch for it now; empty when the Hub cannot list them."""
    specs = [s for s, m in zip(family.methods, state.methods) if not m.present]
    try:
        plan = fetch.plan(specs, fetch.HubListing())
    except fetch.DownloadError:
        return {}
    return {name: sum(f.size for f in files if not f.present) for name, files in plan.methods}
