"""Score a mini-family method against its prompts, on seen and held-out combinations.

    python -m fastgen evaluate --family mini --method turbo --steps 1 --prompts 32

Each image comes from the engine exactly as the demo makes it (seed S + i for the i-th prompt, S = --seed,
default 0). The analyzer
reads it back; a prompt counts as correct when all four attributes match. The distance is a Fréchet
distance between the analyzer's features of the generated images and of rendered images of the same
prompts (lower is closer to the real world).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from .analyzer import ATTRIBUTES, analyze, frechet_distance
from .world import Scene, render, split_scenes

_PROMPT_ORDER_SEED = 7  # fixed: the evaluation's prompt set never changes between runs
_REFERENCE_RENDERS = 4  # rendered images per prompt for the distance's reference set


@dataclass(frozen=True)
class SplitScore:
    split: str  # "seen" or "held-out"
    prompts: int
    accuracy: dict[str, float]  # per attribute, and "all"
    distance: float
    seconds_per_image: float


def evaluation_scenes(count: int) -> dict[str, list[Scene]]:
    """The fixed prompt set: the first `count` of a fixed shuffle of each split. Past a split's size (held-out
    has 34 combinations) the shuffle repeats, so a combination comes back with another seed (prompt i is drawn
    with seed S + i): 68 prompts score every held-out combination twice."""
    if count < 2:
        raise ValueError(f"`prompts` must be at least 2 (the distance needs a spread), got {count}")
    rng = np.random.default_rng(_PROMPT_ORDER_SEED)
    sets = {}
    for split, scenes in zip(("seen", "held-out"), split_scenes()):
        order = [scenes[i] for i in rng.permutation(len(scenes))]
        sets[split] = [order[i % len(order)] for i in range(count)]
    return sets


def reference_features(scenes: list[Scene]) -> np.ndarray:
    """Analyzer features of renders of `scenes` (fixed draws), the distance's reference set."""
    return _reference_features(tuple(scenes))


