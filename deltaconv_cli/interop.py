"""Weights other projects release: the ΔConv authors' distilled students (ConvFusion) and LinFusion's
models, read as adapters and written back in their own layouts (docs/method.md §3).

ConvFusion: one safetensors file of flat keys relative to the student denoiser. Each block sits where
``attn1`` was (``<block>.conv1.*`` for ``<block>.attn1``): ``conv_up`` [C', C] (our ``proj_in``), per
scale ``gates.{i}.conv_spatial.weight`` [k, k, C'] (our depthwise ``convs[i]`` as [C', 1, k, k]; a
``conv_spatial.bias`` [C'] in the authors' first code version), ``conv_out`` [C, n C'/2] (``proj_out``)
and ``conv_pool`` [C, C] (``proj_global``). Scale i is 2^-i. Any other key replaces that tensor of the
denoiser, as the authors' loader does. LinFusion: a diffusers ``ModelMixin`` folder whose
``config.json`` lists ``modules_list`` (``module_name``, ``dim_n``, ``heads``, ``projection_mid_dim``)
and whose weights are ``{i}.to_q/to_k/to_v.weight``, ``{i}.to_out.0.*`` and the feature maps
``{i}.to_q_.{0,1,3}.*`` / ``{i}.to_k_.{0,1,3}.*``.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .architectures import denoiser_of, family_for
from .errors import DeltaConvError
from .loading import ADAPTER_DIR, PICKLE_SUFFIXES, load_adapter, looks_like_path
from .surgery import DeltaConvAdapter, find_self_attention_sites

FORMATS = ("deltaconv", "convfusion", "linfusion")
EXPORT_FORMATS = ("convfusion", "linfusion")
_CONVFUSION_KEY = re.compile(r"^(?P<site>.+)\.conv1\.(?P<rest>.+)$")
_CONVFUSION_PARTS = re.compile(
    r"^(conv_up|conv_out|conv_pool)\.(weight|bias)$|^gates\.(\d+)\.conv_spatial\.(weight|bias)$"
)
_LINFUSION_KEY = re.compile(r"^(?P<index>\d+)\.(?P<rest>.+)$")
# LinFusion's parameter names and ours (LinFusionAttention), per replaced self-attention.
_LINFUSION_NAMES = {
    "to_q.weight": "to_q.weight",
    "to_k.weight": "to_k.weight",
    "to_v.weight": "to_v.weight",
    "to_out.0.weight": "to_out.weight",
    "to_out.0.bias": "to_out.bias",
    **{f"to_{x}_.{i}.{p}": f"mlp_{x}.{i}.{p}" for x in "qk" for i in (0, 1, 3) for p in ("weight", "bias")},
}
_LINFUSION_THEIRS = {ours: theirs for theirs, ours in _LINFUSION_NAMES.items()}


@dataclass
class ImportedWeights:
    """What a weights file or folder holds, matched to one model."""

    source: str
    format: str  # one of FORMATS
    adapter: DeltaConvAdapter
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # other denoiser tensors (ConvFusion)
    kept_attention: list[str] = field(default_factory=list)  # self-attention sites the file leaves alone


def weights_format(path: Path) -> str:
    """Which layout ``path`` holds, from the files themselves; a clear error for anything else."""
    if path.suffix in PICKLE_SUFFIXES:
        raise DeltaConvError(
            f"{path} is a pickle file; only safetensors weights are read (pickle can run code)"
        )
    if path.is_file():
        if path.suffix != ".safetensors":
            raise DeltaConvError(
                f"{path} is not a safetensors file (ConvFusion weights are one .safetensors file)"
            )
        return "convfusion"
    config = path / "config.json"
    if not config.is_file():
        raise DeltaConvError(
            f"{path} holds no weights this tool reads: a ConvFusion .safetensors file, a LinFusion folder "
            "or a deltaconv adapter folder (with config.json)"
        )
    try:
        keys = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DeltaConvError(f"{config} is not valid JSON") from None
    if "modules_list" in keys:
        return "linfusion"
    if "targets" in keys:
        return "deltaconv"
    raise DeltaConvError(f"{config} is neither a LinFusion nor a deltaconv adapter config")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError) as err:
        raise DeltaConvError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


HUB_PREFIX = "hf://"


def locate_weights(source: str | Path) -> Path:
    """The local file or folder of ``source``: a path, a hub id ``owner/name`` (a LinFusion repository)
    or ``hf://owner/name/path/in/repo`` (one file or folder of a repository, such as one ConvFusion
    student), fetched into the hub cache like a model. A folder holding exactly one safetensors file and
    no config.json stands for that file."""
    text = str(source)
    # A hub id is owner/name here: a bare name is a local file (weights are not pipelines).
    hub_id = not looks_like_path(text) and "/" in text
    if text.startswith(HUB_PREFIX) or (not Path(text).expanduser().exists() and hub_id):
        path = _download_weights(text.removeprefix(HUB_PREFIX))
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DeltaConvError(f"weights {source} not found")
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.safetensors"))
        if [f.name for f in files] == [SAFETENSORS_WEIGHTS_NAME]:
            raise DeltaConvError(f"{path} holds {SAFETENSORS_WEIGHTS_NAME} but no config.json (incomplete)")
        if len(files) == 1:
            return files[0]
    return path


def _download_weights(spec: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = spec.split("/")
    if len(parts) < 2:
        raise DeltaConvError(f"{HUB_PREFIX}{spec} is not owner/name[/path in the repository]")
    repo, inside = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if inside.endswith(".safetensors"):
            return Path(hf_hub_download(repo, inside))
        patterns = [f"{inside}/*.json", f"{inside}/*.safetensors"] if inside else ["*.json", "*.safetensors"]
        return Path(snapshot_download(repo, allow_patterns=patterns)) / inside
    except Exception as err:  # the hub client raises many types (offline, 404, auth, timeouts)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DeltaConvError(
            f"cannot fetch {spec!r} from the Hugging Face hub ({reason}); pass a local file or folder instead"
        ) from None


def read_weights(source: str | Path, model: Any) -> ImportedWeights:
    """The adapter (and, for ConvFusion, the other denoiser tensors) in ``source`` for ``model``
    (pipeline or denoiser, weights may be on the meta device), whatever its layout."""
    path = locate_weights(source)
    kind = weights_format(path)
    denoiser = denoiser_of(model)
    if kind == "deltaconv":
        adapter = load_adapter(path)
        adapter.check_matches(denoiser)
        return ImportedWeights(str(path), kind, adapter)
    if kind == "linfusion":
        return _read_linfusion(path, denoiser)
    return _read_convfusion(path, denoiser)


def _read_convfusion(path: Path, denoiser: Any) -> ImportedWeights:
    tensors = _read_safetensors(path)
    family = family_for(denoiser)
    sites = {s.name: s for s in find_self_attention_sites(denoiser)}
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in tensors.items():
        match = _CONVFUSION_KEY.match(key)
        if match is None or not _CONVFUSION_PARTS.match(match["rest"]):  # resnets have a conv1 too
            others[key] = tensor
            continue
        site = f"{match['site']}.attn1"
        if site not in sites:
            raise DeltaConvError(
                f"{path.name}: block {match['site']}.conv1 stands where no self-attention of this "
                f"{type(denoiser).__name__} ({family.label}) is: the file was made for another model family"
            )
        blocks.setdefault(site, {})[match["rest"]] = tensor
    if not blocks:
        raise DeltaConvError(f"{path.name} holds no ConvFusion blocks (no <block>.conv1.conv_up.weight keys)")
    targets = [name for name in sites if name in blocks]  # forward order
    shapes = [_convfusion_shapes(path.name, name, blocks[name], sites[name].channels) for name in targets]
    scales = {n for _, _, n in shapes}
    ratios = {inner / sites[name].channels for name, (_, inner, _) in zip(targets, shapes, strict=True)}
    if len(scales) > 1 or len(ratios) > 1:
        raise DeltaConvError(f"{path.name}: its blocks differ in the number of scales or in C'/C")
    adapter = DeltaConvAdapter(
        targets=targets,
        channels=[sites[name].channels for name in targets],
        kernel_sizes=[k for k, _, _ in shapes],
        mixer="deltaconv",
        scales=tuple(2.0**-i for i in range(scales.pop())),
        inter_ratio=ratios.pop(),
        gate=family.released_gate,
        denoiser_class=type(denoiser).__name__,
        family=family.name,
    )
    with torch.no_grad():
        for name, block in zip(targets, adapter.blocks, strict=True):
            parts = blocks[name]
            _copy(block.proj_in, parts, "conv_up")
            _copy(block.proj_out, parts, "conv_out")
            _copy(block.proj_global, parts, "conv_pool")
            for i, conv in enumerate(block.convs):
                conv.weight.copy_(parts[f"gates.{i}.conv_spatial.weight"].permute(2, 0, 1).unsqueeze(1))
                bias = parts.get(f"gates.{i}.conv_spatial.bias")
                conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
    _check_replacements(path.name, denoiser, others, set(blocks))
    kept = [name for name in sites if name not in blocks]
    return ImportedWeights(str(path), "convfusion", adapter, others, kept)


def _convfusion_shapes(
    file: str, site: str, parts: dict[str, torch.Tensor], channels: int
) -> tuple[int, int, int]:
    """(kernel size, C', number of scales) of one block, each tensor's shape checked."""
    prefix = site.removesuffix(".attn1") + ".conv1"
    for name in ("conv_up.weight", "conv_out.weight", "conv_pool.weight", "gates.0.conv_spatial.weight"):
        if name not in parts:
            raise DeltaConvError(f"{file}: {prefix}.{name} is missing")
    up = parts["conv_up.weight"]
    if up.ndim != 2 or up.shape[1] != channels:
        raise DeltaConvError(
            f"{file}: {prefix}.conv_up.weight is {list(up.shape)}, but {site} of the base model has "
            f"{channels} channels: channel counts do not match the base model"
        )
    inner = up.shape[0]
    count = 1 + max(int(name.split(".")[1]) for name in parts if name.startswith("gates."))
    kernel = parts["gates.0.conv_spatial.weight"]
    for i in range(count):
        weight = parts.get(f"gates.{i}.conv_spatial.weight")
        if weight is None:
            raise DeltaConvError(f"{file}: {prefix}.gates.{i}.conv_spatial.weight is missing")
        if weight.ndim != 3 or weight.shape != kernel.shape or weight.shape[0] != weight.shape[1] \
                or weight.shape[0] % 2 == 0 or weight.shape[2] != inner:  # fmt: skip
            raise DeltaConvError(
                f"{file}: {prefix}.gates.{i}.conv_spatial.weight is {list(weight.shape)}, not a k x k x C' "
                f"kernel with odd k and C' = {inner} (the width of conv_up)"
            )
    expected = {
        "conv_up.bias": [inner],
        "conv_out.weight": [channels, count * inner // 2],
        "conv_out.bias": [channels],
        "conv_pool.weight": [channels, channels],
        "conv_pool.bias": [channels],
        **{f"gates.{i}.conv_spatial.bias": [inner] for i in range(count)},
    }
    for name, shape in expected.items():
        if name in parts and list(parts[name].shape) != shape:
            raise DeltaConvError(f"{file}: {prefix}.{name} is {list(parts[name].shape)}, expected {shape}")
    if inner < 2 or inner % 2:
        raise DeltaConvError(f"{file}: {prefix} has C' = {inner}; the gate needs an even C'")
    return kernel.shape[0], inner, count


def _copy(linear: torch.nn.Linear, parts: dict[str, torch.Tensor], name: str) -> None:
    linear.weight.copy_(parts[f"{name}.weight"])
    bias = parts.get(f"{name}.bias")
    linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))


def _check_replacements(
    file: str, denoiser: Any, others: dict[str, torch.Tensor], replaced: set[str]
) -> None:
    """Every other key must name a parameter (or buffer) of the student: the denoiser less the
    replaced self-attention, with the same shape."""
    own = {**dict(denoiser.named_parameters()), **dict(denoiser.named_buffers())}
    for key, tensor in others.items():
        target = own.get(key)
        if target is None or any(key.startswith(f"{site}.") for site in replaced):
            raise DeltaConvError(f"{file}: {key} names no parameter of the student {type(denoiser).__name__}")
        if list(target.shape) != list(tensor.shape):
            raise DeltaConvError(
                f"{file}: {key} is {list(tensor.shape)}, the base model's {list(target.shape)}: "
                "channel counts do not match the base model"
            )


def _read_linfusion(path: Path, denoiser: Any) -> ImportedWeights:
    config = json.loads((path / "config.json").read_text())
    modules = config["modules_list"]
    weights = path / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        pickled = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        extra = f" (it has {pickled[0]}, a pickle file, which is not read)" if pickled else ""
        raise DeltaConvError(f"LinFusion folder {path} has no {SAFETENSORS_WEIGHTS_NAME}{extra}")
    sites = {s.name: s for s in find_self_attention_sites(denoiser)}
    if not isinstance(modules, list) or not modules:
        raise DeltaConvError(f"{path}/config.json: modules_list is empty")
    for entry in modules:
        name = entry.get("module_name") if isinstance(entry, dict) else None
        if name not in sites:
            raise DeltaConvError(
                f"LinFusion module {name} is not a self-attention of this {type(denoiser).__name__}: "
                "the folder was made for another model"
            )
        site = sites[name]
        if entry.get("dim_n") != site.channels or entry.get("heads") != site.heads:
            raise DeltaConvError(
                f"LinFusion module {name} has dim_n {entry.get('dim_n')} and {entry.get('heads')} heads, the "
                f"base model {site.channels} channels and {site.heads} heads: they do not match"
            )
        if entry.get("projection_mid_dim") not in (None, site.channels):
            raise DeltaConvError(
                f"LinFusion module {name}: projection_mid_dim {entry['projection_mid_dim']} is not supported "
                "(only the default, equal to dim_n)"
            )
    tensors = _read_safetensors(weights)
    adapter = DeltaConvAdapter(
        targets=[m["module_name"] for m in modules],
        channels=[m["dim_n"] for m in modules],
        heads=[m["heads"] for m in modules],
        qkv_bias=False,  # LinFusion's projections have none
        mixer="linfusion",
        denoiser_class=type(denoiser).__name__,
        family=family_for(denoiser).name,
    )
    state = {}
    for key, tensor in tensors.items():
        match = _LINFUSION_KEY.match(key)
        ours = _LINFUSION_NAMES.get(match["rest"]) if match else None
        if ours is None or int(match["index"]) >= len(modules):
            raise DeltaConvError(f"{weights.name}: {key} is not a tensor of a LinFusion module")
        state[f"blocks.{match['index']}.{ours}"] = tensor
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        index, name = missing[0].split(".", 2)[1:]
        raise DeltaConvError(f"{weights.name}: {index}.{_LINFUSION_THEIRS[name]} is missing")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise DeltaConvError(f"{weights.name}: a tensor for {key} has shape {list(tensor.shape)}")
    adapter.load_state_dict(state)
    kept = [name for name in sites if name not in adapter.config.targets]
    return ImportedWeights(str(path), "linfusion", adapter, {}, kept)


def adapter_for(source: str | Path, model: Any) -> DeltaConvAdapter:
    """The blocks in ``source`` (any layout of :data:`FORMATS`) for ``model``; a ConvFusion file that also
    replaces other denoiser tensors has to be imported into a model folder with ``convert --weights``."""
    imported = read_weights(source, model)
    if imported.replaced:
        example = next(iter(imported.replaced))
        raise DeltaConvError(
            f"{source} also replaces {len(imported.replaced)} other denoiser tensors (e.g. {example}): "
            f"import it into a model folder with `deltaconv convert MODEL --weights {source} -o OUT`"
        )
    return imported.adapter


# ----------------------------------------------------------------------------------------------- export


@dataclass
class ExportReport:
    adapter: str
    format: str
    out: str
    blocks: int
    tensors: int
    notes: list[str] = field(default_factory=list)


def export_adapter(
    adapter_path: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False
) -> ExportReport:
    """Write the adapter at ``adapter_path`` (an adapter folder, or a converted model folder) in another
    project's layout: ``convfusion`` (one safetensors file) or ``linfusion`` (a folder)."""
    if fmt not in EXPORT_FORMATS:
        raise DeltaConvError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    source = Path(adapter_path).expanduser()
    if (source / ADAPTER_DIR / "config.json").is_file():
        source = source / ADAPTER_DIR
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise DeltaConvError(f"{out} exists; pass --overwrite to replace it")
    if fmt == "convfusion" and out.suffix != ".safetensors":
        raise DeltaConvError(
            f"a ConvFusion export is one file: give a name ending in .safetensors, not {out}"
        )
    adapter = load_adapter(source)
    mixer = adapter.config.mixer
    wanted = "deltaconv" if fmt == "convfusion" else "linfusion"
    if mixer != wanted:
        raise DeltaConvError(f"{source} holds {mixer} blocks; {fmt} takes {wanted} blocks")
    report = ExportReport(str(source), fmt, str(out), len(adapter.blocks), 0)
    if fmt == "convfusion":
        tensors = _convfusion_tensors(adapter, report.notes)
        _write_atomically(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    else:
        tensors, config = _linfusion_layout(adapter)

        def write(tmp: Path) -> None:
            tmp.mkdir()
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})

        _write_atomically(out, write)
    report.tensors = len(tensors)
    return report


