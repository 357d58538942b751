"""What every test run shares (tests/ and demo_teacher/tests/): nothing may reach the network, Triton runs
in its CPU interpreter, and tests marked ``slow`` run only with RUN_SLOW=1."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on the CPU through Triton's interpreter (there is no GPU in CI).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
