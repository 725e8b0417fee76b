"""The short, plain diffusers program that reproduces one panel: what a user copies out of the UI."""

from __future__ import annotations

from pathlib import Path

from fastgen.registry import SCHEDULERS, MethodSpec


class _Raw(str):
    """Emitted as written (an expression), not as a string literal."""


def _repo(repo: str, imports: set[str]) -> str:
    """A repo as the user's code names it: a Hub id, or for the packaged mini weights `weights("<name>")`, which
    finds them wherever fastgen is installed (a server's own paths neither run elsewhere nor belong in a page)."""
    from fastgen.mini import WEIGHTS

    path = Path(repo)
    if path.is_absolute() and path.parent == WEIGHTS:
        imports.add("from fastgen.mini import weights")
        return f"weights({path.name!r})"
    return repr(repo)


def _file(repo: str, name: str, imports: set[str]) -> str:
    """One file of a repo: hf_hub_download for a Hub id, a path inside a local folder."""
    if Path(repo).is_absolute():
        imports.add("import os")
        return f"os.path.join({_repo(repo, imports)}, {name!r})"
    imports.add("from huggingface_hub import hf_hub_download")
    return f"hf_hub_download({repo!r}, {name!r})"


def _args(*pairs) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, _Raw) else f"{k}={v}" for k, v in pairs if v is not None)


def method_code(spec: MethodSpec, *, prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float,
                width: int, height: int, device: str, dtype: str, scheduler_class: str,
                refine: dict | None = None, styles=()) -> str:
    """`refine`: a refine's pipeline, strength, mask (bool), keep_outside and resize ((w, h) or None); the snippet
    then reads source.png (and mask.png) from where it runs, as `Comparison.save` writes them. `styles`: the
    StyleLoras stacked on the method, loaded as named adapters and set with their scales."""
    dtype_expr = _Raw(f"torch.{dtype}")
    pipeline = refine["pipeline"] if refine else spec.pipeline
    imports = {pipeline}
    extra_imports: set[str] = set()
    lines = []
    if refine:
        extra_imports.add("from diffusers.utils import load_image")
        resize = ""
        if refine["resize"]:  # the explicit --resize: as fastgen.request.fit does it
            extra_imports.add("from PIL import Image")
            resize = f".resize({tuple(refine['resize'])!r}, Image.LANCZOS)"
        lines.append(f'init_image = load_image("source.png"){resize}')
        if refine["mask"]:
            resize = f".resize({tuple(refine['resize'])!r}, Image.NEAREST)" if refine["resize"] else ""
            lines.append(f'mask = load_image("mask.png").convert("L"){resize}')
    load = [("variant", spec.variant), ("dtype", dtype_expr)]
    if spec.unet_weight_name is not None:  # a state dict in the base's UNet config, as the model cards load it
        imports.add("UNet2DConditionModel")
        path = _file(spec.unet_repo, spec.unet_weight_name, extra_imports)
        if spec.unet_weight_name.endswith(".safetensors"):
            extra_imports.add("from safetensors.torch import load_file")
            state = f"load_file({path})"
        else:
            state = f"torch.load({path}, weights_only=True)"
        lines.append(f"unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config("
                     f"{_repo(spec.repo, extra_imports)}, subfolder='unet'))")
        lines.append(f"unet.load_state_dict({state})")
        lines.append(f"unet = unet.to({dtype_expr})")
        load.insert(0, ("unet", _Raw("unet")))
    elif spec.unet_repo is not None:
        imports.add("UNet2DConditionModel")
        unet_args = _args(("subfolder", spec.unet_subfolder), ("variant", spec.unet_variant), ("dtype", dtype_expr))
        lines.append(f"unet = UNet2DConditionModel.from_pretrained({_repo(spec.unet_repo, extra_imports)}, "
                     f"{unet_args})")
        load.insert(0, ("unet", _Raw("unet")))
    lines.append(f"pipe = {pipeline}.from_pretrained({_repo(spec.repo, extra_imports)}, {_args(*load)})"
                 f".to({device!r})")
    if spec.scheduler != "default" or spec.scheduler_kwargs:
        cls = SCHEDULERS[spec.scheduler] or scheduler_class
        imports.add(cls)
        extra = "".join(f", {k}={v!r}" for k, v in spec.scheduler_kwargs)
        lines.append(f"pipe.scheduler = {cls}.from_config(pipe.scheduler.config{extra})")
    adapters = []  # (name, scale)
    if spec.lora_repo is not None:
        lora = _args(("weight_name", spec.lora_weight_name), ("adapter_name", spec.name))
        lines.append(f"pipe.load_lora_weights({_repo(spec.lora_repo, extra_imports)}, {lora})")
        adapters.append((spec.name, spec.lora_scale))
    for i, style in enumerate(styles, 1):
        lora = _args(("weight_name", style.weight_name), ("adapter_name", f"style{i}"))
        lines.append(f"pipe.load_lora_weights({_repo(style.repo, extra_imports)}, {lora})")
        adapters.append((f"style{i}", style.scale))
    if styles or any(scale != 1.0 for _, scale in adapters):
        names, scales = [n for n, _ in adapters], [float(w) for _, w in adapters]
        lines.append(f"pipe.set_adapters({names!r}, adapter_weights={scales!r})")
    call = [("num_inference_steps", steps), ("guidance_scale", float(guidance)), ("width", width), ("height", height)]
    if refine:
        size = call[2:] if refine["mask"] else []  # inpainting would otherwise draw at the UNet's sample size
        source = [("image", _Raw("init_image"))] + ([("mask_image", _Raw("mask"))] if refine["mask"] else [])
        call = source + [("strength", refine["strength"])] + call[:2] + size
    if spec.cfg_at(guidance) and negative_prompt:
        call.insert(0, ("negative_prompt", negative_prompt))
    call += [(k, list(v) if isinstance(v, tuple) else v) for k, v in spec.call_kwargs]  # DMD2's timesteps, eta
    call.append(("generator", _Raw(f'torch.Generator("cpu").manual_seed({seed})')))
    lines.append(f"image = pipe({prompt!r}, {_args(*call)}).images[0]")
    if refine and refine["mask"] and refine["keep_outside"]:
        lines.append("image = pipe.image_processor.apply_overlay(mask, init_image, image)  # keep outside the mask")
    lines.append(f'image.save("{spec.name}.png")')
    header = ["import torch", f"from diffusers import {', '.join(sorted(imports))}", *sorted(extra_imports), ""]
    return "\n".join(header + lines) + "\n"
