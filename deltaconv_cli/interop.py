"""Weights other projects release: the ΔConv authors' distilled students (ConvFusion) and LinFusion's
models, read as adapters and written back in their own layouts (docs/method.md §3).

ConvFusion: one safetensors file of keys relative to the student denoiser, flat or, in files the authors'
training engine saved before 2025-05-12, nested under ``base:`` (and an EMA copy under ``base_ema:``).
Each block sits where ``attn1`` was (``<block>.conv1.*`` for ``<block>.attn1``): ``conv_up`` [C', C] (our
``proj_in``), per scale ``gates.{i}.conv_spatial.weight`` [k, k, C'] (our depthwise ``convs[i]`` as
[C', 1, k, k]; a ``conv_spatial.bias`` [C'] in the authors' first code version), ``conv_out`` [C, n C'/2]
(``proj_out``) and ``conv_pool`` [C, C] (``proj_global``). The file does not record the scales: two gates
are the authors' (1, 1/2), more must be given. Any other key replaces that tensor of the denoiser, as the
authors' loader does. LinFusion: a diffusers ``ModelMixin`` folder whose ``config.json`` lists
``modules_list`` (``module_name``, ``dim_n``, ``heads``, ``projection_mid_dim``) and whose weights are
``{i}.to_q/to_k/to_v.weight``, ``{i}.to_out.0.*`` and the feature MLPs ``{i}.to_q_.{0,1,3}.*`` /
``{i}.to_k_.{0,1,3}.*`` (absent where ``projection_mid_dim`` is -1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .architectures import FAMILIES, denoiser_of, family_for
from .errors import DeltaConvError, first_line
from .files import atomic_path
from .linfusion import NO_FEATURE_MLP
from .loading import ADAPTER_DIR, PICKLE_SUFFIXES, load_adapter, looks_like_path
from .surgery import DeltaConvAdapter, find_self_attention_sites

FORMATS = ("deltaconv", "convfusion", "linfusion")
EXPORT_FORMATS = ("convfusion", "linfusion")
CONVFUSION_KEY = re.compile(r"^(?P<site>.+)\.conv1\.(?P<rest>.+)$")
CONVFUSION_PARTS = re.compile(
    r"^(conv_up|conv_out|conv_pool)\.(weight|bias)$|^gates\.(\d+)\.conv_spatial\.(weight|bias)$"
)
# RainbowNekoEngine's SafeTensorFormat joins nested dict keys with ":"; its checkpoints nested the model under
# "base" and its EMA copy under "base_ema" until 2025-05-12 (docs/method.md §3).
NESTING_SEPARATOR = ":"
MODEL_COPY, EMA_COPY = "base", "base_ema"
AUTHORS_SCALES = (1.0, 0.5)  # the scales the authors' block builds (models/block_conv.py)
SCALES_METADATA = "deltaconv_scales"  # our exports record their scales here; the authors' loader ignores it
BASE_METADATA = "deltaconv_base_model"  # and the model the blocks were made for, where known

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
    key_nesting: str | None = None  # ConvFusion: the copy read, "base" or "base_ema"; None for flat keys
    scales_from: str | None = None  # ConvFusion: where the scales came from (the file does not say)
    base_model: str | None = None  # the model the blocks were made for, where known
    base_model_note: str | None = None  # which model they belong on, for reports


BASE_NOTES = {"Lykon/DreamShaper": "its diffusers weights are the DreamShaper 7 upload, not DreamShaper 8"}
PIXART_1024_NOTE = (
    "the authors' pixart1024 students have no single base model: one training config distils "
    "PixArt-Sigma-XL-2-1024-MS, another trains the 512-MS weights at 1024 px, and their inference config "
    "builds the student from the 512-MS transformer inside the 1024-MS pipeline (docs/method.md §3)"
)


def released_base(family: str, file_name: str) -> str | None:
    """The model the authors distilled a released ConvFusion student of ``family`` from; None for their
    pixart1024 files, where their own configs disagree (:data:`PIXART_1024_NOTE`)."""
    if family == "pixart" and "1024" in file_name:
        return None
    return FAMILIES[family].released_base


def convfusion_base_model(
    metadata: dict[str, str], family: str, file_name: str
) -> tuple[str | None, str | None]:
    """The model a ConvFusion file's blocks were made for and the note reports show: what our export
    recorded in its metadata, else the authors' base model of ``family``."""
    if SCALES_METADATA in metadata:  # written by deltaconv export, which records the base model beside
        base = metadata.get(BASE_METADATA)
        return base, base_model_note(base)
    base = released_base(family, file_name)
    return base, base_model_note(base) or (PIXART_1024_NOTE if family == "pixart" else None)


