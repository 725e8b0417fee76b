"""Train the mini family, one stage at a time.

    python -m fastgen.mini.train vae --seed 0        # AutoencoderKL, 64x64 -> 16x16x4
    python -m fastgen.mini.train vae --decoder-only  # fine-tune the shipped VAE's decoder, a drop-in for every stage
    python -m fastgen.mini.train base --seed 0       # text encoder + UNet (noise prediction, prompt dropout)
    python -m fastgen.mini.train lcm --seed 0        # latent consistency distillation -> full UNet
    python -m fastgen.mini.train lcm-lora --seed 0   # the same objective, training a LoRA only
    python -m fastgen.mini.train turbo --seed 0      # adversarial diffusion distillation

Each stage reads what the earlier ones wrote (`--weights`, default: the package's own weights folder)
and logs its loss as it goes. Defaults are sized to finish within 45 minutes on two CPU cores;
`--device cuda` runs the same recipe faster. `--steps` shortens a stage for a quick look.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import models
from .world import render_dataset, split_scenes

logger = logging.getLogger("fastgen.mini.train")

WEIGHTS = Path(__file__).parent / "weights"
STAGES = ("vae", "base", "lcm", "lcm-lora", "turbo")


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch: int
    lr: float
    images: int = 40_000  # rendered once per stage from the seen combinations
    # vae
    edge_weight: float = 0.0  # extra reconstruction weight on pixels at the shapes' edges (0: every pixel alike)
    # Start from the shipped VAE and train its decoder only: the encoder, and so the latent space every other
    # model of the family was trained in, stays exactly as it is; the new decoder drops in under all of them.
    decoder_only: bool = False
    # base
    prompt_dropout: float = 0.1  # trains the unconditional branch that classifier-free guidance needs
    ema: float = 0.999
    # Go on training the shipped base's UNet, its text encoder and VAE frozen: LCM and Turbo, which share them,
    # keep working unchanged, and LCM-LoRA meets a fine-tune of the UNet it was trained on.
    unet_only: bool = False
    # distillation
    guidance_min: float = 1.0  # LCM samples the teacher's guidance scale from this range (LCM paper: w ~ U[w_min, w_max])
    guidance_max: float = 8.0
    # The teacher's guidance for LCM-LoRA and Turbo (both presets: the base's default, 2).
    guidance: float = 4.0
    ddim_skip: int = 20  # LCM "skipping-step": the solver jumps k=20 of 1000 steps (50 DDIM steps)
    target_ema: float = 0.95  # LCM target network
    lora_rank: int = 32
    adv_weight: float = 0.1  # Turbo: the adversarial term sharpens; the distillation term keeps it on the teacher
    distill_weight: float = 1.0
    teacher_samples: int = 4096  # Turbo: noise -> teacher-sample pairs, drawn once
    teacher_steps: int = 8  # the base at 8 Euler steps is already at its 50-step accuracy
    turbo_t_weights: tuple[float, ...] = (3.0, 1.0, 1.0, 1.0)  # sampling odds of t = 999, 749, 499, 249
    # Turbo's student predicts v, not epsilon: at t=999 an epsilon model's x0 estimate divides its error by
    # sqrt(alpha_bar) = 0.068 (15x speckle); v gives x0 = sqrt(a) x_t - sqrt(1-a) v with no such division.
    turbo_prediction: str = "epsilon"
    # Turbo: weight of a second distillation term in pixels (student and teacher sample both decoded by the frozen
    # VAE, the shapes' edges weighted 1 + edge_weight): an outline's error is small in the latent's mean square
    # but is what the strict reading of shape sees. 0: the latent term alone.
    pixel_weight: float = 0.0
    # lcm, turbo: a second round. The student starts from this stage's shipped weights instead of the base (the
    # optimiser, the discriminator and the schedule start afresh); another seed draws new data and teacher pairs.
    resume: bool = False


PRESETS = {
    "vae": StageConfig(steps=2500, batch=32, lr=1e-3, images=20_000),
    "base": StageConfig(steps=3000, batch=64, lr=1e-3),
    # The teacher's guidance near the base's default of 2, where its outlines are crisp (docs/mini.md)
    "lcm": StageConfig(steps=1400, batch=32, lr=1e-4, guidance_min=1.5, guidance_max=3.0),
    "lcm-lora": StageConfig(steps=2500, batch=32, lr=1e-3, lora_rank=32, images=8000, guidance=2.0),
    # Four times the teacher pairs, the teacher at the base's default guidance and a distillation term in pixels:
    # together they took its one-step strict score from 0.235 / 0.338 to 0.456 / 0.515; without the pixel term,
    # 0.338 / 0.382 (docs/mini.md).
    "turbo": StageConfig(steps=2500, batch=16, lr=1e-4, images=8000, teacher_samples=4096, guidance=2.0,
                         pixel_weight=4.0, edge_weight=4.0, turbo_prediction="v_prediction"),
}


# ---------------------------------------------------------------------------------------------- helpers


def _schedule(device):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**models.SCHEDULE)
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)


def _lr_lambda(total: int):
    warmup = max(1, total // 20)
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class _Log:
    """Loss every few seconds, with speed and time left."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.start, self.last = stage, total, time.perf_counter(), 0.0

    def __call__(self, step: int, **values: float):
        now = time.perf_counter()
        if now - self.last < 10 and step + 1 < self.total:
            return
        self.last = now
        rate = (now - self.start) / (step + 1)
        parts = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        logger.info("%s step %d/%d %s %.2fs/step eta %.0fs", self.stage, step + 1, self.total, parts, rate,
                    rate * (self.total - step - 1))


