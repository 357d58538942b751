"""How many objects a demo-domain generator draws for each number its count and mirror captions name.

    python demo_teacher/count_histogram.py [--pipeline demo] [--seeds 4] [--guidance 2] [--steps 20] \\
        [--scheduler NAME] [--guidance-rescale 0] [--guidance-start 0.2] [--json FILE]

`count` and `mirror` adherence only say that a number came out wrong. This samples every colour and
shape with each number word ("two", "three", "four" ... and "two ... mirrored"), from ``--seeds`` seeds
each (seeds 0.. as the held-out evaluation uses them), and counts with the domain's checker how many
objects of the named colour and shape each image holds and how many objects in all. It prints, for each
number, how the drawn numbers spread (e.g. "three: 2 x 5 %, 3 x 55 %, 4 x 40 %"): whether the misses are
one object too many, one too few, or scattered. For mirror captions it also says where the pairs of two
land: mirrored (one row, outer columns), at the outer columns of two different rows, or elsewhere.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from deltaconv_cli.cli import write_json
from deltaconv_cli.demo import DEMO, domain
from deltaconv_cli.demo.recommended import RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS
from deltaconv_cli.errors import run_script
from deltaconv_cli.sampling import SampleSettings, generate, load_for_sampling, set_scheduler


def captions_by_number() -> dict[str, list[str]]:
    """Every colour and shape, for each number word of ``count`` captions and for ``mirror`` captions."""
    objects = [(color, shape) for color in domain.COLORS for shape in domain.SHAPES]
    numbered = {
        word: [f"{word} {color} {shape}s" for color, shape in objects] for word in domain.NUMBERS.values()
    }
    return numbered | {"two mirrored": [f"two {color} {shape}s mirrored" for color, shape in objects]}


def spread(numbers: list[int]) -> dict[str, float]:
    """The share of images with each drawn number, keyed by the number."""
    return {str(n): c / len(numbers) for n, c in sorted(Counter(numbers).items())}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pipeline", default="demo", help="demo, or a pipeline folder")
    parser.add_argument("--seeds", type=int, default=4, help="images per caption")
    parser.add_argument("--steps", type=int, default=RECOMMENDED_STEPS)
    parser.add_argument("--guidance", type=float, default=RECOMMENDED_GUIDANCE)
    parser.add_argument("--scheduler", default=None, help="default: the pipeline's own")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="diffusers' guidance_rescale")
    parser.add_argument(
        "--guidance-start", type=float, default=None,
        help="share of the steps sampled before guidance starts (default: the demo's recommended)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.seeds < 1 or args.steps < 1 or not args.guidance >= 0:
        parser.error("--seeds and --steps must be at least 1 and --guidance >= 0")
    settings = SampleSettings(
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        guidance_rescale=args.guidance_rescale,
        guidance_start=args.guidance_start,
    )
    settings.check()
    settings = settings.for_model(DEMO)
    pipe = load_for_sampling(args.pipeline).pipe
    scheduler = set_scheduler(pipe, settings.scheduler)
    result = {"seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, "scheduler": scheduler,
              "guidance_rescale": args.guidance_rescale,
              "guidance_start": settings.guidance_start}  # fmt: skip
    for label, captions in captions_by_number().items():
        prompts = [c for c in captions for _ in range(args.seeds)]
        seeds = [s for _ in captions for s in range(args.seeds)]
        images = generate(pipe, prompts, seeds, (domain.SIZE, domain.SIZE), settings)
        named, total, layouts = [], [], []
        for image, caption in zip(images, prompts, strict=True):
            wanted = domain.parse_caption(caption)[1][0]
            found = domain.detect_objects(image)
            matching = [d for d in found if (d.color, d.shape) == (wanted.color, wanted.shape)]
            named.append(len(matching))
            total.append(len(found))
            if len(matching) == 2:
                layouts.append(domain.pair_layout(matching))
        result[label] = {"images": len(images), "named_drawn": spread(named), "all_drawn": spread(total)}
        shares = ", ".join(f"{n} x {share:.0%}" for n, share in result[label]["named_drawn"].items())
        print(f"{label}: named colour and shape drawn {shares}", flush=True)
        if label == "two mirrored":
            # of all images, so that the shares add up to the share with two drawn
            result[label]["pairs"] = {
                k: layouts.count(k) / len(images) for k in ("mirrored", "two rows", "elsewhere")
            }
            print("  pairs of two: " + ", ".join(f"{k} {v:.0%}" for k, v in result[label]["pairs"].items()))
    write_json(args.json, result)


if __name__ == "__main__":
    run_script(main)
