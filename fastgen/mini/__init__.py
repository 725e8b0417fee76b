"""The embedded miniature family: its world, analyzer, training and the weights that ship in the package.

    from fastgen.mini import weights
    pipe = StableDiffusionPipeline.from_pretrained(weights("base"))

Importing this package is cheap: the training and evaluation modules load only when imported themselves.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


def weights(name: str) -> str:
    """The folder of one shipped mini model (base, lcm, lcm-lora, turbo, ...), wherever fastgen is installed."""
    folder = WEIGHTS / name
    if not folder.is_dir():
        names = sorted(p.name for p in WEIGHTS.iterdir() if p.is_dir()) if WEIGHTS.is_dir() else []
        raise ValueError(f"`name` must be one of {names}, got {name!r}")
    return str(folder)
