"""Helpers shared by the trainer tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

#: A run small enough for a two-step smoke test: 4 prompts x 4 responses, a 1-layer hidden-32 model.
TINY: dict[str, Any] = {
    "steps": 2,
    "prompts_per_step": 4,
    "group_size": 4,
    "tiny_hidden_size": 32,
    "tiny_layers": 1,
    "tiny_heads": 2,
    "warmstart_steps": 0,
    "eval_size": 8,
    "save_every": 0,
    "quiet": True,
    "tracker": "none",
}


#: `TINY` as command-line flags of ``proxim train``, without --steps and --eval-size (each test sets its own).
TINY_RUN_FLAGS = "--prompts-per-step 4 --group-size 4 --tiny-hidden-size 32 --tiny-layers 1 --tiny-heads 2 --warmstart-steps 0 --quiet --tracker none".split()


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a `python -m proxim` subprocess: offline, isolated cache, two threads."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PROXIM_CACHE_DIR=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "hf"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


PYTHON = sys.executable
