"""Where a model comes from: a local diffusers folder or a hub id, and loading converted models.

Only safetensors weights are read: a component stored as pickles only is refused with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin
from huggingface_hub import snapshot_download

from .architectures import denoiser_class, meta_denoiser, supported_text
from .demo import DEMO
from .errors import DeltaConvError, first_line
from .surgery import DeltaConvAdapter

ADAPTER_DIR = "deltaconv"
DENOISER_COMPONENTS = ("unet", "transformer")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class ModelFolder:
    """A local diffusers folder: a whole pipeline (``model_index.json``) or a bare denoiser."""

    path: Path
    is_pipeline: bool
    denoiser_subfolder: str | None  # "unet" / "transformer" in a pipeline; None for a bare denoiser
    denoiser_class: str
    denoiser_config: dict[str, Any]

    @property
    def adapter_path(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def is_converted(self) -> bool:
        return (self.adapter_path / "config.json").is_file()

    def meta_denoiser(self) -> ModelMixin:
        return meta_denoiser(self.denoiser_class, self.denoiser_config)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent position: from the pipeline's VAE, else 8 (every SD/SDXL/PixArt VAE)."""
        vae_config = self.path / "vae" / "config.json"
        if self.is_pipeline and vae_config.is_file():
            return 2 ** (len(read_json_object(vae_config).get("block_out_channels", [0] * 4)) - 1)
        return 8

    @property
    def train_timesteps(self) -> int:
        """The noise schedule's length: from the pipeline's scheduler, else 1000 (diffusers' default)."""
        scheduler_config = self.path / "scheduler" / "scheduler_config.json"
        if self.is_pipeline and scheduler_config.is_file():
            return int(read_json_object(scheduler_config).get("num_train_timesteps", 1000))
        return 1000


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; one clear line where the file is missing, damaged or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeltaConvError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise DeltaConvError(f"{path} does not hold a JSON object")
    return data


def looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a local path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _download(repo_id: str, config_only: bool) -> Path:
    try:
        if config_only:
            return Path(snapshot_download(repo_id, allow_patterns=["*.json"]))
        return Path(DiffusionPipeline.download(repo_id, use_safetensors=True))
    except Exception as err:  # the hub client raises many types (offline, 404, auth, timeouts)
        reason = first_line(err, 200)
        raise DeltaConvError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({reason}); "
            "pass the path of a local diffusers folder instead"
        ) from None


DEMO_ASSETS = Path(__file__).resolve().parent / "assets" / "demo"


def demo_path(part: str = "pipeline") -> Path:
    """A part of the embedded demo (``pipeline`` or ``extractor``), installed with the package."""
    path = DEMO_ASSETS / part
    if not path.is_dir():
        raise DeltaConvError(f"the embedded demo {part} is missing from {DEMO_ASSETS}; reinstall deltaconv")
    return path


def locate_model(source: str | Path, *, config_only: bool = False) -> ModelFolder:
    """The local folder of ``source``: ``demo`` (the embedded teacher), a path, or a hub id downloaded
    into the hub cache (with ``config_only`` only its JSON files are fetched)."""
    path = demo_path() if str(source) == DEMO else Path(source).expanduser()
    if not path.exists():
        if looks_like_path(str(source)):
            raise DeltaConvError(f"no such folder: {source}")
        path = _download(str(source), config_only)
    if not path.is_dir():
        raise DeltaConvError(f"{source} is not a folder; expected a diffusers pipeline or model folder")
    if (path / "model_index.json").is_file():
        index = read_json_object(path / "model_index.json")
        subfolder = next((c for c in DENOISER_COMPONENTS if c in index), None)
        if subfolder is None:
            raise DeltaConvError(
                f"{index.get('_class_name', 'this pipeline')} at {path} has no unet or transformer; "
                f"supported: {supported_text()}"
            )
        config = read_json_object(path / subfolder / "config.json")
        folder = ModelFolder(path, True, subfolder, str(index[subfolder][-1]), config)
    elif (path / "config.json").is_file():
        config = read_json_object(path / "config.json")
        folder = ModelFolder(path, False, None, str(config.get("_class_name")), config)
    else:
        raise DeltaConvError(
            f"{path} is not a diffusers folder: it has neither model_index.json (pipeline) "
            "nor config.json (model)"
        )
    denoiser_class(folder.denoiser_class)  # refuses unsupported classes with the list of supported ones
    if not config_only:
        check_safetensors_only(path)
    return folder


