"""The cheap placement probe for the demo teacher's text path (minutes, not the teacher's long run).

    python demo_teacher/probe_text_placement.py [--steps 200] [--variants oracle colour-shape clip2 ...]
                                           [--json demo_teacher/results/text-placement-probe.json]

Each variant trains a fresh UNet of the teacher's architecture, with its own context path, for
``--steps`` steps at t = 999 only, on single-object scenes encoded by the shipped VAE, to predict the
clean latents directly (float32; at t = 999 an epsilon-predicting UNet would have to resolve them from
a 0.07 signal, which 200 steps do not), and reports the mean squared error of that prediction on
held-out scenes (the latents have unit variance). At that timestep the
latent is almost pure noise, so the error measures what the caption alone tells the UNet about the
layout. The two ends of the scale:

- ``oracle``: one learned context vector per colour, per shape and per cell: position reaches
  cross-attention directly.
- ``colour-shape``: the same without the cell: the best a context that ignores position can do.

and text encoders (the tokenizer and caption format of the shipped teacher):

- ``clip2``: the shipped teacher's 2-layer causal CLIP text encoder, trained jointly from scratch.
- ``clip2-aux``: the same encoder first trained for ``--aux-steps`` steps to predict the object's
  colour, shape and cell from the state of the caption's last word (which a causal encoder lets see the
  whole phrase), then jointly.
- ``clip2-aux-frozen``: as ``clip2-aux``, but the encoder stays frozen after the auxiliary task (does
  joint training wash the cell out of the token states, or is it there and unused?).
- ``clip4``: a 4-layer CLIP text encoder, trained jointly.

A text path that reads position words lands near ``oracle``; one that does not lands at ``colour-shape``.
``--objective epsilon`` trains the UNet to predict the noise, as the teacher is trained, and tests the
clean latents that prediction implies (at t = 999 a layout error weighs 0.005 as much in noise units).
``--unet-scenes all`` trains the UNet on scenes of every caption kind, as the teacher is trained (``count``
and ``mirror`` captions name no cell, so their layouts cannot be predicted at t = 999); the auxiliary task
and the test stay on ``single`` scenes.
Run it alone: two PyTorch processes on two cores slow each other down many times over.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from deltaconv_cli.cli import write_json
from deltaconv_cli.conditioning import latent_posterior
from deltaconv_cli.demo import domain
from deltaconv_cli.demo.quality import HELD_OUT_SEED, clean_latents, to_tensor
from deltaconv_cli.errors import run_script
from deltaconv_cli.loading import load_model, locate_model
from teacher import TEXT_LENGTH, TeacherRecipe, build_components, render_dataset, token_ids

VARIANTS = ("oracle", "colour-shape", "clip2", "clip2-aux", "clip2-aux-frozen", "clip4")
DEFAULT_VARIANTS = ("oracle", "colour-shape", "clip2", "clip2-aux")
T = 999


class FactContext(nn.Module):
    """One learned vector per colour, per shape and (unless ``with_cell`` is False) per cell."""

    def __init__(self, width: int, with_cell: bool) -> None:
        super().__init__()
        self.with_cell = with_cell
        self.colour = nn.Embedding(len(domain.COLORS), width)
        self.shape = nn.Embedding(len(domain.SHAPES), width)
        self.cell = nn.Embedding(domain.GRID * domain.GRID, width)

    def forward(self, facts: torch.Tensor) -> torch.Tensor:
        parts = [self.colour(facts[:, 0]), self.shape(facts[:, 1])]
        if self.with_cell:
            parts.append(self.cell(facts[:, 2]))
        return torch.stack(parts, dim=1)


class TextContext(nn.Module):
    """A CLIP text encoder over the teacher's tokenizer, with heads for the auxiliary task."""

    def __init__(self, width: int, layers: int, vocab: int) -> None:
        super().__init__()
        config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=layers, num_attention_heads=2,
                                max_position_embeddings=TEXT_LENGTH, bos_token_id=0, eos_token_id=1,
                                pad_token_id=1)  # fmt: skip
        self.encoder = CLIPTextModel(config)
        self.heads = nn.ModuleList(
            nn.Linear(width, n) for n in (len(domain.COLORS), len(domain.SHAPES), domain.GRID * domain.GRID)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids)[0]

    def aux_loss(self, ids: torch.Tensor, last_word: torch.Tensor, facts: torch.Tensor) -> torch.Tensor:
        states = self.encoder(ids)[0][torch.arange(len(ids)), last_word]
        return sum(F.cross_entropy(head(states), facts[:, i]) for i, head in enumerate(self.heads))


def single_scenes(seed: int, count: int) -> tuple[np.ndarray, list[str], torch.Tensor]:
    scenes = [domain.make_scene(seed, i, "single") for i in range(count)]
    facts = torch.tensor(
        [[list(domain.COLORS).index(o.color), domain.SHAPES.index(o.shape), o.cell] for o in
         (s.objects[0] for s in scenes)]
    )  # fmt: skip
    return np.stack([domain.render(s) for s in scenes]), [s.caption for s in scenes], facts


def predicted_x0(unet, noisy, context, scheduler, objective: str) -> torch.Tensor:
    """The UNet's prediction of the clean latents at t = T, whichever target it is trained on."""
    out = unet(noisy, torch.full((len(noisy),), T), context).sample
    prediction_type = "sample" if objective == "x0" else objective  # diffusers' name for each target
    return clean_latents(out, noisy, scheduler.alphas_cumprod[T], prediction_type)


