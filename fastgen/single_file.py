"""Single-file checkpoints: one .safetensors holding a whole SD 1.5 or SDXL model in the original (LDM) key
layout, as most community fine-tunes are shared.

The architecture is read from the file's tensor names; the file is converted once, by diffusers'
`from_single_file` with the configs of the architecture's base repo, into a diffusers folder kept under
FASTGEN_CACHE_DIR (default ~/.cache/fastgen). That folder then runs as any custom model: through the same cache,
recipes and snippets.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fastgen import fetch, hub
from fastgen.registry import as_folder, get_family

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
PICKLES = (".ckpt", ".pt", ".pth", ".bin")  # pickled: loading one can run code, so a visitor's is never loaded
# A tensor name only each architecture's checkpoints hold (the second text encoder is SDXL's).
MARKERS = {"sdxl": "conditioner.embedders.1.", "sd15": "cond_stage_model.transformer."}
UNET_PREFIX = "model.diffusion_model."
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}
CONFIG_FILES = ["model_index.json", "*/config.json", "tokenizer*/*", "scheduler/*", "feature_extractor/*"]


def is_single_file(base: str) -> bool:
    """Whether `base` names one checkpoint file (a path, or owner/repo/file on the Hub) rather than a folder."""
    return base.lower().endswith((SUFFIX, *PICKLES))


def hub_file(base: str) -> tuple[str, str] | None:
    """(repo id, file name) for owner/repo/path/to/file.safetensors on the Hub; None for a local path."""
    if as_folder(base) is not None:
        return None
    parts = base.split("/")
    return ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) >= 3 else None


def cache_dir() -> Path:
    return Path(os.environ.get("FASTGEN_CACHE_DIR") or "~/.cache/fastgen").expanduser()


def locate(base: str) -> Path:
    """The checkpoint file on this machine: a local path, or the Hub file (downloaded first, within the host's
    cap for custom models). Raises ValueError saying what is wrong."""
    if base.lower().endswith(PICKLES):
        raise ValueError(f"{Path(base).name} is a pickled checkpoint, which can run code when loaded; only "
                         f".safetensors checkpoints are loaded")
    remote = hub_file(base)
    if remote is None:
        path = Path(as_folder(base) or base)
        if not path.is_file():
            raise ValueError(f"no checkpoint file at {path}")
        return path
    repo, name = remote
    folder = hub.local_folder(repo)
    if folder is not None and (folder / name).is_file():
        return folder / name
    problem = fetch.hub_problem()
    if problem:
        raise ValueError(f"{base} is not on this machine and cannot be downloaded now: {problem}")
    try:
        return fetch.visitor_file(repo, name)
    except fetch.DownloadError as error:
        raise ValueError(str(error)) from None


def architecture(path: Path) -> str:
    """"sdxl" or "sd15", from the checkpoint's tensor names (read from the file's header, not its tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # not a safetensors file, truncated
        raise ValueError(f"{path.name} is not a readable .safetensors checkpoint ({error})") from None
    if any(k.startswith(UNET_PREFIX) for k in keys):
        for arch, marker in MARKERS.items():  # sdxl first: its checkpoints hold no cond_stage_model
            if any(k.startswith(marker) for k in keys):
                return arch
    raise ValueError(f"{path.name} is not an SDXL or SD 1.5 checkpoint in the original layout (no "
                     f"{UNET_PREFIX}* with the text encoders of either)")


def config_folder(arch: str) -> Path:
    """The diffusers configs (no weights) of the architecture's base repo: on disk, or those few files fetched."""
    repo = get_family(arch).method(get_family(arch).reference).repo
    folder = hub.local_folder(repo)
    if folder is not None and (folder / "model_index.json").is_file():
        return folder
    problem = fetch.hub_problem()
    if problem:
        raise ValueError(f"converting a single-file checkpoint needs {repo}'s configuration files, which are not on "
                         f"this machine and cannot be fetched now: {problem}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, allow_patterns=CONFIG_FILES, cache_dir=hub.cache_dir(),
                                  endpoint=fetch.endpoint()))


def converted(path: Path, arch: str) -> Path:
    """The checkpoint as a diffusers folder, converted on first use and kept (keyed by the file's path, size and
    modification time, so an edited file converts again)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "single-file" / f"{path.stem}-{key}"
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:  # keep the file's precision (most are shared in fp16)
        first = next(k for k in handle.keys() if k.startswith(UNET_PREFIX))
        dtype = handle.get_slice(first).get_dtype()
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)
    logger.info("converting %s (%s) into %s", path.name, arch, folder)
    pipeline = getattr(diffusers, PIPELINES[arch])
    pipe = pipeline.from_single_file(str(path), config=str(config_folder(arch)), local_files_only=True,
                                     torch_dtype=dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        partial.rename(folder)  # whole or not at all: a half-written folder is never found as converted
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (folder / "model_index.json").is_file():  # not another request's conversion that won the race
            raise
    return folder
