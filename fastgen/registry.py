"""Families x methods as data: one frozen `MethodSpec` per row of the recipes table.

    from fastgen.registry import get_family
    get_family("sdxl").method("lcm").steps  # 4

Adding a method is adding a row. Rows are validated when they are created, so a typo in a recipe fails at
import rather than half-way through a generation. This module imports no torch and no diffusers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastgen import synthetic
from fastgen.mini import WEIGHTS as MINI_WEIGHTS

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]*")  # method names travel in URLs, file names and the API
# Scheduler choices as strings; "default" keeps the class the repo's scheduler_config.json names.
SCHEDULERS = {
    "default": None,
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}
GUIDANCE_MODES = ("cfg", "embedding", "none")
PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionPipeline", "LatentConsistencyModelPipeline")
REFINE_MODES = ("img2img", "inpaint")
# The refine pipeline of each text-to-image pipeline and mode, as diffusers' AutoPipelineForImage2Image /
# AutoPipelineForInpainting map them (0.42); None: diffusers has none, and the method says so.
REFINE_PIPELINES = {
    "StableDiffusionXLPipeline": {"img2img": "StableDiffusionXLImg2ImgPipeline",
                                  "inpaint": "StableDiffusionXLInpaintPipeline"},
    "StableDiffusionPipeline": {"img2img": "StableDiffusionImg2ImgPipeline",
                                "inpaint": "StableDiffusionInpaintPipeline"},
    "LatentConsistencyModelPipeline": {"img2img": "LatentConsistencyModelImg2ImgPipeline", "inpaint": None},
}
# Pipelines that spread N steps over the shortened range (LCM's own img2img: diffusers #7651); the others cut the
# schedule and run int(steps * strength) of its N steps (and fail at 0: diffusers #11092).
SPREADING_PIPELINES = ("LatentConsistencyModelImg2ImgPipeline",)
# LCMScheduler raises for more steps than its original_inference_steps (50): the slider must never get there.
LCM_MAX_STEPS = 50
TURBO_LICENCE = "Stability AI community licence: non-commercial use (a licence from Stability AI is needed otherwise)"


@dataclass(frozen=True)
class StepFile:
    """A method that ships one file per step count (SDXL-Lightning's UNets, Hyper-SD's LoRAs, DMD2's UNets): the
    step count picks the file, and with it anything else the card changes for that count."""

    steps: int
    weight_name: str  # the UNet state dict (with `unet_weight_name`) or the LoRA (with `lora_weight_name`)
    scheduler: str | None = None  # None: the method's
    scheduler_kwargs: tuple[tuple[str, object], ...] | None = None  # None: the method's
    call_kwargs: tuple[tuple[str, object], ...] | None = None  # None: the method's


@dataclass(frozen=True)
class Refine:
    """A method's defaults for refining an image (image-to-image, inpainting), from its model card where it has
    one. None: the text-to-image default."""

    strength: float = 0.5  # image-to-image: how much of the schedule is redone (1.0: all of it)
    inpaint_strength: float = 0.9  # inpainting: the masked region is mostly redrawn; near 1.0 SDXL gets noisy (#8450)
    steps: int | None = None
    guidance: float | None = None

    def __post_init__(self):
        for name in ("strength", "inpaint_strength"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must be in (0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RefineRecipe:
    """How one method refines in one mode: the pipeline class and its default strength, steps and guidance."""

    mode: str  # "img2img" or "inpaint"
    pipeline: str  # diffusers pipeline class name
    strength: float
    steps: int
    guidance: float

    @property
    def spreads_steps(self) -> bool:
        """True: the steps are spread over the shortened schedule; False: int(steps * strength) of them run."""
        return self.pipeline in SPREADING_PIPELINES

    def denoising_steps(self, steps: int, strength: float) -> int:
        """How many denoising steps a run of `steps` at `strength` takes (a multistep scheduler such as PNDM runs
        one more: results report the count that ran)."""
        return steps if self.spreads_steps else min(int(steps * strength), steps)


def as_folder(repo: str) -> str | None:
    """`repo` as an absolute path when it names a folder on disk (absolute, ./ or ~/, or an existing folder),
    None when it is a Hub id. The one rule the custom models, the LoRAs and the host's switch all follow."""
    if os.path.isabs(repo) or repo.startswith((".", "~")) or os.path.isdir(os.path.expanduser(repo)):
        return os.path.abspath(os.path.expanduser(repo))
    return None


@dataclass(frozen=True)
class StyleLora:
    """A visitor's LoRA (a style, a subject) stacked on a method: a Hub id or local folder, the weight file in
    it, and the scale it is applied at. Applied to the methods that run on the base model's own UNet (the
    reference and the adapter methods such as LCM-LoRA), each time only for that run."""

    repo: str
    weight_name: str
    scale: float = 1.0

    def __post_init__(self):
        if not self.repo or not self.weight_name:
            raise ValueError("a LoRA needs a repo (Hub id or folder) and the name of its weight file")
        object.__setattr__(self, "repo", as_folder(self.repo) or self.repo)  # ./my-loras: the folder, not a Hub id
        if not -2.0 <= self.scale <= 2.0:
            raise ValueError(f"a LoRA's scale must be in [-2, 2], got {self.scale}")

    @property
    def label(self) -> str:
        return f"{Path(self.repo).name if os.path.isabs(self.repo) else self.repo}/{self.weight_name} @ {self.scale:g}"

    def to_dict(self) -> dict:
        return {"repo": self.repo, "weight_name": self.weight_name, "scale": self.scale}


@dataclass(frozen=True)
class MethodSpec:
    """One method of one family, as its model card runs it."""

    name: str  # lower-case letters, digits and dashes: it names files, API values and page elements
    label: str  # what the UI and the grid caption show
    pipeline: str  # diffusers pipeline class name
    repo: str  # Hub id or absolute local folder of the full pipeline
    variant: str | None = None  # weight file variant ("fp16") where the repo ships one
    unet_repo: str | None = None  # a separate UNet placed into `repo`'s pipeline (LCM)
    unet_subfolder: str | None = None  # None: the UNet files sit at the root of unet_repo
    unet_variant: str | None = None
    unet_weight_name: str | None = None  # a UNet shipped as one state-dict file at unet_repo's root, loaded into
    # `repo`'s UNet config (.safetensors, or a torch pickle read with weights_only=True)
    lora_repo: str | None = None  # a LoRA loaded on the pipeline's own UNet (LCM-LoRA)
    lora_weight_name: str | None = None  # offline loading refuses to guess the file name
    lora_scale: float = 1.0  # the adapter's weight; never fused: the UNet it sits on is shared
    scheduler: str = "default"
    scheduler_kwargs: tuple[tuple[str, object], ...] = ()
    call_kwargs: tuple[tuple[str, object], ...] = ()  # extra pipeline-call arguments (DMD2's timesteps, TCD's eta)
    step_files: tuple[StepFile, ...] = ()  # one file per allowed step count; empty: any count in the range
    steps: int = 50
    min_steps: int = 1
    max_steps: int = 100
    guidance: float = 7.5
    min_guidance: float = 1.0
    max_guidance: float = 15.0
    guidance_mode: str = "cfg"  # "cfg": two UNet passes when > 1; "embedding": LCM w-embedding; "none": fixed
    native_size: int = 512
    licence: str | None = None  # a note shown wherever the method is offered
    fp16_unsafe_vae: bool = False  # the SDXL VAE overflows in fp16: it must be upcast to decode
    reference: bool = False  # the family's baseline: every speed-up is measured against it
    shown: bool = True  # a panel on the page when it opens (the others are a click away)
    refine: Refine = Refine()  # its image-to-image and inpainting defaults

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"`name` must be lower-case letters, digits and dashes, got {self.name!r}")
        if not self.label:
            raise ValueError(f"`label` must be a non-empty string, got {self.label!r}")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"`pipeline` must be one of {PIPELINES}, got {self.pipeline!r}")
        if not self.repo:
            raise ValueError(f"`repo` must be a Hub id or a local folder, got {self.repo!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {tuple(SCHEDULERS)}, got {self.scheduler!r}")
        if not all(isinstance(pair, tuple) and len(pair) == 2 for pair in self.scheduler_kwargs):
            raise ValueError(f"`scheduler_kwargs` must be a tuple of (key, value) pairs, got {self.scheduler_kwargs!r}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"`guidance_mode` must be one of {GUIDANCE_MODES}, got {self.guidance_mode!r}")
        if not 1 <= self.min_steps <= self.steps <= self.max_steps:
            raise ValueError(
                f"`steps` must satisfy 1 <= min_steps <= steps <= max_steps, "
                f"got {self.min_steps} <= {self.steps} <= {self.max_steps}"
            )
        if self.scheduler == "lcm" and self.max_steps > LCM_MAX_STEPS:
            raise ValueError(f"`max_steps` must be at most {LCM_MAX_STEPS} with the LCM scheduler, got {self.max_steps}")
        if not 0 <= self.min_guidance <= self.guidance <= self.max_guidance:
            raise ValueError(
                f"`guidance` must satisfy 0 <= min_guidance <= guidance <= max_guidance, "
                f"got {self.min_guidance} <= {self.guidance} <= {self.max_guidance}"
            )
        if self.guidance_mode == "none" and not self.min_guidance == self.guidance == self.max_guidance == 0:
            raise ValueError(f"`guidance` must be fixed at 0.0 when guidance_mode is 'none', got {self.guidance}")
        if (self.lora_repo is None) != (self.lora_weight_name is None):
            raise ValueError(
                f"`lora_weight_name` must be given exactly when `lora_repo` is, got {self.lora_repo!r} and "
                f"{self.lora_weight_name!r}"
            )
        if self.unet_subfolder is not None and self.unet_repo is None:
            raise ValueError(f"`unet_subfolder` needs `unet_repo`, got unet_subfolder={self.unet_subfolder!r}")
        if self.unet_weight_name is not None and (self.unet_repo is None or self.unet_subfolder is not None):
            raise ValueError(f"`unet_weight_name` needs `unet_repo` and no `unet_subfolder`, got {self.unet_repo!r}, "
                             f"{self.unet_subfolder!r}")
        if self.step_files:
            counts = [f.steps for f in self.step_files]
            if self.unet_weight_name is None and self.lora_weight_name is None:
                raise ValueError(f"`step_files` needs a single-file UNet or LoRA to choose, got neither for {self.name}")
            if counts != sorted(set(counts)) or counts[0] != self.min_steps or counts[-1] != self.max_steps \
                    or self.steps not in counts:
                raise ValueError(f"`step_files` must list distinct step counts in order from min_steps to max_steps "
                                 f"including the default, got {counts} for {self.name}")
            for f in self.step_files:
                if f.scheduler is not None and f.scheduler not in SCHEDULERS:
                    raise ValueError(f"`scheduler` must be one of {tuple(SCHEDULERS)}, got {f.scheduler!r}")
        if self.refine.steps is not None and self.refine.steps not in self.allowed_steps:
            raise ValueError(f"`refine.steps` must be one of the method's step counts, got {self.refine.steps}")
        if self.refine.guidance is not None and not self.min_guidance <= self.refine.guidance <= self.max_guidance:
            raise ValueError(f"`refine.guidance` must be in the method's guidance range, got {self.refine.guidance}")
        if self.native_size % 8 or not 8 <= self.native_size <= 2048:
            raise ValueError(f"`native_size` must be a multiple of 8 in [8, 2048], got {self.native_size}")

    @property
    def allowed_steps(self) -> tuple[int, ...]:
        if self.step_files:
            return tuple(f.steps for f in self.step_files)
        return tuple(range(self.min_steps, self.max_steps + 1))

    def at_steps(self, steps: int) -> MethodSpec:
        """The recipe for one step count: for a method with `step_files`, the file, scheduler and call arguments
        of that count (a plain spec with no choices left); any other method is returned as it is."""
        if not self.step_files:
            return self
        chosen = next((f for f in self.step_files if f.steps == steps), None)
        if chosen is None:
            raise ValueError(f"`steps` must be one of {self.allowed_steps} for {self.name}, got {steps!r}")
        weight = {"unet_weight_name" if self.unet_weight_name is not None else "lora_weight_name": chosen.weight_name}
        return replace(
            self, **weight, step_files=(), steps=steps, min_steps=steps, max_steps=steps,
            refine=replace(self.refine, steps=None),
            scheduler=self.scheduler if chosen.scheduler is None else chosen.scheduler,
            scheduler_kwargs=self.scheduler_kwargs if chosen.scheduler_kwargs is None else chosen.scheduler_kwargs,
            call_kwargs=self.call_kwargs if chosen.call_kwargs is None else chosen.call_kwargs,
        )

    def refine_recipe(self, mode: str) -> RefineRecipe | None:
        """This method's recipe for refining in `mode` ("img2img" or "inpaint"), or None where diffusers has no
        pipeline for it."""
        if mode not in REFINE_MODES:
            raise ValueError(f"`mode` must be one of {REFINE_MODES}, got {mode!r}")
        pipeline = REFINE_PIPELINES[self.pipeline][mode]
        if pipeline is None:
            return None
        r = self.refine
        return RefineRecipe(mode, pipeline, r.strength if mode == "img2img" else r.inpaint_strength,
                            self.steps if r.steps is None else r.steps,
                            self.guidance if r.guidance is None else r.guidance)

    @property
    def ignores_negative_prompt(self) -> bool:
        """True when no setting of this method runs classifier-free guidance, so a negative prompt has no effect."""
        return self.guidance_mode != "cfg" or self.max_guidance <= 1

    def negative_prompt_ignored(self, guidance: float) -> str | None:
        """Why a run at `guidance` ignores the negative prompt, or None when it uses it: the one wording of this
        rule, for the panel's note and the result's warning."""
        if self.guidance_mode == "embedding":
            return "guidance is an embedding, there is no unconditional pass"
        if self.ignores_negative_prompt:
            return "it samples without classifier-free guidance"
        if not self.cfg_at(guidance):
            return "classifier-free guidance is off at guidance 1 or below"
        return None

    @property
    def takes_styles(self) -> bool:
        """Whether visitors' LoRAs apply: the method runs the base model's own UNet (the reference, or an adapter
        on it). A distilled UNet (Turbo, LCM, Lightning, DMD2) was not what a style LoRA was trained on."""
        return self.unet_repo is None and self.unet_weight_name is None and not self.step_files and (
            self.reference or self.lora_repo is not None)

    def cfg_at(self, guidance: float) -> bool:
        """Whether a run at `guidance` does classifier-free guidance (diffusers: only when > 1 and no w-embedding)."""
        return self.guidance_mode == "cfg" and guidance > 1

    @property
    def repos(self) -> tuple[str, ...]:
        """Every Hub id or folder this method loads from, in load order."""
        return tuple(r for r in (self.repo, self.unet_repo, self.lora_repo) if r is not None)


@dataclass(frozen=True)
class Family:
    """A base architecture and the methods that run on it, in the order a comparison shows them."""

    name: str
    label: str
    methods: tuple[MethodSpec, ...] = field(default=())
    description: str = ""

    def __post_init__(self):
        if not self.name:
            raise ValueError(f"`name` must be a non-empty string, got {self.name!r}")
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError(f"`methods` must hold at least one method, got none for family {self.name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"`methods` must have unique names, got {names} for family {self.name!r}")
        references = [m.name for m in self.methods if m.reference]
        if len(references) > 1:
            raise ValueError(f"`methods` must mark at most one reference, got {references} for family {self.name!r}")

    @property
    def reference(self) -> str | None:
        """The method every speed-up is measured against (the 50-step baseline), or None."""
        return next((m.name for m in self.methods if m.reference), None)

    @property
    def default_methods(self) -> tuple[str, ...]:
        """What runs when a caller names no methods, and the panels the page opens with: the `shown` ones."""
        return tuple(m for m in self.panel_order if self.method(m).shown)

    @property
    def panel_order(self) -> tuple[str, ...]:
        """The methods as the page lays them out: registry order (fastest first), the reference last."""
        return tuple(m.name for m in self.methods if not m.reference) + ((self.reference,) if self.reference else ())

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    def method(self, name: str) -> MethodSpec:
        for spec in self.methods:
            if spec.name == name:
                return spec
        raise ValueError(f"`method` must be one of {self.method_names} for family {self.name!r}, got {name!r}")

    @property
    def repos(self) -> tuple[str, ...]:
        """Every Hub id or folder the family loads from, without repeats."""
        return tuple(dict.fromkeys(r for m in self.methods for r in m.repos))


# Image-to-image settings from the model cards: SDXL Turbo 2 steps at strength 0.5 (one step runs); LCM 4 steps at
# 0.5; LCM-LoRA 4 steps, guidance 1, strength 0.6; the base model at strength 0.3.
TURBO_REFINE = Refine(strength=0.5, steps=2)
LCM_REFINE = Refine(strength=0.5, steps=4)
LCM_LORA_REFINE = Refine(strength=0.6, steps=4, guidance=1.0)
BASE_REFINE = Refine(strength=0.3)

# --- SDXL ---------------------------------------------------------------------------------------------
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LCM_LORA = "latent-consistency/lcm-lora-sdxl"
_SDXL = dict(pipeline="StableDiffusionXLPipeline", variant="fp16", native_size=1024, fp16_unsafe_vae=True)
SDXL_LIGHTNING = "ByteDance/SDXL-Lightning"
SDXL_HYPER_SD = "ByteDance/Hyper-SD"
SDXL_DMD2 = "tianweiy/DMD2"
_TRAILING = (("timestep_spacing", "trailing"),)
_NO_CFG = dict(guidance=0.0, min_guidance=0.0, max_guidance=0.0, guidance_mode="none")

SDXL = Family(
    name="sdxl",
    label="Stable Diffusion XL",
    description="SDXL 1.0 base and its distilled variants (needs a GPU for sensible speed).",
    methods=(
        MethodSpec(
            name="turbo", refine=TURBO_REFINE, label="SDXL Turbo", repo="stabilityai/sdxl-turbo",
            scheduler="euler_ancestral", scheduler_kwargs=(("timestep_spacing", "trailing"),),
            steps=1, min_steps=1, max_steps=4, guidance=0.0, min_guidance=0.0, max_guidance=0.0,
            guidance_mode="none", licence=TURBO_LICENCE, **{**_SDXL, "native_size": 512},
        ),
        MethodSpec(
            name="lcm", refine=LCM_REFINE, label="LCM", repo=SDXL_BASE, unet_repo="latent-consistency/lcm-sdxl",
            unet_variant="fp16",
            scheduler="lcm", steps=4, min_steps=1, max_steps=8, guidance=8.0, min_guidance=1.0, max_guidance=15.0,
            guidance_mode="embedding", **_SDXL,
        ),
        MethodSpec(
            name="lcm-lora", refine=LCM_LORA_REFINE, label="LCM-LoRA", repo=SDXL_BASE,
            lora_repo=SDXL_LCM_LORA, lora_weight_name="pytorch_lora_weights.safetensors",
            scheduler="lcm", steps=4, min_steps=1, max_steps=8, guidance=1.0, min_guidance=1.0, max_guidance=2.0,
            **_SDXL,
        ),
        MethodSpec(
            # SDXL-Lightning (progressive adversarial distillation): one full UNet per step count, as state dicts
            name="lightning", label="SDXL-Lightning", repo=SDXL_BASE, unet_repo=SDXL_LIGHTNING,
            unet_weight_name="sdxl_lightning_4step_unet.safetensors", scheduler="euler",
            scheduler_kwargs=_TRAILING, steps=4, min_steps=1, max_steps=8, step_files=(
                # the 1-step UNet predicts the clean image (x0) itself
                StepFile(1, "sdxl_lightning_1step_unet_x0.safetensors",
                         scheduler_kwargs=(*_TRAILING, ("prediction_type", "sample"))),
                StepFile(2, "sdxl_lightning_2step_unet.safetensors"),
                StepFile(4, "sdxl_lightning_4step_unet.safetensors"),
                StepFile(8, "sdxl_lightning_8step_unet.safetensors"),
            ), shown=False, licence="openrail++", **_NO_CFG, **_SDXL,
        ),
        MethodSpec(
            # Hyper-SD (trajectory-segmented consistency distillation): a LoRA per step count on the base UNet
            name="hyper-sd", label="Hyper-SDXL", repo=SDXL_BASE, lora_repo=SDXL_HYPER_SD,
            lora_weight_name="Hyper-SDXL-4steps-lora.safetensors", scheduler="ddim", scheduler_kwargs=_TRAILING,
            steps=4, min_steps=1, max_steps=8, step_files=(
                # the 1-step LoRA samples with TCD; its eta trades detail (lower) for smoothness (higher)
                StepFile(1, "Hyper-SDXL-1step-lora.safetensors", scheduler="tcd", scheduler_kwargs=(),
                         call_kwargs=(("eta", 1.0),)),
                StepFile(2, "Hyper-SDXL-2steps-lora.safetensors"),
                StepFile(4, "Hyper-SDXL-4steps-lora.safetensors"),
                StepFile(8, "Hyper-SDXL-8steps-lora.safetensors"),
            ), shown=False, licence="see the model card (ByteDance/Hyper-SD)", **_NO_CFG, **_SDXL,
        ),
        MethodSpec(
            # DMD2 (distribution matching distillation): a UNet state dict sampled at fixed timesteps
            name="dmd2", label="DMD2", repo=SDXL_BASE, unet_repo=SDXL_DMD2,
            unet_weight_name="dmd2_sdxl_4step_unet_fp16.safetensors", scheduler="lcm",
            call_kwargs=(("timesteps", (999, 749, 499, 249)),), steps=4, min_steps=1, max_steps=4, step_files=(
                # without its timesteps DMD2 degrades silently; the 1-step UNet ships only as a torch pickle
                StepFile(1, "dmd2_sdxl_1step_unet_fp16.bin", call_kwargs=(("timesteps", (399,)),)),
                StepFile(4, "dmd2_sdxl_4step_unet_fp16.safetensors"),
            ), shown=False, licence="cc-by-nc-4.0: non-commercial use", **_NO_CFG, **_SDXL,
        ),
        MethodSpec(
            name="baseline", refine=BASE_REFINE, label="Baseline", repo=SDXL_BASE,
            steps=50, guidance=5.0, min_guidance=1.0, max_guidance=15.0, reference=True, **_SDXL,
        ),
    ),
)

# --- SD 1.5 -------------------------------------------------------------------------------------------
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml/ is gone
SD15_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"

SD15 = Family(
    name="sd15",
    label="Stable Diffusion 1.5",
    description="SD 1.5 with SD-Turbo (an SD 2.1 distillation), LCM Dreamshaper v7 and LCM-LoRA.",
    methods=(
        MethodSpec(
            # SD-Turbo is distilled from SD 2.1: it shares no weights with SD 1.5.
            name="turbo", refine=TURBO_REFINE, label="SD-Turbo", pipeline="StableDiffusionPipeline",
            repo="stabilityai/sd-turbo",
            variant="fp16", scheduler="default", scheduler_kwargs=(("timestep_spacing", "trailing"),),
            steps=1, min_steps=1, max_steps=4, guidance=0.0, min_guidance=0.0, max_guidance=0.0,
            guidance_mode="none", native_size=512, licence=TURBO_LICENCE,
        ),
        MethodSpec(
            # A full LCM pipeline (Dreamshaper v7 distilled); the repo ships fp32 files only.
            name="lcm", refine=LCM_REFINE, label="LCM", pipeline="LatentConsistencyModelPipeline",
            repo="SimianLuo/LCM_Dreamshaper_v7",
            scheduler="lcm", steps=4, min_steps=1, max_steps=8, guidance=8.0, min_guidance=1.0, max_guidance=15.0,
            guidance_mode="embedding", native_size=768,
        ),
        MethodSpec(
            name="lcm-lora", refine=LCM_LORA_REFINE, label="LCM-LoRA", pipeline="StableDiffusionPipeline",
            repo=SD15_BASE, variant="fp16",
            lora_repo=SD15_LCM_LORA, lora_weight_name="pytorch_lora_weights.safetensors",
            scheduler="lcm", steps=4, min_steps=1, max_steps=8, guidance=1.0, min_guidance=1.0, max_guidance=2.0,
            native_size=512,
        ),
        MethodSpec(
            name="baseline", refine=BASE_REFINE, label="Baseline", pipeline="StableDiffusionPipeline",
            repo=SD15_BASE,
            variant="fp16", steps=50, guidance=7.5, min_guidance=1.0, max_guidance=15.0, native_size=512,
            reference=True,
        ),
    ),
)

# --- mini: the embedded miniature family, trained in fastgen/mini; weights ship inside the package ----
_MINI = dict(pipeline="StableDiffusionPipeline", native_size=64)

MINI = Family(
    name="mini",
    label="Mini (embedded, CPU)",
    description="A 64x64 world of shapes trained for this project: runs in seconds on a CPU.",
    methods=(
        MethodSpec(
            name="turbo", refine=TURBO_REFINE, label="Turbo", repo=str(MINI_WEIGHTS / "turbo"),
            scheduler="euler_ancestral", scheduler_kwargs=(("timestep_spacing", "trailing"),),
            steps=1, min_steps=1, max_steps=4, guidance=0.0, min_guidance=0.0, max_guidance=0.0,
            guidance_mode="none", **_MINI,
        ),
        MethodSpec(
            name="lcm", refine=LCM_REFINE, label="LCM", repo=str(MINI_WEIGHTS / "base"),
            unet_repo=str(MINI_WEIGHTS / "lcm"),
            scheduler="lcm", steps=4, min_steps=1, max_steps=8, guidance=4.0, min_guidance=1.0, max_guidance=8.0,
            guidance_mode="embedding", **_MINI,
        ),
        MethodSpec(
            name="lcm-lora", refine=LCM_LORA_REFINE, label="LCM-LoRA", repo=str(MINI_WEIGHTS / "base"),
            lora_repo=str(MINI_WEIGHTS / "lcm-lora"), lora_weight_name="pytorch_lora_weights.safetensors",
            scheduler="lcm", steps=4, min_steps=1, max_steps=8, guidance=1.0, min_guidance=1.0, max_guidance=2.0,
            **_MINI,
        ),
        MethodSpec(
            name="baseline", refine=BASE_REFINE, label="Baseline", repo=str(MINI_WEIGHTS / "base"),
            steps=50, guidance=2.0, min_guidance=1.0, max_guidance=10.0, reference=True, **_MINI,
        ),
    ),
)


# --- synthetic: the real architectures with random weights (fastgen/synthetic), to measure at full scale --------
def _synthetic(real: Family, name: str, repos: dict[str, str]) -> Family:
    """`real`'s shown methods with their recipes, each repo replaced by its synthetic stand-in: the same pipelines,
    schedulers, steps and sharing, no files to read (so no fp16 variants) and no licence (no one's weights)."""
    methods = tuple(
        replace(m, repo=synthetic.repo(repos[m.repo]), variant=None, unet_variant=None, licence=None,
                unet_repo=m.unet_repo and synthetic.repo(repos[m.unet_repo]),
                lora_repo=m.lora_repo and synthetic.repo(repos[m.lora_repo]),
                lora_weight_name=m.lora_repo and "adapter_config.json")
        for m in real.methods if m.shown
    )
    return Family(name=name, label=f"Synthetic {real.label} ({synthetic.NOTE})", methods=methods,
                  description=f"{real.label}'s architectures with random weights built at load: memory, speed and "
                              "sharing are real, images are noise.")


SYNTHETIC_SDXL = _synthetic(SDXL, "synthetic-sdxl", {
    SDXL_BASE: "sdxl-base", "stabilityai/sdxl-turbo": "sdxl-turbo", "latent-consistency/lcm-sdxl": "lcm-sdxl",
    SDXL_LCM_LORA: "lcm-lora-sdxl"})
SYNTHETIC_SD15 = _synthetic(SD15, "synthetic-sd15", {
    SD15_BASE: "sd15-base", "stabilityai/sd-turbo": "sd-turbo", "SimianLuo/LCM_Dreamshaper_v7": "lcm-dreamshaper-v7",
    SD15_LCM_LORA: "lcm-lora-sdv1-5"})

FAMILIES: dict[str, Family] = {f.name: f for f in (SDXL, SD15, MINI, SYNTHETIC_SDXL, SYNTHETIC_SD15)}


def get_family(name: str | Family) -> Family:
    """The registered family called `name` (a `Family` passes through, so callers accept either)."""
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise ValueError(f"`family` must be one of {tuple(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def custom_family(base: str, arch: str = "sdxl", variant: str | None = None, name: str | None = None,
                  label: str | None = None) -> Family:
    """A family whose baseline is `base` (a Hub id or local folder of an SDXL or SD 1.5 checkpoint in diffusers
    layout), with the architecture's LCM-LoRA applied to it: LCM-LoRA as "turbo for any model".

    `arch` picks the recipe ("sdxl" or "sd15"); `variant` is the weight variant to load ("fp16") if the
    checkpoint ships one, None for plain file names.
    """
    if arch not in ("sdxl", "sd15"):
        raise ValueError(f"`arch` must be one of ('sdxl', 'sd15'), got {arch!r}")
    if not base:
        raise ValueError(f"`base` must be a Hub id or a local folder, got {base!r}")
    base = as_folder(base) or base
    template = get_family(arch)
    short = Path(base).name if os.path.isabs(base) else base
    methods = tuple(
        replace(template.method(m), repo=base, variant=variant, label=label)
        for m, label in (("lcm-lora", "LCM-LoRA"), ("baseline", "Baseline"))
    )
    return Family(
        name=name or f"{arch}:{base}",
        label=f"{label or short} ({template.label})",
        methods=methods,
        description=f"{base} with {template.method('lcm-lora').lora_repo} applied on it.",
    )


def family_available(name: str | Family) -> bool:
    """Whether the family's weights can be loaded now: present on disk or in the Hub cache, or downloadable
    (HF_HUB_OFFLINE is not set and the Hub answers). Never imports torch."""
    from fastgen import doctor  # deferred: huggingface_hub is only needed once someone asks

    return doctor.family_state(name).usable
