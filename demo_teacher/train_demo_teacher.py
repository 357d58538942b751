"""Train the embedded demo teacher and its feature extractor (75 to 105 minutes on a 2-core CPU, by the day).

    python demo_teacher/train_demo_teacher.py [--out deltaconv_cli/assets/demo] [--work DIR] [--seed 1]
        [--set KEY=VALUE ...]

The defaults are the shipped teacher's (v5). --set changes any setting of TeacherRecipe
(demo_teacher/teacher.py); teacher v4 is --steps 5700 --set mixed_precision=no, and teacher v2,
recipe 6 of demo_teacher/HISTORY.md, is --seed 0 --steps 2100 --set vae_steps=800 --set mirror_class=false
--set full_resolution_attention=true --set 'kind_shares=[]' --set mixed_precision=no.

Reproducible from the seed. Finished stages (data, VAE, latents, denoiser checkpoints every 300
steps, extractor) are kept in a work folder (--work; default next to OUT), so an interrupted run
continues where it stopped. Run it alone: two PyTorch processes on two cores slow each other down
many times over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from deltaconv_cli.errors import run_script
from teacher import TeacherRecipe, train_teacher

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "deltaconv_cli" / "assets" / "demo"


def recipe_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for a TeacherRecipe field (but the seed and steps, which have their own options), the
    value (JSON, or the bare word for a text setting) of the field's type."""
    own_options = ("seed", "steps")
    defaults = {f.name: f.default for f in dataclasses.fields(TeacherRecipe) if f.name not in own_options}
    key, _, raw = text.partition("=")
    if key not in defaults:
        raise argparse.ArgumentTypeError(f"KEY=VALUE with KEY one of {', '.join(defaults)}; got {text!r}")
    default = defaults[key]
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if isinstance(default, str) and not isinstance(value, str):  # mixed_precision=bf16, unquoted
        value = raw
    elif isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        raise argparse.ArgumentTypeError(f"{key} takes a value like {json.dumps(default)}; got {raw!r}")
    return key, value


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where pipeline/ and extractor/ go")
    parser.add_argument("--seed", type=int, default=TeacherRecipe.seed)
    parser.add_argument("--work", type=Path, help="finished stages (default: .OUT-work beside OUT)")
    parser.add_argument("--steps", type=int, default=TeacherRecipe.steps, help="denoiser training steps")
    parser.add_argument("--set", type=recipe_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="any other TeacherRecipe setting (repeatable)")  # fmt: skip
    args = parser.parse_args()
    recipe = TeacherRecipe(seed=args.seed, steps=args.steps, **dict(args.set))
    train_teacher(args.out, recipe, work=args.work)
    print(f"wrote {args.out / 'pipeline'} and {args.out / 'extractor'}")


if __name__ == "__main__":
    run_script(main)
