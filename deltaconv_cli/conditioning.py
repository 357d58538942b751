"""The two calls distillation and evaluation make on any family's pipeline: encode prompts into the
denoiser's conditioning, and call the denoiser for its prediction. What each family does lives in its
:class:`~deltaconv_cli.architectures.Family` entry."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin

from .architectures import denoiser_of, family_for


def encode_prompts(pipe: Any, prompts: list[str], height: int, width: int) -> dict[str, Any]:
    """Keyword arguments (besides the latents and timestep) for the pipeline's denoiser, from the
    pipeline's own ``encode_prompt`` (CLIP for SD, both CLIP encoders plus size conditioning for SDXL, T5
    with its attention mask for PixArt); ``height`` and ``width`` are in pixels."""
    return family_for(denoiser_of(pipe)).encode_prompts(pipe, prompts, height, width)


def latent_posterior(pipe: Any, images: torch.Tensor) -> Any:
    """The VAE's posterior of ``images`` (in [-1, 1]), in float32 where the VAE asks to be upcast (SDXL's
    VAE overflows in fp16). Latents are ``sample`` or ``mode()`` times ``vae.config.scaling_factor``."""
    vae = pipe.vae
    dtype = torch.float32 if vae.config.get("force_upcast") else vae.dtype
    return vae.to(dtype).encode(images.to(vae.device, dtype)).latent_dist


def predict(
    denoiser: ModelMixin, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
) -> torch.Tensor:
    """The denoiser's prediction (for a learned-variance DiT, the prediction channels only)."""
    return family_for(denoiser).call(denoiser, latents, timesteps, cond)