def _images_to_tensor(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float):
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, 1 - decay)


def _data(config: StageConfig, seed: int, work: Path):
    """Rendered training images and their prompts, cached in `work` (stages with equal settings share them)."""
    cache = work / f"data-{config.images}-{seed}.npz"
    if cache.exists():
        data = np.load(cache)
        return data["images"], data["prompts"].tolist()
    seen, _ = split_scenes()
    images, scenes = render_dataset(seen, config.images, seed)
    prompts = [s.prompt for s in scenes]
    np.savez(cache, images=images, prompts=np.array(prompts))
    return images, prompts


def _encode_latents(vae, images: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, so that each step samples fresh latents without the encoder."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in range(0, len(images), 256):
            dist = vae.encode(_images_to_tensor(images[chunk:chunk + 256], device)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _load_base(weights: Path, device):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(weights / "base", torch_dtype=torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(device).requires_grad_(False).eval()
    return pipe


class _Batches:
    """Shared batch sampling for the distillation stages: real latents and their prompts' embeddings."""

    def __init__(self, pipe, config: StageConfig, seed: int, work: Path, device):
        images, prompts = _data(config, seed, work)
        # Encoding is the slow part on a CPU: keep the latents, keyed by the data and the VAE's weights.
        vae_digest = hashlib.sha256(pipe.vae.state_dict()["encoder.conv_in.weight"].cpu().numpy().tobytes()).hexdigest()
        cache = work / f"latents-{config.images}-{seed}-{vae_digest[:12]}.pt"
        if cache.exists():
            self.mean, self.std = (t.to(device) for t in torch.load(cache))
        else:
            self.mean, self.std = _encode_latents(pipe.vae, images, device)
            torch.save((self.mean.cpu(), self.std.cpu()), cache)
        self.scale = pipe.vae.config.scaling_factor
        unique = sorted(set(prompts)) + [""]
        index = {p: i for i, p in enumerate(unique)}
        with torch.no_grad():
            out = pipe.text_encoder(_tokenize(pipe.tokenizer, unique, device))
        self.embeds, self.pooled = out.last_hidden_state, out.pooler_output
        self.prompt_ids = torch.tensor([index[p] for p in prompts], device=device)
        self.empty = index[""]
        self.generator = torch.Generator(device).manual_seed(seed)
        self.batch, self.device = config.batch, device

    def __call__(self):
        pick = torch.randint(0, len(self.prompt_ids), (self.batch,), generator=self.generator, device=self.device)
        noise = torch.randn(self.mean[pick].shape, generator=self.generator, device=self.device)
        latents = (self.mean[pick] + self.std[pick] * noise) * self.scale
        ids = self.prompt_ids[pick]
        return latents, self.embeds[ids], self.pooled[ids], self.embeds[self.empty].expand(self.batch, -1, -1)

    def randn(self, shape):
        return torch.randn(shape, generator=self.generator, device=self.device)

    def rand(self, shape):
        return torch.rand(shape, generator=self.generator, device=self.device)


def _shipped_unet(folder: Path, device, prediction: str = "epsilon", scheduler: Path | None = None):
    """A stage's shipped UNet, in float32, to train on (`StageConfig.resume`)."""
    from diffusers import UNet2DConditionModel

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"nothing to resume: no shipped UNet in {folder} (train the stage without --resume)")
    if scheduler is not None:
        shipped = json.loads((scheduler / "scheduler_config.json").read_text()).get("prediction_type", "epsilon")
        if shipped != prediction:
            raise ValueError(f"the UNet in {folder} predicts {shipped!r}; resuming it as {prediction!r} would "
                             "retrain its output from scratch")
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).to(device)


def _x0_from_eps(x_t, eps, alpha_bar):
    a = alpha_bar.view(-1, 1, 1, 1)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def _noised(x0, noise, alpha_bar):
    a = alpha_bar.view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _save_fp16_copy(module, folder: Path):
    """Ship weights as fp16 (they load upcast to float32 on CPU); training keeps float32."""
    copy.deepcopy(module).to("cpu", torch.float16).save_pretrained(folder, safe_serialization=True)


# ---------------------------------------------------------------------------------------------- stages


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """1 on pixels within a pixel of a colour change in `x` (N x 3 x H x W, in [-1, 1]), else 0: the shapes'
    outlines and their anti-aliased edges, where the round trip through the VAE loses most (docs/mini.md)."""
    spread = F.max_pool2d(x, 3, stride=1, padding=1) + F.max_pool2d(-x, 3, stride=1, padding=1)
    return (spread.amax(dim=1, keepdim=True) > 0.05).to(x.dtype)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, edge_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE per pixel, each pixel weighted 1 + `edge_weight` on the shapes' edges, 1 elsewhere."""
    per_pixel = (recon - x).abs() + (recon - x) ** 2
    if not edge_weight:
        return per_pixel.mean()
    weights = 1 + edge_weight * edge_map(x)
    return (per_pixel * weights).sum() / (weights.expand_as(per_pixel).sum())


def train_vae(config: StageConfig, seed: int, weights: Path, work: Path, device):
    torch.manual_seed(seed)
    images, _ = _data(config, seed, work)
    data = _images_to_tensor(images, "cpu")
    if config.decoder_only:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(weights / "base" / "vae", torch_dtype=torch.float32).to(device).train()
        vae.encoder.requires_grad_(False).eval()
        vae.quant_conv.requires_grad_(False)
        trained = [p for p in vae.parameters() if p.requires_grad]
    else:
        vae = models.new_vae().to(device).train()
        trained = list(vae.parameters())
    opt = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.steps))
    generator = torch.Generator().manual_seed(seed)
    log = _Log("vae", config.steps)
    for step in range(config.steps):
        x = data[torch.randint(0, len(data), (config.batch,), generator=generator)].to(device)
        with torch.set_grad_enabled(not config.decoder_only):
            dist = vae.encode(x).latent_dist
            latents = dist.sample()
        recon = vae.decode(latents).sample
        # L1 keeps edges crisp; the tiny KL term (as in Stable Diffusion's VAE) keeps latents near unit scale.
        rec = reconstruction_loss(recon, x, config.edge_weight)
        kl = dist.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl if not config.decoder_only else rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log(step, loss=rec.item(), kl=kl.item())
    vae.eval()
    if not config.decoder_only:  # a fine-tuned decoder keeps the latent space, and so its scaling factor
        # Scale latents to unit variance, as Stable Diffusion's scaling_factor does (0.18215 there).
        mean, std = _encode_latents(vae, images[:4096], device)
        scale = 1.0 / float((mean + std * torch.randn_like(std)).std())
        vae.register_to_config(scaling_factor=scale)
        logger.info("vae scaling_factor=%.4f", scale)
    _save_fp16_copy(vae, work / "vae")
    if config.decoder_only:
        # A drop-in: every pipeline folder that ships the VAE takes the new one (they stay byte-identical).
        for pipeline in ("base", "turbo"):
            if (weights / pipeline / "vae").is_dir():
                shutil.rmtree(weights / pipeline / "vae")
                shutil.copytree(work / "vae", weights / pipeline / "vae")


