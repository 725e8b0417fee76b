"""Synthetic families: the real SDXL and SD 1.5 architectures with random weights, for measuring at full scale.

    python -m fastgen bench --family synthetic-sdxl --dtype bfloat16 --methods turbo --size 512x512

Each folder under `repos/` is one real repo's layout without its weight files: model_index.json, the
scheduler, tokenizers and every component's config.json, as the real repo ships them (the arguments that give
the published parameter counts, see DESIGN.md), plus `synthetic.json` at its root. A config that stands for
weights carries `_synthetic_seed`: the engine finds the marker and builds the component instead of reading it
(on the meta device, `to_empty`, a seeded cheap init), so nothing is downloaded and the cache keys components
by their config files: the same config and seed is the same module, shared where the real repos share bytes
(sdxl-turbo's text encoders and VAE are SDXL base's), distinct where they do not (each UNet has its own seed).

Memory, speed and sharing are real; images are noise. The tokenizers know single characters only (ids 0-511)
plus CLIP's start and end tokens at their real ids: every prompt still pads to 77 tokens, as with the real ones.
Importing this module is cheap: torch loads when a component is built.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

REPOS = Path(__file__).resolve().parent / "repos"
MARKER = "synthetic.json"
NOTE = "synthetic weights: for timing only"
SEED_KEY = "_synthetic_seed"

_meta = threading.local()  # set by `on_meta`: components stay on the meta device


def repo(name: str) -> str:
    """The folder of one synthetic repo (sdxl-base, sdxl-turbo, lcm-sdxl, ...), as an absolute path."""
    return str(REPOS / name)


def is_synthetic(folder) -> bool:
    """True for a folder whose components are built, not read (it holds the marker file at its root)."""
    return folder is not None and (Path(folder) / MARKER).is_file()


def family_is_synthetic(family) -> bool:
    """True when every repo the family loads from is synthetic: its images are noise."""
    return all(is_synthetic(r) for r in family.repos)


@contextlib.contextmanager
def on_meta():
    """Components built in this block (in this thread) stay on the meta device: a load that allocates nothing,
    for counting what the cache would hold (`python -m fastgen bench --meta`). Nothing built so can run."""
    before = getattr(_meta, "on", False)
    _meta.on = True
    try:
        yield
    finally:
        _meta.on = before


def _read(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build(cls, folder, subfolder: str | None, dtype, device: str):
    """The component `cls` of a synthetic repo, with seeded random weights in `dtype` on `device`.

    Built on the meta device (no memory, no init), cast there, then given storage with `to_empty` and filled
    once: a 2.6 B-parameter UNet is never held in float32 on its way to bfloat16. Buffers (CLIP's position ids)
    are made for real from the start, since `to_empty` would leave them as garbage."""
    import torch
    from accelerate import init_empty_weights

    folder = Path(folder)
    where = folder / subfolder if subfolder else folder
    seed = _read(where / "config.json")[SEED_KEY]
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "config_class"):  # transformers: the config class reads config.json
            module = cls(cls.config_class.from_pretrained(folder, subfolder=subfolder or ""))
        else:  # diffusers
            module = cls.from_config(cls.load_config(folder, subfolder=subfolder))
    # nn.Module's own cast (free on meta): diffusers' override only adds a warning about fp32-kept modules, of
    # which these models have none
    module = torch.nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)
    if getattr(_meta, "on", False):
        return module
    buffers = {name: b.to(device) for name, b in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, b in buffers.items():
            module.get_buffer(name).copy_(b)
    fill(module, seed)
    return module


def fill(module, seed: int, only: str | None = None) -> None:
    """Seeded random weights, in parameter order: scales of norms 1, biases 0, every matrix, convolution and
    embedding N(0, 1/fan_in), so activations keep their size layer by layer and stay finite in float16.
    `only`: the parameters whose name contains it (one adapter's)."""
    import torch

    params = [(n, p) for n, p in module.named_parameters() if only is None or only in n]
    if not params:
        return
    generator = torch.Generator(params[0][1].device).manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)


def attach_lora(unet, path, adapter: str) -> None:
    """A LoRA of the real shape (rank, alpha and target modules from the synthetic repo's adapter_config.json)
    added to `unet` as the named adapter, with seeded random weights: what `load_lora_weights` leaves."""
    from peft import LoraConfig

    config = _read(Path(path))
    unet.add_adapter(LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                target_modules=config["target_modules"], init_lora_weights=False),
                     adapter_name=adapter)
    if not getattr(_meta, "on", False):
        fill(unet, config[SEED_KEY], only=f".{adapter}.")


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
