"""`deltaconv analyze` on synthetic attention injected through the recording processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deltaconv_cli.analyze import LocalityStats, analyze, summarize, write_outputs
from deltaconv_cli.cli import app

runner = CliRunner()


def distances(grid, query_index):
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten().double(), xs.flatten().double()
    return torch.sqrt((ys[None] - ys[query_index][:, None]) ** 2 + (xs[None] - xs[query_index][:, None]) ** 2)


def gaussian(sigma):
    def scores(grid, query_index):
        p = torch.exp(-(distances(grid, query_index) ** 2) / (2 * sigma**2))
        return p / p.sum(-1, keepdim=True)

    return scores


def power_law(alpha):
    def scores(grid, query_index):
        p = distances(grid, query_index).clamp(min=1) ** -alpha
        return p / p.sum(-1, keepdim=True)

    return scores


def uniform(grid, query_index):
    n = grid[0] * grid[1]
    return torch.full((len(query_index), n), 1 / n, dtype=torch.float64)


def exact_radius(scores, grid, level):
    """The truth, without the report's binning: the mass-weighted quantile of the exact query-key
    distances, interpolated linearly between consecutive distinct distances."""
    query_index = torch.arange(grid[0] * grid[1])
    d, p = distances(grid, query_index).flatten().numpy(), scores(grid, query_index).flatten().numpy()
    values, inverse = np.unique(np.round(d, 9), return_inverse=True)
    cumulative = np.cumsum(np.bincount(inverse, p)) / p.sum()
    i = int(np.searchsorted(cumulative, level))
    if i == 0:
        return float(values[0])
    frac = (level - cumulative[i - 1]) / (cumulative[i] - cumulative[i - 1])
    return float(values[i - 1] + frac * (values[i] - values[i - 1]))


def stats_of(scores, grid=(32, 32), queries=None, seed=0):
    n = grid[0] * grid[1]
    stats = LocalityStats(*grid)
    index = (
        torch.arange(n)
        if queries is None
        else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:queries]
    )
    stats.add(scores(grid, index), index)
    return stats


@pytest.mark.parametrize("sigma", [1.5, 3.0])
def test_gaussian_radii_match_the_truth(sigma):
    layer = summarize(stats_of(gaussian(sigma)), "x.attn1", "x", "all", 7)
    for level, key in ((0.5, "r50"), (0.9, "r90")):
        assert layer.radii[key] == pytest.approx(exact_radius(gaussian(sigma), (32, 32), level), abs=0.6)
    assert layer.local and layer.global_share < 0.01
    assert layer.radii["r90"] < layer.uniform_radii["r90"] / 4


@pytest.mark.parametrize("alpha", [2.0, 3.0])
def test_power_law_exponent_is_recovered(alpha):
    layer = summarize(stats_of(power_law(alpha), grid=(48, 48)), "x.attn1", "x", "all", 7)
    assert layer.power_law_exponent == pytest.approx(alpha, abs=0.25)
    assert layer.power_law_r2 > 0.95


def test_uniform_attention_is_not_local():
    layer = summarize(stats_of(uniform), "x.attn1", "x", "all", 7)
    assert not layer.local
    assert layer.global_share == pytest.approx(1.0, abs=0.02)
    assert layer.radii["r90"] == pytest.approx(layer.uniform_radii["r90"], abs=0.01)


def test_query_sampling_stays_within_a_token_of_the_full_computation():
    # README states this tolerance: radii within 1 token, decay within 10 % where the weight is > 1e-4.
    for scores in (gaussian(2.0), power_law(2.5)):
        full = summarize(stats_of(scores), "x.attn1", "x", "all", 7)
        sampled = summarize(stats_of(scores, queries=96), "x.attn1", "x", "all", 7)
        assert sampled.queries == 96 and full.queries == 1024
        for key in full.radii:
            assert abs(sampled.radii[key] - full.radii[key]) <= 1.0
        a, b = np.array(full.decay), np.array(sampled.decay)
        near = (a > 1e-4) & (np.arange(len(a)) <= 8)
        assert np.all(np.abs(b[near] - a[near]) <= 0.1 * a[near])


def test_coverage_and_recommended_kernel():
    narrow = summarize(stats_of(gaussian(1.0)), "x.attn1", "x", "all", 7)
    wide = summarize(stats_of(gaussian(4.0)), "x.attn1", "x", "all", 7)
    assert narrow.delta_conv_coverage > 0.99
    assert narrow.recommended_kernel_size < wide.recommended_kernel_size


def test_through_the_processor_during_real_sampling(saved_pipelines, tmp_path):
    report = analyze(str(saved_pipelines["sd1"]), ["a red circle", "a cat"], height=64, width=48, steps=3,
                     band_edges=[500], queries=64, score_override=gaussian(1.5))  # fmt: skip
    assert report.bands == ["t0-500", "t500-1000"]
    assert {layer.grid for layer in report.layers} == {(32, 24), (16, 12), (8, 6)}
    top = [layer for layer in report.layers if layer.grid == (32, 24)]
    truth = exact_radius(gaussian(1.5), (32, 24), 0.5)
    assert all(layer.local and layer.radii["r50"] == pytest.approx(truth, abs=0.6) for layer in top)
    paths = write_outputs(report, tmp_path)
    kernels = json.loads(paths["kernel_sizes.json"].read_text())["kernel_sizes"]
    assert set(kernels) == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1", "up_blocks.2"}
    for name in ("decay.png", "patterns.png", "summary.png"):
        assert paths[name].stat().st_size > 1000
    args = ["convert", str(saved_pipelines["sd1"]), "-o", str(tmp_path / "c")]
    result = runner.invoke(app, [*args, "--kernel-sizes", str(paths["kernel_sizes.json"]), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert {x["stage"]: x["kernel_size"] for x in json.loads(result.stdout)["layers"]} == kernels


def test_real_attention_cli(saved_pipelines, tmp_path):
    args = ["analyze", str(saved_pipelines["sd1"]), "-p", "a cat", "--res", "32", "32", "--steps", "2"]
    args += ["--guidance-start", "0.5"]
    result = runner.invoke(app, [*args, "--layers", "mid_block", "--out", str(tmp_path), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["guidance"], report["guidance_start"]) == (7.5, 0.5)
    assert {layer["stage"] for layer in report["layers"]} == {"mid_block"}
    total = sum(report["layers"][0]["cumulative"][-1:])
    assert total == pytest.approx(1.0)
    bad = runner.invoke(
        app, ["analyze", str(saved_pipelines["sd1"]), "-p", "x", "--layers", "nope", "--out", str(tmp_path)]
    )
    assert bad.exit_code == 1 and "unknown layer or stage 'nope'" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps must be at least 1, got 0"),
        (["--guidance", "-1"], "guidance must be a finite number >= 0, got -1.0"),
        (["--guidance-start", "1.5"], "guidance start must be in [0, 1], got 1.5"),
        (["--guidance", "1", "--guidance-start", "0.2"], "a guidance start needs guidance above 1, got 1.0"),
        (["--queries", "0"], "queries must be at least 1, got 0"),
        (["--timesteps", "0,500"], "timestep band edges must lie in 1..999, got 0"),
        (["--timesteps", "333,1000"], "timestep band edges must lie in 1..999, got 1000"),
        (["--seed", "-2"], "seed must be >= 0, got -2"),
        (["--seed", str(2**64)], f"seeds must be below 2**64, got {2**64}"),
    ],
)
def test_bad_options_fail_before_any_model_is_loaded(
    args, message, saved_pipelines, tmp_path, refuse_model_loading
):
    out = tmp_path / "analysis"
    result = runner.invoke(app, ["analyze", str(saved_pipelines["sd1"]), "-p", "x", *args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == f"error: {message}"
    assert not out.exists()


def exact_kernel(scores, grid, share):
    """The smallest kernel choice whose ΔConv receptive field holds ``share`` of the map's mass."""
    from deltaconv_cli.analyze import KERNEL_CHOICES, delta_conv_reach

    h, w = grid
    query_index = torch.arange(h * w)
    ys, xs = query_index // w, query_index % w
    cheb = torch.maximum((ys[None] - ys[:, None]).abs(), (xs[None] - xs[:, None]).abs())
    p = scores(grid, query_index)
    held = [float(p[cheb <= delta_conv_reach(k)].sum() / p.sum()) for k in KERNEL_CHOICES]
    return next(k for k, mass in zip(KERNEL_CHOICES, held, strict=True) if mass >= share)


def test_uniform_attention_gets_the_smallest_kernel():
    report = summarize(stats_of(uniform), "x.attn1", "x", "all", 7)
    assert report.global_share == pytest.approx(1.0)
    assert report.recommended_kernel_size == 3


@pytest.mark.parametrize(("sigma", "share"), [(1.0, 0.9), (2.5, 0.9), (2.5, 0.99)])
@pytest.mark.parametrize("global_part", [0.0, 0.6, 0.95])
def test_kernel_holds_the_asked_share_of_the_local_mass(sigma, share, global_part):
    local = gaussian(sigma)

    def mixed(grid, query_index):
        return (1 - global_part) * local(grid, query_index) + global_part * uniform(grid, query_index)

    report = summarize(stats_of(mixed), "x.attn1", "x", "all", 7, local_share=share)
    assert report.global_share == pytest.approx(global_part, abs=0.02)
    assert report.recommended_kernel_size == exact_kernel(local, (32, 32), share)