def base_model_note(base: str | None) -> str | None:
    """ "made for BASE", with what users should know about that model."""
    if base is None:
        return None
    return f"made for {base}" + (f" ({BASE_NOTES[base]})" if base in BASE_NOTES else "")


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,1/2,1/3"`` (fractions are read exactly as the authors' code writes them) or ``"1,0.5"``."""
    scales = []
    for item in text.split(","):
        top, _, bottom = item.strip().partition("/")
        try:
            value = float(top) / float(bottom) if bottom else float(top)
        except (ValueError, ZeroDivisionError):
            raise DeltaConvError(
                f"--scales takes numbers or fractions such as 1,1/2,1/3; got {text!r}"
            ) from None
        if not 0.0 < value <= 1.0:
            raise DeltaConvError(f"every scale must be in (0, 1], got {item.strip()} in {text!r}")
        scales.append(value)
    return tuple(scales)


def _scales_example(count: int) -> str:
    return ",".join(["1", *(f"1/{i}" for i in range(2, count + 1))])


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


def _read_safetensors(
    path: Path, choose_group: Callable[[list[str]], str | None] = lambda keys: None
) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """The tensors of ``path``, its metadata, and the group read: ``choose_group(keys)`` names the nested
    group whose tensors are read, without its prefix (None: every tensor)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())  # noqa: SIM118 - safe_open is not a mapping
            group = choose_group(keys)
            prefix = "" if group is None else group + NESTING_SEPARATOR
            tensors = {
                key.removeprefix(prefix): file.get_tensor(key) for key in keys if key.startswith(prefix)
            }
            return tensors, file.metadata() or {}, group
    except (SafetensorError, OSError) as err:
        raise DeltaConvError(f"cannot read {path}: {first_line(err)}") from None


def safetensors_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """``{key: (dtype, shape)}`` and the metadata of a safetensors file, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as file:
            entries = {}
            for key in file.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = file.get_slice(key)
                entries[key] = (piece.get_dtype(), list(piece.get_shape()))
            return entries, file.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DeltaConvError(f"cannot read {path}: {first_line(err)}") from None


def key_groups(keys: list[str], file: str) -> list[str]:
    """The groups ConvFusion keys are nested under (``[]`` for flat keys, else some of ``base`` and
    ``base_ema``); one clear line for any other nesting."""
    nested = [key for key in keys if NESTING_SEPARATOR in key]
    if not nested:
        return []
    flat = [key for key in keys if NESTING_SEPARATOR not in key]
    if flat:
        raise DeltaConvError(
            f"{file} mixes flat keys ({flat[0]}) with nested ones ({nested[0]}); ConvFusion files have "
            f"one or the other"
        )
    deep = next((key for key in nested if key.count(NESTING_SEPARATOR) > 1), None)
    groups = sorted({key.split(NESTING_SEPARATOR, 1)[0] for key in nested})
    other = [group for group in groups if group not in (MODEL_COPY, EMA_COPY)]
    if other or deep:
        example = next((k for k in nested if k.startswith(f"{other[0]}:")), "") if other else deep
        found = f"keys nested under {other[0]!r} ({example})" if other else f"a key nested two deep ({deep})"
        raise DeltaConvError(
            f"{file} has {found}; ConvFusion files have flat keys, or the model under 'base:' and its EMA "
            "copy under 'base_ema:'"
        )
    return groups


def _chosen_copy(groups: list[str], file: str, ema: bool) -> str | None:
    """Which nested copy to read: the model (``base``), or its EMA copy when asked for."""
    if ema and EMA_COPY not in groups:
        held = "flat keys" if not groups else "keys under base: only"
        raise DeltaConvError(f"{file} has no EMA copy (no base_ema: keys; it has {held}): leave out --ema")
    if ema:
        return EMA_COPY
    if groups and MODEL_COPY not in groups:
        raise DeltaConvError(
            f"{file} holds only an EMA copy (base_ema: keys); read it with convert --weights {file} --ema"
        )
    return MODEL_COPY if groups else None


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
        reason = first_line(err, 200)
        raise DeltaConvError(
            f"cannot fetch {spec!r} from the Hugging Face hub ({reason}); pass a local file or folder instead"
        ) from None


