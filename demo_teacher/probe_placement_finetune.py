"""Does a trained teacher learn placement once the noisiest steps weigh more? (minutes, not the long run)

    python demo_teacher/probe_placement_finetune.py --pipeline PATH [--steps 200] [--t-min 700]
                                               [--out FOLDER] [--json FILE]

Fine-tunes the UNet of a trained demo pipeline (its text encoder frozen) for ``--steps`` steps at
timesteps drawn from [``--t-min``, 999], with the loss on the predicted clean latents instead of on the
noise. The teacher's own loss (epsilon, min-SNR weighted) gives a near-noise step's layout error a weight
of about alpha_t / (1 - alpha_t), 0.005 at t = 999: the caption's position can barely move it. The script
reports ``quality.position_reliance`` (moved / own x0 error) before and after; ``--out`` writes the
fine-tuned pipeline for ``demo_teacher/evaluate_demo_teacher.py``. Run it alone: two PyTorch processes on two
cores slow each other down many times over.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from deltaconv_cli.cli import write_json
from deltaconv_cli.conditioning import latent_posterior
from deltaconv_cli.demo.quality import clean_latents, position_reliance, to_tensor
from deltaconv_cli.errors import run_script
from deltaconv_cli.loading import load_model, locate_pipeline
from teacher import render_dataset, token_ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", required=True, help="demo, or a trained demo pipeline folder")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--t-min", type=int, default=700)
    parser.add_argument("--scenes", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or not 0 <= args.t_min <= 999:
        parser.error("--steps and --batch must be at least 1, --t-min within 0..999")

    pipe = load_model(locate_pipeline(args.pipeline, "the fine-tuning probe"))
    timesteps = (999, 900, 800)
    before = position_reliance(pipe, count=64, timesteps=timesteps)
    images, captions = render_dataset(args.seed, args.scenes)
    with torch.no_grad():  # float32: CPUs without bf16 instructions run bf16 autocast about 10x slower
        starts = range(0, len(images), 256)
        chunks = [latent_posterior(pipe, to_tensor(images[i : i + 256])).mode() for i in starts]
    latents = torch.cat(chunks) * pipe.vae.config.scaling_factor
    ids, empty = token_ids(pipe.tokenizer, captions), token_ids(pipe.tokenizer, [""])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod
    unet, encoder = pipe.unet.train(), pipe.text_encoder.requires_grad_(False).eval()
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(len(latents), (args.batch,), generator=generator)
        x0, tokens = latents[index], ids[index].clone()
        tokens[torch.rand(args.batch, generator=generator) < 0.1] = empty  # keep classifier-free guidance
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(args.t_min, 1000, (args.batch,), generator=generator)
        noisy, a = scheduler.add_noise(x0, noise, t), alphas[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            context = encoder(tokens)[0]
        out = unet(noisy, t, context).sample
        loss = F.mse_loss(clean_latents(out, noisy, a, scheduler.config.prediction_type), x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}/{args.steps}: x0 loss {loss.item():.4f}", flush=True)
    unet.eval()
    after = position_reliance(pipe, count=64, timesteps=timesteps)
    for t in timesteps:
        ratios = [r[str(t)]["moved_caption"] / r[str(t)]["own_caption"] for r in (before, after)]
        print(f"t = {t}: moved / own {ratios[0]:.3f} -> {ratios[1]:.3f}")
    if args.out:
        pipe.save_pretrained(args.out)
    if args.json:
        settings = {**vars(args), "out": str(args.out), "json": str(args.json)}
        seconds = time.perf_counter() - start
        result = {"settings": settings, "seconds": seconds, "before": before, "after": after}
        write_json(args.json, result)


if __name__ == "__main__":
    run_script(main)
