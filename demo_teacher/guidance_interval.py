"""Adherence of the demo teacher when classifier-free guidance applies only below a timestep.

    python demo_teacher/guidance_interval.py [--pipeline demo] [--count 200] [--guidance 2]
        [--below 1000 800 600] [--json FILE]

Guidance pushes each prediction away from the caption-free one. Where the layout is decided (t near 999)
that makes more of every object the caption names, and a ``count`` caption's "three" more than three:
extra objects are the failure that dominates (demo_teacher/HISTORY.md). For each ``--below`` T this
samples the held-out captions with the documented sampler (DPM++ 2M, trailing timesteps, seed i for
caption i), guided at the timesteps below T and unguided from T up (T = 1000: every step, the documented
sampler itself), and reports adherence per kind, the failed facts and where named objects land. T is
turned into `deltaconv sample --guidance-start`'s share of the steps (20 steps: T = 800 is 0.2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deltaconv_cli.cli import write_json
from deltaconv_cli.demo import domain
from deltaconv_cli.demo.quality import adherence_by_kind, failed_facts, held_out_captions, placed_objects
from deltaconv_cli.demo.recommended import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from deltaconv_cli.errors import run_script
from deltaconv_cli.loading import load_model, locate_pipeline
from deltaconv_cli.sampling import SampleSettings, generate
from teacher import NOISE_SCHEDULE


def guidance_start(pipe: Any, steps: int, below: int) -> float:
    """The share of the sampler's ``steps`` whose timestep is ``below`` or above: sampled unguided, as
    ``SampleSettings.guidance_start``."""
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps
    return int((timesteps >= below).sum()) / len(timesteps)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pipeline", default="demo", help="demo, or a pipeline folder")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=RECOMMENDED_STEPS)
    parser.add_argument("--guidance", type=float, default=RECOMMENDED_GUIDANCE)
    parser.add_argument("--below", type=int, nargs="+", default=[1000, 800, 600])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    last = NOISE_SCHEDULE["num_train_timesteps"]
    if args.count < 1 or args.steps < 1 or not args.guidance > 1:
        parser.error("--count and --steps must be at least 1 and --guidance above 1")
    if any(not 0 <= below <= last for below in args.below):
        parser.error(f"--below takes timesteps in [0, {last}], got {args.below}")
    pipe = load_model(locate_pipeline(args.pipeline, "sampling"))
    pipe.set_progress_bar_config(disable=True)
    captions, kinds = held_out_captions(args.count)
    seeds = list(range(args.count))
    results = []
    for below in args.below:
        start = guidance_start(pipe, args.steps, below)
        settings = SampleSettings(args.steps, args.guidance, guidance_start=start)
        samples = generate(pipe, captions, seeds, (domain.SIZE, domain.SIZE), settings)
        result = {
            "captions": args.count,
            "steps": args.steps,
            "guidance": args.guidance,
            "guided_below": below,
            "guidance_start": start,
            "adherence": adherence_by_kind(samples, captions, kinds),
            "named_objects": placed_objects(samples, captions),
            "failed_facts": failed_facts(samples, captions),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    write_json(args.json, results)


if __name__ == "__main__":
    run_script(main)
