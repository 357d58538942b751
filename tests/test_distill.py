"""`deltaconv distill` on tiny pipelines: loss terms, what trains, resume, multi-process, clear errors."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltaconv_cli import distill as distillation
from deltaconv_cli.architectures import denoiser_of
from deltaconv_cli.cli import app
from deltaconv_cli.data import batch_indices
from deltaconv_cli.distill import DistillationObjective, make_config
from deltaconv_cli.errors import DeltaConvError
from deltaconv_cli.loading import load_model, locate_model
from deltaconv_cli.surgery import DeltaConvAdapter, ReplacedSelfAttention

runner = CliRunner()
TINY = {"steps": 4, "resolution": 32, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2,
        "report_prompts": 2, "report_steps": 2, "learning_rate": 1e-3}  # fmt: skip


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red circle", "a blue square", "a green cat", "a photo of the cat"] * 2):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def tiny_config(**overrides):
    return make_config("demo", **{**TINY, **overrides})


def run(pipeline_folder, data, out, **overrides):
    return distillation.distill(
        str(pipeline_folder), str(data), out, tiny_config(**overrides), show_progress=False
    )


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_batches_are_fixed_by_the_step():
    assert batch_indices(3, 4, 10, 0) == batch_indices(3, 4, 10, 0)
    first_epoch = [i for step in range(5) for i in batch_indices(step, 2, 10, 0)]
    assert sorted(first_epoch) == list(range(10))  # each sample once per epoch
    assert batch_indices(0, 4, 2**31 - 1, 0) == [0, 1, 2, 3]


@pytest.mark.parametrize("layout,feature", [("sd1", "residual"), ("sd2", "residual"), ("pixart", "residual"),
                                            ("sd1", "attention_output")])  # fmt: skip
def test_loss_terms_against_hand_computed_values(layout, feature, saved_pipelines):
    pipe = load_model(locate_model(saved_pipelines[layout]))
    teacher = copy.deepcopy(denoiser_of(pipe))
    adapter = DeltaConvAdapter.construct_for(pipe, seed=0).mount(pipe, dtype=torch.float32)
    config = tiny_config(feature=feature, caption_dropout=0.0)
    objective = DistillationObjective(pipe, adapter, config)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    captions, seeds = ["a red circle", "a blue square"], [(0, 0, 0), (0, 0, 1)]
    terms = objective(images, captions, seeds)

    noisy, t, cond, target = objective._inputs(images, captions, seeds)
    if layout == "sd2":  # v-prediction: target is the velocity, not the noise
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    student_model = denoiser_of(pipe)

    def outputs_and_features(model):
        """Prediction and, per replaced site, the residual stream after attn1 (block input + attn1 out)
        or the attention output, captured with hooks written here."""
        inputs, outs = {}, {}
        hooks = []
        for name in adapter.config.targets:
            block = model.get_submodule(name.rsplit(".", 1)[0])
            hooks.append(
                block.register_forward_pre_hook(
                    lambda m, a, kw, n=name: (
                        inputs.__setitem__(n, a[0]) if a else inputs.__setitem__(n, kw["hidden_states"])
                    ),
                    with_kwargs=True,
                )
            )
            attn = model.get_submodule(name)
            hooks.append(attn.register_forward_hook(lambda m, a, o, n=name: outs.__setitem__(n, o)))
        with torch.no_grad():
            out = (
                model(noisy, timestep=t, **cond).sample
                if layout == "pixart"
                else model(noisy, t, **cond).sample
            )
        for h in hooks:
            h.remove()
        out = out[:, :4]
        if layout == "pixart":  # ada_norm_single scales the attention output by gate_msa before the add
            return out, None
        feats = [
            outs[n] if feature == "attention_output" else inputs[n] + outs[n] for n in adapter.config.targets
        ]
        return out, feats

    student_out, student_feats = outputs_and_features(student_model)
    adapter.unmount()
    teacher_out, teacher_feats = outputs_and_features(teacher)
    torch.testing.assert_close(terms["denoise"], F.mse_loss(student_out, target))
    torch.testing.assert_close(terms["teacher"], F.mse_loss(student_out, teacher_out))
    if student_feats is not None:
        expected = sum(F.mse_loss(s, t) for s, t in zip(student_feats, teacher_feats, strict=True))
        torch.testing.assert_close(terms["feature"], expected)
    assert terms["feature"] > 0
    weights = (config.denoise_weight, config.teacher_weight, config.feature_weight)
    total = weights[0] * terms["denoise"] + weights[1] * terms["teacher"] + weights[2] * terms["feature"]
    torch.testing.assert_close(terms["total"], total)


def test_only_the_blocks_train(saved_pipelines, image_folder, tmp_path, monkeypatch):
    captured = {}
    original_init = DistillationObjective.__init__

    def capture(self, pipe, adapter, config):
        original_init(self, pipe, adapter, config)
        captured["pipe"], captured["adapter"] = pipe, adapter
        captured["base"] = {
            n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".block." not in n
        }
        captured["blocks"] = copy.deepcopy(adapter.state_dict())

    monkeypatch.setattr(DistillationObjective, "__init__", capture)
    run(saved_pipelines["sd1"], image_folder, tmp_path / "run")
    after = {n: p for n, p in captured["pipe"].unet.named_parameters() if ".block." not in n}
    assert all(torch.equal(after[n], before) for n, before in captured["base"].items())
    for component in ("vae", "text_encoder"):
        assert not any(p.requires_grad for p in getattr(captured["pipe"], component).parameters())
    saved = adapter_weights(tmp_path / "run" / "adapter")
    assert any(not torch.equal(saved[k], v) for k, v in captured["blocks"].items())
    assert set(saved) == set(captured["blocks"])


def test_outputs_of_a_run(saved_pipelines, image_folder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", str(saved_pipelines["sd1"]), "--data", str(image_folder), "--out",
                                 str(out), "--recipe", "demo", "--json", str(tmp_path / "r.json"),
                                 *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"total", "denoise", "teacher", "feature", "lr", "grad_norm"} <= set(records[0])
    for name in ("loss.png", "report.png", "report.json", "config.json", "adapter/config.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    report = json.loads((tmp_path / "r.json").read_text())
    # The demo recipe leaves the report's guidance to the model: SD's 7.5 for a model other than the demo.
    config = json.loads((out / "config.json").read_text())
    assert (config["report_guidance"], config["report_guidance_start"]) == (7.5, 0.0)
    assert set(report["converted"]) >= {"psnr_db", "ssim", "denoiser_relative_error"}
    from deltaconv_cli.loading import load_converted

    pipe = load_converted(saved_pipelines["sd1"], adapter=out / "adapter")
    assert sum(isinstance(m, ReplacedSelfAttention) for m in pipe.unet.modules()) == 7


@pytest.mark.slow
def test_resume_gives_the_same_weights(saved_pipelines, image_folder, tmp_path):
    run(saved_pipelines["sd1"], image_folder, tmp_path / "straight")
    # The split run also loads its data in a worker process: same samples, same trajectory.
    run(saved_pipelines["sd1"], image_folder, tmp_path / "split", steps=2, num_workers=1)
    distillation.distill(str(saved_pipelines["sd1"]), str(image_folder), tmp_path / "split", tiny_config(),
                         resume=True, show_progress=False)  # fmt: skip
    straight, split = (adapter_weights(tmp_path / name / "adapter") for name in ("straight", "split"))
    for key in straight:
        torch.testing.assert_close(split[key], straight[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_interrupt_saves_and_resume_finishes(saved_pipelines, image_folder, tmp_path):
    def interrupt(step, terms):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(
        DeltaConvError, match="interrupted at step 3; saved .*step-0000003; continue with --resume"
    ):
        distillation.distill(str(saved_pipelines["sd1"]), str(image_folder), tmp_path / "run", tiny_config(),
                             show_progress=False, on_step=interrupt)  # fmt: skip
    folder, data = str(saved_pipelines["sd1"]), str(image_folder)
    result = distillation.distill(
        folder, data, tmp_path / "run", tiny_config(), resume=True, show_progress=False
    )
    assert result.steps_done == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    saved_pipelines, image_folder, tmp_path, monkeypatch
):
    original = DistillationObjective.forward

    def poisoned(self, images, captions, seeds):
        terms = original(self, images, captions, seeds)
        if seeds[0][1] >= 2:  # from the third step on
            terms = {**terms, "teacher": terms["teacher"] * float("nan")}
            terms["total"] = terms["total"] + terms["teacher"]
        return terms

    monkeypatch.setattr(DistillationObjective, "forward", poisoned)
    with pytest.raises(
        DeltaConvError, match="loss term 'teacher' is nan at step 3; stopped, the last good checkpoint"
    ):
        run(saved_pipelines["sd1"], image_folder, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]


def test_out_of_memory_suggests_smaller_batches(saved_pipelines, image_folder, tmp_path, monkeypatch):
    def oom(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DistillationObjective, "forward", oom)
    with pytest.raises(DeltaConvError, match="out of memory at batch size 4: lower --batch-size and raise"):
        run(saved_pipelines["sd1"], image_folder, tmp_path / "run")


def cli_error(*args):
    result = runner.invoke(app, ["distill", *map(str, args), "--recipe", "demo"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_clear_errors(saved_pipelines, image_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no metadata.jsonl" in cli_error(
        saved_pipelines["sd1"], "--data", empty, "--out", tmp_path / "a"
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\nnot json\n')
    Image.new("RGB", (8, 8)).save(bad / "x.png")
    assert "metadata.jsonl line 2: expected a JSON object" in cli_error(
        saved_pipelines["sd1"], "--data", bad, "--out", tmp_path / "b"
    )
    (bad / "metadata.jsonl").write_bytes(b'{"file_name": "x.png", "text": "caf\xe9"}\n')  # Latin-1
    assert cli_error(saved_pipelines["sd1"], "--data", bad, "--out", tmp_path / "b") == (
        f"error: {bad / 'metadata.jsonl'} is not UTF-8 text (byte 35: invalid continuation byte)"
    )
    assert "--steps must be a positive number, got 0" in cli_error(
        saved_pipelines["sd1"], "--data", image_folder, "--steps", "0", "--out", tmp_path / "c"
    )
    other = tmp_path / "other-adapter"
    DeltaConvAdapter.construct_for(load_model(locate_model(saved_pipelines["sdxl"]))).save_pretrained(other)
    message = cli_error(
        saved_pipelines["sd1"], "--data", image_folder, "--adapter", other, "--out", tmp_path / "d"
    )
    assert "adapter does not match this model" in message
    run(saved_pipelines["sd1"], image_folder, tmp_path / "done", steps=2)
    assert "already holds a run; pass --resume" in cli_error(
        saved_pipelines["sd1"], "--data", image_folder, "--out", tmp_path / "done"
    )


def test_linfusion_baseline_trains_in_the_same_harness(saved_pipelines, image_folder, tmp_path):
    # With LinFusion-XL's narrow feature MLPs (dim_n // 16), as LinFusion's --mid_dim_scale 16 builds them.
    config = make_config("demo", mixer="linfusion", mid_dim_scale=16, **TINY)
    assert (config.teacher_weight, config.feature_weight, config.feature) == (0.5, 0.5, "attention_output")
    result = distillation.distill(
        str(saved_pipelines["sd1"]), str(image_folder), tmp_path / "lf", config, show_progress=False
    )
    saved = json.loads((result.adapter_path / "config.json").read_text())
    assert saved["mixer"] == "linfusion"
    assert saved["projection_mid_dims"] == [c // 16 for c in saved["channels"]]
    assert saved["base_model_name_or_path"] == str(saved_pipelines["sd1"].resolve())


@pytest.mark.slow
def test_two_processes_match_one(saved_pipelines, image_folder, tmp_path):
    args = ["distill", str(saved_pipelines["sd1"]), "--data", str(image_folder), "--recipe", "demo"]
    args += sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
              "-m", "deltaconv_cli", *args, "--out", str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    single = subprocess.run([sys.executable, "-m", "deltaconv_cli", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stdout + single.stderr
    one, two = (adapter_weights(tmp_path / name / "adapter") for name in ("one", "two"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mixer", "foo"], "setting mixer must be one of deltaconv, linfusion, got 'foo'"),
        (["--set", "gate=relu"], "setting gate must be one of scaled, sigmoid, got 'relu'"),
        (["--set", "feature=bad"], "setting feature must be one of residual, attention_output, got 'bad'"),
        (["--learning-rate", "-1"], "setting learning_rate must be a positive number, got -1.0"),
        (["--batch-size", "0"], "setting batch_size must be at least 1, got 0"),
        (["--set", "caption_dropout=2"], "setting caption_dropout must be a probability in [0, 1], got 2"),
        (["--set", "report_to=wandb"], "setting report_to must be one of none, tensorboard, got 'wandb'"),
        (["--set", "report_guidance_start=2"], "setting report_guidance_start must be in [0, 1], got 2"),
        (
            ["--set", "report_guidance=1", "--set", "report_guidance_start=0.2"],
            "a guidance start needs guidance above 1, got 1",
        ),
        (["-k", "4"], "kernel sizes must be positive odd numbers, got 4"),
        (
            ["--resolution", "36"],
            "resolution 36x36 is not a multiple of 8 pixels (VAE factor 2 x latent stride 4); "
            "valid sizes are 8, 16, 24, ...",
        ),
    ],
)
def test_bad_settings_fail_before_any_model_is_loaded(
    args, message, saved_pipelines, image_folder, tmp_path, refuse_model_loading
):
    out = tmp_path / "run"
    line = cli_error(saved_pipelines["sd1"], "--data", image_folder, "--out", out, *args)
    assert line == f"error: {message}"
    assert not out.exists()


def test_a_guidance_start_for_the_report_of_a_pixart_run_fails_before_loading(
    saved_pipelines, image_folder, tmp_path, refuse_model_loading
):
    out = tmp_path / "run"
    line = cli_error(saved_pipelines["pixart"], "--data", image_folder, "--out", out,
                     "--set", "report_guidance_start=0.2")  # fmt: skip
    why = "fix guidance for the whole call; leave the guidance start at 0"
    assert line == f"error: PixArt-α/Σ DiT pipelines {why}"
    assert not out.exists()


@pytest.mark.parametrize(
    "reader",
    [[], ["--set", "calibration_samples=0", "--set", "num_workers=1"]],
    ids=["this-process", "worker-process"],
)
def test_a_failure_on_the_first_batch_is_one_line_and_leaves_no_run_folder(reader, saved_pipelines, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.png").write_bytes(b"not an image")
    (data / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "a cat"}\n')
    out = tmp_path / "run"
    line = cli_error(saved_pipelines["sd1"], "--data", data, "--out", out, *reader)
    assert line.startswith(f"error: cannot read image {data / 'x.png'}: ")
    assert not out.exists()


def test_an_image_damaged_mid_run_stops_with_progress_saved(saved_pipelines, image_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    originals = {path: path.read_bytes() for path in data.glob("*.png")}

    def damage_every_image(step, terms):
        if step == 1:  # the next step reads the four images the first did not
            for path in originals:
                path.write_bytes(b"not an image")

    with pytest.raises(DeltaConvError) as caught:
        distillation.distill(str(saved_pipelines["sd1"]), str(data), tmp_path / "run",
                             tiny_config(calibration_samples=0, checkpoint_every=4),
                             show_progress=False, on_step=damage_every_image)  # fmt: skip
    message = str(caught.value)
    assert message.startswith(f"cannot read image {data}")
    saved = tmp_path / "run" / "checkpoints" / "step-0000001"
    assert message.endswith(f"; stopped at step 1; saved {saved}; continue with --resume")
    for path, content in originals.items():
        path.write_bytes(content)
    result = distillation.distill(str(saved_pipelines["sd1"]), str(data), tmp_path / "run",
                                  tiny_config(calibration_samples=0, checkpoint_every=4), resume=True,
                                  show_progress=False)  # fmt: skip
    assert result.steps_done == 4


def test_a_failure_before_the_first_checkpoint_leaves_no_run_folder(
    saved_pipelines, image_folder, tmp_path, monkeypatch
):
    def broken(self, *args):
        raise DeltaConvError("broken on purpose")

    monkeypatch.setattr(DistillationObjective, "forward", broken)
    with pytest.raises(DeltaConvError, match="broken on purpose"):
        run(saved_pipelines["sd1"], image_folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_passes_over_a_damaged_checkpoint(saved_pipelines, image_folder, tmp_path):
    folder, data = str(saved_pipelines["sd1"]), str(image_folder)
    run(saved_pipelines["sd1"], image_folder, tmp_path / "straight")
    run(saved_pipelines["sd1"], image_folder, tmp_path / "run", steps=4, checkpoint_every=1)
    newest = tmp_path / "run" / "checkpoints" / "step-0000004"
    (newest / "state.json").write_text("{not json")
    result = runner.invoke(app, ["distill", folder, "--data", data, "--out", str(tmp_path / "run"),
                                 "--resume", "--recipe", "demo",
                                 *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), [])])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "skipped damaged checkpoint(s) step-0000004" in result.stderr
    assert "resuming from step-0000003" in result.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["resumed_from"].endswith("step-0000003")
    straight, resumed = (adapter_weights(tmp_path / name / "adapter") for name in ("straight", "run"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    for checkpoint in (tmp_path / "run" / "checkpoints").iterdir():
        (checkpoint / "state.json").write_text("")
    message = cli_error(folder, "--data", data, "--out", tmp_path / "run", "--resume",
                        *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []))  # fmt: skip
    assert message.startswith("error: no intact checkpoint to resume from: step-0000004 (")


def test_losses_go_to_tensorboard_when_asked(saved_pipelines, image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    run(saved_pipelines["sd1"], image_folder, tmp_path / "run", steps=2, report_to="tensorboard")
    assert list((tmp_path / "run").glob("tensorboard/**/events.out.tfevents.*"))


def test_loss_plot_trend_is_a_trailing_mean():
    np.testing.assert_allclose(distillation.smoothed([1, 2, 3, 4, 5, 6], 3), [1, 1.5, 2, 3, 4, 5])
    np.testing.assert_allclose(distillation.smoothed([2.0, 4.0], 1), [2.0, 4.0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device trains fp16 as asked")
def test_fp16_recipes_train_in_fp32_on_the_cpu_and_say_so(saved_pipelines, image_folder, tmp_path):
    args = ["distill", str(saved_pipelines["sd1"]), "--data", str(image_folder), "--recipe", "demo"]
    args += sum((["--set", f"{k}={v}"] for k, v in {**TINY, "steps": 1}.items()), [])
    result = runner.invoke(app, [*args, "--mixed-precision", "fp16", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "note: fp16 mixed precision needs a GPU: this CPU run trains in fp32" in result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == "no"
    # One step of a 1-step warm-up (TINY) is done; with more warm-up steps the report says so.
    assert "note" not in json.loads((tmp_path / "run" / "report.json").read_text())


def test_report_says_when_warm_up_has_not_finished(saved_pipelines, image_folder, tmp_path):
    run(saved_pipelines["sd1"], image_folder, tmp_path / "run", steps=2, warmup_steps=10)
    note = json.loads((tmp_path / "run" / "report.json").read_text())["note"]
    assert note.startswith("the learning rate was still warming up (2 of 10 warm-up steps, now 0.0002)")
