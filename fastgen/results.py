"""What a run returns: one `MethodResult` per panel (a `MethodFailure` for a panel that failed), gathered in a
`Comparison` (results.json and the grid)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


@dataclass
class MethodResult:
    method: str
    label: str
    image: Image.Image
    steps: int
    guidance: float
    cfg: bool  # classifier-free guidance on: two UNet passes per step
    scheduler: str  # class name
    timestep_spacing: str | None
    width: int
    height: int
    seconds: float  # generation alone: text encoding + denoising + decoding
    load_seconds: float  # loading (and on CUDA, the first-run warm-up) before it, 0.0 when all was cached
    timings: dict[str, float]  # text_encoding, denoising, decoding
    steps_per_second: float
    warnings: list[str] = field(default_factory=list)
    code: str = ""  # a runnable diffusers snippet that reproduces the image
    licence: str | None = None
    denoising_steps: int | None = None  # the steps that ran (a refine runs fewer than `steps` on most pipelines)
    mode: str = "text2img"  # or "img2img", "inpaint"
    strength: float | None = None  # a refine's: the share of the schedule redone
    outside_change: dict | None = None  # inpainting: {"mean", "max"} change outside the mask (0-255), "kept"
    loras: list[dict] = field(default_factory=list)  # style LoRAs applied: {"repo", "weight_name", "scale"}

    def to_dict(self, image: str | None = None) -> dict:
        """JSON-safe fields; `image` is the file name the image was saved under (default `<method>.png`). The
        refine fields (strength, outside_change) appear on refine results only, `loras` when some were applied."""
        data = {k: v for k, v in asdict(self).items() if k != "image"}
        if self.mode == "text2img":
            del data["strength"], data["outside_change"]
        if not self.loras:
            del data["loras"]
        data["image"] = image or f"{self.method}.png"
        return data


@dataclass
class MethodFailure:
    """A panel that did not finish: the others ran. `kind`: missing-weights, load-failed, out-of-memory, error."""

    method: str
    label: str
    kind: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    family: str
    prompt: str
    negative_prompt: str
    seed: int
    device: str
    dtype: str
    results: list[MethodResult]
    cache: list[dict]  # ComponentCache.report() rows for the components these methods used
    failures: list[MethodFailure] = field(default_factory=list)  # panels that failed; `results` holds the rest
    reference: str | None = "baseline"  # the family's reference method: speed-ups are measured against it
    strength: float | None = None  # a refine's strength for every method (None: each method's default)
    source: Image.Image | None = None  # a refine's source image, and its mask for inpainting
    mask: Image.Image | None = None

    @property
    def mode(self) -> str:
        """"text2img"; for a refine "img2img", or "inpaint" when it had a mask."""
        return "text2img" if self.source is None else "img2img" if self.mask is None else "inpaint"

    def result(self, method: str) -> MethodResult:
        for result in self.results:
            if result.method == method:
                return result
        raise ValueError(f"`method` must be one of {[r.method for r in self.results]}, got {method!r}")

    def speedup(self, method: str) -> float | None:
        """How many times faster than the reference `method` generated (None without a reference run)."""
        if not any(r.method == self.reference for r in self.results):
            return None
        return self.result(self.reference).seconds / max(self.result(method).seconds, 1e-9)

    def to_dict(self) -> dict:
        """The results.json shape: family, prompt, seed, device, dtype, results, cache.components."""
        results = []
        for r in self.results:
            row = r.to_dict()
            row["speedup"] = self.speedup(r.method)
            results.append(row)
        return {
            "family": self.family, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "seed": self.seed, "device": self.device, "dtype": self.dtype, "results": results,
            "cache": {"components": self.cache}, "failures": [f.to_dict() for f in self.failures],
            "reference": self.reference,
            **({"mode": self.mode, "strength": self.strength, "source_sha256": image_digest(self.source)}
               if self.source is not None else {}),
        }

    def save(self, directory, stem: str | None = None, images: bool = True) -> tuple[Path, Path]:
        """The one way a comparison is written: `<method>.png` per panel (when `images`), the captioned grid
        (`grid.png`, with results.json in its `fastgen` text chunk) and `results.json`; with `stem`, the grid
        and JSON are `<stem>.png` / `<stem>.json` (the page's per-run downloads). Returns (grid, json) paths;
        the grid path is None when no panel finished."""
        from PIL.PngImagePlugin import PngInfo

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if images:
            for result in self.results:
                result.image.save(directory / f"{result.method}.png")
            if self.source is not None:  # what the refine snippets load
                self.source.save(directory / "source.png")
                if self.mask is not None:
                    self.mask.save(directory / "mask.png")
        grid_path = directory / f"{stem or 'grid'}.png"
        if self.results:
            info = PngInfo()
            info.add_text("fastgen", json.dumps(data))
            info.add_text("prompt", self.prompt)
            self.grid().save(grid_path, pnginfo=info)
        json_path = directory / f"{stem or 'results'}.json"
        json_path.write_text(json.dumps(data, indent=2))
        return (grid_path if self.results else None), json_path

    def grid(self) -> Image.Image:
        """The panels side by side, each captioned with its label, steps, guidance and time; a refine's source (and
        mask) come first."""
        font = ImageFont.load_default()
        line = 14
        tiles = []
        if self.source is not None:
            tiles.append((self.source, ["Source", f"{self.source.width}x{self.source.height}", ""]))
            if self.mask is not None:
                tiles.append((self.mask, ["Mask", "white: repainted", ""]))
        for r in self.results:
            ran = f" ({r.denoising_steps} run)" if r.mode != "text2img" and r.denoising_steps != r.steps else ""
            tiles.append((r.image, [
                r.label, f"{r.steps} step{'s' * (r.steps != 1)}{ran}, guidance {r.guidance:g}", f"{r.seconds:.2f} s" +
                (f" ({self.speedup(r.method):.1f}x)" if self.speedup(r.method) and r.method != self.reference else "")]))
        widths = [max(image.width, 8 + max(int(font.getlength(t)) for t in caption)) for image, caption in tiles]
        height = max(image.height for image, _ in tiles) + line * 3 + 8
        grid = Image.new("RGB", (sum(widths) + 4 * (len(widths) + 1), height), "white")
        draw = ImageDraw.Draw(grid)
        x = 4
        for (image, caption), width in zip(tiles, widths):
            grid.paste(image.convert("RGB"), (x + (width - image.width) // 2, 0))
            for i, text in enumerate(caption):
                draw.text((x + 4, image.height + 4 + i * line), text, fill="black", font=font)
            x += width + 4
        return grid


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels (8-bit, row by row) with its size: the same for any file format."""
    import numpy as np

    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    return hashlib.sha256(f"{image.width}x{image.height}:".encode() + pixels.tobytes()).hexdigest()
