"""Where weights live: which files a method needs, where they are on disk, and what their content is.

One selection rule serves three callers: downloads (`fastgen.fetch` fetches only these files), the missing-
weights check (are these files on disk?) and the cache (hash these files to key a component by content).
Imports huggingface_hub only; never torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fastgen import synthetic

logger = logging.getLogger(__name__)

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers and transformers file names
# Config keys that name where or with which version a file was written; they do not change the module.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash")
_NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Scheduler", "ImageProcessor", "ImageProcessorPil", "ImageProcessorFast",
               "FeatureExtractor")
_SHARD = re.compile(r"-\d+-of-\d+$")


class MissingWeightsError(FileNotFoundError):
    """Weights are neither on disk nor downloadable. Names the repos and the command that fetches them."""

    def __init__(self, repos: list[str], family: str | None = None):
        self.repos = list(repos)
        self.family = family
        hub_repos = [r for r in self.repos if not os.path.isabs(r)]
        lines = [f"missing weights: {', '.join(self.repos)}"]
        if hub_repos:
            cmd = f"python -m fastgen download --family {family}" if family else "python -m fastgen download"
            lines.append(f"run `{cmd}` while online (HF_HUB_OFFLINE is set or the Hub cannot be reached)")
        if len(hub_repos) < len(self.repos):
            lines.append("local folders must exist and hold a diffusers model (model_index.json or config.json)")
        super().__init__("; ".join(lines))


@dataclass(frozen=True)
class Source:
    """Where one component's files sit: a repo (Hub id or absolute folder), a subfolder (None: the root), the
    weight variant, and for single-file components (a LoRA) the file name."""

    repo: str
    subfolder: str | None = None
    variant: str | None = None
    weight_name: str | None = None

    @property
    def label(self) -> str:
        where = self.weight_name or self.subfolder
        return f"{self.repo}/{where}" if where else self.repo


def is_local(repo: str) -> bool:
    return os.path.isabs(repo)


def offline() -> bool:
    import huggingface_hub.constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().lower() in ("1", "on", "yes", "true")
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    import huggingface_hub.constants

    return os.environ.get("HF_HUB_CACHE") or huggingface_hub.constants.HF_HUB_CACHE


def weight_variant(filename: str) -> str | None:
    """"model.fp16.safetensors" -> "fp16"; "diffusion_pytorch_model-00001-of-00002.safetensors" -> None."""
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = _SHARD.sub("", stem)
    base, _, variant = stem.partition(".")
    return variant or None if base in WEIGHT_STEMS else None


def select_files(filenames: list[str], source: Source) -> list[str]:
    """The files `from_pretrained` reads for one component: its configs and tokenizer files, and its weights
    in the requested variant (falling back to plain names, as diffusers does), safetensors before .bin."""
    if source.weight_name is not None:
        name = f"{source.subfolder}/{source.weight_name}" if source.subfolder else source.weight_name
        return [name] if name in filenames else []
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    here = [f for f in filenames if f.startswith(prefix) and "/" not in f[len(prefix):]]
    configs = [f for f in here if f.endswith((".json", ".txt", ".model")) and ".index." not in f]
    if not prefix:  # a component at the repo root: the root also holds README, model_index, single-file checkpoints
        configs = [f for f in configs if f.rsplit("/", 1)[-1] == "config.json"]
    for ext in (".safetensors", ".bin"):
        weights = [f for f in here if f.endswith(ext) and f.rsplit("/", 1)[-1].startswith(WEIGHT_STEMS)]
        for variant in (source.variant, None) if source.variant else (None,):
            chosen = [f for f in weights if weight_variant(f) == variant]
            if chosen:
                index_name = f"{ext}.index.{variant}.json" if variant else f"{ext}.index.json"
                index = [f for f in here if f.endswith(index_name)]
                return sorted(configs + chosen + index)
    return sorted(configs)


def needs_weights(class_name: str) -> bool:
    return not class_name.endswith(_NO_WEIGHTS)


def components(model_index: dict) -> dict[str, tuple[str, str]]:
    """model_index.json -> {component name: (library, class name)}, without the empty (null) slots."""
    return {
        name: (value[0], value[1])
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] and value[1]
    }


# --- files on disk ----------------------------------------------------------------------------------------

def local_folder(repo: str) -> Path | None:
    """The folder holding `repo`'s files now (a local folder, or the Hub cache snapshot), or None."""
    if is_local(repo):
        return Path(repo) if Path(repo).is_dir() else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, cache_dir=cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def list_files(folder: Path) -> list[str]:
    """Every file under `folder` ("unet/config.json"), hidden ones and hidden folders left out. Read on every run
    (a file may have appeared), so with os.walk: pathlib's rglob took most of a warm mini run's overhead."""
    root, names = str(folder), []
    for where, folders, files in os.walk(root, followlinks=True):
        folders[:] = [f for f in folders if not f.startswith(".")]
        prefix = os.path.relpath(where, root).replace(os.sep, "/")
        prefix = "" if prefix == "." else prefix + "/"
        names += [prefix + f for f in files if not f.startswith(".") and os.path.isfile(os.path.join(where, f))]
    return sorted(names)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def method_sources(spec, model_index: dict | None) -> dict[str, Source]:
    """Component name -> Source for one method; `model_index` is its pipeline repo's model_index.json."""
    sources = {}
    for name in components(model_index or {}):
        sources[name] = Source(spec.repo, name, spec.variant)
    if spec.unet_repo is not None:  # a diffusers folder, or one state-dict file at the repo's root
        sources["unet"] = Source(spec.unet_repo, spec.unet_subfolder, spec.unet_variant,
                                 getattr(spec, "unet_weight_name", None))
    if spec.lora_repo is not None:
        sources["lora"] = Source(spec.lora_repo, None, None, spec.lora_weight_name)
    return sources