def _denoising_loss(unet, x0, t, noise, cond, alphas) -> torch.Tensor:
    eps = unet(_noised(x0, noise, alphas[t]), t, cond).sample
    # Min-SNR-5 weighting (Hang et al. 2023) converges several times faster than plain MSE.
    snr = alphas[t] / (1 - alphas[t])
    weight = snr.clamp(max=5.0) / snr
    return (weight * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def _fine_tune_base_unet(config: StageConfig, seed: int, weights: Path, work: Path, device):
    """The shipped base's UNet trained on (see StageConfig.unet_only); only base/unet is rewritten."""
    torch.manual_seed(seed)
    pipe = _load_base(weights, device)
    batches = _Batches(pipe, config, seed, work, device)
    unet = pipe.unet.requires_grad_(True).train()
    ema_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.steps))
    alphas = _schedule(device)
    log = _Log("base", config.steps)
    for step in range(config.steps):
        x0, cond, _, uncond = batches()
        drop = batches.rand((len(x0),)) < config.prompt_dropout
        cond = torch.where(drop.view(-1, 1, 1), uncond, cond)
        t = torch.randint(0, 1000, (len(x0),), generator=batches.generator, device=device)
        loss = _denoising_loss(unet, x0, t, batches.randn(x0.shape), cond, alphas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, config.ema)  # the average starts at the shipped weights: no warm-up
        log(step, loss=loss.item())
    out = weights / "base" / "unet"
    shutil.rmtree(out)
    _save_fp16_copy(ema_unet, out)


