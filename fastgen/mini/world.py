"""The miniature world: one shape on a plain background, 64x64, with a fixed prompt grammar.

    from fastgen.mini.world import Scene, render
    image = render(Scene("large", "red", "circle", "blue"))   # 64x64x3 uint8

Prompts read `a {size} {color} {shape} on a {background} background`. A fixed tenth of the
(size, color, shape, background) combinations is held out of training so that evaluation can
tell whether a model composes what it never saw.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # anti-aliasing: draw at 4x, then average 4x4 blocks

SIZES = ("small", "large")
SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 70, 190),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
}
COLORS = tuple(PALETTE)
# Extent (bounding-box side, in pixels) a size word allows; the renderer draws uniformly inside it.
SIZE_RANGES = {"small": (14, 22), "large": (30, 44)}

HELD_OUT_FRACTION = 0.1
_HELD_OUT_SEED = 20240601  # fixed forever: changing it changes which combinations are "unseen"

PROMPT_PATTERN = re.compile(
    r"^\s*an?\s+(?P<size>\w+)\s+(?P<color>\w+)\s+(?P<shape>\w+)\s+on\s+an?\s+(?P<background>\w+)\s+background\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Scene:
    size: str
    color: str
    shape: str
    background: str

    def __post_init__(self):
        for field, allowed in (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("background", COLORS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"`{field}` must be one of {', '.join(allowed)}, got {value!r}")
        if self.color == self.background:
            raise ValueError(f"`color` and `background` must differ, got {self.color!r} for both")

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"

    @classmethod
    def from_prompt(cls, prompt: str) -> "Scene":
        match = PROMPT_PATTERN.match(prompt)
        if match is None:
            raise ValueError(
                f"prompt must read 'a {{size}} {{color}} {{shape}} on a {{background}} background', got {prompt!r}"
            )
        return cls(**{k: v.lower() for k, v in match.groupdict().items()})


def all_scenes() -> list[Scene]:
    """Every valid combination, in a fixed order (2 sizes x 8 colors x 3 shapes x 7 backgrounds = 336)."""
    return [
        Scene(size, color, shape, background)
        for size, color, shape, background in itertools.product(SIZES, COLORS, SHAPES, COLORS)
        if color != background
    ]


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """(seen, held_out): a fixed tenth of the combinations never appears in training."""
    scenes = all_scenes()
    order = np.random.default_rng(_HELD_OUT_SEED).permutation(len(scenes))
    n_held = round(len(scenes) * HELD_OUT_FRACTION)
    held = set(order[:n_held].tolist())
    seen = [s for i, s in enumerate(scenes) if i not in held]
    held_out = [s for i, s in enumerate(scenes) if i in held]
    return seen, held_out


def render(scene: Scene, rng: np.random.Generator | None = None, extent: float | None = None,
           center: tuple[float, float] | None = None) -> np.ndarray:
    """Draw `scene` as a 64x64x3 uint8 array. Size and position are drawn from `rng` unless given."""
    rng = rng if rng is not None else np.random.default_rng(0)
    lo, hi = SIZE_RANGES[scene.size]
    extent = float(rng.uniform(lo, hi)) if extent is None else float(extent)
    if center is None:
        margin = extent / 2 + 1  # keep the whole shape inside the frame
        center = (float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
    mask = coverage(scene.shape, extent, center)
    background = np.array(PALETTE[scene.background], dtype=np.float32)
    color = np.array(PALETTE[scene.color], dtype=np.float32)
    image = background + mask[..., None] * (color - background)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def coverage(shape: str, extent: float, center: tuple[float, float]) -> np.ndarray:
    """Fraction of each pixel the shape covers, by supersampling."""
    return coverage_window(shape, extent, center, (0, IMAGE_SIZE, 0, IMAGE_SIZE))


def coverage_window(shape: str, extent: float, center: tuple[float, float], window: tuple[int, int, int, int],
                    supersample: int = SUPERSAMPLE) -> np.ndarray:
    """`coverage` over the pixels rows y0:y1, columns x0:x1 of the frame only (window = (y0, y1, x0, x1))."""
    y0, y1, x0, x1 = window
    ys = y0 + (np.arange((y1 - y0) * supersample, dtype=np.float32) + 0.5) / supersample
    xs = x0 + (np.arange((x1 - x0) * supersample, dtype=np.float32) + 0.5) / supersample
    y, x = np.meshgrid(ys, xs, indexing="ij")
    cx, cy = center
    half = extent / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # upright isosceles triangle filling its extent x extent box
        top, bottom = cy - half, cy + half
        rel = (y - top) / extent  # 0 at the apex, 1 at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= rel * half)
    return inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))


def render_dataset(scenes: list[Scene], count: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`count` images of scenes drawn uniformly from `scenes`: (N x 64 x 64 x 3 uint8, their scenes)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scenes), size=count)
    chosen = [scenes[i] for i in picks]
    images = np.stack([render(scene, rng) for scene in chosen])
    return images, chosen
