"""Architectures of the mini family: standard diffusers/transformers classes at a miniature size.

Everything here is a configuration of a stock class (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer), so the trained family loads with the same `from_pretrained` calls as any Hub model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .world import COLORS, SHAPES, SIZES

MAX_TOKENS = 16  # the longest grammar prompt is 10 tokens with its start and end markers
TEXT_WIDTH = 64
LATENT_SIZE = 16  # 64x64 pixels -> 16x16x4 latents
WORDS = ("a", "an", "on", "background", *SIZES, *COLORS, *SHAPES)

# The UNet: three resolutions (16, 8, 4), cross-attention on the lower two. About 2.3M parameters:
# small enough that three UNets, the VAE and the text encoder ship in under 20 MB as fp16,
# and that a 50-step run with guidance takes ~1 s on two CPU cores.
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 80),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,
    norm_num_groups=16,
)
# The VAE: two downsamplings (64 -> 16), four latent channels, as in Stable Diffusion's f=8 VAE but f=4.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 48, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
# The noise schedule of Stable Diffusion 1.5 / SDXL, so that every scheduler behaves as it does there.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")


def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table, so that any text tokenizes (unknown words fall back to letters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer whose merges spell out each grammar word as one token."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "r e" -> "re", "re d</w>" -> "red</w>"
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    merges = list(dict.fromkeys(merges))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)


def new_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def new_unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)