def read_weights(
    source: str | Path, model: Any, *, ema: bool = False, scales: tuple[float, ...] | None = None
) -> ImportedWeights:
    """The adapter (and, for ConvFusion, the other denoiser tensors) in ``source`` for ``model``
    (pipeline or denoiser, weights may be on the meta device, blocks may be mounted), whatever its layout.

    ConvFusion only: ``ema`` reads the EMA copy (``base_ema:`` keys) of a nested file instead of the model
    (``base:``); ``scales`` gives the blocks' scales, which the file does not record (needed for more than
    two gates per block: the authors' README example uses ``(1, 1/2, 1/3)``).
    """
    path = locate_weights(source)
    kind = weights_format(path)
    if kind != "convfusion" and (ema or scales is not None):
        given = "--ema" if ema else "--scales"
        raise DeltaConvError(f"{given} is for ConvFusion files; {path} is a {kind} folder")
    denoiser = denoiser_of(model)
    if kind == "deltaconv":
        adapter = load_adapter(path)
        adapter.check_matches(denoiser)
        base = adapter.config.base_model_name_or_path
        return ImportedWeights(
            str(path), kind, adapter, base_model=base, base_model_note=base_model_note(base)
        )
    if kind == "linfusion":
        return _read_linfusion(path, denoiser)
    return _read_convfusion(path, denoiser, ema, scales)


def convfusion_scales(
    file: str, count: int, given: tuple[float, ...] | None, metadata: dict[str, str]
) -> tuple[tuple[float, ...], str]:
    """The blocks' scales and where they came from: given, recorded by our export, or the authors' two; one
    line naming ``--scales`` where none of these says."""
    if given is not None:
        if len(given) != count:
            raise DeltaConvError(
                f"{file} has {count} gates per block, but --scales gives {len(given)} scales"
            )
        return tuple(given), "given"
    recorded = metadata.get(SCALES_METADATA)
    if recorded is not None:
        try:
            scales = tuple(float(s) for s in json.loads(recorded))
        except (ValueError, TypeError):
            scales = ()
        if not scales or not all(0.0 < s <= 1.0 for s in scales):
            raise DeltaConvError(f"{file}: its {SCALES_METADATA} metadata is not a list of scales in (0, 1]")
        if len(scales) == count:
            return scales, "recorded in the file's metadata by deltaconv export"
    if count == len(AUTHORS_SCALES):
        return AUTHORS_SCALES, "two gates: the authors' (1, 1/2)"
    raise DeltaConvError(
        f"{file} has {count} gate{'s' if count > 1 else ''} per block, and a ConvFusion file does not record "
        f"their scales: give them to convert --weights, e.g. --scales {_scales_example(count)} (the authors' "
        "README example builds 1,1/2,1/3)"
    )


def _read_convfusion(
    path: Path, denoiser: Any, ema: bool = False, given_scales: tuple[float, ...] | None = None
) -> ImportedWeights:
    tensors, metadata, nesting = _read_safetensors(
        path, lambda keys: _chosen_copy(key_groups(keys, path.name), path.name, ema)
    )
    family = family_for(denoiser)
    sites = {s.name: s for s in find_self_attention_sites(denoiser)}
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in tensors.items():
        match = CONVFUSION_KEY.match(key)
        if match is None or not CONVFUSION_PARTS.match(match["rest"]):  # resnets have a conv1 too
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
    block_scales, scales_from = convfusion_scales(path.name, scales.pop(), given_scales, metadata)
    base, note = convfusion_base_model(metadata, family.name, path.name)
    adapter = DeltaConvAdapter(
        targets=targets,
        channels=[sites[name].channels for name in targets],
        kernel_sizes=[k for k, _, _ in shapes],
        mixer="deltaconv",
        scales=block_scales,
        inter_ratio=ratios.pop(),
        gate=family.released_gate,
        denoiser_class=type(denoiser).__name__,
        family=family.name,
        base_model_name_or_path=base,
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
    return ImportedWeights(str(path), "convfusion", adapter, others, kept, nesting, scales_from, base, note)


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


def linfusion_modules(path: Path) -> list[dict[str, Any]]:
    """The ``modules_list`` of a LinFusion folder's config, each entry checked for its form."""
    config = json.loads((path / "config.json").read_text())
    modules = config["modules_list"]
    if not isinstance(modules, list) or not modules:
        raise DeltaConvError(f"{path}/config.json: modules_list is empty")
    if config.get("_class_name") == "StableMamba" or not all(isinstance(m, dict) for m in modules):
        raise DeltaConvError(
            f"{path}/config.json is an early LinFusion config (class {config.get('_class_name')}, "
            "modules_list entries as lists) that LinFusion's released code no longer reads: fetch that "
            "model again (its current config lists each module as an object with module_name and dim_n)"
        )
    for entry in modules:
        for name, kind, what in (("module_name", str, "a module path"), ("dim_n", int, "a whole number"),
                                 ("heads", int, "a whole number")):  # fmt: skip
            if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
                raise DeltaConvError(
                    f"{path}/config.json: a modules_list entry has {name} {entry.get(name)!r}, not {what}"
                )
        width = entry.get("projection_mid_dim")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int)
                                  or (width < 1 and width != NO_FEATURE_MLP)):  # fmt: skip
            raise DeltaConvError(
                f"LinFusion module {entry.get('module_name')}: projection_mid_dim {width!r} is not a width "
                "(a positive number, null for dim_n, or -1 for no feature MLP)"
            )
    return modules


