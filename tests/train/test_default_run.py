"""The main job: `proxim train` with no arguments learns arithmetic on a CPU (several minutes: slow)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .helpers import PYTHON, cli_env


@pytest.mark.slow
def test_proxim_train_with_no_arguments_learns(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run([PYTHON, "-m", "proxim", "train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| accuracy |" in proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    result = json.loads((run / "eval.json").read_text())
    assert result["after"]["accuracy"] >= result["before"]["accuracy"] + 0.15, result
    assert (run / "plot.png").is_file()
