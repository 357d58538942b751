"""How close a freshly built student is to the demo teacher, before any training, per initialisation.

16 held-out demo scenes are encoded, noised at 16 timesteps from 50 to 950, and denoised once by the
teacher and once by each student (same noisy latents, timesteps and captions); the number is the
relative error ||student - teacher|| / ||teacher|| over all of them. Students: ΔConv as `convert demo`
and `distill` start it (teacher initialisation fitted to the teacher on 32 training-stream images at 8
timesteps), the teacher initialisation alone (uniform limit), the authors' random start, self-attention
simply removed (block output zero), and LinFusion started from the teacher's projections.

    python benchmarks/init_fidelity.py --json docs/init-fidelity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from deltaconv_cli.calibration import calibrate
from deltaconv_cli.conditioning import encode_prompts, latent_posterior, predict
from deltaconv_cli.demo import domain
from deltaconv_cli.demo.quality import HELD_OUT_SEED
from deltaconv_cli.demo.teacher import to_tensor
from deltaconv_cli.loading import load_model, locate_model
from deltaconv_cli.surgery import DeltaConvAdapter


@torch.no_grad()
def relative_errors(scenes: int = 16, timesteps: int = 16, seed: int = 0) -> dict[str, float]:
    pipe = load_model(locate_model("demo"))
    unet = pipe.unet.eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    chosen = [domain.make_scene(HELD_OUT_SEED, i) for i in range(scenes)]
    images = to_tensor(np.stack([domain.render(s) for s in chosen]))
    x0 = latent_posterior(pipe, images).mode() * pipe.vae.config.scaling_factor
    cond = encode_prompts(pipe, [s.caption for s in chosen], *images.shape[-2:])
    steps = np.linspace(50, 950, timesteps).round().astype(int)
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for t in steps:
        noise = torch.randn(x0.shape, generator=generator)
        batch_t = torch.full((scenes,), int(t))
        inputs.append((scheduler.add_noise(x0, noise, batch_t), batch_t))
    teacher = [predict(unet, noisy, t, cond) for noisy, t in inputs]

    def error() -> float:
        student = [predict(unet, noisy, t, cond) for noisy, t in inputs]
        num = sum(float((s - r).square().sum()) for s, r in zip(student, teacher, strict=True))
        return (num / sum(float(r.square().sum()) for r in teacher)) ** 0.5

    calibrated = DeltaConvAdapter.construct_for(pipe, init="teacher", seed=0).mount(pipe)
    calibrate(pipe, calibrated, "demo", images.shape[-1])
    calibrated.unmount()
    removed = DeltaConvAdapter.construct_for(pipe, init="random", seed=0)
    for block in removed.blocks:  # every block outputs zero: the attention's output is simply gone
        for linear in (block.proj_out, block.proj_global):
            linear.weight.zero_()
            linear.bias.zero_()
    students = {
        "deltaconv, init teacher, fitted (the default)": calibrated,
        "deltaconv, init teacher, not fitted (uniform limit)": DeltaConvAdapter.construct_for(pipe, seed=0),
        "deltaconv, init random (the authors')": DeltaConvAdapter.construct_for(pipe, init="random", seed=0),
        "self-attention removed (output zero)": removed,
        "linfusion (projections copied)": DeltaConvAdapter.construct_for(pipe, mixer="linfusion", seed=0),
    }
    result = {}
    for name, adapter in students.items():
        adapter.mount(pipe)
        result[name] = error()
        adapter.unmount()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    result = relative_errors()
    print("| student, no training | relative error vs teacher |\n| --- | --- |")
    for name, value in result.items():
        print(f"| {name} | {value:.3f} |")
    if args.json:
        args.json.write_text(
            json.dumps({"scenes": 16, "timesteps": "16 from 50 to 950", **result}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