@functools.lru_cache(maxsize=8)  # a report scores every method and step count against the same two prompt sets
def _reference_features(scenes: tuple[Scene, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    features = np.stack([analyze(render(scene, rng), strict=False).features for scene in scenes
                         for _ in range(_REFERENCE_RENDERS)])
    features.flags.writeable = False  # shared between callers
    return features


def score_images(images: list[np.ndarray], scenes: list[Scene], distance: bool = True
                 ) -> tuple[dict[str, float], float | None]:
    """(accuracy per attribute and "all" in the lenient reading, the same as "strict_<attribute>" and "strict"
    in the strict one, Fréchet distance to renders of the same prompts, or None with `distance=False`)."""
    readings = [analyze(image) for image in images]
    accuracy = {}
    for prefix, strict in (("", False), ("strict_", True)):
        hits = np.array([[r.matches(s, strict)[a] for a in ATTRIBUTES] for r, s in zip(readings, scenes)], float)
        accuracy.update({prefix + a: float(hits[:, i].mean()) for i, a in enumerate(ATTRIBUTES)})
        accuracy["strict" if strict else "all"] = float(hits.all(axis=1).mean())
    if not distance:
        return accuracy, None
    return accuracy, frechet_distance(np.stack([r.features for r in readings]), reference_features(scenes))


def evaluate(engine, method: str, steps: int | None = None, guidance: float | None = None, prompts: int = 32,
             family: str = "mini", seed: int = 0) -> list[SplitScore]:
    """Generate every prompt of the fixed set with `method` (prompt i with seed `seed + i`) and score each split."""
    scores = []
    for split, scenes in evaluation_scenes(prompts).items():
        images, seconds = [], 0.0
        for i, scene in enumerate(scenes):
            result = engine.run(family, method, scene.prompt, seed=seed + i, steps=steps, guidance=guidance)
            images.append(np.asarray(result.image.convert("RGB")))
            seconds += result.seconds
        accuracy, distance = score_images(images, scenes)
        scores.append(SplitScore(split, len(scenes), accuracy, distance, seconds / len(scenes)))
    return scores


def format_scores(method: str, steps: int, guidance: float, scores: list[SplitScore]) -> str:
    columns = (*ATTRIBUTES, "all", "strict_shape", "strict")
    lines = [f"{method} at {steps} step{'s' if steps != 1 else ''}, guidance {guidance:g} "
             "(all: every attribute, lenient reading; strict: every attribute, strict reading)",
             f"{'split':<9} {'prompts':>7} " + " ".join(f"{a:>12}" for a in columns) +
             f" {'distance':>9} {'s/image':>8}"]
    for s in scores:
        lines.append(f"{s.split:<9} {s.prompts:>7} " + " ".join(f"{s.accuracy[a]:>12.3f}" for a in columns)
                     + f" {s.distance:>9.4f} {s.seconds_per_image:>8.3f}")
    return "\n".join(lines)


def main(args) -> int:
    """`python -m fastgen evaluate`: print the scores of one method at one setting."""
    from fastgen.engine import Engine
    from fastgen.registry import get_family

    if args.family != "mini":
        raise ValueError(f"`family` must be 'mini' (only its world has an analyzer), got {args.family!r}")
    spec = get_family("mini").method(args.method or "baseline")
    steps = spec.steps if args.steps is None else args.steps
    guidance = spec.guidance if args.guidance is None else args.guidance
    prompts = 32 if args.prompts is None else args.prompts
    start = time.perf_counter()
    scores = evaluate(Engine(device="cpu"), spec.name, steps, guidance, prompts, seed=args.seed)
    print(format_scores(spec.name, steps, guidance, scores))
    print(f"({time.perf_counter() - start:.1f} s in all)")
    return 0


# --- refining a draft: the workflow's claim, measured --------------------------------------------------------

def refine_steps(spec, strength: float) -> int:
    """The method's refine step count, raised to the fewest that run at least one step at `strength`."""
    recipe = spec.refine_recipe("img2img")
    return next((n for n in spec.allowed_steps if n >= recipe.steps and recipe.denoising_steps(n, strength) >= 1),
                spec.max_steps)


def evaluate_refine(engine, draft: str, draft_steps: int, refiner: str, strength: float, prompts: int = 32,
                    family: str = "mini", seed: int = 0) -> list[SplitScore]:
    """Draft every prompt of the fixed set with `draft` at `draft_steps`, refine it (image-to-image, same prompt
    and seed) with `refiner` at `strength`, and score the refined images; seconds per image are draft + refine."""
    from fastgen.registry import get_family

    steps = refine_steps(get_family(family).method(refiner), strength)
    scores = []
    for split, scenes in evaluation_scenes(prompts).items():
        images, seconds = [], 0.0
        for i, scene in enumerate(scenes):
            first = engine.run(family, draft, scene.prompt, seed=seed + i, steps=draft_steps)
            refined = engine.refine(family, refiner, first.image, scene.prompt, seed=seed + i, strength=strength,
                                    steps=steps)
            images.append(np.asarray(refined.image.convert("RGB")))
            seconds += first.seconds + refined.seconds
        accuracy, distance = score_images(images, scenes)
        scores.append(SplitScore(split, len(scenes), accuracy, distance, seconds / len(scenes)))
    return scores


def vae_round_trip(vae, count: int = 300, seed: int = 5) -> dict:
    """Renders of random scenes through the VAE and back (the latent's mean, decoded): how the two readings score
    the reconstructions, and the mean absolute error (0-255) over all pixels and over the shapes' edges (pixels
    a render anti-aliases, and their neighbours). The ceiling on what any model decoding through this VAE can
    draw: a shape the VAE itself softens cannot come out crisp."""
    import torch
    from scipy import ndimage

    from .world import all_scenes, render_dataset

    images, scenes = render_dataset(all_scenes(), count, seed)
    decoded = []
    with torch.no_grad():
        for start in range(0, count, 50):
            batch = torch.from_numpy(images[start:start + 50]).permute(0, 3, 1, 2).float() / 127.5 - 1
            batch = batch.to(vae.device, vae.dtype)
            out = vae.decode(vae.encode(batch).latent_dist.mean).sample
            decoded.append(((out.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    decoded = np.concatenate(decoded)
    accuracy, _ = score_images(list(decoded), scenes, distance=False)
    error = np.abs(decoded.astype(np.float32) - images.astype(np.float32)).mean(axis=-1)
    edges = np.stack([ndimage.binary_dilation(ndimage.morphological_gradient(img.sum(-1), size=2) > 0)
                      for img in images.astype(np.int32)])
    return {"images": count, "accuracy": accuracy, "error_all": float(error.mean()),
            "error_edges": float(error[edges].mean()), "error_flat": float(error[~edges].mean())}


def shape_mask(image: np.ndarray, grow: int = 2):
    """White where the drawn shape is (pixels clearly off the background colour), grown by `grow` pixels to take
    in its soft edge: the mask a user paints over the shape."""
    from PIL import Image

    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]).astype(np.float32)
    distance = np.linalg.norm(image.astype(np.float32) - np.median(border, axis=0), axis=-1)
    mask = distance > 40
    if grow:
        from scipy import ndimage

        mask = ndimage.binary_dilation(mask, iterations=grow)
    return Image.fromarray(mask.astype(np.uint8) * 255)


def recolour(scene: Scene) -> Scene:
    """The same scene with the shape in another colour (neither its own nor the background's)."""
    from .world import COLORS

    options = [c for c in COLORS if c not in (scene.color, scene.background)]
    new = options[(COLORS.index(scene.color) * 3 + COLORS.index(scene.background)) % len(options)]
    return Scene(scene.size, new, scene.shape, scene.background)


def evaluate_inpaint(engine, draft: str, draft_steps: int, refiner: str, prompts: int = 32, family: str = "mini",
                     seed: int = 0, strength: float | None = None) -> dict:
    """Draft each prompt, mask its shape, inpaint with the prompt recoloured: the share whose new colour (and all
    attributes) read correctly with "keep outside the mask" on, and how far the outside moved with it off
    (mean and max of the per-image mean / max absolute difference, 0-255)."""
    rows = {"prompts": 0, "color": 0.0, "all": 0.0, "outside_mean": [], "outside_max": [], "kept_max": [],
            "seconds": 0.0}
    for split, scenes in evaluation_scenes(prompts).items():
        for i, scene in enumerate(scenes):
            first = engine.run(family, draft, scene.prompt, seed=seed + i, steps=draft_steps)
            pixels = np.asarray(first.image.convert("RGB"))
            mask, target = shape_mask(pixels), recolour(scene)
            kept = engine.refine(family, refiner, first.image, target.prompt, mask=mask, seed=seed + i,
                                 strength=strength, keep_outside=True)
            loose = engine.refine(family, refiner, first.image, target.prompt, mask=mask, seed=seed + i,
                                  strength=strength)
            reading = analyze(np.asarray(kept.image))
            hits = reading.matches(target)
            rows["prompts"] += 1
            rows["color"] += hits["color"]
            rows["all"] += all(hits.values())
            rows["outside_mean"].append(loose.outside_change["mean"])
            rows["outside_max"].append(loose.outside_change["max"])
            rows["kept_max"].append(kept.outside_change["max"])
            rows["seconds"] += first.seconds + kept.seconds
    n = rows["prompts"]
    return {"prompts": n, "color": rows["color"] / n, "all": rows["all"] / n,
            "outside_mean": float(np.mean(rows["outside_mean"])), "outside_max": int(np.max(rows["outside_max"])),
            "kept_max": int(np.max(rows["kept_max"])), "seconds_per_image": rows["seconds"] / n}
