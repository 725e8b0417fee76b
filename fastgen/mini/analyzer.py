"""Read a mini-world image back into its attributes, and measure distances between image sets.

    from fastgen.mini.analyzer import analyze
    reading = analyze(image)            # image: 64x64x3 uint8
    reading.scene_words                 # {"size": "large", "color": "red", ...}

The analyzer is deliberately simple and interpretable: the background is the colour of the frame's
border, the shape is the largest region that differs clearly from it, its size follows from its
extent, and its shape is whichever ideal outline (circle, square, upright triangle) drawn over the
same bounding box overlaps it best.
Its readings on rendered images are checked in the tests (>= 99% per attribute).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from .world import COLORS, PALETTE, SHAPES, Scene, coverage

ATTRIBUTES = ("background", "color", "shape", "size")
_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
_MIN_DISTANCE = 60.0  # RGB distance from the background that counts as "shape"; palette pairs are >= 100 apart
_SMALL_LARGE_SPLIT = 26.0  # px: small shapes span 14-22, large 30-44
_N_FEATURES = 13


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None
    shape: str | None
    size: str | None
    features: np.ndarray  # fixed-length vector for distribution distances

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {name: getattr(self, name) == getattr(scene, name) for name in ATTRIBUTES}


def nearest_color(rgb: np.ndarray) -> str:
    return COLORS[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def analyze(image: np.ndarray) -> Reading:
    image = np.asarray(image, dtype=np.float32)
    if image.shape[-1] != 3 or image.ndim != 3:
        raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
    # 1. Background: the frame's border, which the shape rarely touches.
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)

    # 2. Shape pixels: the largest connected region that stands out from the background.
    distance = np.linalg.norm(image - background_rgb, axis=-1)
    labels, count = ndimage.label(distance > _MIN_DISTANCE)
    features = np.zeros(_N_FEATURES, dtype=np.float32)
    features[:3] = background_rgb / 255
    if count == 0:
        return Reading(background, None, None, None, features)
    sizes = ndimage.sum_labels(np.ones_like(distance), labels, index=np.arange(1, count + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    area = float(mask.sum())
    if area < 20:  # a speck, not a shape
        return Reading(background, None, None, None, features)

    # 3. Shape colour: the median of the region's core, away from anti-aliased edges.
    core = mask & (distance > 0.6 * distance[mask].max())
    shape_rgb = np.median(image[core], axis=0)
    color = nearest_color(shape_rgb)

    # 4. Geometry: extent, fill of the bounding box, and the share of mass in the top half.
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    extent = float(max(height, width))
    fill = area / float(height * width)
    middle = (ys.min() + ys.max()) / 2
    top_share = float((ys < middle).sum()) / area
    shape = _closest_shape(mask, ys, xs, extent)
    size = "large" if extent >= _SMALL_LARGE_SPLIT else "small"

    edge = mask & (distance < 0.6 * distance[mask].max())
    features[3:6] = shape_rgb / 255
    features[6:13] = (extent / 64, fill, top_share, xs.mean() / 64, ys.mean() / 64,
                      float(distance[mask].mean()) / 255, float(edge.sum()) / area)
    return Reading(background, color, shape, size, features)


def _closest_shape(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, extent: float) -> str:
    """The shape whose ideal outline, drawn over the region's bounding box, overlaps it best (IoU)."""
    center = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = coverage(shape, extent, center) > 0.5
        iou = (template & mask).sum() / max(1, (template | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(a.shape[1])  # keeps sqrtm stable when a feature is constant
    covmean, _ = linalg.sqrtm((cov_a + eps) @ (cov_b + eps), disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
