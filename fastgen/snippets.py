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


def _args(*pairs) -> str:
    return ", ".join(f"{k}={v!r}" if not isinstance(v, _Raw) else f"{k}={v}" for k, v in pairs if v is not None)


def method_code(spec: MethodSpec, *, prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float,
                width: int, height: int, device: str, dtype: str, scheduler_class: str) -> str:
    dtype_expr = _Raw(f"torch.{dtype}")
    imports = {spec.pipeline}
    extra_imports: set[str] = set()
    lines = []
    load = [("variant", spec.variant), ("dtype", dtype_expr)]
    if spec.unet_repo is not None:
        imports.add("UNet2DConditionModel")
        unet_args = _args(("subfolder", spec.unet_subfolder), ("variant", spec.unet_variant), ("dtype", dtype_expr))
        lines.append(f"unet = UNet2DConditionModel.from_pretrained({_repo(spec.unet_repo, extra_imports)}, "
                     f"{unet_args})")
        load.insert(0, ("unet", _Raw("unet")))
    lines.append(f"pipe = {spec.pipeline}.from_pretrained({_repo(spec.repo, extra_imports)}, {_args(*load)})"
                 f".to({device!r})")
    if spec.scheduler != "default" or spec.scheduler_kwargs:
        cls = SCHEDULERS[spec.scheduler] or scheduler_class
        imports.add(cls)
        extra = "".join(f", {k}={v!r}" for k, v in spec.scheduler_kwargs)
        lines.append(f"pipe.scheduler = {cls}.from_config(pipe.scheduler.config{extra})")
    if spec.lora_repo is not None:
        lora = _args(("weight_name", spec.lora_weight_name), ("adapter_name", "lcm"))
        lines.append(f"pipe.load_lora_weights({_repo(spec.lora_repo, extra_imports)}, {lora})")
    call = [("num_inference_steps", steps), ("guidance_scale", float(guidance)), ("width", width), ("height", height)]
    if spec.cfg_at(guidance) and negative_prompt:
        call.insert(0, ("negative_prompt", negative_prompt))
    call.append(("generator", _Raw(f'torch.Generator("cpu").manual_seed({seed})')))
    lines.append(f"image = pipe({prompt!r}, {_args(*call)}).images[0]")
    lines.append(f'image.save("{spec.name}.png")')
    header = ["import torch", f"from diffusers import {', '.join(sorted(imports))}", *sorted(extra_imports), ""]
    return "\n".join(header + lines) + "\n"
