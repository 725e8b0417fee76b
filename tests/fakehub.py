"""A fake Hugging Face Hub cache: tiny random models under the real repo ids, in huggingface_hub's layout.

    from tests.fakehub import build_fake_hub
    build_fake_hub("/tmp/hub")            # then HF_HUB_CACHE=/tmp/hub HF_HUB_OFFLINE=1

Every repo has the real repo's subfolders, file names, weight variants, model_index.json and scheduler config,
so `from_pretrained(...)` and `load_lora_weights(...)` take the same code paths as with the real weights.
Models are tiny (64x64 images, 8x8 latents). Facts the tests rely on:

- Where a real repo ships fp16 variant files, the fake ships `*.fp16.safetensors` AND plain fp32 files, and the
  plain files hold *different* random weights: loading the wrong variant changes the image.
- sdxl-turbo's text encoders, tokenizers and VAE are byte-identical to SDXL base's (as on the Hub); its UNet is
  not. SD-Turbo (SD 2.1 lineage) shares nothing with SD 1.5; LCM Dreamshaper ships plain fp32 files only.
- LCM-LoRA files use the real kohya-style keys (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`), with non-zero up weights so that an applied LoRA changes the image.
- The safety checker never flags an image (its concept thresholds are above any cosine similarity).

`build_mini(folder)` writes the embedded `mini` family's layout (base/, lcm/, lcm-lora/, turbo/) with random
weights, and `mini_family(folder)` points the registry's mini rows at it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TURBO = "stabilityai/sdxl-turbo"
SDXL_LCM_UNET = "latent-consistency/lcm-sdxl"
SDXL_LCM_LORA = "latent-consistency/lcm-lora-sdxl"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD_TURBO = "stabilityai/sd-turbo"
SD15_LCM = "SimianLuo/LCM_Dreamshaper_v7"
SD15_LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
SDXL_LIGHTNING = "ByteDance/SDXL-Lightning"
SDXL_HYPER_SD = "ByteDance/Hyper-SD"
SDXL_DMD2 = "tianweiy/DMD2"
LIGHTNING_FILES = ("sdxl_lightning_1step_unet_x0.safetensors", "sdxl_lightning_2step_unet.safetensors",
                   "sdxl_lightning_4step_unet.safetensors", "sdxl_lightning_8step_unet.safetensors")
HYPER_SD_FILES = ("Hyper-SDXL-1step-lora.safetensors", "Hyper-SDXL-2steps-lora.safetensors",
                  "Hyper-SDXL-4steps-lora.safetensors", "Hyper-SDXL-8steps-lora.safetensors")
REPOS = {
    "sdxl": (SDXL_BASE, SDXL_TURBO, SDXL_LCM_UNET, SDXL_LCM_LORA, SDXL_LIGHTNING, SDXL_HYPER_SD, SDXL_DMD2),
    "sd15": (SD15_BASE, SD_TURBO, SD15_LCM, SD15_LCM_LORA),
}
LFS_SUFFIXES = (".safetensors", ".bin")  # stored as LFS on the Hub: their blob is named by sha256

_SCHEDULER_BASE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, prediction_type="epsilon", trained_betas=None, clip_sample=False, set_alpha_to_one=False,
)
SCHEDULERS = {
    SDXL_BASE: dict(_class_name="EulerDiscreteScheduler", interpolation_type="linear", timestep_spacing="leading",
                    use_karras_sigmas=False, sample_max_value=1.0, skip_prk_steps=True, **_SCHEDULER_BASE),
    SDXL_TURBO: dict(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing", **_SCHEDULER_BASE),
    SD15_BASE: dict(_class_name="PNDMScheduler", skip_prk_steps=True, **_SCHEDULER_BASE),
    SD_TURBO: dict(_class_name="EulerDiscreteScheduler", timestep_spacing="trailing", interpolation_type="linear",
                   use_karras_sigmas=False, **_SCHEDULER_BASE),
    SD15_LCM: dict(_class_name="LCMScheduler", original_inference_steps=50, timestep_spacing="leading",
                   rescale_betas_zero_snr=False, thresholding=False,
                   **{**_SCHEDULER_BASE, "set_alpha_to_one": True}),
}


# --- hub cache layout -------------------------------------------------------------------------------------

def publish(cache: str | os.PathLike, repo_id: str, folder: str | os.PathLike) -> Path:
    """Copy `folder` into the hub cache as `repo_id`: blobs/<hash>, snapshots/<commit>/<path> -> blob symlinks,
    refs/main. LFS files are named by sha256, others by their git blob sha1, as the Hub does."""
    folder = Path(folder)
    repo_dir = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    hashes = {}
    for path in files:
        data = path.read_bytes()
        if path.suffix in LFS_SUFFIXES:
            hashes[path] = hashlib.sha256(data).hexdigest()
        else:
            hashes[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    commit = hashlib.sha1("".join(f"{p.relative_to(folder)}{h}" for p, h in hashes.items()).encode()).hexdigest()
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for path, digest in hashes.items():
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = repo_dir / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    return repo_dir / "snapshots" / commit


# --- tiny components ----------------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (the CLIP/GPT-2 table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP tokenizer in the real file set (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) with one token per byte: any prompt over ~75 characters overflows 77 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>", "re", "red</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad_token)
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = dict(model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer", **special)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


VOCAB_SIZE = 516
BOS, EOS = 512, 513


def _clip_text_config(hidden: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1,
        hidden_act="quick_gelu",
    )


def _unet(kind: str, seed: int, cross_attention_dim: int, lcm: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        cross_attention_dim=cross_attention_dim, time_cond_proj_dim=256 if lcm else None,
    )
    if kind == "sdxl":
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32, **common,
        )
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, **common,
    )


def _vae(seed: int, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64,
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def _text_encoder(cls_name: str, seed: int, hidden: int):
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(_clip_text_config(hidden))


def _safety_checker(seed: int):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # thresholds above any cosine similarity: never flags
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    return checker


def _save(model, folder: Path, variant: str | None, plain_seed: int | None, make) -> None:
    """Save `model` in fp16 as the `variant`, plus (when `plain_seed` is given) a differently seeded fp32 copy
    under the plain file names; with variant None, save `model` in fp32 under the plain names only."""
    if variant is None:
        model.save_pretrained(folder, safe_serialization=True)
        return
    model.to(torch.float16).save_pretrained(folder, variant=variant, safe_serialization=True)
    if plain_seed is not None:
        make(plain_seed).save_pretrained(folder, safe_serialization=True)


def write_feature_extractor(folder: Path) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def write_pipeline(folder: Path, model_index: dict, parts: dict, variant: str | None, scheduler: dict) -> None:
    """parts: component name -> (seed, factory(seed) -> model) or a callable(folder) that writes the files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    for name, part in parts.items():
        if callable(part):
            part(folder / name)
        else:
            seed, make = part
            _save(make(seed), folder / name, variant, seed + 1000 if variant else None, make)


