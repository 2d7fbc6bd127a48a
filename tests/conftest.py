"""Session-wide test setup: private caches, and the tiny datasets and one-step checkpoints the tests share.

Each dataset and checkpoint here is made once per run (session scope) and must be treated as read-only by
the tests that take it: a test that changes files copies them to its own `tmp_path` first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CACHE_VARIABLES = {"RESBONE_CACHE": "resbone", "TORCH_HOME": "torch"}  # variable -> folder under the session's


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory) -> Path:
    """Points every cache the code writes (COCO stores, generated datasets, downloaded weights) into the run's
    temporary folder, for this process and the processes the tests start, so that a test run leaves nothing in
    the user's `~/.cache` and never reads what an earlier run or the user left there."""
    root = tmp_path_factory.mktemp("cache")
    saved = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    os.environ.update({name: str(root / folder) for name, folder in CACHE_VARIABLES.items()})
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
