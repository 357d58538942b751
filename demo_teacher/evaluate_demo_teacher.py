"""Measure the embedded demo teacher: prompt adherence on held-out captions and Fréchet distances.

    python demo_teacher/evaluate_demo_teacher.py [--pipeline PATH] [--count 200] [--guidance G ...]
        [--steps 20] [--first-seed 0] [--caption-seed SEED] [--scheduler NAME] [--guidance-rescale 0]
        [--guidance-start 0.2]

Prints and writes JSON (--json) with adherence per scene kind, three Fréchet distances in the domain
extractor's feature space: samples vs real images, real vs real (the floor at this sample size) and
between two different domains (single-object scenes vs counting scenes), and how much the denoiser relies
on the captions' position words (quality.position_reliance). Each result also says which of the captions'
facts fail and why (quality.failed_facts), and how well the VAE's reconstructions of the real scenes
behind those captions adhere (quality.reconstruction_adherence: the ceiling its samples decode to).
--grid writes a sample grid. --first-seed N samples caption i from the noise of seed N + i instead of i:
the same captions from other noise, to see how far the sampling seeds alone move a score. --caption-seed
draws other held-out captions (from a data set seed that neither trains the teacher nor gives the
Fréchet distances' real images), to choose a setting on captions other than the documented ones before
measuring it on those. --scheduler samples with another of `deltaconv sample`'s schedulers instead of
the pipeline's own (the documented sampler); the result names the one used. --guidance-start S samples
the first share S of the steps with the conditional prediction alone (`deltaconv sample
--guidance-start`; by default the demo's recommended 0.2, 0 where the guidance is 1 or less).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaconv_cli.cli import write_json
from deltaconv_cli.demo import DEMO
from deltaconv_cli.demo.extractor import DomainFeatureExtractor
from deltaconv_cli.demo.quality import (
    HELD_OUT_SEED,
    check_caption_seed,
    generator_quality,
    position_reliance,
    real_images,
    reconstruction_adherence,
)
from deltaconv_cli.demo.recommended import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from deltaconv_cli.errors import DeltaConvError, run_script
from deltaconv_cli.imaging import save_grid
from deltaconv_cli.loading import demo_path, load_model, locate_pipeline
from deltaconv_cli.sampling import SampleSettings, set_scheduler

GRID_CAPTIONS = 16


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pipeline", default="demo", help="demo, or a pipeline folder")
    parser.add_argument("--extractor", type=Path, default=None, help="default: the shipped extractor")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=RECOMMENDED_STEPS)
    parser.add_argument("--guidance", type=float, nargs="+", default=[RECOMMENDED_GUIDANCE])
    parser.add_argument("--first-seed", type=int, default=0, help="caption i is sampled with seed N + i")
    parser.add_argument(
        "--caption-seed", type=int, default=HELD_OUT_SEED,
        help=f"draw the held-out captions from this data set seed (default: the documented {HELD_OUT_SEED})",
    )  # fmt: skip
    parser.add_argument("--scheduler", default=None, help="default: the pipeline's own")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="diffusers' guidance_rescale")
    parser.add_argument(
        "--guidance-start", type=float, default=None,
        help="share of the steps sampled before guidance starts (default: the demo's recommended)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="PNG: 16 captions, real scene and sample")
    args = parser.parse_args()
    if args.count < 1 or args.first_seed < 0:
        parser.error(
            f"--count must be at least 1 and --first-seed >= 0, got {args.count} and {args.first_seed}"
        )
    check_caption_seed(args.caption_seed)
    samplers = [
        SampleSettings(args.steps, guidance, scheduler=args.scheduler, guidance_rescale=args.guidance_rescale,
                       guidance_start=args.guidance_start)
        for guidance in args.guidance
    ]  # fmt: skip
    for settings in samplers:
        settings.check()
    samplers = [settings.for_model(DEMO) for settings in samplers]
    extractor_folder = args.extractor or demo_path("extractor")
    if not (extractor_folder / "config.json").is_file():
        raise DeltaConvError(f"{extractor_folder} is not a feature extractor folder: it has no config.json")
    pipe = load_model(locate_pipeline(args.pipeline, "evaluation"))
    pipe.set_progress_bar_config(disable=True)
    scheduler = set_scheduler(pipe, args.scheduler)
    extractor = DomainFeatureExtractor.from_pretrained(extractor_folder).eval()
    reliance = position_reliance(pipe)
    reconstruction = reconstruction_adherence(pipe, args.count, args.caption_seed)
    results = []
    for settings in samplers:
        quality = generator_quality(pipe, extractor, settings, args.count, args.first_seed, args.caption_seed)
        quality["scheduler"] = scheduler
        quality["position_reliance"] = reliance
        quality["vae_reconstruction"] = reconstruction
        samples, captions = quality.pop("samples"), quality.pop("sample_captions")
        print(json.dumps(quality), flush=True)
        results.append(quality)
        if args.grid is not None and settings is samplers[0]:
            # Each held-out caption beside the real scene it was drawn from (16, or all with fewer).
            shown = min(GRID_CAPTIONS, args.count)
            reals = real_images(args.caption_seed, shown)
            rows = [[real, sample] for real, sample in zip(reals, samples[:shown], strict=True)]
            save_grid(rows, args.grid, ["real scene", "teacher sample"], captions[:shown], scale=2)
    write_json(args.json, results)


if __name__ == "__main__":
    run_script(main)
