"""The embedded demo teacher's training: a small Stable-Diffusion pipeline trained from scratch on the demo
domain (research, not installed: demo_teacher/REPORT.md says what was tried and what shipped).

Architecture (a genuine ``StableDiffusionPipeline``): a CLIP tokenizer over the domain's words, a
2-layer CLIP text encoder, an ``AutoencoderKL`` (64 x 64 RGB <-> 32 x 32 x 4 latents) and a
``UNet2DConditionModel`` with self- and cross-attention at 32 x 32 (unless the recipe leaves it out) and
16 x 16 (and 8 x 8 in the middle).

Training (:func:`train_teacher`) runs in stages, each saved when done so that a rerun resumes after the
last finished stage: render the data set, train the VAE, encode latents, teach the text encoder what each
object phrase says (:func:`train_text_encoder`), train the UNet on the frozen encoder (v prediction,
loss capped at low noise, EMA, classifier-free caption dropout), train the feature extractor, write the
pipeline folder. Everything runs in float32 except the UNet's training forward pass, which runs under
bfloat16 autocast when ``mixed_precision="bf16"`` (v5's recipe).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from deltaconv_cli.demo import domain
from deltaconv_cli.demo.extractor import train_extractor
from deltaconv_cli.demo.quality import to_tensor
from deltaconv_cli.demo.text import build_clip_tokenizer
from deltaconv_cli.errors import DeltaConvError
from deltaconv_cli.files import atomic_path, load_optimizer_tensors, optimizer_tensors
from deltaconv_cli.progress import advance, progress_bar

TEXT_LENGTH = 24  # tokens; the longest caption has 17 with BOS/EOS
NORM_GROUPS = 16  # of the UNet's group norms
TEXT_HEADS = 2  # of the text encoder's attention layers
# SD's scaled-linear betas, rescaled to zero SNR at t = 999 and predicting v (see train_denoiser for why).
NOISE_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
}


def vocabulary() -> list[str]:
    """Every word the domain's captions use."""
    words = ["a", "and", "at", "the", "in", "center", "top", "bottom", "left", "right", "mirrored"]
    words += list(domain.NUMBERS.values()) + list(domain.COLORS)
    words += [s for shape in domain.SHAPES for s in (shape, shape + "s")]
    return words


# Settings that recipe.json did not record at first, each with the value every run had before it existed:
# what a work folder lacking it ran, whatever the default is now. A setting added later belongs here too.
SETTINGS_BEFORE_RECORDED: dict[str, Any] = {
    "attention_heads": (1, 1, 1),
    "full_resolution_attention": True,
    "kind_shares": (),
    "lowest_resolution_attention": False,
    "mixed_precision": "no",
}

# accelerate's names for the precision of the UNet's forward pass in training (weights, optimizer and loss
# stay float32); "bf16" runs it under torch.autocast.
MIXED_PRECISION = ("no", "bf16")


