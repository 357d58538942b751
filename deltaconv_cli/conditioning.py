"""The calls distillation, sampling and evaluation make on any family's pipeline: encode prompts into the
denoiser's conditioning, call the denoiser for its prediction, and encode images with the VAE (tiled
when they are larger than the VAE's native size). What each family does lives in its
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


def use_tiled_vae(pipe: Any, size: tuple[int, int]) -> bool:
    """Switch diffusers' tiled VAE decoding and encoding on for images of ``size`` (pixels) larger than
    the VAE's native size, off otherwise; returns whether it is on. An untiled decoder's activations grow
    with the image (tens of GiB for SD's VAE at 4096 px); tiles of the native size, blended where they
    overlap, keep it to one tile's worth, at the price of small differences near tile seams."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        return False
    native = vae.config.get("sample_size")
    if native is None:  # no native size to compare with: leave the VAE as it is
        return bool(getattr(vae, "use_tiling", False))
    native = native if isinstance(native, int) else min(native)
    tiled = max(size) > native
    vae.enable_tiling() if tiled else vae.disable_tiling()
    return tiled


def latent_posterior(pipe: Any, images: torch.Tensor) -> Any:
    """The VAE's posterior of ``images`` (in [-1, 1]), in float32 where the VAE asks to be upcast (SDXL's
    VAE overflows in fp16), tiled for images larger than the VAE's native size (:func:`use_tiled_vae`).
    Latents are ``sample`` or ``mode()`` times ``vae.config.scaling_factor``."""
    vae = pipe.vae
    use_tiled_vae(pipe, tuple(images.shape[-2:]))
    dtype = torch.float32 if vae.config.get("force_upcast") else vae.dtype
    return vae.to(dtype).encode(images.to(vae.device, dtype)).latent_dist


def predict(
    denoiser: ModelMixin, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
) -> torch.Tensor:
    """The denoiser's prediction (for a learned-variance DiT, the prediction channels only)."""
    return family_for(denoiser).call(denoiser, latents, timesteps, cond)
