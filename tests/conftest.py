"""Shared fixtures. Nothing here may reach the network: the hub is switched off for the whole run."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on the CPU through Triton's interpreter (there is no GPU in CI).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tiny_models import LAYOUTS, tiny_pipeline  # noqa: E402

RUN_SLOW = os.environ.get("RUN_SLOW", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (end-to-end runs, subprocesses, teacher training) run only with RUN_SLOW=1,
    as diffusers' are: README's test command stays fast, and ``RUN_SLOW=1 python -m pytest -m slow`` runs
    the rest (CI runs both)."""
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: runs with RUN_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory):
    """Each tiny pipeline layout saved with save_pretrained, as a user's checkpoint folder would be."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for layout in LAYOUTS:
        pipe = tiny_pipeline(layout, root / f"{layout}-scratch")
        pipe.save_pretrained(root / layout)
        folders[layout] = root / layout
    return folders


@pytest.fixture(scope="module")
def converted(saved_pipelines, tmp_path_factory):
    """The tiny SD1 pipeline converted with ``deltaconv convert`` (fresh blocks, teacher start)."""
    from typer.testing import CliRunner

    from deltaconv_cli.cli import app

    out = tmp_path_factory.mktemp("converted") / "sd1"
    assert CliRunner().invoke(app, ["convert", str(saved_pipelines["sd1"]), "-o", str(out)]).exit_code == 0
    return out


@pytest.fixture
def refuse_model_loading(monkeypatch):
    """Fails the test if any command loads a model: for input that must be refused before any load."""
    import deltaconv_cli.convert
    import deltaconv_cli.distill
    import deltaconv_cli.sampling

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module in (deltaconv_cli.sampling, deltaconv_cli.distill, deltaconv_cli.convert):
        monkeypatch.setattr(module, "load_model", loaded)