def write_lora(path: Path, unet, seed: int, rank: int = 4) -> None:
    """A LoRA for `unet` in the kohya-style key format of the published LCM-LoRA files."""
    from safetensors.torch import save_file

    targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "time_emb_proj", "conv_shortcut")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(targets) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        else:
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(float(rank * 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))


def write_peft_lora(path: Path, unet, seed: int, rank: int = 4) -> None:
    """A LoRA for `unet` in the diffusers/peft key format (`unet.<module>.lora_A.weight`, `.lora_B.weight`)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(("to_q", "to_k", "to_v", "to_out.0")) or not isinstance(module, torch.nn.Linear):
            continue
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn((rank, module.in_features), generator=generator) * 0.1
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn((module.out_features, rank), generator=generator) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))


def write_state_dict(path: Path, module) -> None:
    """A module's full state dict as one fp16 file: safetensors, or a torch pickle for a .bin name."""
    from safetensors.torch import save_file

    state = {k: v.to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))


# --- families ---------------------------------------------------------------------------------------------

def _sdxl_index(scheduler: str) -> dict:
    return {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def _sd_index(cls: str, scheduler: str, safety: bool) -> dict:
    null = [None, None]
    return {
        "_class_name": cls, "_diffusers_version": "0.21.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"] if safety else null,
        "requires_safety_checker": safety,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if safety else null,
        "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def build_sdxl(cache: Path, work: Path) -> None:
    shared = dict(  # byte-identical between SDXL base and sdxl-turbo, as on the Hub
        text_encoder=(11, lambda s: _text_encoder("CLIPTextModel", s, 32)),
        text_encoder_2=(12, lambda s: _text_encoder("CLIPTextModelWithProjection", s, 32)),
        vae=(13, lambda s: _vae(s, 0.13025, force_upcast=True)),
        tokenizer=lambda f: write_tokenizer(f),
        tokenizer_2=lambda f: write_tokenizer(f, pad_token="!"),
    )
    base, turbo = work / "sdxl-base", work / "sdxl-turbo"
    write_pipeline(base, _sdxl_index("EulerDiscreteScheduler"), {**shared, "unet": (14, lambda s: _unet("sdxl", s, 64))},
                   "fp16", SCHEDULERS[SDXL_BASE])
    shutil.copytree(base, turbo)
    shutil.rmtree(turbo / "unet")
    write_pipeline(turbo, _sdxl_index("EulerAncestralDiscreteScheduler"),
                   {"unet": (15, lambda s: _unet("sdxl", s, 64))}, "fp16", SCHEDULERS[SDXL_TURBO])
    lcm = work / "lcm-sdxl"  # UNet files at the repo root
    _save(_unet("sdxl", 16, 64, lcm=True), lcm, "fp16", 1016, lambda s: _unet("sdxl", s, 64, lcm=True))
    write_lora(work / "lcm-lora-sdxl" / "pytorch_lora_weights.safetensors", _unet("sdxl", 0, 64), seed=17)
    lightning, hyper, dmd2 = work / "sdxl-lightning", work / "hyper-sd", work / "dmd2"
    for i, name in enumerate(LIGHTNING_FILES):  # full UNet state dicts at the root, in the base's config, fp16
        write_state_dict(lightning / name, _unet("sdxl", 40 + i, 64))
    for i, name in enumerate(HYPER_SD_FILES):  # both LoRA key formats seen in the wild: kohya and peft
        (write_lora if i % 2 == 0 else write_peft_lora)(hyper / name, _unet("sdxl", 0, 64), seed=50 + i)
    write_state_dict(dmd2 / "dmd2_sdxl_4step_unet_fp16.safetensors", _unet("sdxl", 60, 64))
    write_state_dict(dmd2 / "dmd2_sdxl_1step_unet_fp16.bin", _unet("sdxl", 61, 64))  # a torch pickle
    for repo, folder in ((SDXL_BASE, base), (SDXL_TURBO, turbo), (SDXL_LCM_UNET, lcm),
                         (SDXL_LCM_LORA, work / "lcm-lora-sdxl"), (SDXL_LIGHTNING, lightning),
                         (SDXL_HYPER_SD, hyper), (SDXL_DMD2, dmd2)):
        publish(cache, repo, folder)


def _sd15_parts(seed: int, hidden: int, safety: bool, lcm: bool = False) -> dict:
    parts = dict(
        text_encoder=(seed, lambda s: _text_encoder("CLIPTextModel", s, hidden)),
        vae=(seed + 1, lambda s: _vae(s, 0.18215, force_upcast=False)),
        unet=(seed + 2, lambda s: _unet("sd", s, hidden, lcm=lcm)),
        tokenizer=lambda f: write_tokenizer(f),
    )
    if safety:
        parts["safety_checker"] = (seed + 3, _safety_checker)
        parts["feature_extractor"] = write_feature_extractor
    return parts


def build_sd15(cache: Path, work: Path) -> None:
    base, turbo, lcm = work / "sd15", work / "sd-turbo", work / "lcm-dreamshaper"
    write_pipeline(base, _sd_index("StableDiffusionPipeline", "PNDMScheduler", True),
                   _sd15_parts(21, 32, safety=True), "fp16", SCHEDULERS[SD15_BASE])
    write_pipeline(turbo, _sd_index("StableDiffusionPipeline", "EulerDiscreteScheduler", False),
                   _sd15_parts(31, 48, safety=False), "fp16", SCHEDULERS[SD_TURBO])
    write_pipeline(lcm, _sd_index("LatentConsistencyModelPipeline", "LCMScheduler", True),
                   _sd15_parts(41, 32, safety=True, lcm=True), None, SCHEDULERS[SD15_LCM])
    write_lora(work / "lcm-lora-sdv1-5" / "pytorch_lora_weights.safetensors", _unet("sd", 0, 32), seed=27)
    for repo, folder in ((SD15_BASE, base), (SD_TURBO, turbo), (SD15_LCM, lcm),
                         (SD15_LCM_LORA, work / "lcm-lora-sdv1-5")):
        publish(cache, repo, folder)


BUILDERS = {"sdxl": build_sdxl, "sd15": build_sd15}


def build_fake_hub(cache: str | os.PathLike, families=("sdxl", "sd15")) -> Path:
    """Write the fake repos of `families` into the hub cache folder `cache` and return it."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for family in families:
            BUILDERS[family](cache, Path(work) / family)
    return cache


def build_mini(folder: str | os.PathLike) -> Path:
    """The mini family's on-disk layout with random weights: base/ (full pipeline, Euler), lcm/ (UNet at the
    root, time_cond_proj_dim set), lcm-lora/pytorch_lora_weights.safetensors, turbo/ (full pipeline whose
    text encoder, tokenizer and VAE are byte-identical to base's). Plain file names, no variants."""
    folder = Path(folder)
    parts = _sd15_parts(51, 32, safety=False)
    euler = {k: v for k, v in SCHEDULERS[SD_TURBO].items() if k != "timestep_spacing"}
    write_pipeline(folder / "base", _sd_index("StableDiffusionPipeline", "EulerDiscreteScheduler", False), parts,
                   None, {**euler, "timestep_spacing": "leading"})
    shutil.copytree(folder / "base", folder / "turbo")
    shutil.rmtree(folder / "turbo" / "unet")
    _unet("sd", 61, 32).save_pretrained(folder / "turbo" / "unet")
    _unet("sd", 62, 32, lcm=True).save_pretrained(folder / "lcm")
    write_lora(folder / "lcm-lora" / "pytorch_lora_weights.safetensors", _unet("sd", 0, 32), seed=63)
    return folder


def mini_family(folder: str | os.PathLike):
    """The registry's mini family with its repos moved to `folder` (as written by `build_mini`)."""
    from fastgen.registry import MINI, MINI_WEIGHTS, Family

    def moved(path):
        return str(Path(folder) / Path(path).relative_to(MINI_WEIGHTS)) if path else path

    methods = tuple(
        replace(m, repo=moved(m.repo), unet_repo=moved(m.unet_repo), lora_repo=moved(m.lora_repo))
        for m in MINI.methods
    )
    return Family(name="mini", label=MINI.label, methods=methods, description=MINI.description)


# --- the fake Hub over HTTP -------------------------------------------------------------------------------

class HubServer:
    """The repos of a fake Hub cache served over HTTP the way huggingface.co answers huggingface_hub: repo
    listings with file sizes (`/api/models/<repo>`), and `/<repo>/resolve/<rev>/<file>` with the commit, ETag
    and size headers, byte ranges, and the Hub's error codes. Failures are switched on per repo or file:

        with HubServer(cache) as server:      # server.endpoint -> HF_ENDPOINT
            server.gated.add(SDXL_BASE)        # 401 GatedRepo;  server.gone: 404 RepoNotFound
            server.gone_files.add((repo, f))  # 404 EntryNotFound
            server.cut[(repo, f)] = 1000      # the next answer for that file drops after 1000 bytes
            server.stall[(repo, f)] = 30      # sends half the file, then waits 30 s before the rest
    """

    def __init__(self, cache: str | os.PathLike):
        self.cache = Path(cache)
        self.gated: set[str] = set()
        self.gone: set[str] = set()
        self.gone_files: set[tuple[str, str]] = set()
        self.cut: dict[tuple[str, str], int] = {}
        self.stall: dict[tuple[str, str], float] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)

    def snapshot(self, repo: str) -> tuple[str, Path]:
        repo_dir = self.cache / f"models--{repo.replace('/', '--')}"
        commit = (repo_dir / "refs" / "main").read_text().strip()
        return commit, repo_dir / "snapshots" / commit

    def files(self, repo: str) -> dict[str, Path]:
        _, folder = self.snapshot(repo)
        return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def __enter__(self) -> "HubServer":
        import http.server
        import threading

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server.answer(self, body=False)

            def do_GET(self):
                server.answer(self, body=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, request, body: bool) -> None:
        import re
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (api or resolve).group(1) if (api or resolve) else None
        if repo is None:
            return self.send(request, 200 if path == "/" else 404, b"", body)
        if repo in self.gated:
            return self.send(request, 401, b'{"error": "Access to this model is restricted."}', body,
                             {"X-Error-Code": "GatedRepo"})
        if repo in self.gone or not (self.cache / f"models--{repo.replace('/', '--')}").is_dir():
            return self.send(request, 401 if api else 404, b'{"error": "Repository not found"}', body,
                             {"X-Error-Code": "RepoNotFound"})
        commit, _ = self.snapshot(repo)
        files = self.files(repo)
        if api:
            siblings = []
            for name, link in files.items():
                entry = {"rfilename": name, "size": link.stat().st_size, "blobId": link.resolve().name}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"sha256": link.resolve().name, "size": link.stat().st_size, "pointerSize": 134}
                siblings.append(entry)
            data = {"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings}
            return self.send(request, 200, json.dumps(data).encode(), body, {"Content-Type": "application/json"})
        name = resolve.group(3)
        headers = {"X-Repo-Commit": commit}
        if name not in files or (repo, name) in self.gone_files:
            return self.send(request, 404, b'{"error": "Entry not found"}', body,
                             {**headers, "X-Error-Code": "EntryNotFound"})
        data = files[name].read_bytes()
        etag = files[name].resolve().name
        headers["ETag"] = f'"{etag}"'
        if name.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range") or "")
        if ranged and body:
            start = int(ranged.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send(request, 206 if start else 200, data[start:], body, headers,
                  cut=self.cut.pop((repo, name), None) if body else None, stall=self.stall.get((repo, name)))

    @staticmethod
    def send(request, status: int, data: bytes, body: bool, headers: dict | None = None, cut: int | None = None,
             stall: float | None = None):
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if not body:
            return
        if cut is not None and cut < len(data):  # a connection that drops half-way through the file
            request.wfile.write(data[:cut])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(2)
            return
        if stall:
            import time

            request.wfile.write(data[:len(data) // 2])
            request.wfile.flush()
            time.sleep(stall)
            data = data[len(data) // 2:]
        request.wfile.write(data)


# --- single-file checkpoints ----------------------------------------------------------------------------------
# An SD 1.5 pipeline folder as one .safetensors in the original (LDM) key layout, as community fine-tunes are
# shared: the inverse of the renaming diffusers' from_single_file does, checked against it on the way out.

def _ldm_unet_key(key: str, layers: int, attention_blocks: set[int]) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # diffusers -> ldm
    if key in direct:
        return direct[key]
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
              ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    parts = key.split(".")
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        rest = ".".join(parts[3:])
        if parts[1] == "resnets":
            for new, old in resnet:
                rest = old + rest[len(new):] if rest.startswith(new + ".") else rest
        return f"middle_block.{index}.{rest}"
    kind, block, what, layer, rest = parts[0], int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
    if what == "resnets":
        for new, old in resnet:
            rest = old + rest[len(new):] if rest.startswith(new + ".") else rest
    if kind == "down_blocks":
        if what == "downsamplers":
            return f"input_blocks.{1 + block * (layers + 1) + layers}.0.op.{rest.removeprefix('conv.')}"
        return f"input_blocks.{1 + block * (layers + 1) + int(layer)}.{0 if what == 'resnets' else 1}.{rest}"
    if what == "upsamplers":
        slot = 2 if block in attention_blocks else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{slot}.{rest}"
    return f"output_blocks.{block * (layers + 1) + int(layer)}.{0 if what == 'resnets' else 1}.{rest}"


def _ldm_vae_key(key: str, blocks: int) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in direct:
        return direct[key]
    side, parts = key.split(".")[0], key.split(".")[1:]
    rest = ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"{side}.mid.block_{int(parts[2]) + 1}.{rest}"
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for new, old in names.items():
            rest = old + rest[len(new):] if rest.startswith(new + ".") else rest
        return f"{side}.mid.attn_1.{rest}"
    block = int(parts[1]) if side == "encoder" else blocks - 1 - int(parts[1])
    if parts[2] in ("downsamplers", "upsamplers"):
        return f"{side}.{'down' if side == 'encoder' else 'up'}.{block}.{parts[2][:-2]}.{'.'.join(parts[4:])}"
    return f"{side}.{'down' if side == 'encoder' else 'up'}.{block}.block.{parts[3]}.{'.'.join(parts[4:])}"


def write_single_file(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`folder` (an SD 1.5 pipeline in diffusers layout) as one LDM-layout .safetensors at `path`; each part
    checked to come back unchanged through diffusers' own conversion."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    out = {}
    unet_sd = unet.state_dict()
    for key, value in unet_sd.items():
        out["model.diffusion_model." + _ldm_unet_key(key, unet.config.layers_per_block, attention)] = value
    vae_sd = vae.state_dict()
    for key, value in vae_sd.items():
        ldm = _ldm_vae_key(key, len(vae.config.up_block_types))
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + ldm] = value
    for key, value in text.state_dict().items():  # LDM keeps the CLIP text model's own "text_model." prefix
        out["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    back = convert_ldm_unet_checkpoint(out, dict(unet.config))
    assert set(back) == set(unet_sd) and all(torch.equal(back[k], unet_sd[k]) for k in back), "unet keys"
    back = convert_ldm_vae_checkpoint(out, dict(vae.config))
    assert set(back) == set(vae_sd) and all(torch.equal(back[k], vae_sd[k]) for k in back), "vae keys"
    path = Path(path)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path
