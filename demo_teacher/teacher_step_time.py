"""Time one training step of the demo teacher's UNet, with attention at 32 x 32 (v2), without it (v3 and v4),
with attention in the 8 x 8 blocks too (recipe 17), and v4's under bf16 autocast (recipe 19), in turns.

    python demo_teacher/teacher_step_time.py [--rounds 7] [--batch 16]
        [--json demo_teacher/results/teacher-step-time.json]

A step is what ``train_denoiser`` does per batch: the UNet's forward pass on noisy 32 x 32 latents with
the caption states as cross-attention context, the backward pass and an AdamW update. The UNets are
built by ``build_components`` from the default recipe with ``full_resolution_attention`` or
``lowest_resolution_attention`` set, run in the recipe's ``mixed_precision`` as ``train_denoiser`` runs
them, and timed in interleaved rounds (one step of each per round, after one warm-up step each); the
medians are reported, so that the machine's drift during the run moves all alike. Each system is its own
UNet: switching one UNet between float32 and bf16 autocast slows its float32 steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deltaconv_cli.cli import write_json
from deltaconv_cli.errors import run_script
from teacher import TEXT_LENGTH, TeacherRecipe, build_components, unet_autocast


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=TeacherRecipe.batch)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be at least 1")
    recipes = {
        "attention at 32 x 32 (v2)": TeacherRecipe(full_resolution_attention=True),
        "no attention at 32 x 32": TeacherRecipe(full_resolution_attention=False),
        "attention at 8 x 8 too (recipe 17)": TeacherRecipe(lowest_resolution_attention=True),
        "no attention at 32 x 32, bf16 autocast (recipe 19)": TeacherRecipe(mixed_precision="bf16"),
    }
    steps = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, recipe in recipes.items():
            torch.manual_seed(0)
            unet = build_components(recipe, Path(scratch))["unet"].train()
            optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr)
            size = unet.config.sample_size
            inputs = (
                torch.randn(args.batch, unet.config.in_channels, size, size),
                torch.randint(1000, (args.batch,)),
                torch.randn(args.batch, TEXT_LENGTH, recipe.text_width),
            )
            steps[name] = (unet, optimizer, inputs, recipe)

    def train_step(name: str) -> float:
        unet, optimizer, inputs, recipe = steps[name]
        start = time.perf_counter()
        with unet_autocast(recipe):
            prediction = unet(*inputs).sample.float()
        prediction.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in steps:
        train_step(name)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name in steps:
            seconds[name].append(train_step(name))
    results = {
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "median_seconds_per_step": {name: statistics.median(s) for name, s in seconds.items()},
        "parameters": {name: sum(p.numel() for p in steps[name][0].parameters()) for name in steps},
    }
    for name, median in results["median_seconds_per_step"].items():
        print(f"{name}: {median:.3f} s a step (median of {args.rounds}, batch {args.batch})")
    write_json(args.json, results)


if __name__ == "__main__":
    run_script(main)
