"""`deltaconv profile`: counted multiply-adds against closed forms and fvcore, reports, measuring."""

from __future__ import annotations

import contextlib
import json
import shutil
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from fvcore.nn import FlopCountAnalysis
from PIL import Image
from tiny_models import tiny_denoiser
from typer.testing import CliRunner

from deltaconv_cli.block import DeltaConvBlock
from deltaconv_cli.cli import app
from deltaconv_cli.linfusion import LinFusionAttention
from deltaconv_cli.profile import count, profile
from deltaconv_cli.runtime import Timer, human_count

runner = CliRunner()


def closed_forms(h: int, w: int, c: int, heads: int, k: int) -> dict[str, int]:
    """docs/method.md §1.1 and §2, with the half-scale branch on the floor(H/2) x floor(W/2) grid."""
    n, d = h * w, c // heads
    return {
        "attention": 4 * n * c * c + 2 * n * n * c,
        "deltaconv": n * c * c + n * k * k * c // 2 + (h // 2) * (w // 2) * k * k * c // 2 + c * c,
        "linfusion": 8 * n * c * c + 2 * n * c * d + n * c,
    }


def mixers(c: int, heads: int, k: int, device: str) -> dict[str, torch.nn.Module]:
    with torch.device(device):
        return {
            "attention": Attention(c, heads=heads, dim_head=c // heads),
            "deltaconv": DeltaConvBlock(c, k),
            "linfusion": LinFusionAttention(c, heads, c // heads),
        }


def inputs(name: str, h: int, w: int, c: int, device: str) -> torch.Tensor:
    shape = (1, h * w, c) if name == "attention" else (1, h, w, c)
    return torch.randn(shape) if device == "cpu" else torch.empty(shape, device=device)


@pytest.mark.parametrize("h,w,c,heads,k", [(64, 64, 320, 8, 7), (96, 128, 1280, 20, 13), (9, 7, 64, 2, 3)])
def test_counted_macs_equal_closed_forms(h, w, c, heads, k):
    expected = closed_forms(h, w, c, heads, k)
    for name, module in mixers(c, heads, k, "meta").items():
        macs, activation = count(partial(module, inputs(name, h, w, c, "meta")))
        assert macs == expected[name], name
        assert activation >= h * w * c * 4  # at least the output, in float32


def _fvcore_sdpa(inputs, outputs):
    q, k, v = (i.type().sizes() for i in inputs[:3])
    return q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])


def test_counter_agrees_with_fvcore_on_real_tensors():
    h, w, c, heads, k = 12, 10, 64, 4, 5
    for name, module in mixers(c, heads, k, "cpu").items():
        x = inputs(name, h, w, c, "cpu")
        analysis = FlopCountAnalysis(module, (x,))
        analysis.set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa)
        analysis.unsupported_ops_warnings(False)
        # fvcore also counts norms, pooling and resizing, which are not multiply-adds of weights.
        not_matmul = {"layer_norm", "group_norm", "adaptive_avg_pool2d", "upsample_bilinear2d"}
        matmul_and_conv = sum(v for op, v in analysis.by_operator().items() if op not in not_matmul)
        assert "scaled_dot_product_attention" in analysis.by_operator() or name != "attention"
        assert count(partial(module, x))[0] == matmul_and_conv, name


def test_scaled_dot_product_attention_counts_on_cpu_too():
    q = torch.randn(1, 2, 16, 8)
    assert count(partial(F.scaled_dot_product_attention, q, q, q))[0] == 2 * 16 * 16 * 8 * 2


@pytest.mark.parametrize(
    "name,sites",
    [("sd15", 16), ("sd21", 16), pytest.param("sdxl", 70, marks=pytest.mark.slow), ("pixart-sigma", 28)],
)
def test_site_counts_and_totals(name, sites):
    report = profile(name, [(1024, 1024)], find_paper_ratio=False)
    res = report.resolutions[0]
    assert len(res.layers) == sites
    # LinFusion's MLPs make it dearer than attention itself at SDXL's 1024 px grids; ΔConv is cheapest.
    assert min(res.total("attention"), res.total("linfusion")) > res.total("deltaconv")
    assert res.denoiser_macs > res.total("attention")
    assert 0 < res.attention_share < 1


def test_sd15_at_512_by_the_formulas():
    report = profile("sd15", [(512, 512)], find_paper_ratio=False)
    res = report.resolutions[0]
    kernels = {"down_blocks.0": 7, "down_blocks.1": 9, "down_blocks.2": 5, "mid_block": 3,
               "up_blocks.1": 5, "up_blocks.2": 9, "up_blocks.3": 11}  # fmt: skip
    expected = {"attention": 0, "deltaconv": 0, "linfusion": 0}
    for layer in res.layers:
        assert layer.kernel_size == kernels[layer.stage]
        forms = closed_forms(*layer.grid, layer.channels, layer.heads, layer.kernel_size)
        for mixer in expected:
            expected[mixer] += forms[mixer]
    assert {m: res.total(m) for m in expected} == expected


@pytest.mark.slow
def test_paper_ratio_crossing_for_sd15():
    report = profile("sd15", [(512, 512)])
    # docs/method.md §1.1: by the formulas the ratio passes ~7000x near 16K px.
    assert report.paper_ratio_passed_at == 14400
    assert report.ratio_at_crossing >= 6929


