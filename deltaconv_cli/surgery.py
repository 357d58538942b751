"""Finding the self-attention sites of a denoiser and swapping them for ΔConvBlocks.

The blocks live in one adapter (:class:`DeltaConvAdapter`, a diffusers ``ModelMixin`` + ``ConfigMixin``)
that records which module each block replaces. ``mount`` puts the blocks in place, ``unmount`` restores
the original attention modules, and ``save_pretrained`` / ``from_pretrained`` move only the blocks.

Neither a transformer block nor an attention processor sees the token grid (H, W), so a forward pre-hook
on the module whose input is the spatial latent of that stage (a ``Transformer2DModel`` inside UNets,
the ``PixArtTransformer2DModel`` itself for DiTs) records it for the blocks below it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .architectures import denoiser_inputs, denoiser_of, family_for
from .errors import DeltaConvError
from .mixers import check_init, get_mixer


@dataclass(frozen=True)
class SelfAttentionSite:
    """One self-attention layer of a denoiser."""

    name: str  # module path of the attention, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    stage: str  # "down_blocks.0", "mid_block", "up_blocks.3" or "transformer_blocks"
    channels: int
    heads: int
    grid_source: str  # module path whose 4-D input carries this layer's token grid ("" = the denoiser)
    patch_size: int  # tokens are patch_size x patch_size cells of that input


def _stage_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def self_attention(denoiser: nn.Module, name: str) -> nn.Module:
    """The self-attention module at ``name``: the original one where blocks are mounted in its place."""
    module = denoiser.get_submodule(name)
    return module.original if isinstance(module, ReplacedSelfAttention) else module


def find_self_attention_sites(model: Any) -> list[SelfAttentionSite]:
    """Every self-attention of every transformer block of a supported denoiser, in forward order (the
    base model's, also where blocks are mounted in their place)."""
    denoiser = denoiser_of(model)
    carriers = family_for(denoiser).grid_sources
    grid_sources = {name: module for name, module in denoiser.named_modules() if isinstance(module, carriers)}
    sites = []
    for name, module in denoiser.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        attn = self_attention(module, "attn1")
        if module.only_cross_attention or attn.is_cross_attention:
            continue
        source = max((s for s in grid_sources if s == "" or name.startswith(s + ".")), key=len)
        patch = grid_sources[source].config.get("patch_size") or 1
        sites.append(
            SelfAttentionSite(
                name=f"{name}.attn1",
                stage=_stage_of(name),
                channels=attn.to_q.in_features,
                heads=attn.heads,
                grid_source=source,
                patch_size=patch,
            )
        )
    # named_modules() lists a UNet's up_blocks before its mid_block; order the sites as forward runs them.
    flow = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(sites, key=lambda site: flow.get(site.stage.split(".")[0], 0))


def _stages(sites: Sequence[SelfAttentionSite], prefix: str) -> list[str]:
    names = {s.stage for s in sites if s.stage.startswith(prefix)}
    return sorted(names, key=lambda stage: int(stage.split(".")[1]))


def default_kernel_sizes(model: Any) -> dict[str, int]:
    """The authors' kernel size for each stage of this model (docs/method.md §1.2).

    A model with fewer or more attention stages than the family's reference model takes the
    reference values from the high-resolution end; extra low-resolution stages repeat the
    lowest-resolution reference value.
    """
    denoiser = denoiser_of(model)
    sites = find_self_attention_sites(denoiser)
    ref = family_for(denoiser).kernel_sizes
    if "all" in ref:
        return {s.stage: ref["all"] for s in sites}
    sizes = {"mid_block": ref["mid"]}
    down, up = _stages(sites, "down_blocks"), _stages(sites, "up_blocks")
    for i, stage in enumerate(down):  # high -> low resolution
        sizes[stage] = ref["down"][min(i, len(ref["down"]) - 1)]
    for i, stage in enumerate(reversed(up)):  # high -> low resolution
        sizes[stage] = ref["up"][max(len(ref["up"]) - 1 - i, 0)]
    return {s.stage: sizes[s.stage] for s in sites}


def resolve_kernel_sizes(model: Any, overrides: int | Mapping[str, int] | None = None) -> list[int]:
    """Kernel size of each site: family defaults, then overrides by stage or by site name.

    ``overrides`` is one size for every site, or a mapping from stage names (``"mid_block"``) or
    site names (``"mid_block.attentions.0.transformer_blocks.0.attn1"``) to sizes.
    """
    sites = find_self_attention_sites(model)
    if isinstance(overrides, int):
        return [overrides for _ in sites]
    by_stage = default_kernel_sizes(model)
    overrides = dict(overrides or {})
    known = {s.stage for s in sites} | {s.name for s in sites}
    unknown = sorted(set(overrides) - known)
    if unknown:
        stages = ", ".join(sorted({s.stage for s in sites}))
        raise DeltaConvError(f"unknown layer or stage {unknown[0]!r} in kernel sizes; stages: {stages}")
    return [overrides.get(s.name, overrides.get(s.stage, by_stage[s.stage])) for s in sites]


def read_kernel_sizes_file(path: Path) -> dict[str, int]:
    """Kernel sizes from JSON: ``{"stage or site": k, ...}`` or ``{"kernel_sizes": {...}, ...}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DeltaConvError(f"cannot read kernel sizes from {path}: {err}") from None
    data = data.get("kernel_sizes", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise DeltaConvError(f"{path} must hold a JSON object mapping stage or layer names to integers")
    return data


def projection_mid_dims(mixer: str, mid_dim_scale: int, channels: Sequence[int]) -> list[int] | None:
    """LinFusion's feature-MLP width per site for ``mid_dim_scale`` (see
    :meth:`DeltaConvAdapter.construct_for`); None for the default, full width."""
    if (
        isinstance(mid_dim_scale, bool)
        or not isinstance(mid_dim_scale, int)
        or not (mid_dim_scale >= 1 or mid_dim_scale == -1)
    ):
        raise DeltaConvError(
            f"mid_dim_scale must be a whole number >= 1, or -1 (no MLP), got {mid_dim_scale!r}"
        )
    if mid_dim_scale == 1:
        return None
    if "projection_mid_dims" not in get_mixer(mixer).optional_per_site:
        raise DeltaConvError(f"mid_dim_scale sets LinFusion's feature MLPs; {mixer} blocks have none")
    if mid_dim_scale == -1:
        return [-1 for _ in channels]
    narrow = [c for c in channels if c < mid_dim_scale]
    if narrow:
        raise DeltaConvError(
            f"mid_dim_scale {mid_dim_scale} leaves no width for a site of {narrow[0]} channels"
        )
    return [c // mid_dim_scale for c in channels]


class TokenGrid:
    """The (H, W) token grid of the latest forward of one grid-carrying module, set by a pre-hook."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self.size: tuple[int, int] | None = None

    def record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.ndim == 4:
            self.size = (hidden.shape[-2] // self.patch_size, hidden.shape[-1] // self.patch_size)
        else:
            self.size = None


def attach_token_grids(
    denoiser: ModelMixin, sites: Sequence[SelfAttentionSite]
) -> tuple[dict[str, TokenGrid], list[torch.utils.hooks.RemovableHandle]]:
    """One :class:`TokenGrid` per grid source of ``sites``, kept current by forward pre-hooks."""
    grids: dict[str, TokenGrid] = {}
    handles = []
    for site in sites:
        if site.grid_source not in grids:
            grid = TokenGrid(site.patch_size)
            module = denoiser.get_submodule(site.grid_source)
            handles.append(module.register_forward_pre_hook(grid.record, with_kwargs=True))
            grids[site.grid_source] = grid
    return grids, handles


def trace_token_grids(model: Any, latent_height: int, latent_width: int) -> dict[str, tuple[int, int]]:
    """The token grid each self-attention site sees for a latent of the given size.

    Runs the denoiser's forward on the meta device when its weights are there (no compute, no memory),
    otherwise on a batch of one.
    """
    denoiser = denoiser_of(model)
    sites = find_self_attention_sites(denoiser)
    grids, handles = attach_token_grids(denoiser, sites)
    try:
        with torch.no_grad():
            denoiser(**denoiser_inputs(denoiser, 1, latent_height, latent_width))
    finally:
        for handle in handles:
            handle.remove()
    return {s.name: grids[s.grid_source].size for s in sites}


class ReplacedSelfAttention(nn.Module):
    """Stands in for a self-attention module: feeds its tokens, as a grid, to a mixer (a ΔConvBlock, or
    LinFusion's linear attention for the baseline).

    Keeps the original attention so that ``use_original`` (the teacher view) and unmounting are exact.
    """

    def __init__(self, block: nn.Module, original: nn.Module, grid: TokenGrid, name: str) -> None:
        super().__init__()
        self.block = block
        self.original = original
        self.grid = grid
        self.site_name = name
        self.use_original = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.use_original:
            return self.original(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        batch, tokens, channels = hidden_states.shape
        size = self.grid.size
        if size is None or size[0] * size[1] != tokens:
            raise RuntimeError(
                f"{self.site_name}: token grid {size} does not match {tokens} tokens; "
                "ΔConv blocks need the denoiser to be called with a spatial latent (B, C, H, W)"
            )
        param = next(self.block.parameters())
        x = hidden_states.reshape(batch, size[0], size[1], channels).to(param.dtype)
        return self.block(x).reshape(batch, tokens, channels).to(hidden_states.dtype)


@dataclass
class _Mount:
    denoiser: ModelMixin
    wrappers: list[ReplacedSelfAttention]
    hooks: list[torch.utils.hooks.RemovableHandle]
    requires_grad: dict[str, bool]


class DeltaConvAdapter(ModelMixin, ConfigMixin):
    """The blocks that replace a denoiser's self-attention, one per entry of ``targets``.

    Build one for a model with :meth:`construct_for`, put it in place with :meth:`mount`, take it out
    with :meth:`unmount`; ``save_pretrained`` / ``from_pretrained`` store only the blocks (safetensors).
    Its ``config.json`` holds:

    Args:
        targets (`list[str]`): module path of each replaced self-attention, in forward order.
        channels (`list[int]`): C of each target.
        kernel_sizes (`list[int]`, *optional*): k of each ΔConvBlock (mixers that use kernels).
        heads (`list[int]`, *optional*): attention heads of each target (LinFusion).
        qkv_bias (`bool`, defaults to `False`): whether the replaced q/k/v projections have biases.
        mixer (`str`, defaults to `"deltaconv"`): a name from :data:`deltaconv_cli.mixers.MIXERS`:
            ``"deltaconv"`` (ΔConvBlocks) or ``"linfusion"`` (LinFusion's generalized linear attention,
            the baseline, distilled in the same harness).
        scales (`tuple[float]`, defaults to `(1.0, 0.5)`): the ΔConvBlock's pyramid scales.
        inter_ratio (`float`, defaults to 0.5): C' / C of the ΔConvBlock's convolution branches.
        gate (`str`, defaults to `"scaled"`): ``"scaled"`` or ``"sigmoid"`` (docs/method.md §1.1).
        denoiser_class (`str`): class name of the denoiser it was built for.
        family (`str`): that denoiser's family (``"sd"``, ``"sdxl"``, ``"pixart"``, ...).
        projection_mid_dims (`list[int]`, *optional*): LinFusion's feature-MLP hidden width per target
            (its ``projection_mid_dim``; -1: no MLP); None: as wide as the target's channels.
        base_model_name_or_path (`str`, *optional*): the model the blocks were made for, where known (a
            hub id or a local folder), like PEFT's field of that name.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        targets: list[str],
        channels: list[int],
        kernel_sizes: list[int] | None = None,
        heads: list[int] | None = None,
        qkv_bias: bool = False,
        mixer: str = "deltaconv",
        scales: tuple[float, ...] = (1.0, 0.5),
        inter_ratio: float = 0.5,
        gate: str = "scaled",
        denoiser_class: str = "UNet2DConditionModel",
        family: str = "sd",
        projection_mid_dims: list[int] | None = None,
        base_model_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        kind = get_mixer(mixer)
        per_site = {"channels": channels, "kernel_sizes": kernel_sizes, "heads": heads,
                    "projection_mid_dims": projection_mid_dims}  # fmt: skip
        for name in ("channels", *kind.per_site):
            if per_site[name] is None or len(per_site[name]) != len(targets):
                raise ValueError(f"{mixer} blocks need one of {name} per target ({len(targets)})")
        if projection_mid_dims is not None and (
            "projection_mid_dims" not in kind.optional_per_site or len(projection_mid_dims) != len(targets)
        ):
            raise ValueError(f"projection_mid_dims needs {mixer} blocks that take it, one per target")
        options = {"scales": scales, "inter_ratio": inter_ratio, "gate": gate}
        unused = [None] * len(targets)
        blocks = [
            kind.build(c, h, k, m, qkv_bias, **options)
            for c, h, k, m in zip(
                channels, heads or unused, kernel_sizes or unused, projection_mid_dims or unused, strict=True
            )  # fmt: skip
        ]
        self.blocks = nn.ModuleList(blocks)
        self._mount: _Mount | None = None

    @classmethod
    def construct_for(
        cls,
        model: Any,
        kernel_sizes: int | Mapping[str, int] | None = None,
        *,
        mixer: str = "deltaconv",
        scales: Sequence[float] = (1.0, 0.5),
        inter_ratio: float = 0.5,
        gate: str = "scaled",
        seed: int | None = None,
        init: str = "teacher",
        mid_dim_scale: int = 1,
        base_model_name_or_path: str | None = None,
    ) -> DeltaConvAdapter:
        """A freshly initialised adapter for every self-attention site of ``model`` (pipeline or denoiser).

        ``kernel_sizes`` overrides the family defaults (see :func:`resolve_kernel_sizes`). With ``seed``
        the initial weights are reproducible without touching the global RNG. ``init`` says how each
        block starts from the attention it replaces (:data:`deltaconv_cli.mixers.INITS`): ``"teacher"``
        (ΔConv: the attention's uniform limit, docs/method.md §1.4) or ``"random"`` (the ΔConv authors'
        start); LinFusion copies the projections either way (our start, docs/method.md §2).
        ``mid_dim_scale`` (LinFusion only) narrows its feature MLPs to C // mid_dim_scale, as LinFusion's
        trainer's ``--mid_dim_scale`` does (16 for LinFusion-XL); -1 builds them without MLPs.
        """
        denoiser = denoiser_of(model)
        sites = find_self_attention_sites(denoiser)
        kind = get_mixer(mixer)
        check_init(init)
        mid_dims = projection_mid_dims(mixer, mid_dim_scale, [s.channels for s in sites])
        sizes = None
        if "kernel_sizes" in kind.per_site:
            sizes = resolve_kernel_sizes(denoiser, kernel_sizes)
            bad = sorted({k for k in sizes if k < 1 or k % 2 == 0})
            if bad:
                raise DeltaConvError(f"kernel sizes must be positive odd numbers, got {bad[0]}")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            adapter = cls(
                targets=[s.name for s in sites],
                channels=[s.channels for s in sites],
                kernel_sizes=sizes,
                heads=[s.heads for s in sites] if "heads" in kind.per_site else None,
                qkv_bias=any(self_attention(denoiser, s.name).to_q.bias is not None for s in sites),
                mixer=mixer,
                scales=tuple(scales),
                inter_ratio=inter_ratio,
                gate=gate,
                denoiser_class=type(denoiser).__name__,
                family=family_for(denoiser).name,
                projection_mid_dims=mid_dims,
                base_model_name_or_path=base_model_name_or_path,
            )
        return adapter.initialise_from(denoiser, init)

    def initialise_from(self, model: Any, init: str = "teacher") -> DeltaConvAdapter:
        """Start each block from the attention it replaces in ``model`` as ``init`` says (see
        :meth:`construct_for`); attention modules without weights (meta device) are passed over."""
        denoiser = denoiser_of(model)
        start = get_mixer(self.config.mixer).initialisers[check_init(init)]
        for target, block in zip(self.config.targets, self.blocks, strict=True):
            attention = self_attention(denoiser, target)
            if attention.to_v.weight.device.type != "meta":
                start(block, attention)
        return self

    @property
    def is_mounted(self) -> bool:
        return self._mount is not None

    def check_matches(self, model: Any) -> list[SelfAttentionSite]:
        """The sites of ``model`` this adapter replaces; a clear error if it was built for another model."""
        denoiser = denoiser_of(model)
        if type(denoiser).__name__ != self.config.denoiser_class:
            raise DeltaConvError(
                f"adapter was built for a {self.config.denoiser_class}, not a {type(denoiser).__name__}"
            )
        sites = {s.name: s for s in find_self_attention_sites(denoiser)}
        matched = []
        for target, channels in zip(self.config.targets, self.config.channels, strict=True):
            site = sites.get(target)
            if site is None:
                raise DeltaConvError(f"adapter does not match this model: it has no self-attention {target}")
            if site.channels != channels:
                raise DeltaConvError(
                    f"adapter does not match this model: {target} has {site.channels} channels, "
                    f"the adapter's block {channels}"
                )
            matched.append(site)
        return matched

    def mount(self, model: Any, *, dtype: torch.dtype | None = None) -> DeltaConvAdapter:
        """Replace the target self-attention modules of ``model`` (pipeline or denoiser) with the blocks.

        The blocks move to the denoiser's device and to ``dtype`` (default: the denoiser's dtype). The
        denoiser's own parameters are frozen while mounted; the blocks are trainable.
        """
        if self._mount is not None:
            raise DeltaConvError("this adapter is already mounted; unmount it first")
        denoiser = denoiser_of(model)
        if mounted_adapter(denoiser) is not None:
            raise DeltaConvError(
                "this model already has ΔConv blocks mounted; unmount them first "
                "(deltaconv_cli.mounted_adapter(model).unmount())"
            )
        sites = self.check_matches(denoiser)
        param = next(denoiser.parameters())
        if param.device.type != "meta":
            # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast.
            nn.Module.to(self, device=param.device, dtype=dtype or param.dtype)
        requires_grad = {name: p.requires_grad for name, p in denoiser.named_parameters()}
        grids, hooks = attach_token_grids(denoiser, sites)
        wrappers = []
        for site, block in zip(sites, self.blocks, strict=True):
            parent_name, attr = site.name.rsplit(".", 1)
            parent = denoiser.get_submodule(parent_name)
            wrapper = ReplacedSelfAttention(block, getattr(parent, attr), grids[site.grid_source], site.name)
            wrapper.__dict__["adapter"] = self  # plain reference: not a submodule of the denoiser
            setattr(parent, attr, wrapper)
            wrappers.append(wrapper)
        denoiser.requires_grad_(False)
        self.requires_grad_(True)
        self._mount = _Mount(denoiser, wrappers, hooks, requires_grad)
        return self

    def unmount(self) -> None:
        """Put the original attention modules back; the model computes exactly what it did before."""
        if self._mount is None:
            raise DeltaConvError("this adapter is not mounted")
        mount, self._mount = self._mount, None
        for wrapper in mount.wrappers:
            parent_name, attr = wrapper.site_name.rsplit(".", 1)
            setattr(mount.denoiser.get_submodule(parent_name), attr, wrapper.original)
        for hook in mount.hooks:
            hook.remove()
        for name, param in mount.denoiser.named_parameters():
            param.requires_grad_(mount.requires_grad[name])

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """While inside, the mounted model computes with its original self-attention (the teacher)."""
        with self._using_original(True):
            yield

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """While inside, the blocks compute, also within an outer :meth:`bypassed` (the student's
        prediction on the teacher's trajectory)."""
        with self._using_original(False):
            yield

    @contextlib.contextmanager
    def _using_original(self, original: bool) -> Iterator[None]:
        if self._mount is None:
            raise DeltaConvError("this adapter is not mounted")
        previous = [wrapper.use_original for wrapper in self._mount.wrappers]
        for wrapper in self._mount.wrappers:
            wrapper.use_original = original
        try:
            yield
        finally:
            for wrapper, state in zip(self._mount.wrappers, previous, strict=True):
                wrapper.use_original = state


def mounted_adapter(model: Any) -> DeltaConvAdapter | None:
    """The adapter mounted on ``model`` (pipeline or denoiser), if any."""
    for module in denoiser_of(model).modules():
        if isinstance(module, ReplacedSelfAttention):
            return module.__dict__["adapter"]
    return None
