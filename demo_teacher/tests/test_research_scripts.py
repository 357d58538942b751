"""The demo teacher's research scripts: what they ask and what they write."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deltaconv_cli.demo import domain
from deltaconv_cli.demo.quality import HELD_OUT_SEED, held_out_captions, real_images
from deltaconv_cli.loading import load_model, locate_model

SCRIPTS = Path(__file__).resolve().parents[1]  # demo_teacher/


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _guidance_interval_recipe():
    return _recipe("guidance_interval")


@pytest.mark.slow
def test_vae_reconstruction_checks_every_fact_of_the_held_out_scenes(tmp_path: Path):
    result_file = tmp_path / "reconstruction.json"
    command = [sys.executable, str(SCRIPTS / "vae_reconstruction.py"),
               "--pipeline", "demo", "--count", "3", "5", "--json", str(result_file)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(result_file.read_text())
    assert [(r["pipeline"], r["captions"]) for r in results] == [("demo", 3), ("demo", 5)]
    for result in results:
        captions = held_out_captions(result["captions"])[0]
        real = real_images(HELD_OUT_SEED, result["captions"])
        facts = sum(len(domain.facts(image, caption)) for image, caption in zip(real, captions, strict=True))
        counted = result["failed_facts"]
        assert counted["facts"] == facts == counted["hold"] + sum(counted[r] for r in domain.FAILURES)
        assert 0 <= result["adherence"]["all"] <= 1


def test_count_histogram_asks_every_colour_and_shape_for_each_number():
    numbered = _recipe("count_histogram").captions_by_number()
    asked = {"two": ("count", 2), "three": ("count", 3), "four": ("count", 4), "two mirrored": ("mirror", 2)}
    assert list(numbered) == list(asked)
    for label, captions in numbered.items():
        parsed = [domain.parse_caption(c) for c in captions]
        assert {(kind, len(objects)) for kind, objects in parsed} == {asked[label]}
        assert sorted((o[0].color, o[0].shape) for _, o in parsed) == sorted(
            (c, s) for c in domain.COLORS for s in domain.SHAPES
        )


@pytest.mark.slow
def test_count_histogram_spreads_the_drawn_numbers_of_each_caption_number(tmp_path: Path):
    counts = tmp_path / "counts.json"
    command = [sys.executable, str(SCRIPTS / "count_histogram.py"),
               "--seeds", "1", "--steps", "2", "--scheduler", "euler", "--guidance-rescale", "0.5",
               "--json", str(counts)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(counts.read_text())
    recorded = (result["seeds"], result["steps"], result["scheduler"], result["guidance_rescale"])
    assert recorded == (1, 2, "EulerDiscreteScheduler", 0.5)
    for label in ("two", "three", "four", "two mirrored"):
        assert result[label]["images"] == len(domain.COLORS) * len(domain.SHAPES)
        for drawn in (result[label]["named_drawn"], result[label]["all_drawn"]):
            assert all(n.isdigit() for n in drawn) and sum(drawn.values()) == pytest.approx(1.0)
        assert f"{label}: named colour and shape drawn " in done.stdout
    pairs = result["two mirrored"]["pairs"]
    assert list(pairs) == ["mirrored", "two rows", "elsewhere"]
    assert sum(pairs.values()) == pytest.approx(result["two mirrored"]["named_drawn"].get("2", 0.0))


def test_guidance_below_a_timestep_is_the_share_of_steps_at_or_above_it():
    recipe = _guidance_interval_recipe()
    pipe = load_model(locate_model("demo"))  # DPM++ with trailing timesteps: 999, 949, ..., 49 at 20 steps
    assert [recipe.guidance_start(pipe, 20, below) for below in (1000, 800, 799, 0)] == [0.0, 0.2, 0.25, 1.0]
