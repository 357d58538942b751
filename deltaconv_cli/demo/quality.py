"""How good a demo-domain generator is: prompt adherence by the exact checker, and Fréchet distances
in the domain extractor's feature space (computed offline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from cleanfid.fid import fid_from_feats

from ..errors import DeltaConvError
from . import domain
from .extractor import DomainFeatureExtractor

if TYPE_CHECKING:
    from ..sampling import SampleSettings

HELD_OUT_SEED = 10_000_019  # captions no training stream draws (training uses seeds 0.. and seed + 1)
REFERENCE_SEED = 20_000_003  # real images for Fréchet distances (this seed and the next three)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` images as float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def check_caption_seed(seed: int) -> None:
    """Refuse a seed to draw held-out captions from whose scenes train the teacher or are the real images
    that Fréchet distances compare with (samples of those very scenes would flatter the distance)."""
    if seed < HELD_OUT_SEED:
        raise DeltaConvError(
            f"caption seed must be >= {HELD_OUT_SEED} (the seeds below train the teacher), got {seed}"
        )
    if REFERENCE_SEED <= seed <= REFERENCE_SEED + 3:
        raise DeltaConvError(
            f"caption seed {seed} draws the real images Fréchet distances compare with "
            f"({REFERENCE_SEED} to {REFERENCE_SEED + 3}); choose another"
        )


@torch.no_grad()
def features(extractor: DomainFeatureExtractor, images: Sequence[np.ndarray], batch: int = 256) -> np.ndarray:
    """Extractor features of uint8 ``(H, W, 3)`` images."""
    chunks = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[start : start + batch])).permute(0, 3, 1, 2).float() / 255
        chunks.append(extractor.features(x).double().numpy())
    return np.concatenate(chunks)


def frechet(extractor: DomainFeatureExtractor, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Fréchet distance between two image sets in the extractor's feature space."""
    return float(fid_from_feats(features(extractor, a), features(extractor, b)))


def real_images(seed: int, count: int, kind: str | None = None) -> list[np.ndarray]:
    return [domain.render(domain.make_scene(seed, i, kind)) for i in range(count)]


def held_out_captions(count: int, seed: int = HELD_OUT_SEED) -> tuple[list[str], list[str]]:
    """Captions (and their scene kinds) from a seed no training run draws from."""
    scenes = [domain.make_scene(seed, i) for i in range(count)]
    return [s.caption for s in scenes], [s.kind for s in scenes]


def adherence_by_kind(
    images: Sequence[np.ndarray], captions: Sequence[str], kinds: Sequence[str]
) -> dict[str, float]:
    scores = [domain.check(image, caption) for image, caption in zip(images, captions, strict=True)]
    result = {"all": float(np.mean(scores))}
    for kind in domain.KINDS:
        chosen = [s for s, k in zip(scores, kinds, strict=True) if k == kind]
        if chosen:
            result[kind] = float(np.mean(chosen))
    return result


