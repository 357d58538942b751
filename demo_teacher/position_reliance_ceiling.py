"""What `quality.position_reliance` can read at t = 999 for a denoiser that knows only the caption.

    python demo_teacher/position_reliance_ceiling.py --pipeline runs/teacher-v2/pipeline [--draws 64]

On a schedule with zero SNR at t = 999 the noisy latents hold nothing of the image there, so the best
prediction of the clean latents is the mean latent of every scene the caption describes. This renders
`--draws` scenes for each of the first 32 of position_reliance's held-out single captions (same colour,
shape and cell; object size, jitter and background drawn as the data set draws them) and for their moved
captions, encodes them with the pipeline's VAE, and prints the x0 error of that mean against the real
scene, for the own and for the moved caption: the moved / own that a perfect caption-only denoiser
reaches.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import numpy as np
import torch

from deltaconv_cli.conditioning import latent_posterior
from deltaconv_cli.demo import domain
from deltaconv_cli.demo.quality import HELD_OUT_SEED, to_tensor, with_cell_moved
from deltaconv_cli.errors import run_script
from deltaconv_cli.loading import load_model, locate_pipeline

COUNT = 32


@torch.no_grad()
def mean_latent(pipe: Any, caption: str, draws: int, rng: np.random.Generator) -> torch.Tensor:
    """The mean latent of ``draws`` scenes that ``caption`` describes."""
    _, (wanted,) = domain.parse_caption(caption)
    scenes = []
    for _ in range(draws):
        drawn = domain.sample_scene(rng, "single")
        (free,) = drawn.objects  # its size and jitter
        placed = dataclasses.replace(free, color=wanted.color, shape=wanted.shape, cell=wanted.cell)
        scenes.append(dataclasses.replace(drawn, objects=(placed,)))
    images = to_tensor(np.stack([domain.render(s) for s in scenes]))
    return (latent_posterior(pipe, images).mode() * pipe.vae.config.scaling_factor).mean(0)


@torch.no_grad()
def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pipeline", default="demo", help="demo, or a pipeline folder (its VAE is used)")
    parser.add_argument("--draws", type=int, default=64, help="scenes per caption")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error("--draws must be at least 1")
    pipe = load_model(locate_pipeline(args.pipeline, "the position-reliance probe"))
    scenes = [domain.make_scene(HELD_OUT_SEED, i, "single") for i in range(COUNT)]  # as position_reliance
    x0 = latent_posterior(pipe, to_tensor(np.stack([domain.render(s) for s in scenes]))).mode()
    x0 = x0 * pipe.vae.config.scaling_factor
    rng = np.random.default_rng(0)
    own, moved = [], []
    for i, scene in enumerate(scenes):
        own.append(float((mean_latent(pipe, scene.caption, args.draws, rng) - x0[i]).square().mean()))
        shifted = with_cell_moved(scene.caption, 1 + i % 8)
        moved.append(float((mean_latent(pipe, shifted, args.draws, rng) - x0[i]).square().mean()))
    own_error, moved_error = float(np.mean(own)), float(np.mean(moved))
    print(f"caption-only x0 error at t = 999: own {own_error:.4f}, moved {moved_error:.4f}, "
          f"moved / own {moved_error / own_error:.3f}")  # fmt: skip


if __name__ == "__main__":
    run_script(main)
