"""Shared fixtures: tiny pipelines saved as a user's checkpoint folders (the environment is set in the
repository's conftest.py: no network)."""

from __future__ import annotations

import pytest
from tiny_models import LAYOUTS, tiny_pipeline


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
