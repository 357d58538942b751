"""How well a demo pipeline's VAE keeps the captions' facts: adherence of its reconstructions of real scenes.

    python demo_teacher/vae_reconstruction.py --pipeline PATH [PATH ...] [--count 200 ...] [--json FILE]

Encodes and decodes the real held-out scenes behind the first ``--count`` held-out captions and checks
each reconstruction against its caption (quality.reconstruction_adherence, the row "the real scenes
through the VAE" of evaluate_demo_teacher.py). Nothing is sampled, so it needs no trained UNet: a run of
train_demo_teacher.py with one UNet step measures a VAE stage alone. Samples decoded by this VAE score
at most about this much.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaconv_cli.cli import write_json
from deltaconv_cli.demo.quality import reconstruction_adherence
from deltaconv_cli.errors import run_script
from deltaconv_cli.loading import load_model, locate_pipeline


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pipeline", nargs="+", required=True, help="demo, or pipeline folders")
    parser.add_argument("--count", type=int, nargs="+", default=[200], help="held-out captions")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if min(args.count) < 1:
        parser.error(f"--count must be at least 1, got {min(args.count)}")
    folders = [locate_pipeline(p, "reconstruction") for p in args.pipeline]  # all checked before loading
    results = []
    for name, folder in zip(args.pipeline, folders, strict=True):
        pipe = load_model(folder)
        for count in args.count:
            result = {"pipeline": name, "captions": count} | reconstruction_adherence(pipe, count)
            print(json.dumps(result), flush=True)
            results.append(result)
    write_json(args.json, results)


if __name__ == "__main__":
    run_script(main)
