"""Family-specific glue between a pipeline and its denoiser: text conditioning and the denoiser call.

Prompts are encoded with the pipeline's own ``encode_prompt`` (CLIP for SD, both CLIP encoders plus the
pooled embedding and size conditioning for SDXL, T5 with its attention mask for PixArt).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin

from .architectures import family_of


def encode_prompts(pipe: Any, prompts: list[str], height: int, width: int) -> dict[str, Any]:
    """Keyword arguments (besides the latents and timestep) for the pipeline's denoiser."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    family = family_of(denoiser)
    device = denoiser.device
    if family == "sd":
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        # SDXL's size conditioning: original size, crop top-left, target size (no crop here).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=device)
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)},
        }
    embeds, mask, _, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, device=device, clean_caption=False
    )
    added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
    if denoiser.use_additional_conditions:
        added = {
            "resolution": torch.tensor([[height, width]], dtype=embeds.dtype, device=device).repeat(
                len(prompts), 1
            ),
            "aspect_ratio": torch.full((len(prompts), 1), height / width, dtype=embeds.dtype, device=device),
        }
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": added}


def predict(
    denoiser: ModelMixin, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
) -> torch.Tensor:
    """The denoiser's prediction (PixArt's learned variance channels dropped: the prediction half only)."""
    if family_of(denoiser) == "pixart":
        out = denoiser(latents, timestep=timesteps, **cond).sample
        return out[:, : latents.shape[1]]
    return denoiser(latents, timesteps, **cond).sample
