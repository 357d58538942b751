"""Train the embedded demo teacher and its feature extractor (about 85 minutes on a 2-core CPU).

    python recipes/train_demo_teacher.py [--out deltaconv_cli/assets/demo] [--work DIR] [--seed 0]

Reproducible from the seed. Finished stages (data, VAE, latents, denoiser checkpoints every 300
steps, extractor) are kept in a work folder (--work; default next to OUT), so an interrupted run
continues where it stopped. Run it alone: two PyTorch processes on two cores slow each other down
many times over.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deltaconv_cli.demo.teacher import TeacherRecipe, train_teacher

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "deltaconv_cli" / "assets" / "demo"


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where pipeline/ and extractor/ go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="finished stages (default: .OUT-work beside OUT)")
    parser.add_argument("--steps", type=int, default=TeacherRecipe.steps, help="denoiser training steps")
    args = parser.parse_args()
    train_teacher(args.out, TeacherRecipe(seed=args.seed, steps=args.steps), work=args.work)
    print(f"wrote {args.out / 'pipeline'} and {args.out / 'extractor'}")


if __name__ == "__main__":
    main()
