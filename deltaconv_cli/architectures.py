"""What deltaconv knows about each supported denoiser family: classes, default kernel sizes, inputs."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import ModelMixin, PixArtTransformer2DModel, UNet2DConditionModel

from .errors import DeltaConvError

SUPPORTED_DENOISERS: dict[str, type[ModelMixin]] = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "PixArtTransformer2DModel": PixArtTransformer2DModel,
}
SUPPORTED_TEXT = (
    "UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) and PixArtTransformer2DModel (PixArt-alpha/Sigma)"
)

# The authors' kernel sizes (docs/method.md §1.2). "down" runs from high to low resolution
# (down_blocks order), "up" from low to high resolution (up_blocks order).
FAMILY_KERNEL_SIZES: dict[str, dict[str, Any]] = {
    "sd": {"down": (7, 9, 5), "mid": 3, "up": (5, 9, 11)},
    "sdxl": {"down": (9, 7), "mid": 9, "up": (9, 13)},
    "pixart": {"all": 13},
}

# Public configs of the reference models (their denoisers), so that architectures can be built on the
# meta device, counted and profiled without downloading weights. Keys not given take diffusers' defaults.
_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
BUILTIN_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "sd15": (  # runwayml/stable-diffusion-v1-5 unet/config.json
        "UNet2DConditionModel",
        {**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
    ),
    "sd21": (  # stabilityai/stable-diffusion-2-1 unet/config.json
        "UNet2DConditionModel",
        {
            **_SD_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
            "upcast_attention": True,
        },
    ),
    "sdxl": (  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        "UNet2DConditionModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 128,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
    ),
    "pixart-sigma": (  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
        "PixArtTransformer2DModel",
        {
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 28,
            "cross_attention_dim": 1152,
            "caption_channels": 4096,
            "sample_size": 128,
            "patch_size": 2,
            "interpolation_scale": 2,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "use_additional_conditions": False,
        },
    ),
}

# Text sequence lengths the families' pipelines use (CLIP: 77 tokens; PixArt-Sigma's T5: 300).
TEXT_TOKENS = {"sd": 77, "sdxl": 77, "pixart": 300}


def denoiser_of(model: Any) -> ModelMixin:
    """The denoiser of a pipeline (``unet`` or ``transformer``), or the model itself if it is one."""
    for attr in ("unet", "transformer"):
        candidate = getattr(model, attr, None)
        if isinstance(candidate, ModelMixin):
            model = candidate
            break
    if type(model).__name__ not in SUPPORTED_DENOISERS:
        raise DeltaConvError(f"unsupported model class {type(model).__name__}; supported: {SUPPORTED_TEXT}")
    return model


def denoiser_class(name: str) -> type[ModelMixin]:
    """The diffusers class of a supported denoiser, by class name."""
    try:
        return SUPPORTED_DENOISERS[name]
    except KeyError:
        raise DeltaConvError(f"unsupported model class {name}; supported: {SUPPORTED_TEXT}") from None


def family_of(denoiser: ModelMixin) -> str:
    """``"sd"`` (SD 1.x/2.x-like UNet), ``"sdxl"`` (UNet with text-time conditioning) or ``"pixart"``."""
    if isinstance(denoiser, PixArtTransformer2DModel):
        return "pixart"
    if denoiser.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd"


def meta_denoiser(class_name: str, config: dict[str, Any], dtype: torch.dtype | None = None) -> ModelMixin:
    """The architecture of a denoiser with no weights allocated (meta device), from its config."""
    cls = denoiser_class(class_name)
    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast.
    return torch.nn.Module.to(model, dtype) if dtype is not None else model


def latent_stride(denoiser: ModelMixin) -> int:
    """Latent height and width must be multiples of this (UNet downsampling, or the DiT patch size)."""
    if isinstance(denoiser, PixArtTransformer2DModel):
        return denoiser.config.patch_size
    return 2 ** (len(denoiser.config.block_out_channels) - 1)


def _cross_attention_dim(denoiser: ModelMixin) -> int:
    dim = denoiser.config.cross_attention_dim
    return dim[0] if isinstance(dim, list | tuple) else dim


def denoiser_inputs(
    denoiser: ModelMixin,
    batch: int,
    latent_height: int,
    latent_width: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Keyword arguments for one denoiser call on random inputs of the given latent size.

    Shapes follow what the family's pipeline passes (text length, SDXL's added conditions, PixArt's
    resolution conditioning), so the call exercises the same code path as sampling does.
    """
    param = next(denoiser.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    family = family_of(denoiser)
    cfg = denoiser.config

    def randn(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    sample = randn(batch, cfg.in_channels, latent_height, latent_width)
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    if family == "pixart":
        text_dim = cfg.caption_channels or cfg.cross_attention_dim
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if denoiser.use_additional_conditions:
            vae_factor = 8
            size = torch.tensor([latent_height * vae_factor, latent_width * vae_factor], dtype=dtype)
            added = {
                "resolution": size.repeat(batch, 1).to(device),
                "aspect_ratio": torch.full((batch, 1), latent_height / latent_width, dtype=dtype).to(device),
            }
        return {
            "hidden_states": sample,
            "encoder_hidden_states": randn(batch, TEXT_TOKENS[family], text_dim),
            "timestep": timestep,
            "added_cond_kwargs": added,
        }
    kwargs: dict[str, Any] = {
        "sample": sample,
        "timestep": timestep,
        "encoder_hidden_states": randn(batch, TEXT_TOKENS[family], _cross_attention_dim(denoiser)),
    }
    if family == "sdxl":
        time_ids = 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, cfg.projection_class_embeddings_input_dim - time_ids),
            "time_ids": randn(batch, 6),
        }
    return kwargs