def missing_files(spec, lister=None) -> list[str]:
    """Repos (of one method) whose needed files are not on disk; empty when the method can load offline.
    `lister`: list_files, or a caller's memo of it (one run lists each folder once)."""
    list_files_ = lister or list_files
    folder = local_folder(spec.repo)
    if folder is None or not (folder / "model_index.json").is_file():
        return list(dict.fromkeys(r for r in spec.repos if r == spec.repo or local_folder(r) is None))
    model_index = read_json(folder / "model_index.json")
    classes = components(model_index)
    missing = []
    for name, source in method_sources(spec, model_index).items():
        where = local_folder(source.repo)
        files = select_files(list_files_(where), source) if where else []
        class_name = classes.get(name, ("", "UNet2DConditionModel" if name == "unet" else "lora"))[1]
        # a synthetic repo's components are built from their configs (fastgen.synthetic): no weight files
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in files) or synthetic.is_synthetic(where)
        if not files or (needs_weights(class_name) and not has_weights):
            missing.append(source.repo)
    return list(dict.fromkeys(missing))


def missing_repos(methods) -> list[str]:
    return list(dict.fromkeys(r for spec in methods for r in missing_files(spec)))


# --- content keys -----------------------------------------------------------------------------------------

_file_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime in ns) -> digest


def file_digest(path: Path) -> str:
    """sha256 of a file's content. In the Hub cache an LFS file's blob is named by exactly that digest, so
    weights are never re-read; JSON configs hash without the keys that only record provenance."""
    path = Path(path)
    if path.suffix == ".json":
        stat = path.stat()
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in _file_hashes:
            config = read_json(path)
            if isinstance(config, dict):
                config = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
            _file_hashes[memo] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        return _file_hashes[memo]
    target = path.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    stat = target.stat()
    memo = (str(target), stat.st_size, stat.st_mtime_ns)
    if memo not in _file_hashes:
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        _file_hashes[memo] = digest.hexdigest()
    return _file_hashes[memo]


def content_key(folder: Path, files: list[str], subfolder: str | None) -> str:
    """One digest over a component's files, named relative to its subfolder, so that byte-identical
    components in different repos (sdxl-turbo's text encoders and SDXL base's) get the same key."""
    digest = hashlib.sha256()
    for name in sorted(files):
        relative = name[len(subfolder) + 1:] if subfolder else name
        digest.update(f"{relative}\0{file_digest(folder / name)}\n".encode())
    return digest.hexdigest()


def every_step_file(spec_list) -> list:
    """The specs with one recipe per step count spelled out (each step count's file is a download of its own)."""
    return [s.at_steps(n) if s.step_files else s for s in spec_list for n in (s.allowed_steps if s.step_files else (0,))]
