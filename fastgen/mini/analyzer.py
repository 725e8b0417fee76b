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

from .world import COLORS, PALETTE, SHAPES, SUPERSAMPLE, Scene, coverage_window

ATTRIBUTES = ("background", "color", "shape", "size")
_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
_MIN_DISTANCE = 60.0  # RGB distance from the background that counts as "shape"; palette pairs are >= 100 apart
_SMALL_LARGE_SPLIT = 26.0  # px: small shapes span 14-22, large 30-44
_N_FEATURES = 13
_MIN_AREA = 20  # px: a smaller region is a speck, not a shape
# The strict reading's bars, set on rendered images (every render passes them; tests/test_mini_world.py) and on
# the hand-checked generated images in tests/data/mini_checked/ (each kind of failure falls short of one).
STRICT_FIT = 0.83  # IoU with the best-fitting ideal outline (renders: 0.97 and up)
STRICT_SOLIDITY = 0.965  # a square's area over its convex hull's (renders: 1.0)
STRICT_PINCH = 0.065  # a square's width across its middle against near its ends, as a share (renders: 0.0)
STRICT_ROUNDNESS = {"large": 0.035, "small": 0.065}  # a circle's outline spread (renders: <= 0.019 / 0.045)
STRICT_CONTRAST = 0.70  # the core's distance from the background, as a share of the palette pair's
_CANDIDATE_DISTANCE = 25.0  # the strict reading's first look: under half the closest palette pair (66, orange-yellow)


@dataclass(frozen=True)
class Strict:
    """The strict reading: an outline a person would call the shape, in a colour that stands out as it should.

    The outline is where the image is half-way between the background and the shape's palette colour (the
    rendered edge, whatever the pair's contrast). `fit` is its IoU with the best-fitting ideal outline of each
    shape (placed and sized from the region's moments, then refined), `solidity` its area over its convex
    hull's (a square with pinched sides, a lumpy circle fall short), `contrast` how far the shape's core is
    from the background as a share of how far the two palette colours are (a faint shape falls short), `pinch`
    how much narrower the region is across its middle than near its ends (a square's sides caving in), and
    `roundness` the spread of its outline's distance from its centre over the mean (a lumpy or squarish circle).
    A shape counts only when its fit and, for a square or a circle, its outline measures clear the bars."""

    color: str | None
    shape: str | None
    size: str | None
    fit: float
    solidity: float
    contrast: float
    pinch: float = 0.0
    roundness: float = 0.0


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None
    shape: str | None
    size: str | None
    features: np.ndarray  # fixed-length vector for distribution distances
    strict: Strict | None = None

    def matches(self, scene: Scene, strict: bool = False) -> dict[str, bool]:
        if strict:
            got = self.strict
            return {name: (self.background if name == "background" else getattr(got, name, None))
                    == getattr(scene, name) for name in ATTRIBUTES}
        return {name: getattr(self, name) == getattr(scene, name) for name in ATTRIBUTES}


