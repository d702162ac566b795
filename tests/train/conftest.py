"""Fixtures of the trainer tests: an isolated cache, tiny models built in code, small run settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# runs keep torch's thread count instead of measuring the machine (`threads=auto`): two runs a test compares
# must not differ in their last bits because the machine's load changed between them
os.environ.setdefault("OMP_NUM_THREADS", str(__import__("torch").get_num_threads()))

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from proxim.train import TrainConfig

from .helpers import TINY


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXIM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "proxim-cache"))


@pytest.fixture
def tiny_config(tmp_path: Path):
    def make(**overrides: Any) -> TrainConfig:
        values = {**TINY, "output_dir": str(tmp_path / "runs"), "run_name": "run", **overrides}
        return TrainConfig(**values)

    return make
