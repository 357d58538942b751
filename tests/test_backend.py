"""The Triton kernels check themselves against PyTorch before they are trusted, and fall back (or, when
forced, fail) with one clear message: tested on the CPU through Triton's interpreter (conftest.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from deltaconv_cli import backend
from deltaconv_cli.backend import BACKEND_ENV, self_check_results
from deltaconv_cli.block import DeltaConvBlock
from deltaconv_cli.cli import app


@pytest.fixture(autouse=True)
def fresh_checks():
    backend.clear_self_checks()
    yield
    backend.clear_self_checks()


def block_and_input(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return DeltaConvBlock(16, 3, scales=(1.0, 0.5)), torch.randn(2, 9, 7, 16, dtype=dtype)


def test_auto_on_the_cpu_runs_pytorch_and_checks_nothing():
    block, x = block_and_input()
    block(x)
    assert self_check_results() == []


@pytest.mark.slow  # the real kernels, in Triton's CPU interpreter
def test_forced_kernels_check_themselves_once_per_kind_of_call(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    block, x = block_and_input()
    with torch.no_grad():
        block(x)
        block(x)  # cached: no second check
    (inference,) = self_check_results()
    assert inference.passed and "cpu, input float32, weights float32" in inference.key
    assert inference.key.endswith("gate scaled, with a pooled branch, inference")
    block(x).sum().backward()  # gradients needed: forward and backward are checked
    assert [r.key.endswith("training") for r in self_check_results()] == [False, True]
    assert all(r.passed for r in self_check_results())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_float32_weights_under_autocast_pass(dtype, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    block, x = block_and_input()
    with torch.autocast("cpu", dtype=dtype):
        block(x).float().sum().backward()
    (result,) = self_check_results()
    assert f"weights float32, {str(dtype).removeprefix('torch.')} autocast" in result.key
    assert result.passed, result.detail


def failing(self, x):
    raise RuntimeError("PTX assembly failed: sm_90a")


def disagreeing(self, x):
    return self._local_torch(x) * 1.05


class DoubledGradient(torch.autograd.Function):
    """The identity forward whose backward doubles: a kernel right forward and wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def wrong_backward(self, x):
    return DoubledGradient.apply(self._local_torch(x))


@pytest.mark.parametrize(
    "kernel,training,message",
    [
        (failing, False, "RuntimeError: PTX assembly failed: sm_90a"),
        (disagreeing, False, "output differs by"),
        (wrong_backward, True, "input gradient differs by"),
    ],
)
def test_a_failing_or_disagreeing_kernel_warns_once_and_pytorch_takes_over(
    kernel, training, message, monkeypatch
):
    monkeypatch.setattr(backend, "auto_chooses_triton", lambda x: True)  # as on a CUDA device
    monkeypatch.setattr(DeltaConvBlock, "_local_triton", kernel)
    block, x = block_and_input()
    reference = DeltaConvBlock(16, 3, scales=(1.0, 0.5), backend="torch")
    reference.load_state_dict(block.state_dict())
    with torch.set_grad_enabled(training):
        with pytest.warns(RuntimeWarning, match="failed their self-check") as caught:
            out = block(x)
        text = str(caught[0].message)
        assert message in text and "the blocks use PyTorch instead" in text and "deltaconv env" in text
        assert "cpu, input float32" in text
        assert torch.equal(out, reference(x))  # the same computation: bit for bit
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: the result is cached
            assert torch.equal(block(x), reference(x))
    assert [r.passed for r in self_check_results()] == [False]


def test_forced_kernels_that_fail_are_an_error_every_time(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setattr(DeltaConvBlock, "_local_triton", failing)
    block, x = block_and_input()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="DELTACONV_BACKEND=triton .* makes that an error"):
            with torch.no_grad():
                block(x)


def test_env_reports_versions_devices_backend_and_checks_offline(monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["env", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["packages"]["torch"] == torch.__version__.split("+")[0] or report["packages"]["torch"]
    assert set(report["packages"]) >= {
        "deltaconv",
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "triton",
    }
    assert report["devices"][0]["device"] == "cpu" and report["devices"][0]["memory_gib"] > 0
    assert report["blocks"]["path"] == "torch" and report["self_checks"] == []
    assert "not run: the blocks use PyTorch on cpu" in report["blocks"]["self_check"]
    assert "math" in report["sdpa"]
    table = runner.invoke(app, ["env"])
    assert (
        table.exit_code == 0
        and "diffusers: " in table.stdout
        and "Triton self-check: not run" in table.stdout
    )
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    bad = runner.invoke(app, ["env", "--json", "-"])
    assert (
        bad.exit_code == 0
        and "must be one of auto, torch, triton" in json.loads(bad.stdout)["blocks"]["problem"]
    )


@pytest.mark.slow  # five self-checks in Triton's CPU interpreter
def test_env_runs_the_self_check_for_each_dtype_where_the_kernels_would_run(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    result = CliRunner().invoke(app, ["env", "--json", "-"])
    assert result.exit_code == 0, result.output
    checks = {c["check"]: c for c in json.loads(result.stdout)["self_checks"]}
    # float32, float16 and bfloat16 inference; float16 and bfloat16 autocast training with float32 weights
    assert len(checks) == 5 and all(c["passed"] for c in checks.values()), checks
    assert any("weights float32, bfloat16 autocast" in name and name.endswith("training") for name in checks)
