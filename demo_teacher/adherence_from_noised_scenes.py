"""Where along the sampling trajectory the demo teacher loses its captions' facts.

    python demo_teacher/adherence_from_noised_scenes.py [--pipeline demo] [--count 100] \\
        [--strength 0.3 0.5 0.7 0.85 0.95] [--json FILE]

Each held-out caption's real scene is encoded by the pipeline's VAE, noised part of the way up the schedule
and sampled from there with the pipeline's scheduler, 20 steps and the recommended guidance at every step
from where sampling starts (each image's noise seeded by its caption's index), as diffusers' img2img does with
``strength``: strength s starts at the trailing timestep s of the way up, and 1 is sampling from pure
noise. For each strength it prints the timestep sampling starts at, adherence by scene kind and the
failed facts by reason (quality.failed_facts). What a strength loses that a lower one keeps is lost at
the timesteps between them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from deltaconv_cli.cli import write_json
from deltaconv_cli.demo.quality import (
    HELD_OUT_SEED,
    adherence_by_kind,
    failed_facts,
    held_out_captions,
    real_images,
)
from deltaconv_cli.demo.recommended import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from deltaconv_cli.errors import run_script
from deltaconv_cli.imaging import to_uint8
from deltaconv_cli.loading import load_model, locate_pipeline

BATCH = 8


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pipeline", default="demo", help="demo, or a pipeline folder")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--strength", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 0.95])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    lowest = 1 / RECOMMENDED_STEPS  # below it img2img runs no step at all
    if args.count < 1 or not all(lowest <= s <= 1 for s in args.strength):
        parser.error(f"--count must be at least 1 and every --strength in [{lowest:g}, 1]")
    components = load_model(locate_pipeline(args.pipeline, "img2img from noised scenes")).components
    pipe = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(RECOMMENDED_STEPS)
    schedule = pipe.scheduler.timesteps.tolist()
    captions, kinds = held_out_captions(args.count)
    reals = [Image.fromarray(image) for image in real_images(HELD_OUT_SEED, args.count)]
    results = []
    for strength in args.strength:
        images: list[np.ndarray] = []
        for start in range(0, args.count, BATCH):
            chunk = slice(start, start + BATCH)
            seeds = range(start, min(start + BATCH, args.count))
            output = pipe(
                captions[chunk],
                image=reals[chunk],
                strength=strength,
                num_inference_steps=RECOMMENDED_STEPS,
                guidance_scale=RECOMMENDED_GUIDANCE,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                output_type="np",
            )
            images += [to_uint8(image) for image in output.images]
        steps_run = int(RECOMMENDED_STEPS * strength)
        result = {
            "strength": strength,
            "start_timestep": int(schedule[RECOMMENDED_STEPS - steps_run]),
            "adherence": adherence_by_kind(images, captions, kinds),
            "failed_facts": failed_facts(images, captions),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    write_json(args.json, results)


if __name__ == "__main__":
    run_script(main)
