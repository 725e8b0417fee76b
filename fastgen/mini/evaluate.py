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
    """The fixed prompt set: the first `count` of a fixed shuffle of each split (held-out has 34 at most)."""
    if count < 2:
        raise ValueError(f"`prompts` must be at least 2 (the distance needs a spread), got {count}")
    seen, held_out = split_scenes()
    rng = np.random.default_rng(_PROMPT_ORDER_SEED)
    seen = [seen[i] for i in rng.permutation(len(seen))][:count]
    held_out = [held_out[i] for i in rng.permutation(len(held_out))][:count]
    return {"seen": seen, "held-out": held_out}


def reference_features(scenes: list[Scene]) -> np.ndarray:
    """Analyzer features of renders of `scenes` (fixed draws), the distance's reference set."""
    return _reference_features(tuple(scenes))


@functools.lru_cache(maxsize=8)  # a report scores every method and step count against the same two prompt sets
def _reference_features(scenes: tuple[Scene, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    features = np.stack([analyze(render(scene, rng)).features for scene in scenes for _ in range(_REFERENCE_RENDERS)])
    features.flags.writeable = False  # shared between callers
    return features


def score_images(images: list[np.ndarray], scenes: list[Scene]) -> tuple[dict[str, float], float]:
    """(accuracy per attribute and "all", Fréchet distance to renders of the same prompts)."""
    readings = [analyze(image) for image in images]
    hits = np.array([[r.matches(s)[a] for a in ATTRIBUTES] for r, s in zip(readings, scenes)], dtype=float)
    accuracy = {a: float(hits[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}
    accuracy["all"] = float(hits.all(axis=1).mean())
    distance = frechet_distance(np.stack([r.features for r in readings]), reference_features(scenes))
    return accuracy, distance


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
    lines = [f"{method} at {steps} step{'s' if steps != 1 else ''}, guidance {guidance:g}",
             f"{'split':<9} {'prompts':>7} " + " ".join(f"{a:>10}" for a in (*ATTRIBUTES, "all")) +
             f" {'distance':>9} {'s/image':>8}"]
    for s in scores:
        lines.append(f"{s.split:<9} {s.prompts:>7} " + " ".join(f"{s.accuracy[a]:>10.3f}" for a in (*ATTRIBUTES, "all"))
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
