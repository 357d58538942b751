"""Position reliance of a demo-teacher training run at its latest denoiser checkpoint.

    python demo_teacher/checkpoint_position_reliance.py --work runs/teacher-v2-work [--weights ema|live]

Reads the work folder of `demo_teacher/train_demo_teacher.py` (VAE, the frozen text encoder, denoiser
checkpoint) and prints `quality.position_reliance` for 32 held-out single scenes at t = 999, 900 and 600:
whether the UNet has started to read the caption's cell. The pipeline it builds (noise schedule,
prediction type) is the checked-out recipe's, so read a run with the code that made it: read with another
recipe's schedule, the numbers are meaningless. It runs on one thread, so that a training run going on
beside it slows down by seconds. `--save DIR` also writes the checkpoint as a pipeline folder, to sample
from before the run ends.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel

from deltaconv_cli.demo.quality import position_reliance
from deltaconv_cli.errors import run_script
from teacher import TeacherRecipe, build_components


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--work", type=Path, required=True, help="the training run's work folder")
    parser.add_argument("--weights", choices=("ema", "live"), default="ema")
    parser.add_argument("--save", type=Path, help="also write the checkpoint as a pipeline folder here")
    args = parser.parse_args()
    checkpoint = args.work / "denoiser-checkpoint"
    needed = (args.work / "recipe.json", args.work / "text_encoder", checkpoint / "state.json")
    if not all(path.exists() for path in needed):
        parser.error(f"{args.work} has no recipe, text encoder and denoiser checkpoint yet")
    torch.set_num_threads(1)
    parts = build_components(TeacherRecipe.read(args.work / "recipe.json"), args.work)
    parts["vae"] = AutoencoderKL.from_pretrained(args.work / "vae")
    parts["text_encoder"] = CLIPTextModel.from_pretrained(args.work / "text_encoder")
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    tensors = load_file(checkpoint / "state.safetensors")
    prefix = "ema" if args.weights == "ema" else "param"  # the checkpoint's names for the two
    with torch.no_grad():
        for i, parameter in enumerate(parts["unet"].parameters()):  # the order train_denoiser saves them in
            parameter.copy_(tensors[f"{prefix}.{i}"])
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if args.save is not None:  # for demo_teacher/evaluate_demo_teacher.py --pipeline
        pipe.save_pretrained(args.save)
    reliance = position_reliance(pipe, count=32, timesteps=(999, 900, 600))
    print(f"step {step}, {args.weights} weights")
    for t, errors in reliance.items():
        own, moved = errors["own_caption"], errors["moved_caption"]
        print(f"t = {t}: x0 error {own:.4f} with its own caption, moved / own {moved / own:.3f}")


if __name__ == "__main__":
    run_script(main)
