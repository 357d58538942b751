"""The repository explains itself: every document it cites is in it, and its benchmark tables come from a
command that reads the results files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml"}


def repository_texts():
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.suffix in TEXT_SUFFIXES and path.is_file() and not parts & {".git", "build", "runs"}:
            if not any(part.endswith(".egg-info") for part in parts):
                yield path, path.read_text(errors="replace")


def test_every_cited_document_is_in_the_repository():
    cited = set()
    for path, text in repository_texts():
        assert not re.search(r"DESIGN \d", text), f"{path} cites a design document not in the repository"
        cited |= {(path, name) for name in re.findall(r"\bdocs/[\w.-]+\.md\b", text)}
    assert cited
    missing = [f"{path.relative_to(ROOT)}: {name}" for path, name in cited if not (ROOT / name).is_file()]
    assert not missing


def test_method_sections_cited_exist():
    sections = set(re.findall(r"^## (§[\d.]+)", (ROOT / "docs" / "method.md").read_text(), re.MULTILINE))
    for path, text in repository_texts():
        for section in re.findall(r"docs/method\.md (§[\d.]*\d)", text):
            assert section in sections, f"{path} cites {section}, which docs/method.md does not have"


def _tables(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "tables.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_benchmark_tables_render_the_shipped_results():
    done = _tables("teacher", str(ROOT / "demo_teacher" / "results" / "demo-teacher-quality.json"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| guidance | adherence | adherence: single |")


@pytest.mark.slow
def test_benchmark_tables_end_a_missing_or_foreign_results_file_with_one_line(tmp_path: Path):
    missing = tmp_path / "missing.json"
    done = _tables("eval", str(missing))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"tables.py: cannot read results from {missing}: No such file or directory\n"

    (tmp_path / "broken.json").write_text('{"rows": [')
    done = _tables("eval", str(tmp_path / "broken.json"))
    assert done.returncode == 1 and done.stderr.startswith(f"tables.py: cannot read results from {tmp_path}")
    assert done.stderr.count("\n") == 1

    done = _tables("noised", str(ROOT / "demo_teacher" / "results" / "demo-teacher-quality.json"))
    assert (done.returncode, done.stdout) == (1, "")
    assert (
        done.stderr.startswith("tables.py: noised: not results of that kind (")
        and done.stderr.count("\n") == 1
    )

    done = _tables("eval", str(missing), str(missing))
    assert done.returncode == 2 and "eval takes one results file, got 2" in done.stderr


@pytest.mark.slow
def test_benchmark_tables_piped_into_a_reader_that_stops_end_without_a_traceback():
    command = [sys.executable, str(ROOT / "benchmarks" / "tables.py"), "teacher"]
    command.append(str(ROOT / "demo_teacher" / "results" / "demo-teacher-quality.json"))
    tables = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tables.stdout.close()  # as `head` does once it has its lines; the script is still importing then
    stderr = tables.stderr.read()
    assert (tables.wait(timeout=120), stderr) == (1, "")


def test_readme_python_snippet_runs_as_written(saved_pipelines, converted, tmp_path, monkeypatch):
    """README's "From Python" block, top to bottom, with tiny stand-ins at the paths it names."""
    import shutil

    from test_interop import convfusion_tensors, linfusion_folder, nested_file

    from deltaconv_cli.loading import load_model, locate_model
    from deltaconv_cli.surgery import DeltaConvAdapter

    text = (ROOT / "README.md").read_text()
    snippet = text.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(converted, "sd15-deltaconv")
    Path("sd15").symlink_to(saved_pipelines["sd1"])
    unet = load_model(locate_model("sd15")).unet
    DeltaConvAdapter.construct_for(unet, seed=5).save_pretrained("runs/sd15/adapter")
    linfusion_folder(unet, tmp_path / "LinFusion-1-5")
    nested_file(convfusion_tensors(unet, scales=3), "convfusion-sd15.safetensors", ("base", "base_ema"))
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    assert namespace["imported"].key_nesting == "base_ema"
    assert tuple(namespace["imported"].adapter.config.scales) == (1, 1 / 2, 1 / 3)
    assert Path("student.safetensors").is_file() and Path("my-adapter/config.json").is_file()
    assert namespace["dc"].mounted_adapter(namespace["pipe"]).config.mixer == "linfusion"
