"""Everything deltaconv knows about each supported denoiser family, one :class:`Family` entry each.

A family says which diffusers class it is, which modules hand the token grid to the self-attention
layers, the authors' kernel sizes, how a pipeline of the family encodes prompts and calls its denoiser,
which part of the output is the prediction, where distillation taps the residual stream, its default
recipe and what its pipeline needs at sampling time. Surgery, distillation, sampling and profiling read
only these entries: supporting a new family is one more entry (:func:`register_family`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import ModelMixin, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from .errors import DeltaConvError

RandomTensor = Callable[..., torch.Tensor]  # randn(*shape) on the inputs' device and dtype


@dataclass(frozen=True)
class Family:
    """One family of denoisers.

    Attributes:
        name: short name saved in adapters (``"sd"``, ``"sdxl"``, ``"pixart"``).
        denoiser_class: the diffusers class of its denoiser.
        label: what users call it, for messages.
        kernel_sizes: the authors' kernel sizes (docs/method.md §1.2): ``{"all": k}``, or ``"down"``
            from high to low resolution, ``"mid"``, and ``"up"`` from low to high resolution.
        grid_sources: module classes whose 4-D input carries the token grid of the layers below them.
        text_tokens: length of the text sequence its pipelines pass.
        default_recipe: the recipe ``distill`` uses for it (a name from ``recipes/``).
        encode_prompts: ``(pipe, prompts, height, width) -> kwargs`` for the denoiser besides the
            latents and the timestep.
        random_inputs: ``(denoiser, latents, timesteps, randn) -> kwargs`` of one denoiser call with
            conditions of the shapes its pipeline passes (for tracing and profiling without a pipeline).
        call: ``(denoiser, latents, timesteps, cond) -> prediction`` (only the prediction channels).
        latent_stride: ``denoiser -> int``: latent sizes must be multiples of it.
        pipeline_options: extra keyword arguments its pipeline needs to sample exactly the asked size.
        guidance_rescale: whether its pipeline takes diffusers' ``guidance_rescale``.
        late_guidance: whether its pipeline reads the guidance scale anew at every step (so that
            guidance can start after the first steps; PixArt's fixes it for the whole call).
        matches: ``config -> bool``, to tell families that share a class apart.
        residual_tap: ``block -> module`` whose first input is the residual stream right after the
            self-attention sub-block (the feature ``distill`` compares by default).
        released_gate: the gate of the ΔConv authors' released students of this family (their files
            do not say; docs/method.md §1.1).
        released_base: the hub id of the model those students were distilled from (the authors'
            ``cfgs/train/py/*_dist.py``), recorded in the adapters imported from them.
    """

    name: str
    denoiser_class: type[ModelMixin]
    label: str
    kernel_sizes: dict[str, Any]
    grid_sources: tuple[type[nn.Module], ...]
    text_tokens: int
    default_recipe: str
    encode_prompts: Callable[[Any, list[str], int, int], dict[str, Any]]
    random_inputs: Callable[[ModelMixin, torch.Tensor, torch.Tensor, RandomTensor], dict[str, Any]]
    call: Callable[[ModelMixin, torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]
    latent_stride: Callable[[ModelMixin], int]
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    guidance_rescale: bool = True
    late_guidance: bool = True
    matches: Callable[[Any], bool] = lambda config: True
    residual_tap: Callable[[BasicTransformerBlock], nn.Module] = lambda block: _residual_tap(block)
    released_gate: str = "scaled"
    released_base: str | None = None


def _residual_tap(block: BasicTransformerBlock) -> nn.Module:
    """The sub-module of a BasicTransformerBlock whose first input is the residual stream right after
    the self-attention sub-block (PixArt's ada_norm_single feeds it to attn2 without a norm)."""
    single = block.norm_type == "ada_norm_single"
    if block.attn2 is not None:
        return block.attn2 if single else block.norm2
    return block.norm2 if single else block.norm3


# ----------------------------------------------------------------------------------------------- UNets


def _unet_stride(denoiser: ModelMixin) -> int:
    return 2 ** (len(denoiser.config.block_out_channels) - 1)


def _cross_attention_dim(denoiser: ModelMixin) -> int:
    dim = denoiser.config.cross_attention_dim
    return dim[0] if isinstance(dim, list | tuple) else dim


def _unet_call(denoiser: ModelMixin, latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    return denoiser(latents, t, **cond).sample


def _sd_prompts(pipe: Any, prompts: list[str], height: int, width: int) -> dict[str, Any]:
    embeds, _ = pipe.encode_prompt(prompts, pipe.unet.device, 1, False)
    return {"encoder_hidden_states": embeds}


def _sd_random(denoiser: ModelMixin, latents: torch.Tensor, t: torch.Tensor, randn: RandomTensor) -> dict:
    text = randn(len(latents), SD.text_tokens, _cross_attention_dim(denoiser))
    return {"sample": latents, "timestep": t, "encoder_hidden_states": text}


def _sdxl_time_ids(height: int, width: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    # SDXL's size conditioning: original size, crop top-left, target size (no crop here).
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=like.dtype, device=like.device)
    return ids.repeat(batch, 1)


def _sdxl_prompts(pipe: Any, prompts: list[str], height: int, width: int) -> dict[str, Any]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    added = {"text_embeds": pooled, "time_ids": _sdxl_time_ids(height, width, len(prompts), embeds)}
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}


def _sdxl_random(denoiser: ModelMixin, latents: torch.Tensor, t: torch.Tensor, randn: RandomTensor) -> dict:
    cfg, batch = denoiser.config, len(latents)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {
        "sample": latents,
        "timestep": t,
        "encoder_hidden_states": randn(batch, SDXL.text_tokens, _cross_attention_dim(denoiser)),
        "added_cond_kwargs": {"text_embeds": randn(batch, pooled), "time_ids": randn(batch, 6)},
    }


# ----------------------------------------------------------------------------------------------- DiTs


def _pixart_conditions(denoiser: ModelMixin, batch: int, height: int, width: int, like: torch.Tensor) -> dict:
    """PixArt's resolution and aspect-ratio conditioning for an image of height x width pixels (used only
    by models trained with additional conditions)."""
    if not denoiser.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    size = torch.tensor([[height, width]], dtype=like.dtype, device=like.device)
    return {
        "resolution": size.repeat(batch, 1),
        "aspect_ratio": torch.full((batch, 1), height / width, dtype=like.dtype, device=like.device),
    }


def _pixart_prompts(pipe: Any, prompts: list[str], height: int, width: int) -> dict[str, Any]:
    embeds, mask, _, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, device=pipe.transformer.device, clean_caption=False
    )
    added = _pixart_conditions(pipe.transformer, len(prompts), height, width, embeds)
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": added}


def _pixart_random(denoiser: ModelMixin, latents: torch.Tensor, t: torch.Tensor, randn: RandomTensor) -> dict:
    cfg, batch = denoiser.config, len(latents)
    text = randn(batch, PIXART.text_tokens, cfg.caption_channels or cfg.cross_attention_dim)
    vae_factor = 8  # every PixArt VAE
    height, width = (side * vae_factor for side in latents.shape[-2:])
    added = _pixart_conditions(denoiser, batch, height, width, text)
    return {
        "hidden_states": latents,
        "timestep": t,
        "encoder_hidden_states": text,
        "added_cond_kwargs": added,
    }


def _dit_call(denoiser: ModelMixin, latents: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    # A learned-variance DiT predicts twice the latent channels: the first half is the prediction.
    return denoiser(latents, timestep=t, **cond).sample[:, : latents.shape[1]]


# ----------------------------------------------------------------------------------------------- registry

SD = Family(
    name="sd",
    denoiser_class=UNet2DConditionModel,
    label="SD 1.x / 2.x UNet",
    kernel_sizes={"down": (7, 9, 5), "mid": 3, "up": (5, 9, 11)},
    grid_sources=(Transformer2DModel,),
    text_tokens=77,  # CLIP
    default_recipe="sd15",
    encode_prompts=_sd_prompts,
    random_inputs=_sd_random,
    call=_unet_call,
    latent_stride=_unet_stride,
    matches=lambda config: config.get("addition_embed_type") != "text_time",
    released_base="Lykon/DreamShaper",  # an SD 1.5 fine-tune; its diffusers weights are DreamShaper 7
)
SDXL = Family(
    name="sdxl",
    denoiser_class=UNet2DConditionModel,
    label="SDXL UNet",
    kernel_sizes={"down": (9, 7), "mid": 9, "up": (9, 13)},
    grid_sources=(Transformer2DModel,),
    text_tokens=77,  # both CLIP encoders
    default_recipe="sdxl",
    encode_prompts=_sdxl_prompts,
    random_inputs=_sdxl_random,
    call=_unet_call,
    latent_stride=_unet_stride,
    matches=lambda config: config.get("addition_embed_type") == "text_time",
    released_base="stabilityai/stable-diffusion-xl-base-1.0",
)
PIXART = Family(
    name="pixart",
    denoiser_class=PixArtTransformer2DModel,
    label="PixArt-α/Σ DiT",
    kernel_sizes={"all": 13},
    grid_sources=(PixArtTransformer2DModel,),
    text_tokens=300,  # PixArt-Sigma's T5
    default_recipe="pixart-sigma",
    encode_prompts=_pixart_prompts,
    random_inputs=_pixart_random,
    call=_dit_call,
    latent_stride=lambda denoiser: denoiser.config.patch_size,
    pipeline_options={"use_resolution_binning": False},  # PixArt would otherwise snap to its own sizes
    guidance_rescale=False,
    late_guidance=False,
    released_gate="sigmoid",
    released_base="PixArt-alpha/PixArt-Sigma-XL-2-512-MS",  # pixart512-*; pixart1024-*: see interop
)
FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL, PIXART)}


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


def register_family(family: Family) -> Family:
    """Support one more family of denoisers (its name must be new)."""
    if family.name in FAMILIES:
        raise ValueError(f"a family named {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


def supported_text() -> str:
    names = dict.fromkeys(f.denoiser_class.__name__ for f in FAMILIES.values())
    labels = {name: ", ".join(f.label for f in FAMILIES.values() if f.denoiser_class.__name__ == name)
              for name in names}  # fmt: skip
    return "; ".join(f"{name} ({label})" for name, label in labels.items())


def denoiser_class(name: str) -> type[ModelMixin]:
    """The diffusers class of a supported denoiser, by class name."""
    for family in FAMILIES.values():
        if family.denoiser_class.__name__ == name:
            return family.denoiser_class
    raise DeltaConvError(f"unsupported model class {name}; supported: {supported_text()}")


def family_for(denoiser: ModelMixin) -> Family:
    """The family of a denoiser: its exact class, then the family's config test."""
    for family in FAMILIES.values():
        if type(denoiser) is family.denoiser_class and family.matches(denoiser.config):
            return family
    raise DeltaConvError(f"unsupported model class {type(denoiser).__name__}; supported: {supported_text()}")


def family_of(denoiser: ModelMixin) -> str:
    """The name of :func:`family_for`'s family (``"sd"``, ``"sdxl"``, ``"pixart"``, ...)."""
    return family_for(denoiser).name


def denoiser_of(model: Any) -> ModelMixin:
    """The denoiser of a pipeline (``unet`` or ``transformer``), or the model itself if it is one."""
    for attr in ("unet", "transformer"):
        candidate = getattr(model, attr, None)
        if isinstance(candidate, ModelMixin):
            model = candidate
            break
    family_for(model)  # refuses unsupported classes with the list of supported ones
    return model


def latent_stride(denoiser: ModelMixin) -> int:
    """Latent height and width must be multiples of this (UNet downsampling, or the DiT patch size)."""
    return family_for(denoiser).latent_stride(denoiser)


def native_latent_side(denoiser: ModelMixin) -> int:
    """The side of the latent the denoiser was trained on (its config's ``sample_size``; the first of two)."""
    native = denoiser.config.sample_size
    return native if isinstance(native, int) else native[0]


def latent_size(height: int, width: int, vae_factor: int, stride: int) -> tuple[int, int]:
    """The latent height and width of a ``height`` x ``width`` image, or a clear error where a model with
    this VAE factor and :func:`latent_stride` cannot take that size."""
    step = vae_factor * stride
    if height <= 0 or width <= 0 or height % step or width % step:
        raise DeltaConvError(
            f"resolution {height}x{width} is not a multiple of {step} pixels (VAE factor {vae_factor} x "
            f"latent stride {stride}); valid sizes are {step}, {2 * step}, {3 * step}, ..."
        )
    return height // vae_factor, width // vae_factor


def meta_denoiser(class_name: str, config: dict[str, Any], dtype: torch.dtype | None = None) -> ModelMixin:
    """The architecture of a denoiser with no weights allocated (meta device), from its config."""
    cls = denoiser_class(class_name)
    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast.
    return torch.nn.Module.to(model, dtype) if dtype is not None else model


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

    def randn(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    latents = randn(batch, denoiser.config.in_channels, latent_height, latent_width)
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    return family_for(denoiser).random_inputs(denoiser, latents, timestep, randn)