@dataclass
class TeacherRecipe:
    """Every setting of the teacher's training; the defaults are the shipped teacher's."""

    seed: int = 1
    train_scenes: int = 24_000
    vae_steps: int = 1600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_object_weight: float = 1.0  # of object (saturated) pixels in the VAE loss; the background's is 1
    text_steps: int = 1000
    text_batch: int = 64
    text_lr: float = 1e-3
    mirror_class: bool = True  # the text encoder's auxiliary task gives mirror phrases their own cell class
    steps: int = 8000
    batch: int = 16
    lr: float = 6e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_cap: float = 5.0
    high_noise_share: float = 0.5  # of every batch, drawn from t >= high_noise_from instead of all timesteps
    high_noise_from: int = 900
    # Of every UNet batch, the share of each caption kind (domain.KINDS order); empty draws the training
    # scenes uniformly, so each kind at its share of the data set. The default gives count and mirror scenes
    # 1.25 times their share of the data set (domain.KIND_WEIGHTS), singles and pairs 0.8 and 0.86 times.
    kind_shares: tuple[float, ...] = (0.2, 0.3, 0.25, 0.25)
    extractor_steps: int = 1200
    checkpoint_every: int = 300
    unet_channels: tuple[int, int, int] = (48, 96, 96)
    attention_heads: tuple[int, int, int] = (1, 1, 1)  # at 32 x 32, at 16 x 16, and in the 8 x 8 middle
    # Attention at 32 x 32 is half of a UNet step's time; without it the same minutes train twice the steps.
    full_resolution_attention: bool = False
    # Self- and cross-attention in the 8 x 8 level's down and up blocks too, not only in its middle block:
    # the number of objects and a mirrored pair's row are decided over the whole image, in the first steps.
    lowest_resolution_attention: bool = False
    # v5 trained in bf16 (recipe 19 in demo_teacher/HISTORY.md); a step takes as long as in float32 there.
    mixed_precision: str = "bf16"
    text_width: int = 96

    def __post_init__(self) -> None:
        # Checked here, before train_teacher makes a folder: a bad value would otherwise fail deep inside a
        # stage (diffusers building the UNet, a zero batch) or train silently wrong (a negative rate).
        at_least_one = (
            *("train_scenes", "vae_steps", "vae_batch", "text_steps", "text_batch", "steps", "batch"),
            *("warmup", "extractor_steps", "checkpoint_every", "text_width"),
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise DeltaConvError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("vae_lr", "text_lr", "lr", "vae_object_weight", "snr_cap"):
            if not getattr(self, name) > 0:
                raise DeltaConvError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("caption_dropout", "high_noise_share", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise DeltaConvError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.seed < 0:
            raise DeltaConvError(f"seed must be >= 0, got {self.seed}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DeltaConvError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        last_timestep = NOISE_SCHEDULE["num_train_timesteps"] - 1
        if not 0 <= self.high_noise_from <= last_timestep:
            raise DeltaConvError(
                f"high_noise_from must be a timestep in [0, {last_timestep}], got {self.high_noise_from}"
            )
        if self.kind_shares and (
            len(self.kind_shares) != len(domain.KINDS)
            or any(type(share) not in (int, float) or not share >= 0 for share in self.kind_shares)
            or not math.isclose(sum(self.kind_shares), 1.0, abs_tol=1e-6)
        ):
            raise DeltaConvError(
                f"kind_shares takes {len(domain.KINDS)} shares >= 0 summing to 1 "
                f"({', '.join(domain.KINDS)}), got {list(self.kind_shares)}"
            )
        if self.text_width % TEXT_HEADS:
            raise DeltaConvError(f"text_width must be a multiple of the text encoder's {TEXT_HEADS} heads")
        for name in ("unet_channels", "attention_heads"):
            value = getattr(self, name)
            if len(value) != 3 or not all(type(v) is int and v > 0 for v in value):
                raise DeltaConvError(f"{name} takes three whole numbers > 0, got {list(value)}")
        if any(channels % NORM_GROUPS for channels in self.unet_channels):
            raise DeltaConvError(
                f"unet_channels must be multiples of {NORM_GROUPS}, got {list(self.unet_channels)}"
            )
        if any(c % h for c, h in zip(self.unet_channels, self.attention_heads, strict=True)):
            raise DeltaConvError(
                f"attention_heads {list(self.attention_heads)} must divide unet_channels "
                f"{list(self.unet_channels)} level by level"
            )

    def as_recorded(self) -> dict[str, Any]:
        """The settings as ``recipe.json`` holds them (tuples as JSON lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> TeacherRecipe:
        """The recipe that ``train_teacher`` recorded as ``recipe.json`` in its work and output folders."""

        def broken(why: object) -> DeltaConvError:
            return DeltaConvError(f"{path} is not a recipe recorded by train_teacher: {why}")

        try:
            settings = json.loads(Path(path).read_text())
        except ValueError as error:
            raise broken(error) from None
        if not isinstance(settings, dict):
            raise broken("not a JSON object")
        unknown = sorted(settings.keys() - {f.name for f in fields(cls)})
        if unknown:
            raise DeltaConvError(f"{path} records settings this recipe does not have: {', '.join(unknown)}")
        try:
            recorded = {key: tuple(v) if isinstance(v, list) else v for key, v in settings.items()}
            return cls(**(SETTINGS_BEFORE_RECORDED | recorded))
        except TypeError as error:  # a value of another type than its setting's, e.g. "steps": "many"
            raise broken(error) from None


def build_components(recipe: TeacherRecipe, scratch: Path) -> dict[str, Any]:
    """Untrained pipeline components of the teacher's architecture."""
    torch.manual_seed(recipe.seed)
    tokenizer = build_clip_tokenizer(vocabulary(), scratch / "tokenizer-files", TEXT_LENGTH)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe.text_width,
            intermediate_size=2 * recipe.text_width,
            num_hidden_layers=2,
            num_attention_heads=TEXT_HEADS,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=domain.SIZE,
        mid_block_add_attention=False,
    )

    def level_blocks(attention: bool) -> tuple[str, str]:  # a level's down and up block types
        return ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")

    first_down, last_up = level_blocks(recipe.full_resolution_attention)
    last_down, first_up = level_blocks(recipe.lowest_resolution_attention)
    unet = UNet2DConditionModel(
        sample_size=domain.SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=recipe.unet_channels,
        layers_per_block=1,
        down_block_types=(first_down, "CrossAttnDownBlock2D", last_down),
        up_block_types=(first_up, "CrossAttnUpBlock2D", last_up),
        cross_attention_dim=recipe.text_width,
        # diffusers reads this as the number of heads per level; the last is the middle block's (and the
        # 8 x 8 down and up blocks' with lowest_resolution_attention)
        attention_head_dim=recipe.attention_heads,
        norm_num_groups=NORM_GROUPS,
    )
    # Trailing spacing starts sampling at t = 999, the pure noise the zero-SNR schedule trains on.
    scheduler = DPMSolverMultistepScheduler(**NOISE_SCHEDULE, timestep_spacing="trailing")
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "unet": unet,
        "scheduler": scheduler,
    }


def render_dataset(seed: int, count: int) -> tuple[np.ndarray, list[str]]:
    scenes = [domain.make_scene(seed, i) for i in range(count)]
    return np.stack([domain.render(s) for s in scenes]), [s.caption for s in scenes]


def _save_atomic(component: Any, target: Path) -> None:
    with atomic_path(target) as staging:
        component.save_pretrained(staging)


def train_vae(vae: AutoencoderKL, images: np.ndarray, recipe: TeacherRecipe, progress: Progress) -> None:
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    task = progress.add_task("VAE", total=recipe.vae_steps, status="")
    vae.train()
    for step in range(recipe.vae_steps):
        index = torch.randint(len(images), (recipe.vae_batch,), generator=gen)
        x = to_tensor(images[index.numpy()])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # Objects cover a small share of the pixels: weighted like the background, the VAE learns their
        # colours late and decodes blue partly cyan (demo_teacher/HISTORY.md).
        saturated = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) > 0.4
        weight = 1 + (recipe.vae_object_weight - 1) * saturated.float()
        error = recon - x
        pixel_loss = (weight * (error.square() + 0.5 * error.abs())).mean() / weight.mean()
        loss = pixel_loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay to 10 %
            group["lr"] = recipe.vae_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / recipe.vae_steps)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        advance(progress, task, f"loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Posterior means of ``images``, unscaled."""
    chunks = []
    for start in range(0, len(images), batch):
        chunks.append(vae.encode(to_tensor(images[start : start + batch])).latent_dist.mode())
    return torch.cat(chunks)


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """``captions`` as padded ``(N, TEXT_LENGTH)`` token ids, as the pipeline tokenizes prompts."""
    return tokenizer(
        captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


IGNORE = -100  # cross-entropy's ignore index: a caption with one object phrase has no second target
NO_CELL = domain.GRID * domain.GRID  # the cell class of phrases that name none (count, mirror)
# With ``mirror_class``, the cell class of mirror phrases (the outer cells of one row). Without it a mirror
# phrase ("two red squares mirrored") and a two-object count phrase ("two red squares") state the same
# facts, nothing asks the encoder to keep them apart, and the UNet draws both alike (demo_teacher/HISTORY.md).
MIRRORED = NO_CELL + 1


PhraseFacts = tuple[int, int, int, int]  # colour, shape, cell, number of objects - 1


def phrase_facts(caption: str, mirror_class: bool = False) -> tuple[list[int], list[PhraseFacts]]:
    """Where each object phrase of ``caption`` ends (token index, BOS counted) and what it says.

    The cell is NO_CELL where the phrase names none (MIRRORED for mirror phrases with ``mirror_class``).
    The tokenizer spells every word as one token, so word ``i`` is token ``i + 1``; a causal encoder's
    state at a phrase's last word has seen the whole phrase.
    """
    kind, objects = domain.parse_caption(caption)
    words = caption.split()
    colours = list(domain.COLORS)
    if kind in ("single", "pair"):
        ends = [len(words)] if kind == "single" else [words.index("and"), len(words)]
        facts = [(colours.index(o.color), domain.SHAPES.index(o.shape), o.cell, 0) for o in objects]
    else:
        first, cell = objects[0], MIRRORED if mirror_class and kind == "mirror" else NO_CELL
        ends = [len(words)]
        facts = [(colours.index(first.color), domain.SHAPES.index(first.shape), cell, len(objects) - 1)]
    return ends, facts


class PhraseProbe(torch.nn.Module):
    """Linear heads that read an object phrase's facts from the text encoder's state at its last word."""

    FACTS = ("colour", "shape", "cell", "number")

    def __init__(self, width: int, mirror_class: bool = False) -> None:
        super().__init__()
        cells = (MIRRORED if mirror_class else NO_CELL) + 1
        classes = (len(domain.COLORS), len(domain.SHAPES), cells, max(domain.NUMBERS))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in classes)

    def forward(self, states: torch.Tensor) -> list[torch.Tensor]:
        return [head(states) for head in self.heads]


def _phrase_targets(captions: list[str], mirror_class: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Phrase-end token indices ``(N, 2)`` and their facts ``(N, 2, 4)``, IGNORE where a caption has one."""
    ends = torch.zeros(len(captions), 2, dtype=torch.long)
    facts = torch.full((len(captions), 2, len(PhraseProbe.FACTS)), IGNORE, dtype=torch.long)
    for i, caption in enumerate(captions):
        caption_ends, caption_facts = phrase_facts(caption, mirror_class)
        ends[i, : len(caption_ends)] = torch.tensor(caption_ends)
        facts[i, : len(caption_facts)] = torch.tensor(caption_facts)
    return ends, facts


def train_text_encoder(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    captions: list[str],
    held_out: list[str],
    recipe: TeacherRecipe,
    progress: Progress,
) -> dict[str, float]:
    """Teach the text encoder to state each object phrase's colour, shape, cell and number at its last word.

    Trained jointly with the UNet from scratch, a causal CLIP encoder learns colour and shape but never
    turns position words into anything cross-attention can use (the placement probe in ``recipes/``
    measures this). Trained first on this auxiliary task and then frozen, it hands the UNet the cell.
    Returns the linear heads' accuracy per fact on ``held_out`` captions.
    """
    tokenize = partial(token_ids, tokenizer)
    probe = PhraseProbe(text_encoder.config.hidden_size, recipe.mirror_class)
    params = [*text_encoder.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.text_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    ids, (ends, facts) = tokenize(captions), _phrase_targets(captions, recipe.mirror_class)

    def logits(batch_ids: torch.Tensor, batch_ends: torch.Tensor) -> list[torch.Tensor]:
        states = text_encoder(batch_ids)[0]
        return probe(states[torch.arange(len(batch_ids))[:, None], batch_ends])

    task = progress.add_task("text encoder", total=recipe.text_steps, status="")
    text_encoder.train()
    for step in range(recipe.text_steps):
        index = torch.randint(len(ids), (recipe.text_batch,), generator=gen)
        outputs = logits(ids[index], ends[index])
        target = facts[index]
        loss = sum(F.cross_entropy(out.flatten(0, 1), target[..., k].flatten(), ignore_index=IGNORE)
                   for k, out in enumerate(outputs))  # fmt: skip
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = recipe.text_lr * 0.5 * (1 + math.cos(math.pi * step / recipe.text_steps))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        advance(progress, task, f"loss {loss.item():.4f}")
    text_encoder.eval()
    held_ends, held_facts = _phrase_targets(held_out, recipe.mirror_class)
    with torch.no_grad():
        outputs = logits(tokenize(held_out), held_ends)
    accuracy = {}
    for k, name in enumerate(PhraseProbe.FACTS):
        named = held_facts[..., k] != IGNORE
        accuracy[name] = float((outputs[k].argmax(-1) == held_facts[..., k])[named].float().mean())
    return accuracy


def unet_autocast(recipe: TeacherRecipe) -> torch.autocast:
    """The context the UNet's training forward pass runs in: bfloat16 autocast if the recipe asks for it."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.mixed_precision == "bf16")


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latents: torch.Tensor,
    captions: list[str],
    recipe: TeacherRecipe,
    progress: Progress,
    checkpoint: Path,
) -> None:
    """The UNet, trained on the frozen text encoder for v prediction with EMA.

    The schedule reaches zero SNR at t = 999. On SD's own schedule 6.8 % of the clean latents' amplitude
    is left there, and on 32 x 32 latents of large flat shapes that is enough to find the objects in the
    noise: a teacher trained on it takes the layout from the noise and none from the caption, and at
    sampling time draws whatever layout the seed's noise suggests. With no signal left at t = 999 the
    caption is the only source of the layout. Drawn uniformly, one timestep in ten is there (t >= 900),
    where the layout is decided; ``high_noise_share`` of every batch is drawn from those steps instead.

    The loss is the v error, which is the clean-latent error weighted by SNR + 1, capped at ``snr_cap`` + 1
    so that the nearly clean steps do not dominate. Where the layout is decided (t near 999) this keeps the
    clean-latent error at full weight, where epsilon prediction with min-SNR weighting scales it by the
    SNR (0.005 at t = 999 on SD's schedule, and 0 with zero SNR).

    Every ``checkpoint_every`` steps the weights, EMA and optimizer state are saved to ``checkpoint``
    (safetensors + JSON, atomically); a rerun continues from there. Each step's random draws come from a
    generator seeded by the step, so a resumed run follows the same trajectory.
    """
    scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    tokenize = partial(token_ids, tokenizer)
    ids, empty = tokenize(captions), tokenize([""])
    text_encoder.requires_grad_(False).eval()  # joint training would wash the cell back out of its states
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=True, power=0.75)
    scene_weights = _scene_weights(captions, recipe.kind_shares) if recipe.kind_shares else None
    start = _load_denoiser_checkpoint(checkpoint, params, ema, optimizer) if checkpoint.exists() else 0
    task = progress.add_task("UNet", total=recipe.steps, completed=start, status="")
    unet.train()
    for step in range(start, recipe.steps):
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        if scene_weights is None:
            index = torch.randint(len(latents), (recipe.batch,), generator=gen)
        else:
            index = torch.multinomial(scene_weights, recipe.batch, replacement=True, generator=gen)
        x0 = latents[index]
        tokens = ids[index].clone()
        tokens[torch.rand(recipe.batch, generator=gen) < recipe.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=gen)
        steps = scheduler.config.num_train_timesteps
        t = torch.randint(steps, (recipe.batch,), generator=gen)
        high = torch.randint(recipe.high_noise_from, steps, t.shape, generator=gen)
        t = torch.where(torch.rand(recipe.batch, generator=gen) < recipe.high_noise_share, high, t)
        noisy = scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            context = text_encoder(tokens)[0]
        with unet_autocast(recipe):
            pred = unet(noisy, t, context).sample.float()
        weight = torch.clamp((recipe.snr_cap + 1) / (snr[t] + 1), max=1.0)
        target = scheduler.get_velocity(x0, noise, t)
        loss = (weight * (pred - target).square().mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        warm = min(1.0, (step + 1) / recipe.warmup)
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * warm * cosine
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        advance(progress, task, f"loss {loss.item():.4f}")
        if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.steps:
            _save_denoiser_checkpoint(checkpoint, step + 1, params, ema, optimizer)
    ema.copy_to(params)
    unet.eval()


def _scene_weights(captions: list[str], kind_shares: tuple[float, ...]) -> torch.Tensor:
    """Each training scene's chance of being drawn, so that every batch holds each kind at its share."""
    kinds = [domain.parse_caption(caption)[0] for caption in captions]
    scenes_of = {kind: kinds.count(kind) for kind in domain.KINDS}
    shares = dict(zip(domain.KINDS, kind_shares, strict=True))
    for kind, share in shares.items():
        if share > 0 and not scenes_of[kind]:  # the other kinds would silently take its share
            raise DeltaConvError(
                f"kind_shares gives {kind} scenes {share} of every batch, but none were rendered"
            )
    return torch.tensor([shares[kind] / scenes_of[kind] for kind in kinds], dtype=torch.float64)


def _save_denoiser_checkpoint(folder: Path, step: int, params: list, ema: EMAModel, optimizer: Any) -> None:
    with atomic_path(folder) as staging:
        staging.mkdir(parents=True)
        opt_tensors, param_groups = optimizer_tensors(optimizer, prefix="opt.")
        tensors = {f"param.{i}": p.detach() for i, p in enumerate(params)}
        tensors |= {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}
        save_file(
            {k: v.contiguous() for k, v in (tensors | opt_tensors).items()}, staging / "state.safetensors"
        )
        meta = {"step": step, "ema_optimization_step": ema.optimization_step, "param_groups": param_groups}
        (staging / "state.json").write_text(json.dumps(meta))


def _load_denoiser_checkpoint(folder: Path, params: list, ema: EMAModel, optimizer: Any) -> int:
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(folder / "state.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    ema.shadow_params = [tensors[f"ema.{i}"] for i in range(len(params))]
    ema.optimization_step = meta["ema_optimization_step"]
    load_optimizer_tensors(optimizer, tensors, meta["param_groups"], prefix="opt.")
    return int(meta["step"])


def train_teacher(out: Path, recipe: TeacherRecipe | None = None, work: Path | None = None) -> Path:
    """Train the demo teacher and its feature extractor; write the pipeline to ``out/pipeline`` and the
    extractor to ``out/extractor``. Finished stages are kept in ``work`` and skipped on a rerun of the
    same recipe; a work folder started with another recipe is refused rather than mixed in."""
    recipe = recipe or TeacherRecipe()
    out = Path(out)
    work = Path(work) if work else out.parent / f".{out.name}-work"
    recorded = work / "recipe.json"
    if recorded.exists():
        # A setting added after the folder was written is missing there; read fills in what ran before it.
        earlier = TeacherRecipe.read(recorded)
        changed = [f.name for f in fields(recipe) if getattr(earlier, f.name) != getattr(recipe, f.name)]
        if changed:
            raise DeltaConvError(
                f"{work} holds stages of another recipe ({', '.join(changed)} differ); "
                "give another --work or delete it"
            )
    work.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(recipe.as_recorded(), indent=2) + "\n")
    parts = build_components(recipe, work)
    with progress_bar() as progress:
        data_file = work / "data.npz"
        if not data_file.exists():
            progress.console.print("rendering the training scenes")
            images, captions = render_dataset(recipe.seed, recipe.train_scenes)
            np.savez(work / "data.tmp.npz", images=images, captions=np.array(captions))
            (work / "data.tmp.npz").rename(data_file)
        data = np.load(data_file)
        images, captions = data["images"], [str(c) for c in data["captions"]]
        if recipe.kind_shares:  # a share the rendered scenes cannot fill is refused before the VAE trains
            _scene_weights(captions, recipe.kind_shares)

        if (work / "vae").exists():
            parts["vae"] = AutoencoderKL.from_pretrained(work / "vae")
        else:
            train_vae(parts["vae"], images, recipe, progress)
            latents = encode_latents(parts["vae"], images[:4096])
            parts["vae"].register_to_config(scaling_factor=float(1.0 / latents.std()))
            _save_atomic(parts["vae"], work / "vae")
        vae = parts["vae"]

        if not (work / "pipeline").exists():
            latents_file = work / "latents.safetensors"
            if not latents_file.exists():
                progress.console.print("encoding the training set to latents")
                latents = encode_latents(vae, images) * vae.config.scaling_factor
                save_file({"latents": latents.contiguous()}, latents_file)
            latents = load_file(latents_file)["latents"]
            if (work / "text_encoder").exists():
                parts["text_encoder"] = CLIPTextModel.from_pretrained(work / "text_encoder")
            else:
                held_out = [domain.make_scene(recipe.seed + 4, i).caption for i in range(1024)]
                accuracy = train_text_encoder(
                    parts["text_encoder"], parts["tokenizer"], captions, held_out, recipe, progress
                )
                facts = ", ".join(f"{name} {value:.3f}" for name, value in accuracy.items())
                progress.console.print(f"text encoder: held-out phrase facts read back: {facts}")
                _save_atomic(parts["text_encoder"], work / "text_encoder")
            denoiser_parts = (parts["unet"], parts["text_encoder"], parts["tokenizer"])
            train_denoiser(*denoiser_parts, latents, captions, recipe, progress, work / "denoiser-checkpoint")
            pipe = StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
            _save_atomic(pipe, work / "pipeline")

        if not (work / "extractor").exists():
            extractor = train_extractor(recipe.seed + 3, recipe.extractor_steps, progress)
            _save_atomic(extractor, work / "extractor")

    out.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "extractor"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(work / name, out / name)
    shutil.copyfile(recorded, out / "recipe.json")
    return out
