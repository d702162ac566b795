"""Kill a real `proxim train` process, resume it, and end with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import PYTHON, TINY_RUN_FLAGS, cli_env

STEPS = 24
FLAGS = [
    *TINY_RUN_FLAGS,
    "--steps",
    str(STEPS),
    "--eval-size",
    "4",
    "--save-every",
    "3",
    "--epochs",
    "2",
    "--minibatch-size",
    "8",
]  # two epochs of two minibatches: the optimizer state, not only the weights, must survive the restart


def _train(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, "-m", "proxim", "train", *args], env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss/total"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = _train(tmp, *FLAGS, "--output-dir", str(tmp / "runs"), "--run-name", "full")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    return tmp / "runs" / "full"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_and_resumed_run_ends_with_identical_weights(sig: signal.Signals, uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "cut"
    proc = _train(tmp_path, *FLAGS, "--output-dir", str(tmp_path / "runs"), "--run-name", "cut")
    deadline = time.time() + 240
    while _steps_logged(run) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        # the handler finishes the step in flight, checkpoints it and exits with 128 + SIGTERM
        assert proc.returncode == 128 + signal.SIGTERM, out.decode()
        assert b"--resume" in out
        stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
        assert 4 <= stopped_at < STEPS
        assert stopped_at == _steps_logged(run)
    else:
        assert proc.returncode == -signal.SIGKILL
        assert _steps_logged(run) >= 4  # steps after the last periodic checkpoint are redone
    resumed = _train(tmp_path, "--resume", str(run))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()

    want, got = _final_weights(uninterrupted), _final_weights(run)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert _losses(run) == _losses(uninterrupted)


def test_resume_refuses_a_changed_setting(uninterrupted: Path, tmp_path: Path) -> None:
    proc = _train(tmp_path, "--resume", str(uninterrupted), "--lr", "0.5")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert b"--lr cannot change when continuing a run" in out