@pytest.mark.slow
def test_cli_writes_json_and_plot(tmp_path):
    json_file, png_file = tmp_path / "p.json", tmp_path / "p.png"
    args = ["profile", "--res", "512", "1024", "--json", str(json_file), "--plot", str(png_file)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "attention/ΔConv passes the paper's 6,929x at 14,400 px" in result.stdout
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["model"] == "sd15" and [r["height"] for r in data["resolutions"]] == [512, 1024]
    assert len(data["resolutions"][0]["layers"]) == 16
    assert data["resolutions"][1]["linfusion_over_deltaconv"] > 1
    with Image.open(tmp_path / "p.png") as image:
        assert image.format == "PNG" and image.width > 300


@pytest.mark.slow
def test_measure_on_a_tiny_model(tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    out = tmp_path / "m.json"
    result = runner.invoke(
        app,
        ["profile", str(tmp_path / "unet"), "--res", "64", "96x64", "--measure", "--repeats", "2",
         "--json", str(out), "--plot", str(tmp_path / "m.png")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for res in data["resolutions"]:
        for layer in res["layers"]:
            for mixer in ("attention", "deltaconv", "linfusion"):
                assert layer[mixer]["latency_ms"] > 0 and layer[mixer]["peak_bytes"] > 0
                assert layer[mixer]["skipped"] is None
        assert set(res["step_latency_ms"]) == {"attention", "deltaconv", "linfusion"}


@pytest.mark.slow
def test_measure_skips_with_the_reason(tmp_path):
    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    args = ["profile", str(tmp_path / "unet"), "--res", "64", "--measure", "--time-budget", "1e-9"]
    args += ["--json", "-"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)["resolutions"][0]["layers"][0]
    assert layer["attention"]["latency_ms"] is None
    assert layer["attention"]["skipped"].startswith("estimated")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "3"], "--repeats applies to timing only: add --measure or --end-to-end"),
        (["--time-budget", "5"], "--time-budget applies to timing only: add --measure or --end-to-end"),
        (["--measure", "--repeats", "0"], "repeats must be at least 1, got 0"),
        (["--measure", "--time-budget", "0"], "time budget must be a positive number of seconds, got 0.0"),
    ],
)
def test_timing_options_need_timing_and_sense(args, message):
    result = runner.invoke(app, ["profile", "sd15", "--res", "512", *args])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {message}"


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--json", "folder", "--json {path} is a folder; give a file name"),
        ("--json", "file/x.json", "--json {path} cannot be written: {file} is a file, not a folder"),
        ("--plot", "folder", "--plot {path} is a folder; give a file name"),
        ("--plot", "cost.jpg", "--plot writes a PNG file: give a name ending in .png"),
    ],
)
def test_an_output_file_that_cannot_be_written_is_refused_before_the_work(option, name, message, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("the user's")
    path = tmp_path / name
    result = runner.invoke(app, ["profile", "sd15", "--res", "512", option, str(path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: " + message.format(path=path, file=tmp_path / "file")
    assert not result.stdout
    assert (tmp_path / "file").read_text() == "the user's"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"targets": ["a"]', "cannot read {path}: Expecting ',' delimiter: line 1 column 18 (char 17)"),
        ('{"targets": ["a"]}', "{path} does not list the adapter's targets and kernel_sizes"),
    ],
)
def test_a_damaged_adapter_config_is_one_line(config, message, converted, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(converted, folder)
    path = folder / "deltaconv" / "config.json"
    path.write_text(config)
    result = runner.invoke(app, ["profile", str(folder), "--res", "64"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == "error: " + message.format(path=path)


def test_resolution_that_does_not_fit_the_model():
    result = runner.invoke(app, ["profile", "sdxl", "--res", "1000"])
    assert result.exit_code == 1
    assert "not a multiple of 32 pixels" in result.stderr and "valid sizes are 32, 64, 96" in result.stderr


def test_steps_are_timed_in_turns_each_under_its_own_setup():
    events = []

    def setup(name):
        @contextlib.contextmanager
        def entered():
            events.append(f"enter {name}")
            yield
            events.append(f"exit {name}")

        return entered

    timer = Timer(torch.device("cpu"), torch.float32, repeats=2, budget_s=60)
    result = timer.interleaved_latency_ms(lambda: events.append("run"), {"a": setup("a"), "b": setup("b")})
    assert set(result) == {"a", "b"} and all(ms >= 0 for ms in result.values())
    one_round = ["enter a", "run", "exit a", "enter b", "run", "exit b"]
    assert events == one_round * 3  # warm-up round, then 2 timed rounds


@pytest.mark.parametrize("measured", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_profile_table_headings_match_their_cells(measured, tmp_path):
    from deltaconv_cli.profile import profile
    from deltaconv_cli.reports import profile_tables

    tiny_denoiser("sd1").save_pretrained(tmp_path / "unet")
    report = profile(str(tmp_path / "unet"), [(64, 64)], measure=measured, repeats=1, time_budget_s=1e-9)
    summary, per_layer = profile_tables(report, measured)
    mixers = ["ΔConv", "LinFusion"]
    ratios = ["attn/ΔConv", "LinFusion/ΔConv", "attn share of denoiser"]
    expected_summary = ["resolution", "top grid", "MACs attn", *mixers, *ratios]
    expected_summary += ["step ms attn", *mixers] if measured else []
    expected_layer = ["stage", "grid", "C", "k", "n", "MACs attn", *mixers, "params attn", *mixers,
                      "act. attn", *mixers] + (["ms attn", *mixers] if measured else [])  # fmt: skip
    for table, headings in ((summary, expected_summary), (per_layer, expected_layer)):
        assert [str(column.header) for column in table.columns] == headings
        assert {len(column._cells) for column in table.columns} == {table.row_count}
    layer = report.resolutions[0].layers[0]
    params = [column._cells[0] for column in per_layer.columns if "params" in str(column.header)]
    assert params == [human_count(layer.attention.params)]