def train_base(config: StageConfig, seed: int, weights: Path, work: Path, device):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if config.unet_only:
        return _fine_tune_base_unet(config, seed, weights, work, device)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(work / "vae", torch_dtype=torch.float32).to(device).eval()
    models.write_tokenizer(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    images, prompts = _data(config, seed, work)
    mean, std = _encode_latents(vae, images, device)
    ids = _tokenize(tokenizer, prompts, device)
    empty = _tokenize(tokenizer, [""], device)[0]

    text_encoder = models.new_text_encoder(tokenizer).to(device).train()
    unet = models.new_unet().to(device).train()
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.steps))
    alphas = _schedule(device)
    generator = torch.Generator(device).manual_seed(seed)
    log = _Log("base", config.steps)
    for step in range(config.steps):
        pick = torch.randint(0, len(ids), (config.batch,), generator=generator, device=device)
        x0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=generator, device=device))
        x0 = x0 * vae.config.scaling_factor
        tokens = ids[pick].clone()
        drop = torch.rand(config.batch, generator=generator, device=device) < config.prompt_dropout
        tokens[drop] = empty
        t = torch.randint(0, 1000, (config.batch,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        loss = _denoising_loss(unet, x0, t, noise, text_encoder(tokens).last_hidden_state, alphas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(config.ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        log(step, loss=loss.item())

    scheduler = EulerDiscreteScheduler(**models.SCHEDULE, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = weights / "base"
    shutil.rmtree(out, ignore_errors=True)
    pipe.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)


def _lcm_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """Consistency boundary condition, exactly as diffusers' LCMScheduler applies it at inference."""
    scaled = (t * timestep_scaling).float().view(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def _guidance_embedding(w, dim: int):
    """Sinusoidal embedding of the guidance scale, as diffusers' LCM pipelines compute it."""
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def _consistency_distill(config, seed, weights, work, device, lora: bool):
    """One loop for LCM (full UNet, guidance embedding, EMA target) and LCM-LoRA (adapter, fixed guidance)."""
    torch.manual_seed(seed)
    pipe = _load_base(weights, device)
    teacher = pipe.unet
    batches = _Batches(pipe, config, seed, work, device)
    alphas = _schedule(device)
    if lora:
        from peft import LoraConfig

        student = copy.deepcopy(teacher)
        student.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                       "ff.net.0.proj", "ff.net.2", "time_emb_proj"]))
        target = student  # LCM-LoRA uses the student itself, without gradient, as the target
        cond_dim = None
    else:
        cond_dim = 256
        if config.resume:
            student = _shipped_unet(weights / "lcm", device)
        else:
            student = models.new_unet(time_cond_proj_dim=cond_dim).to(device)
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
            assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
            torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts as the teacher exactly
        student.requires_grad_(True)
        target = copy.deepcopy(student).requires_grad_(False)
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.steps))
    ddim = torch.arange(1, 1000 // config.ddim_skip + 1, device=device) * config.ddim_skip - 1  # 19, 39, ..., 999
    name = "lcm-lora" if lora else "lcm"
    log = _Log(name, config.steps)
    for step in range(config.steps):
        x0, cond, _, uncond = batches()
        n = len(x0)
        index = torch.randint(0, len(ddim), (n,), generator=batches.generator, device=device)
        t = ddim[index]
        t_prev = (t - config.ddim_skip).clamp(min=0)
        if lora:
            w = torch.full((n,), config.guidance - 1, device=device)
            w_embed = None
        else:
            # guidance scale g = 1 + w; the pipeline embeds w = g - 1
            w = config.guidance_min - 1 + (config.guidance_max - config.guidance_min) * batches.rand((n,))
            w_embed = _guidance_embedding(w, cond_dim)
        x_t = _noised(x0, batches.randn(x0.shape), alphas[t])

        # 1. The student's one jump from x_t to the trajectory's end, through the boundary condition.
        c_skip, c_out = _lcm_scalings(t)
        eps = student(x_t, t, cond, timestep_cond=w_embed).sample
        pred = c_skip * x_t + c_out * _x0_from_eps(x_t, eps, alphas[t])

        with torch.no_grad():
            # 2. The teacher's DDIM step from t to t - k under classifier-free guidance.
            both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond])).sample
            eps_c, eps_u = both.chunk(2)
            eps_g = eps_c + w.view(-1, 1, 1, 1) * (eps_c - eps_u)
            x0_g = _x0_from_eps(x_t, eps_g, alphas[t])
            x_prev = _noised(x0_g, eps_g, alphas[t_prev])
            # 3. The target network's jump from the teacher's point.
            c_skip_p, c_out_p = _lcm_scalings(t_prev)
            eps_p = target(x_prev, t_prev, cond, timestep_cond=w_embed).sample
            goal = c_skip_p * x_prev + c_out_p * _x0_from_eps(x_prev, eps_p, alphas[t_prev])

        loss = F.mse_loss(pred.float(), goal.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        if not lora:
            _ema_update(target, student, config.target_ema)
        log(step, loss=loss.item())
    return pipe, (student if lora else target)


def train_lcm(config: StageConfig, seed: int, weights: Path, work: Path, device):
    _, unet = _consistency_distill(config, seed, weights, work, device, lora=False)
    out = weights / "lcm"
    shutil.rmtree(out, ignore_errors=True)
    _save_fp16_copy(unet.eval(), out)  # files at the folder root, as latent-consistency/lcm-sdxl ships them


def train_lcm_lora(config: StageConfig, seed: int, weights: Path, work: Path, device):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    _, unet = _consistency_distill(config, seed, weights, work, device, lora=True)
    state = get_peft_model_state_dict(unet)  # peft's own key names, which load_lora_weights reads as they are
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}
    out = weights / "lcm-lora"
    shutil.rmtree(out, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, safe_serialization=True)


