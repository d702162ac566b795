"""Two processes on CPU through `accelerate launch`, and the rank agreement check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxim.train import TrainingError
from proxim.train.distributed import check_same_across_ranks

from .helpers import TINY_RUN_FLAGS, cli_env


def test_ranks_must_agree_on_the_objective() -> None:
    check_same_across_ranks(["a|b", "a|b"], "objective fingerprint")
    with pytest.raises(TrainingError, match=r"disagree on the objective fingerprint(.|\n)*rank 1: clip\(eps_low=0.3\)"):
        check_same_across_ranks(["clip(eps_low=0.2)", "clip(eps_low=0.3)"], "objective fingerprint")


def test_accelerate_launch_two_processes_on_cpu(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    env.pop("WORLD_SIZE", None)
    cmd = [
        # `accelerate launch` (the same entry point as the `accelerate` command); on a CPU-only machine it
        # needs --multi_gpu to start several processes, which proxim then joins into a CPU (gloo) group
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29561",
        "-m",
        "proxim",
        "train",
        *TINY_RUN_FLAGS,
        *"--steps 3 --eval-size 8 --save-every 3 --run-name ddp".split(),
        "--output-dir",
        str(tmp_path / "runs"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    run = tmp_path / "runs" / "ddp"
    state = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["world_size"] == 2
    assert (run / "checkpoints" / "step_000003" / "rng_rank1.pt").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    # each process sampled its own 2 prompts x 4 responses; the main process logged both ranks' samples
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 * 2  # log_samples=4 per rank, capped by the 2 groups each rank has
    assert output.count("held-out evaluation") == 1  # only the main process prints the table
    evaluated = [json.loads(line) for line in (run / "eval_after.jsonl").read_text().splitlines()]
    assert len(evaluated) == 8  # the held-out set was split over the ranks and gathered back