def _convfusion_tensors(adapter: DeltaConvAdapter, notes: list[str]) -> dict[str, torch.Tensor]:
    config = adapter.config
    powers = tuple(2.0**-i for i in range(len(config.scales)))
    if tuple(config.scales) != powers:
        raise DeltaConvError(
            f"ConvFusion files do not record scales and are read as {powers}; "
            f"these blocks use {tuple(config.scales)}"
        )
    tensors: dict[str, torch.Tensor] = {}
    with_bias = any(conv.bias.abs().max() > 0 for block in adapter.blocks for conv in block.convs)
    for target, block in zip(config.targets, adapter.blocks, strict=True):
        prefix = target.removesuffix(".attn1") + ".conv1"
        for ours, theirs in (("proj_in", "conv_up"), ("proj_out", "conv_out"), ("proj_global", "conv_pool")):
            linear = getattr(block, ours)
            tensors[f"{prefix}.{theirs}.weight"] = linear.weight.detach().float()
            tensors[f"{prefix}.{theirs}.bias"] = linear.bias.detach().float()
        for i, conv in enumerate(block.convs):
            tensors[f"{prefix}.gates.{i}.conv_spatial.weight"] = (
                conv.weight.detach()[:, 0].permute(1, 2, 0).float()
            )
            if with_bias:
                tensors[f"{prefix}.gates.{i}.conv_spatial.bias"] = conv.bias.detach().float()
    simple = "True (scaled product)" if config.gate == "scaled" else "False (sigmoid)"
    notes.append(f"gate {config.gate}: build the authors' blocks with simple={simple}")
    if with_bias:
        notes.append(
            "the depthwise convolutions have non-zero biases: written as conv_spatial.bias, the layout of "
            "the authors' first code version (their later blocks have no such tensor)"
        )
    notes.append(f"kernel sizes per block: {sorted(set(config.kernel_sizes))}; scales {tuple(config.scales)}")
    return {key: tensor.contiguous() for key, tensor in tensors.items()}


def _linfusion_layout(adapter: DeltaConvAdapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from diffusers import __version__ as diffusers_version

    config = adapter.config
    if config.qkv_bias:
        raise DeltaConvError(
            "these LinFusion blocks have q/k/v biases, which LinFusion's layout has no place for"
        )
    tensors = {}
    for i, block in enumerate(adapter.blocks):
        for name, tensor in block.state_dict().items():
            tensors[f"{i}.{_LINFUSION_THEIRS[name]}"] = tensor.detach().float().contiguous()
    modules = [
        {"module_name": target, "dim_n": channels, "heads": heads, "projection_mid_dim": None}
        for target, channels, heads in zip(config.targets, config.channels, config.heads, strict=True)
    ]
    return tensors, {
        "_class_name": "LinFusion",
        "_diffusers_version": diffusers_version,
        "modules_list": modules,
    }


def _write_atomically(out: Path, write: Any) -> None:
    """``write(tmp)`` next to ``out``, then rename into place (an old ``out`` is replaced only then)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