def model_name_or_path(source: str | Path, folder: ModelFolder) -> str:
    """What to record as the model a folder came from: its hub id where one is known (``source`` itself,
    or read from a hub-cache path ``models--owner--name``), ``demo``, else the folder's absolute path."""
    text = str(source)
    if text == DEMO or (not looks_like_path(text) and not Path(text).expanduser().exists()):
        return text
    cached = next((part for part in folder.path.absolute().parts if part.startswith("models--")), None)
    if cached is not None:
        return cached.removeprefix("models--").replace("--", "/", 1)
    return str(folder.path.resolve())


def locate_pipeline(source: str | Path, needs: str, *, config_only: bool = False) -> ModelFolder:
    """``locate_model`` for work that needs the whole pipeline; ``needs`` names that work in the error
    a bare denoiser folder gets."""
    folder = locate_model(source, config_only=config_only)
    if not folder.is_pipeline:
        raise DeltaConvError(f"{source} is a bare denoiser; {needs} needs a whole pipeline")
    return folder


def weight_components(folder: Path) -> list[Path]:
    """Folders (the root and its direct subfolders) that hold weight files."""
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
    return [
        d
        for d in candidates
        if any(f.suffix == ".safetensors" or f.suffix in PICKLE_SUFFIXES for f in d.iterdir() if f.is_file())
    ]


def check_safetensors_only(folder: Path) -> None:
    """Refuse a folder where some component has pickle weights and no safetensors."""
    for component in weight_components(folder):
        files = [f for f in component.iterdir() if f.is_file()]
        if not any(f.suffix == ".safetensors" for f in files):
            pickle = next(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
            raise DeltaConvError(
                f"{component} has only pickle weights ({pickle}); deltaconv reads safetensors only: "
                "re-save it with save_pretrained(..., safe_serialization=True) where you trust the file"
            )


def load_attention_weights(folder: ModelFolder, denoiser: ModelMixin, sites: list[Any]) -> None:
    """Read only the weights of the self-attention modules at ``sites`` from the folder's safetensors
    into ``denoiser`` (an architecture on the meta device): enough to start blocks from the attention
    they replace without loading the whole model."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    root = folder.path / folder.denoiser_subfolder if folder.is_pipeline else folder.path
    prefixes = tuple(f"{site.name}." for site in sites)
    # Plain files first: a variant (e.g. *.fp16.safetensors) only fills keys they lack.
    files = sorted(root.glob("*.safetensors"), key=lambda f: (f.name.count(".") > 1, f.name))
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.startswith(prefixes) and key not in found:
                    value = tensors.get_tensor(key).float()
                    set_module_tensor_to_device(denoiser, key, "cpu", value=value, dtype=torch.float32)
                    found.add(key)
    missing = [site.name for site in sites if f"{site.name}.to_v.weight" not in found]
    if missing:
        raise DeltaConvError(f"{root} has no weights for {missing[0]}; cannot start the blocks from it")


def load_model(folder: ModelFolder, *, torch_dtype: torch.dtype | None = None) -> Any:
    """The pipeline (or bare denoiser) in ``folder``, as diffusers loads it, from safetensors only."""
    try:
        if folder.is_pipeline:
            return DiffusionPipeline.from_pretrained(folder.path, dtype=torch_dtype, use_safetensors=True)
        cls = denoiser_class(folder.denoiser_class)
        return cls.from_pretrained(folder.path, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise DeltaConvError(f"cannot load the model in {folder.path}: {first_line(err)}") from None


def load_adapter(path: str | Path) -> DeltaConvAdapter:
    """A saved adapter (``config.json`` + safetensors), with a clear error when it is damaged."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DeltaConvError(f"no deltaconv adapter in {path} (config.json missing)")
    try:
        return DeltaConvAdapter.from_pretrained(path, use_safetensors=True)
    except Exception as err:  # safetensors and diffusers raise several types for damaged files
        first = first_line(err)
        raise DeltaConvError(f"adapter in {path} is corrupt or incomplete: {first}") from None


def load_converted(
    source: str | Path,
    *,
    adapter: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """Load a converted model in one call: the pipeline (or denoiser) with its ΔConv blocks mounted.

    ``source`` is a folder written by ``deltaconv convert`` (its adapter is in ``source/deltaconv``), or
    any supported model together with ``adapter``, the folder of a saved adapter. The adapter can be
    found again with :func:`deltaconv_cli.mounted_adapter` (to unmount it, or to bypass it).
    """
    folder = locate_model(source)
    adapter_path = Path(adapter) if adapter is not None else folder.adapter_path
    if adapter is None and not folder.is_converted:
        raise DeltaConvError(
            f"{source} has no ΔConv adapter ({ADAPTER_DIR}/ missing): run `deltaconv convert` on it "
            "or pass an adapter folder"
        )
    from .interop import adapter_for

    model = load_model(folder, torch_dtype=torch_dtype)
    blocks = adapter_for(adapter_path, model)
    if device is not None:
        model = model.to(device)
    blocks.mount(model)
    return model
