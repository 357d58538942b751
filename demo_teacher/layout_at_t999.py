"""Where the teacher puts objects at t = 999, by column, for count and mirror captions, against real scenes.

    python demo_teacher/layout_at_t999.py --pipeline demo [--json FILE]

At t = 999 a zero-SNR schedule leaves nothing of the image in the noisy latents, so the denoiser's
clean-latent prediction is its caption-only guess of the layout: the mean of every scene it thinks the
caption describes. For every colour and shape, this decodes that prediction for "two ... mirrored", "two",
"three" and "four" captions and reports how its colour (each pixel's spread between its largest and
smallest channel, above the background's) divides between the left, middle and right thirds of the
image, next to the same division in real scenes of those captions. Real mirror scenes have nothing in the
middle third and count scenes about a third; a denoiser that draws mirror captions like count captions
(or the reverse) divides both alike. A third column decodes the mean of the real scenes' latents through
the same VAE: what the prediction would show if it were exactly the caption's mean scene, so that a lean
of the decoder is told apart from one of the denoiser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltaconv_cli.cli import write_json
from deltaconv_cli.conditioning import encode_prompts, predict
from deltaconv_cli.demo import domain
from deltaconv_cli.demo.quality import clean_latents, to_tensor
from deltaconv_cli.errors import run_script
from deltaconv_cli.loading import load_model, locate_pipeline

CAPTIONS = {
    "two mirrored": "two {color} {shape}s mirrored",
    "two": "two {color} {shape}s",
    "three": "three {color} {shape}s",
    "four": "four {color} {shape}s",
}


def column_shares(images: torch.Tensor) -> list[float]:
    """How the colour of ``images`` (in [-1, 1]) divides between their left, middle and right thirds, above
    each image's background (its median, as objects cover less than half of every scene)."""
    spread = images.amax(1) - images.amin(1)
    spread = (spread - spread.flatten(1).median(1).values[:, None, None]).clamp(min=0)
    thirds = torch.stack([part.sum() for part in torch.tensor_split(spread, 3, dim=-1)])
    return [round(float(share), 3) for share in thirds / thirds.sum()]


def real_scenes(caption: str, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` rendered scenes that ``caption`` describes (cells, sizes and jitter drawn as the data set
    draws them)."""
    kind, wanted = domain.parse_caption(caption)
    scenes = []
    while len(scenes) < count:
        scene = domain.sample_scene(rng, kind)
        if domain.parse_caption(scene.caption)[1] == wanted:  # same colour, shape and number
            scenes.append(scene)
    return to_tensor(np.stack([domain.render(s) for s in scenes]))


@torch.no_grad()
def layout(pipe: Any, draws: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    scheduler = pipe.scheduler
    alpha = scheduler.alphas_cumprod[999]
    prediction_type = scheduler.config.prediction_type
    size = pipe.unet.config.sample_size
    rng = np.random.default_rng(seed)
    result = {}
    for name, template in CAPTIONS.items():
        captions = [template.format(color=c, shape=s) for c in domain.COLORS for s in domain.SHAPES]
        noisy = torch.randn(len(captions), 4, size, size, generator=torch.Generator().manual_seed(seed))
        steps = torch.full((len(captions),), 999)
        cond = encode_prompts(pipe, captions, domain.SIZE, domain.SIZE)
        x0 = clean_latents(predict(pipe.unet, noisy, steps, cond).float(), noisy, alpha, prediction_type)
        decoded = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
        reals = [real_scenes(c, draws, rng) for c in captions]
        mean_latents = torch.cat(
            [pipe.vae.encode(real).latent_dist.mode().mean(0, keepdim=True) for real in reals]
        )
        mean_decoded = pipe.vae.decode(mean_latents).sample.clamp(-1, 1)
        result[name] = {
            "teacher": column_shares(decoded),
            "real": column_shares(torch.cat(reals)),
            "real_mean_latent": column_shares(mean_decoded),
        }
    return result


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pipeline", default="demo", help="demo, or a pipeline folder")
    parser.add_argument("--draws", type=int, default=8, help="real scenes per caption")
    parser.add_argument("--json", type=Path, help="write the shares as JSON")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error("--draws must be at least 1")
    pipe = load_model(locate_pipeline(args.pipeline, "the layout probe"))
    result = layout(pipe, args.draws)
    print(f"{'caption':<14} {'teacher: left / middle / right':<32} {'real':<24} real, mean latent decoded")
    for name, shares in result.items():
        teacher, real, mean = (
            " / ".join(f"{x:.3f}" for x in shares[k]) for k in ("teacher", "real", "real_mean_latent")
        )
        print(f"{name:<14} {teacher:<32} {real:<24} {mean}")
    write_json(args.json, {"pipeline": args.pipeline, "columns": result})


if __name__ == "__main__":
    run_script(main)
