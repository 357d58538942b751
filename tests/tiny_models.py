"""Tiny random-weight stand-ins with the class and config layout of SD 1.x, SD 2.x, SDXL and PixArt-Sigma.

Everything is built in code (no hub): tokenizers from a small vocabulary, models from configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

WORDS = ["a", "red", "blue", "green", "circle", "square", "cat", "photo", "of", "the"]
LAYOUTS = ("sd1", "sd2", "sdxl", "pixart")


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each of WORDS as one token."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        prefix = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{prefix} {piece}")
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=300)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def clip_text_encoder(projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_unet(layout: str) -> UNet2DConditionModel:
    common = dict(sample_size=16, layers_per_block=1, norm_num_groups=8)
    if layout == "sd1":
        return UNet2DConditionModel(
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            **common,
        )
    if layout == "sd2":  # linear projections and per-stage head counts
        return UNet2DConditionModel(
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            **common,
        )
    if layout == "sdxl":  # no attention at the top stage, 2 transformer layers at the bottom, text-time
        return UNet2DConditionModel(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=64,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            **common,
        )
    raise ValueError(layout)


def tiny_pixart() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=8,
        patch_size=2,
        use_additional_conditions=False,
    )


def tiny_denoiser(layout: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_pixart() if layout == "pixart" else tiny_unet(layout)


def tiny_pipeline(layout: str, scratch: Path):
    """A whole pipeline of this layout with random weights."""
    torch.manual_seed(0)
    if layout in ("sd1", "sd2"):
        scheduler = DDIMScheduler(prediction_type="v_prediction" if layout == "sd2" else "epsilon")
        return StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=clip_text_encoder(),
            tokenizer=clip_tokenizer(scratch / "tok"),
            unet=tiny_unet(layout),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if layout == "sdxl":
        return StableDiffusionXLPipeline(
            vae=tiny_vae(),
            text_encoder=clip_text_encoder(),
            text_encoder_2=clip_text_encoder(projection=True),
            tokenizer=clip_tokenizer(scratch / "tok"),
            tokenizer_2=clip_tokenizer(scratch / "tok2"),
            unet=tiny_unet("sdxl"),
            scheduler=EulerDiscreteScheduler(),
        )
    if layout == "pixart":
        text = T5EncoderModel(
            T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2)
        )
        return PixArtSigmaPipeline(
            tokenizer=t5_tokenizer(),
            text_encoder=text,
            vae=tiny_vae(),
            transformer=tiny_pixart(),
            scheduler=DPMSolverMultistepScheduler(),
        )
    raise ValueError(layout)


def pipeline_call_kwargs(layout: str) -> dict:
    """Extra arguments a tiny pipeline call needs (PixArt's resolution binning knows only real sizes)."""
    return {"use_resolution_binning": False} if layout == "pixart" else {}