def placed_objects(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Over every object a ``single`` or ``pair`` caption names: the share drawn (its colour and shape
    anywhere in the image) and the share drawn in the cell the caption names. The gap between the two is
    what the generator gets wrong about position alone."""
    drawn, placed = [], []
    for image, caption in zip(images, captions, strict=True):
        kind, wanted = domain.parse_caption(caption)
        if kind not in ("single", "pair"):
            continue
        found = domain.detect_objects(image)
        for w in wanted:
            drawn.append(any((d.color, d.shape) == (w.color, w.shape) for d in found))
            placed.append(any((d.color, d.shape, d.cell) == (w.color, w.shape, w.cell) for d in found))
    return {"objects": len(drawn), "drawn": float(np.mean(drawn)), "in_named_cell": float(np.mean(placed))}


def failed_facts(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, int]:
    """How many of the captions' facts (``domain.facts``) hold, and how many fail for each reason in
    ``domain.FAILURES``: where the adherence that :func:`adherence_by_kind` averages is lost."""
    pairs = zip(images, captions, strict=True)
    checked = [fact for image, caption in pairs for fact in domain.facts(image, caption)]
    reasons = [reason for holds, reason in checked if not holds]
    return {"facts": len(checked), "hold": len(checked) - len(reasons)} | {
        reason: reasons.count(reason) for reason in domain.FAILURES
    }


@torch.no_grad()
def reconstruction_adherence(pipe: Any, count: int = 200, seed: int = HELD_OUT_SEED) -> dict[str, Any]:
    """Adherence of the pipeline's VAE reconstructions (encode, decode) of the real held-out scenes whose
    captions :func:`generator_quality` samples: the most a sample decoded by this VAE can be expected to
    score, and which facts the VAE alone already breaks."""
    from ..conditioning import latent_posterior
    from ..imaging import to_uint8

    captions, kinds = held_out_captions(count, seed)
    reals = real_images(seed, count)  # the scenes those captions were drawn from
    reconstructions = []
    for start in range(0, count, 50):
        images = to_tensor(np.stack(reals[start : start + 50]))
        decoded = pipe.vae.decode(latent_posterior(pipe, images).mode()).sample.float()
        reconstructions += [to_uint8(x) for x in (decoded / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy()]
    return {
        "adherence": adherence_by_kind(reconstructions, captions, kinds),
        "failed_facts": failed_facts(reconstructions, captions),
    }


def with_cell_moved(caption: str, step: int) -> str:
    """A ``single`` caption with its object moved ``step`` cells on (row-major, wrapping)."""
    kind, objects = domain.parse_caption(caption)
    if kind != "single":
        raise ValueError(f"not a single-object caption: {caption!r}")
    wanted = objects[0]
    moved = domain.SceneObject(wanted.color, wanted.shape, (wanted.cell + step) % (domain.GRID * domain.GRID))
    return domain.caption_of("single", (moved,))


def clean_latents(
    prediction: torch.Tensor, noisy: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean latents a denoiser's ``prediction`` implies for ``noisy`` latents at cumulative alpha
    ``alpha``, for diffusers' prediction types (``epsilon``, ``v_prediction``, ``sample``)."""
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction
    return prediction


@torch.no_grad()
def position_reliance(
    pipe: Any, count: int = 64, timesteps: Sequence[int] = (999, 900, 800, 600), seed: int = HELD_OUT_SEED
) -> dict[str, dict[str, float]]:
    """How much the denoiser uses the caption's position words: real ``single`` scenes are noised to
    each timestep and denoised once with their own caption and once with the object named in another
    cell; the mean squared error of the predicted clean latents, for both. A denoiser that reads the
    position words does worse with the moved caption; one that ignores them scores the two the same."""
    from diffusers import DDPMScheduler

    from ..conditioning import encode_prompts, latent_posterior, predict

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas, prediction = scheduler.alphas_cumprod, scheduler.config.prediction_type
    scenes = [domain.make_scene(seed, i, "single") for i in range(count)]
    images = to_tensor(np.stack([domain.render(s) for s in scenes]))
    x0 = latent_posterior(pipe, images).mode() * pipe.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    own = [s.caption for s in scenes]
    moved = [with_cell_moved(c, 1 + i % 8) for i, c in enumerate(own)]
    conds = {
        "own": encode_prompts(pipe, own, *images.shape[-2:]),
        "moved": encode_prompts(pipe, moved, *images.shape[-2:]),
    }
    result = {}
    for t in timesteps:
        steps = torch.full((count,), t)
        noisy, a = scheduler.add_noise(x0, noise, steps), alphas[t]
        errors = {}
        for name, cond in conds.items():
            x0_hat = clean_latents(predict(pipe.unet, noisy, steps, cond).float(), noisy, a, prediction)
            errors[f"{name}_caption"] = float((x0_hat - x0).square().mean())
        result[str(t)] = errors
    return result


def generator_quality(
    pipe: Any,
    extractor: DomainFeatureExtractor,
    settings: SampleSettings,
    count: int = 200,
    first_seed: int = 0,
    caption_seed: int = HELD_OUT_SEED,
) -> dict[str, Any]:
    """Adherence on ``count`` held-out captions and Fréchet distances of the samples to real images,
    next to two reference distances: real vs real (the floor at this sample size) and between two
    different domains (real ``single``-object scenes vs real ``count`` scenes). The samples are drawn with
    ``settings`` and the pipeline's scheduler as it is set.

    Caption ``i`` is sampled from the initial noise of seed ``first_seed + i``: another ``first_seed``
    draws the same captions from other noise, which measures how far the sampling seeds alone move a score.
    Another ``caption_seed`` draws other held-out captions, on which to choose settings without tuning
    them to the documented ones.
    """
    from ..sampling import generate

    check_caption_seed(caption_seed)
    captions, kinds = held_out_captions(count, caption_seed)
    seeds = list(range(first_seed, first_seed + count))
    samples = generate(pipe, captions, seeds, (domain.SIZE, domain.SIZE), settings)
    reference = real_images(REFERENCE_SEED, count)
    return {
        "captions": count,
        "caption_seed": caption_seed,
        "first_seed": first_seed,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "guidance_rescale": settings.guidance_rescale,
        "guidance_start": settings.guidance_start,
        "adherence": adherence_by_kind(samples, captions, kinds),
        "named_objects": placed_objects(samples, captions),
        "failed_facts": failed_facts(samples, captions),
        "fd_samples_vs_real": frechet(extractor, samples, reference),
        "fd_real_vs_real": frechet(extractor, real_images(REFERENCE_SEED + 1, count), reference),
        "fd_between_domains": frechet(
            extractor,
            real_images(REFERENCE_SEED + 2, count, "single"),
            real_images(REFERENCE_SEED + 3, count, "count"),
        ),
        "samples": samples,
        "sample_captions": captions,
    }