class _Discriminator(torch.nn.Module):
    """Trainable heads on frozen teacher-UNet features, conditioned on the prompt by projection."""

    def __init__(self, channels: list[int], text_width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(c, 64, 3, padding=1), torch.nn.GroupNorm(8, 64), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1)) for c in channels)
        self.out = torch.nn.ModuleList(torch.nn.Linear(64, 1) for _ in channels)
        self.project = torch.nn.ModuleList(torch.nn.Linear(text_width, 64) for _ in channels)

    def forward(self, features: list[torch.Tensor], pooled_text: torch.Tensor) -> torch.Tensor:
        scores = []
        for feat, head, out, project in zip(features, self.heads, self.out, self.project):
            h = head(feat).mean(dim=(2, 3))
            scores.append(out(h).squeeze(1) + (h * project(pooled_text)).sum(1) / 8)
        return torch.stack(scores, 1).sum(1)


class _EncoderDone(Exception):
    """Raised by the mid-block hook: the discriminator needs only the UNet's encoder half."""


def _teacher_features(teacher, x, t, cond) -> list[torch.Tensor]:
    """Outputs of the frozen teacher's down blocks and mid block (gradients still flow to `x`)."""
    captured = []

    def keep(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    def keep_and_stop(module, inputs, output):
        keep(module, inputs, output)
        raise _EncoderDone

    hooks = [block.register_forward_hook(keep) for block in teacher.down_blocks]
    hooks.append(teacher.mid_block.register_forward_hook(keep_and_stop))
    try:
        teacher(x, t, cond)
    except _EncoderDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _teacher_samples(pipe, batches: "_Batches", config: StageConfig, seed: int, work: Path):
    """Pairs (noise, the base's own guided sample from it, prompt index): the distillation targets. Drawing them
    is minutes on a CPU, so they are kept in `work`, keyed by what they depend on (the base UNet's weights too)."""
    digest = hashlib.sha256()
    for name, value in sorted(pipe.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    key = f"{config.teacher_samples}-{config.teacher_steps}-{config.guidance:g}-{config.images}-{seed}"
    cache = work / f"turbo-pairs-{key}-{digest.hexdigest()[:12]}.pt"
    if cache.exists():
        *pairs, state = torch.load(cache)
        batches.generator.set_state(state)  # where drawing them left it: training goes on exactly as after a draw
        return tuple(t.to(batches.device) for t in pairs)
    logger.info("turbo: %d teacher samples at %d steps", config.teacher_samples, config.teacher_steps)
    pairs = _draw_teacher_samples(pipe, batches, config.teacher_samples, config.teacher_steps, config.guidance)
    torch.save((*(t.cpu() for t in pairs), batches.generator.get_state()), cache)
    return pairs


def _draw_teacher_samples(pipe, batches: "_Batches", count: int, steps: int, guidance: float):
    device = batches.device
    noises, samples, prompts = [], [], []
    for start in range(0, count, 128):
        n = min(128, count - start)
        ids = batches.prompt_ids[torch.randint(0, len(batches.prompt_ids), (n,), generator=batches.generator,
                                               device=device)]
        z = batches.randn((n, 4, models.LATENT_SIZE, models.LATENT_SIZE))
        with torch.no_grad():
            x0 = pipe(prompt_embeds=batches.embeds[ids], negative_prompt_embeds=batches.embeds[batches.empty].expand(n, -1, -1),
                      latents=z, num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images
        noises.append(z)
        samples.append(x0)
        prompts.append(ids)
    return torch.cat(noises), torch.cat(samples), torch.cat(prompts)


def train_turbo(config: StageConfig, seed: int, weights: Path, work: Path, device):
    """Adversarial diffusion distillation (ADD paper), in miniature.

    As in ADD, the student starts from the base, trains on the four timesteps of the trailing 4-step schedule,
    and combines an adversarial loss (a discriminator of trainable, prompt-conditioned heads on frozen
    features) with a distillation loss towards the base teacher. Four choices differ, for a model this size
    and a CPU budget (docs/mini.md): the frozen features are the teacher UNet's own (as in LADD); the
    distillation target is the teacher's guided 8-step sample from the same noise (as in Luhman & Luhman
    2021), which is sharper than its one-step denoised estimate; the student may predict v (`turbo_prediction`);
    and with `pixel_weight` the distillation term is measured again in pixels through the frozen decoder, the
    shapes' edges weighted.
    """
    from diffusers import EulerAncestralDiscreteScheduler

    torch.manual_seed(seed)
    pipe = _load_base(weights, device)
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.unet
    batches = _Batches(pipe, config, seed, work, device)
    alphas = _schedule(device)
    noises, targets, target_prompts = _teacher_samples(pipe, batches, config, seed, work)
    target_pixels = None
    if config.pixel_weight:
        with torch.no_grad():
            target_pixels = torch.cat([pipe.vae.decode(chunk / batches.scale).sample.clamp(-1, 1)
                                       for chunk in targets.split(256)])
    student = (_shipped_unet(weights / "turbo" / "unet", device, config.turbo_prediction,
                             weights / "turbo" / "scheduler") if config.resume else copy.deepcopy(teacher))
    student.requires_grad_(True).train()
    channels = [b.resnets[-1].out_channels for b in teacher.down_blocks] + [teacher.mid_block.resnets[-1].out_channels]
    disc = _Discriminator(channels, models.TEXT_WIDTH).to(device)
    opt_g = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=config.lr * 2, betas=(0.0, 0.99), weight_decay=0.0)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_lambda(config.steps))
    student_t = torch.tensor([999, 749, 499, 249], device=device)  # the trailing 4-step schedule
    log = _Log("turbo", config.steps)
    for step in range(config.steps):
        n = config.batch
        pick = torch.randint(0, len(noises), (n,), generator=batches.generator, device=device)
        goal, cond = targets[pick], batches.embeds[target_prompts[pick]]
        # t=999, the one-step case the demo shows by default, `turbo_t_weights[0]` times as likely as each of
        # 749/499/249 (the preset's 3: half the batch); `--one-step-odds` sets it.
        t_s = student_t[torch.multinomial(torch.tensor(config.turbo_t_weights, device=device), n, replacement=True,
                                          generator=batches.generator)]
        # At t=999 the student sees the very noise the teacher started from, as at one-step inference;
        # at the later timesteps, the teacher's sample re-noised, as a multi-step run would hand it over.
        renoised = _noised(goal, batches.randn(goal.shape), alphas[t_s])
        x_s = torch.where((t_s == 999).view(-1, 1, 1, 1), noises[pick], renoised)
        out = student(x_s, t_s, cond).sample
        if config.turbo_prediction == "v_prediction":  # x0 = sqrt(a) x_t - sqrt(1-a) v: no division by sqrt(a)
            a = alphas[t_s].view(-1, 1, 1, 1)
            fake = a.sqrt() * x_s - (1 - a).sqrt() * out
        else:
            fake = _x0_from_eps(x_s, out, alphas[t_s])
        distill = F.mse_loss(fake, goal)
        if config.pixel_weight:
            drawn = pipe.vae.decode(fake / batches.scale).sample
            distill = distill + config.pixel_weight * reconstruction_loss(drawn, target_pixels[pick],
                                                                          config.edge_weight)

        # Adversarial: student outputs and real latents, both lightly re-noised, judged on the teacher's features.
        real, real_cond, real_pooled, _ = batches()
        fake_pooled = batches.pooled[target_prompts[pick]]
        t_a = torch.randint(0, 500, (n,), generator=batches.generator, device=device)
        noise_a = batches.randn(goal.shape)
        fake_feats = _teacher_features(teacher, _noised(fake, noise_a, alphas[t_a]), t_a, cond)
        gen_score = disc(fake_feats, fake_pooled)
        loss_g = config.distill_weight * distill + config.adv_weight * F.softplus(-gen_score).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_g.step()
        sched_g.step()

        with torch.no_grad():
            real_feats = _teacher_features(teacher, _noised(real, noise_a, alphas[t_a]), t_a, real_cond)
        fake_feats = [f.detach() for f in fake_feats]  # the same input as the generator's pass: no second forward
        loss_d = F.softplus(-disc(real_feats, real_pooled)).mean() + F.softplus(disc(fake_feats, fake_pooled)).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        log(step, distill=distill.item(), d=loss_d.item())

    pipe.unet = student.eval()
    # steps_offset only moves "leading" timesteps (these are trailing), but the pipeline warns on any value but 1
    pipe.scheduler = EulerAncestralDiscreteScheduler(**{**models.SCHEDULE, "prediction_type": config.turbo_prediction},
                                                     timestep_spacing="trailing", steps_offset=1)
    out = weights / "turbo"
    shutil.rmtree(out, ignore_errors=True)
    # A full pipeline folder, like stabilityai/sdxl-turbo: its VAE and text encoder are the base's, byte for byte.
    pipe.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    for shared in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(out / shared)
        shutil.copytree(weights / "base" / shared, out / shared)


def forget_paths(weights: Path) -> None:
    """Drop `_name_or_path` (the folder a module was loaded from, on the training machine) from every config
    under `weights`: shipped files should not change with where they were trained."""
    for config in [*weights.rglob("config.json"), *weights.rglob("model_index.json")]:
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")  # diffusers' own layout


RUNNERS = {"vae": train_vae, "base": train_base, "lcm": train_lcm, "lcm-lora": train_lcm_lora, "turbo": train_turbo}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastgen.mini.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--batch", type=int, help="override the preset's batch size")
    parser.add_argument("--images", type=int, help="override how many images are rendered")
    parser.add_argument("--lr", type=float, help="override the preset's learning rate")
    parser.add_argument("--edge-weight", type=float,
                        help="vae, and turbo's pixel term: extra weight on the shapes' edges (presets: 0 and 4)")
    parser.add_argument("--guidance", type=float,
                        help="lcm-lora, turbo: the teacher's guidance scale (presets: 2)")
    parser.add_argument("--guidance-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="lcm: the range the teacher's guidance scale is drawn from (preset: 1.5 3)")
    parser.add_argument("--lora-rank", type=int, help="lcm-lora: the adapter's rank (preset: 32)")
    parser.add_argument("--teacher-steps", type=int, help="turbo: the teacher's steps for each distillation target")
    parser.add_argument("--teacher-samples", type=int,
                        help="turbo: how many distillation targets are drawn (preset: 4096)")
    parser.add_argument("--pixel-weight", type=float,
                        help="turbo: weight of the distillation term in decoded pixels, edges weighted (preset: 4)")
    parser.add_argument("--decoder-only", action="store_true", default=None,
                        help="vae: fine-tune the shipped VAE's decoder, keeping its encoder and latent space")
    parser.add_argument("--unet-only", action="store_true", default=None,
                        help="base: go on training the shipped base's UNet, its text encoder and VAE frozen")
    parser.add_argument("--one-step-odds", type=float,
                        help="turbo: how much likelier t=999 (one step) is drawn than each of 749, 499, 249"
                             " (preset: 3)")
    parser.add_argument("--resume", action="store_true", default=None,
                        help="lcm, turbo: start from this stage's shipped weights instead of the base (a second round;"
                             " give another --seed for new data and teacher pairs)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="where the family's folders are read and written")
    parser.add_argument("--work", type=Path, default=Path("runs/mini"),
                        help="intermediate files: the VAE before base, rendered data, latents, Turbo's teacher pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    config = PRESETS[args.stage]
    overridable = ("steps", "batch", "images", "lr", "edge_weight", "decoder_only", "unet_only", "guidance",
                   "lora_rank", "teacher_steps", "teacher_samples", "pixel_weight", "resume")
    overrides = {k: getattr(args, k) for k in overridable if getattr(args, k) is not None}
    if args.resume and args.stage not in ("lcm", "turbo"):
        parser.error(f"--resume is for lcm and turbo (base has --unet-only), not {args.stage}")
    if args.one_step_odds is not None:
        if args.one_step_odds <= 0:
            parser.error(f"--one-step-odds must be positive, got {args.one_step_odds:g}")
        overrides["turbo_t_weights"] = (args.one_step_odds, 1.0, 1.0, 1.0)
    if args.guidance_range is not None:
        overrides["guidance_min"], overrides["guidance_max"] = args.guidance_range
    config = replace(config, **overrides)
    logger.info("stage %s on %s: %s", args.stage, device,
                ", ".join(f"{f.name}={getattr(config, f.name)}" for f in fields(config)))
    args.weights.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    RUNNERS[args.stage](config, args.seed, args.weights, args.work, device)
    forget_paths(args.weights)
    logger.info("stage %s done in %.1f s", args.stage, time.perf_counter() - start)


if __name__ == "__main__":
    main()
