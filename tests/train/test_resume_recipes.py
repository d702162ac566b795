"""Every recipe checkpoints and resumes exactly: kill a real process (SIGKILL: only the periodic checkpoints
survive), resume it, and end with the weights and per-step losses of an uninterrupted run.

Online RL has its own, more thorough test (test_resume.py, SIGTERM and SIGKILL); here the offline
preference recipe (DPO), SFT on records and the reward model, each on a tiny model and a data file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import PYTHON, cli_env
from .test_offline import PAIRS

STEPS = 16
TINY_MODEL = "--tiny-hidden-size 32 --tiny-layers 1 --tiny-heads 2 --quiet --tracker none --save-every 3".split()
PLAIN_PAIRS = [p for p in PAIRS if isinstance(p["prompt"], str)] * 4
RECORDS = [{"prompt": f"count a: {'a' * n}b=", "response": str(n)} for n in range(1, 25)]

#: recipe -> (command, flags, the metric that is each step's loss)
RECIPES = {
    "dpo": (
        ["train", "--preset", "dpo"],
        ["--steps", str(STEPS), "--prompts-per-step", "4", "--micro-batch-size", "2", "--task", "none", "--eval-size", "3", "--warmstart-steps", "0"],
        "loss/preference",
    ),
    "sft": (
        ["sft"],
        ["--warmstart-steps", str(STEPS), "--warmstart-batch-size", "4", "--task", "none", "--eval-size", "4", "--warmstart-lr", "3e-3"],
        "loss/supervised",
    ),
    "reward-model": (
        ["reward-model"],
        ["--steps", str(STEPS), "--prompts-per-step", "4", "--task", "none", "--eval-size", "3", "--lr", "1e-3", "--warmstart-steps", "0"],
        "loss/bradley_terry",
    ),
}


def _data(tmp: Path, recipe: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (RECORDS if recipe == "sft" else PLAIN_PAIRS)))
    return path


def _start(tmp: Path, recipe: str, name: str) -> subprocess.Popen[bytes]:
    command, flags, _ = RECIPES[recipe]
    args = [*command, *flags, *TINY_MODEL, "--data", str(_data(tmp, recipe)), "--output-dir", str(tmp / "runs"), "--run-name", name]
    return subprocess.Popen([PYTHON, "-m", "proxim", *args], env=cli_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _logged(run: Path) -> list[dict[str, float]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_killed_and_resumed_recipe_ends_with_identical_weights(recipe: str, tmp_path: Path) -> None:
    full = _start(tmp_path / "full", recipe, "full")
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out.decode()
    want = tmp_path / "full" / "runs" / "full"

    cut_tmp = tmp_path / "cut"
    proc = _start(cut_tmp, recipe, "cut")
    run = cut_tmp / "runs" / "cut"
    deadline = time.time() + 240
    while len(_logged(run)) < 7 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").is_file()  # a periodic checkpoint (every 3 steps) survived
    command = RECIPES[recipe][0][:1]  # the command alone: --resume takes the rest from the run folder
    resumed = subprocess.run([PYTHON, "-m", "proxim", *command, "--resume", str(run)], env=cli_env(cut_tmp), capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout.decode() + resumed.stderr.decode()

    expected, got = _final_weights(want), _final_weights(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    key = RECIPES[recipe][2]
    assert [h[key] for h in _logged(run)] == [h[key] for h in _logged(want)]
    assert [h["step"] for h in _logged(run)] == list(range(1, STEPS + 1))