def x0_error(unet, context, x0, noise, scheduler, objective: str) -> float:
    noisy = scheduler.add_noise(x0, noise, torch.full((len(x0),), T))
    with torch.no_grad():
        return float((predicted_x0(unet, noisy, context, scheduler, objective) - x0).square().mean())


def run_variant(name: str, args: argparse.Namespace, data: dict, tokenizer, width: int) -> dict:
    torch.manual_seed(args.seed)
    recipe = TeacherRecipe(seed=args.seed, full_resolution_attention=True)  # the UNet it was measured on
    unet = build_components(recipe, args.scratch)["unet"]
    if name in ("oracle", "colour-shape"):
        path = FactContext(width, with_cell=name == "oracle")
        train_in, test_in = data["train_facts"], data["test_facts"]
    else:
        path = TextContext(width, 4 if name == "clip4" else 2, len(tokenizer))
        train_in, test_in = data["train_ids"], data["test_ids"]
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    aux_accuracy = None
    if name.startswith("clip2-aux"):
        optimizer = torch.optim.AdamW(path.parameters(), lr=1e-3)
        for _ in range(args.aux_steps):
            index = torch.randint(len(train_in), (64,), generator=generator)
            loss = path.aux_loss(train_in[index], data["train_last"][index], data["train_facts"][index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            states = path.encoder(test_in)[0][torch.arange(len(test_in)), data["test_last"]]
            hits = [(head(states).argmax(-1) == data["test_facts"][:, i]).float().mean() for i, head in
                    enumerate(path.heads)]  # fmt: skip
        aux_accuracy = {k: float(h) for k, h in zip(("colour", "shape", "cell"), hits, strict=True)}
    if name == "clip2-aux-frozen":
        path.requires_grad_(False)
    params = [*unet.parameters(), *(p for p in path.parameters() if p.requires_grad)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    test_noise = torch.randn(data["test_x0"].shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    before = x0_error(unet, path(test_in), data["test_x0"], test_noise, scheduler, args.objective)
    unet_x0, unet_in = (data["all_x0"], data["all_ids"]) if "all_x0" in data else (data["train_x0"], train_in)
    for _ in range(args.steps):
        index = torch.randint(len(unet_in), (args.batch,), generator=generator)
        x0 = unet_x0[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.full((args.batch,), T)
        noisy = scheduler.add_noise(x0, noise, t)
        # float32: CPUs without bf16 instructions run bf16 autocast about 10x slower
        target = x0 if args.objective == "x0" else noise
        loss = F.mse_loss(unet(noisy, t, path(unet_in[index])).sample, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = x0_error(unet, path(test_in), data["test_x0"], test_noise, scheduler, args.objective)
    result = {"x0_error_before": before, "x0_error_after": after, "seconds": time.perf_counter() - start}
    if aux_accuracy is not None:
        result["aux_accuracy"] = aux_accuracy
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--aux-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--train-scenes", type=int, default=4096)
    parser.add_argument("--test-scenes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=Path("runs/probe-scratch"))
    parser.add_argument("--objective", choices=("x0", "epsilon"), default="x0",
                        help="what the UNet predicts (epsilon: the noise, as the teacher; the test still "
                        "reads the clean latents it implies)")  # fmt: skip
    parser.add_argument("--unet-scenes", choices=("single", "all"), default="single",
                        help="the scenes the UNet trains on (all: every caption kind, as the teacher; the "
                        "auxiliary task and the test stay on single scenes; text encoders only)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.steps < 1 or args.aux_steps < 0 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1, --aux-steps at least 0")
    if args.unet_scenes == "all" and {"oracle", "colour-shape"} & set(args.variants):
        parser.error("--unet-scenes all needs text-encoder variants: count and mirror captions name no cell")

    pipe = load_model(locate_model("demo"))
    tokenizer, width = pipe.tokenizer, pipe.text_encoder.config.hidden_size
    data = {}
    for split, seed, count in (
        ("train", args.seed, args.train_scenes),
        ("test", HELD_OUT_SEED, args.test_scenes),
    ):
        images, captions, facts = single_scenes(seed, count)
        with torch.no_grad():
            x0 = latent_posterior(pipe, to_tensor(images)).mode() * pipe.vae.config.scaling_factor
        ids = token_ids(tokenizer, captions)
        data[f"{split}_x0"], data[f"{split}_facts"], data[f"{split}_ids"] = x0, facts, ids
        data[f"{split}_last"] = (ids != tokenizer.eos_token_id).sum(dim=1) - 1  # the last word, before EOS
    if args.unet_scenes == "all":
        images, captions = render_dataset(args.seed + 1, args.train_scenes)
        with torch.no_grad():
            data["all_x0"] = latent_posterior(pipe, to_tensor(images)).mode() * pipe.vae.config.scaling_factor
        data["all_ids"] = token_ids(tokenizer, captions)
    results = {}
    for name in args.variants:
        results[name] = run_variant(name, args, data, tokenizer, width)
        r = results[name]
        aux = f"  aux accuracy {r['aux_accuracy']}" if "aux_accuracy" in r else ""
        print(f"{name:13s} x0 error at t={T}: {r['x0_error_before']:.3f} -> {r['x0_error_after']:.3f} "
              f"({r['seconds']:.0f} s){aux}")  # fmt: skip
    if args.json:
        settings = {**vars(args), "scratch": str(args.scratch), "json": str(args.json)}
        write_json(args.json, {"settings": settings, "results": results})


if __name__ == "__main__":
    run_script(main)