def nearest_color(rgb: np.ndarray) -> str:
    return COLORS[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def analyze(image: np.ndarray, strict: bool = True) -> Reading:
    """The image's reading; `strict=False` leaves out the strict reading (the lenient one and the features only)."""
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
    strictly = _strict(image, distance, background, background_rgb) if strict else None
    features = np.zeros(_N_FEATURES, dtype=np.float32)
    features[:3] = background_rgb / 255
    mask = _largest_region(distance > _MIN_DISTANCE)
    if mask is None:
        return Reading(background, None, None, None, features, strictly)
    area = float(mask.sum())

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
    return Reading(background, color, shape, size, features, strictly)


def _largest_region(pixels: np.ndarray) -> np.ndarray | None:
    """The largest connected region of `pixels` (a boolean image), or None when it is a speck, not a shape."""
    labels, count = ndimage.label(pixels)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(np.ones(pixels.shape), labels, index=np.arange(1, count + 1))
    region = labels == (1 + int(np.argmax(sizes)))
    return region if region.sum() >= _MIN_AREA else None


def _template_iou(shape: str, extent: float, center: tuple[float, float], window, region: np.ndarray,
                  supersample: int = SUPERSAMPLE) -> float:
    """IoU of the ideal `shape` (coverage over half) with `region`, both over the frame's `window`."""
    template = coverage_window(shape, extent, center, window, supersample) > 0.5
    return (template & region).sum() / max(1, (template | region).sum())


def _closest_shape(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, extent: float) -> str:
    """The shape whose ideal outline, drawn over the region's bounding box, overlaps it best (IoU)."""
    center = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
    reach = int(np.ceil(extent / 2)) + 2  # every template lies within its extent around the centre
    window = (max(0, int(center[1]) - reach), min(mask.shape[0], int(center[1]) + reach + 1),
              max(0, int(center[0]) - reach), min(mask.shape[1], int(center[0]) + reach + 1))
    region = mask[window[0]:window[1], window[2]:window[3]]  # the whole region: the window holds its box
    return max(SHAPES, key=lambda shape: _template_iou(shape, extent, center, window, region))


def _strict(image: np.ndarray, distance: np.ndarray, background: str, background_rgb: np.ndarray) -> Strict:
    """The strict reading, on its own: a candidate region found at a low threshold (below half of any palette
    pair's distance), its core's colour, then the outline at half the distance of that colour's pair."""
    nothing = Strict(None, None, None, 0.0, 0.0, 0.0)
    candidate = _largest_region(distance > _CANDIDATE_DISTANCE)
    if candidate is None:
        return nothing
    core = candidate & (distance >= np.percentile(distance[candidate], 60))
    shape_rgb = np.median(image[core], axis=0)
    color = nearest_color(shape_rgb)
    if color == background:  # the core reads as the background's own colour: nothing stands out
        return nothing
    pair = float(np.linalg.norm(np.subtract(PALETTE[color], PALETTE[background], dtype=np.float32)))
    contrast = float(np.linalg.norm(shape_rgb - background_rgb)) / pair
    mask = _largest_region(distance > 0.5 * pair)
    if mask is None:
        return Strict(None, None, None, 0.0, 0.0, round(contrast, 3))
    fits = {shape: _fit(mask, shape) for shape in SHAPES}
    shape = max(fits, key=lambda k: fits[k][0])
    fit, extent = fits[shape]
    size = "large" if extent >= _SMALL_LARGE_SPLIT else "small"
    solidity, pinch, roundness = _solidity(mask), _pinch(mask), _radial_spread(mask)
    good = fit >= STRICT_FIT
    if shape == "square":  # straight sides: nothing caved in, as wide across the middle as near the corners
        good = good and solidity >= STRICT_SOLIDITY and pinch <= STRICT_PINCH
    elif shape == "circle":  # round: the outline's distance from the centre hardly varies
        good = good and roundness <= STRICT_ROUNDNESS[size]
    return Strict(color if contrast >= STRICT_CONTRAST else None, shape if good else None, size, round(fit, 3),
                  round(solidity, 3), round(contrast, 3), round(pinch, 3), round(roundness, 3))


def _fit(mask: np.ndarray, shape: str) -> tuple[float, float]:
    """(IoU, extent) of the ideal `shape` that best overlaps `mask`: first sized to the region's area and placed on
    its centroid (for the triangle, the centroid sits a sixth of the extent below the box's centre), then nudged
    by a pixel and 5% of the size either way while that improves the IoU."""
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    extent = {"circle": 2 * np.sqrt(area / np.pi), "square": np.sqrt(area), "triangle": np.sqrt(2 * area)}[shape]
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    if shape == "triangle":
        cy -= extent / 6

    margin = int(np.ceil(0.3 * extent)) + 2  # room for the template as the search grows it
    window = (max(0, ys.min() - margin), min(mask.shape[0], ys.max() + 1 + margin),
              max(0, xs.min() - margin), min(mask.shape[1], xs.max() + 1 + margin))
    region = mask[window[0]:window[1], window[2]:window[3]]  # all of the region: the window holds its box

    def iou(e, x, y):
        return _template_iou(shape, e, (x, y), window, region, supersample=2)  # 2x2 is enough for a fit

    best = iou(extent, cx, cy)
    for _ in range(4):  # a few rounds of local search: each step moves one parameter
        moves = [(extent * f, cx, cy) for f in (0.95, 1.05)] + [(extent, cx + d, cy) for d in (-1, 1)] + \
                [(extent, cx, cy + d) for d in (-1, 1)]
        scored = [(iou(*m), m) for m in moves]
        top, move = max(scored, key=lambda t: t[0])
        if top <= best:
            break
        best, (extent, cx, cy) = top, move
    return float(best), float(extent)


def _solidity(mask: np.ndarray) -> float:
    """The region's pixels over the pixels of its convex hull (the hull of the pixel centres, filled): 1 for any
    digitally convex region, less where its outline caves in."""
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], axis=1).astype(np.float64)
    try:
        hull = ConvexHull(points)
    except QhullError:  # all on one line: a region with no inside
        return 0.0
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64)
    inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(axis=1)
    return float(mask.sum() / inside.sum())


def _pinch(mask: np.ndarray) -> float:
    """How much the region narrows across its middle 60%, rows and columns, as a share of its widest there:
    0 for an upright square, about 0.2 for a circle, more where a square's sides cave in."""
    def along(m):
        rows = np.nonzero(m.any(axis=1))[0]
        n = len(rows)
        widths = m[rows[int(n * 0.2):int(np.ceil(n * 0.8))]].sum(axis=1)
        return float((widths.max() - widths.min()) / widths.max()) if widths.size else 1.0
    return max(along(mask), along(mask.T))


def _radial_spread(mask: np.ndarray) -> float:
    """The spread (standard deviation over mean) of the outline pixels' distances from the region's centroid."""
    ys, xs = np.nonzero(mask)
    ey, ex = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    r = np.hypot(ey - ys.mean(), ex - xs.mean())
    return float(r.std() / r.mean()) if r.size and r.mean() > 0 else 1.0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = 1e-6 * np.eye(a.shape[1])  # keeps sqrtm stable when a feature is constant
    covmean, _ = linalg.sqrtm((cov_a + eps) @ (cov_b + eps), disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