def _mid_dims(modules: list[dict[str, Any]]) -> list[int] | None:
    """The adapter's ``projection_mid_dims`` for LinFusion entries (None where every one is the default)."""
    widths = [m.get("projection_mid_dim") for m in modules]
    if all(w is None or w == m["dim_n"] for w, m in zip(widths, modules, strict=True)):
        return None
    return [m["dim_n"] if w is None else w for w, m in zip(widths, modules, strict=True)]


def _read_linfusion(path: Path, denoiser: Any) -> ImportedWeights:
    modules = linfusion_modules(path)
    weights = path / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        pickled = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        extra = f" (it has {pickled[0]}, a pickle file, which is not read)" if pickled else ""
        raise DeltaConvError(f"LinFusion folder {path} has no {SAFETENSORS_WEIGHTS_NAME}{extra}")
    sites = {s.name: s for s in find_self_attention_sites(denoiser)}
    for entry in modules:
        name = entry.get("module_name")
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
    tensors, _, _ = _read_safetensors(weights)
    adapter = DeltaConvAdapter(
        targets=[m["module_name"] for m in modules],
        channels=[m["dim_n"] for m in modules],
        heads=[m["heads"] for m in modules],
        qkv_bias=False,  # LinFusion's projections have none
        mixer="linfusion",
        denoiser_class=type(denoiser).__name__,
        family=family_for(denoiser).name,
        projection_mid_dims=_mid_dims(modules),
    )
    expected = adapter.state_dict()
    state = {}
    for key, tensor in tensors.items():
        match = _LINFUSION_KEY.match(key)
        ours = _LINFUSION_NAMES.get(match["rest"]) if match else None
        if ours is None or int(match["index"]) >= len(modules):
            raise DeltaConvError(f"{weights.name}: {key} is not a tensor of a LinFusion module")
        state[f"blocks.{match['index']}.{ours}"] = tensor
        if f"blocks.{match['index']}.{ours}" not in expected:
            width = modules[int(match["index"])].get("projection_mid_dim")
            raise DeltaConvError(f"{weights.name}: {key} has no place in module {match['index']}, whose "
                                 f"projection_mid_dim is {width} (no feature MLP)")  # fmt: skip
    missing = sorted(set(expected) - set(state))
    if missing:
        index, name = missing[0].split(".", 2)[1:]
        raise DeltaConvError(f"{weights.name}: {index}.{_LINFUSION_THEIRS[name]} is missing")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            index, name = key.split(".", 2)[1:]
            raise DeltaConvError(
                f"{weights.name}: {index}.{_LINFUSION_THEIRS[name]} is {list(tensor.shape)}, expected "
                f"{list(expected[key].shape)} from config.json (dim_n, projection_mid_dim)"
            )
    adapter.load_state_dict(state)
    kept = [name for name in sites if name not in adapter.config.targets]
    return ImportedWeights(str(path), "linfusion", adapter, {}, kept)


def adapter_for(
    source: str | Path, model: Any, *, ema: bool = False, scales: tuple[float, ...] | None = None
) -> DeltaConvAdapter:
    """The blocks in ``source`` (any layout of :data:`FORMATS`, options as :func:`read_weights`) for
    ``model``; a ConvFusion file that also replaces other denoiser tensors has to be imported into a model
    folder with ``convert --weights``."""
    imported = read_weights(source, model, ema=ema, scales=scales)
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
        metadata = {"format": "pt", SCALES_METADATA: json.dumps(list(adapter.config.scales))}
        if adapter.config.base_model_name_or_path:
            metadata[BASE_METADATA] = adapter.config.base_model_name_or_path
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    else:
        tensors, config = _linfusion_layout(adapter)
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, str(tmp / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    report.tensors = len(tensors)
    return report


def _convfusion_tensors(adapter: DeltaConvAdapter, notes: list[str]) -> dict[str, torch.Tensor]:
    config = adapter.config
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
    if tuple(config.scales) != AUTHORS_SCALES:
        notes.append(
            f"scales {tuple(config.scales)} are not the authors' (1, 1/2): build their blocks with these "
            "scales (only this file's metadata records them, and their loader does not read it)"
        )
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
    widths = config.projection_mid_dims or [None] * len(config.targets)
    modules = [
        {"module_name": target, "dim_n": channels, "heads": heads, "projection_mid_dim": width}
        for target, channels, heads, width in zip(
            config.targets, config.channels, config.heads, widths, strict=True
        )  # fmt: skip
    ]
    return tensors, {
        "_class_name": "LinFusion",
        "_diffusers_version": diffusers_version,
        "modules_list": modules,
    }
