"""FSDP2 on two CPU processes, launched as a user launches it:
``accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 ...``.

- The first steps under FSDP equal a single process training on the same global batch (same prompts, same
  sampled responses): losses, rewards and the final weights, within float32 reduction-order noise.
- Checkpoint and resume under FSDP end with exactly the weights of an uninterrupted FSDP run.
- ``-m proxim train`` itself under FSDP with a critic (PPO) and LoRA (the reference is the sharded policy
  with its adapter off) writes full (gathered) checkpoints, which a single process resumes.

To compare with a single process, sampling must not depend on how the prompts are split over processes.
The driver (this file run as a script) therefore samples each prompt's responses in their own ``generate``
call, seeded by the step and the prompt; everything else is proxim's training step. Prompts all have the
same length, so no process pads them differently.

Tolerance (stated, and why): relative 1e-4 (absolute 1e-7) on each step's losses and gradient norm; absolute
1e-5 on every weight after 3 steps of 2 passes (6 AdamW updates at lr 1e-3). The sharded run computes the
same float32 numbers in another order: each process scores 2 of the 4 prompts (padded to its own longest
response), the gradient is reduce-scattered as the mean of 2 partial sums instead of one sum over 16
responses, and the norm is summed from shards. Those differ by a few float32 ulps (measured: losses at
most 6e-9 apart, 8e-7 relative; gradient norms 2e-7 relative; weights at most 2.6e-7 apart, having moved
6e-3). Adam's first updates divide the gradient by its own magnitude, so an ulp-level relative difference
in the gradient moves a weight by about that fraction of lr, per update: far below 1e-5, with room for
the tiny gradients where the ratio is least stable. A real fault moves a compared number by percent: a
missing shard the weights, the normaliser off by the process count the losses, gradients summed instead of
averaged the gradient norm (logged before clipping; Adam's scale-free first updates would hide it in the weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FSDP2 = REPO / "examples" / "accelerate" / "fsdp2.yaml"

#: Twelve training prompts of one width and three held-out ones (3 over 2 processes: uneven shares).
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(12, 34), (21, 43), (30, 15), (44, 11), (17, 28), (39, 20)] * 2]
EVAL = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(10, 10), (23, 31), (40, 12)]]

SETTINGS: dict[str, Any] = {
    "task": None,
    "prompts_per_step": 4,
    "group_size": 4,
    "tiny_hidden_size": 32,
    "tiny_layers": 2,
    "tiny_heads": 2,
    "warmstart_steps": 0,
    "max_new_tokens": 6,
    "lr": 1e-3,
    "epochs": 2,  # the second pass is off-policy: the policy loss is not 0 (at ratio 1 GRPO's is, up to rounding)
    "quiet": True,
    "tracker": "none",
}


def digit_share(prompts: Sequence[str], completions: Sequence[str], **batch: Any) -> list[float]:
    """A reward that varies within a group from the first step on (the untrained model writes anything)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _trainer_class() -> Any:
    from proxim.train import Trainer
    from proxim.train.generation import concat

    class PerPromptSampling(Trainer):
        """Each prompt's G responses from their own ``generate`` call, seeded by (step, prompt): the same samples
        however the prompts are split over processes."""

        def step(self, step: int) -> dict[str, float]:
            self._step = step
            return super().step(step)

        def sample(self, rows: Sequence[Mapping[str, Any]], n: int | None = None, greedy: bool = False) -> Any:
            if greedy:
                return super().sample(rows, n, greedy)
            import torch

            parts = []
            for row in rows:
                torch.manual_seed(zlib.crc32(f"{self._step}:{row['prompt']}".encode()))
                parts.append(super().sample([row], n, greedy))
            return concat(parts, int(self.tokenizer.pad_token_id), self.tokenizer)

    return PerPromptSampling


def train_runs(out: Path, runs: Sequence[str]) -> None:
    """Train the named runs into `out` (also under ``accelerate launch``): ``straight`` 3 steps; ``first`` 2
    steps, then ``resumed``: ``first`` continued to 3 steps from its checkpoint."""
    from proxim.train import TrainConfig

    cls = _trainer_class()
    for run in runs:
        name, steps, resume = {"straight": ("straight", 3, None), "first": ("first", 2, None), "resumed": ("first", 3, out / "first")}[run]
        config = TrainConfig(**SETTINGS, steps=steps, run_name=name, output_dir=str(out), save_every=0)
        cls(config, rewards=[digit_share], prompts=ROWS, eval_prompts=EVAL, resume=resume).run()


def _launch(args: Sequence[str], tmp_path: Path) -> str:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(PROXIM_CACHE_DIR=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2", "--main_process_port", "0"]
    proc = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _history(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_fsdp_equals_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    import torch

    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    _launch([__file__, str(sharded), "straight", "first", "resumed"], tmp_path)
    train_runs(single, ["straight"])  # this process, alone, on the same 4 prompts x 4 responses per step

    state = json.loads((sharded / "straight" / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["world_size"] == 2
    fsdp, one = _history(sharded / "straight"), _history(single / "straight")
    assert len(fsdp) == len(one) == 3
    for a, b in zip(fsdp, one):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-6)  # the same responses (float32 means of 2 means vs of 16)
        for key in ("loss/total", "loss/policy", "loss/kl", "optim/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    # not trivially equal: the groups' rewards differ, the gradient is not 0, the policy moves away from the (sharded) reference
    assert all(h["optim/grad_norm"] > 0.1 for h in fsdp) and fsdp[-1]["loss/kl"] > 1e-4
    assert max(abs(h["loss/policy"]) for h in fsdp) > 1e-4

    straight, alone = _weights(sharded / "straight" / "model"), _weights(single / "straight" / "model")
    start = _weights(sharded / "straight" / "init")
    assert straight.keys() == alone.keys() == start.keys()
    assert max(float((straight[k] - alone[k]).abs().max()) for k in straight) < 1e-5
    assert max(float((straight[k] - start[k]).abs().max()) for k in straight) > 1e-3  # three updates did move the weights

    # 2 steps, a checkpoint, 1 more step from it == 3 steps straight: bit for bit
    resumed = _weights(sharded / "first" / "model")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert [h["loss/total"] for h in _history(sharded / "first")] == [h["loss/total"] for h in fsdp]
    # the held-out set (3 prompts over 2 processes) was decoded whole, each prompt once
    evaluated = [json.loads(line) for line in (sharded / "straight" / "eval_after.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in evaluated) == sorted(r["prompt"] for r in EVAL)


def test_proxim_train_under_fsdp_with_critic_and_lora(tmp_path: Path) -> None:
    """``-m proxim train`` sharded: PPO (a critic, its own backbone; a reference: the policy with its LoRA adapter off)."""
    from proxim.cli import main

    runs = tmp_path / "runs"
    flags = "--preset ppo --lora-rank 4 --prompts-per-step 4 --group-size 2 --tiny-hidden-size 32 --tiny-layers 1 --tiny-heads 2"
    flags += " --warmstart-steps 0 --quiet --tracker none --steps 2 --eval-size 3 --save-every 1 --run-name ppo"
    _launch(["-m", "proxim", "train", *flags.split(), "--output-dir", str(runs)], tmp_path)
    run = runs / "ppo"
    checkpoint = run / "checkpoints" / "step_000002"
    assert {p.name for p in checkpoint.iterdir()} >= {"adapter_model.safetensors", "critic.safetensors", "optimizer.pt", "rng_rank1.pt"}
    assert (run / "model" / "adapter_model.safetensors").is_file() and not (run / "model" / "model.safetensors").exists()
    history = _history(run)
    assert len(history) == 2 and all("loss/value" in h for h in history)
    # the checkpoint holds full tensors: one process continues it (with a warning about the process count)
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0
    assert len(_history(run)) == 3


def test_fsdp_version_1_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate would shard with FSDP1, whose wrappers proxim does not handle: the error names the fix."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from proxim.errors import ConfigurationError
    from proxim.train.sharding import check_supported

    acc = Accelerator(cpu=True)
    monkeypatch.setattr(acc.state, "distributed_type", DistributedType.FSDP)
    monkeypatch.setattr(acc.state, "fsdp_plugin", FullyShardedDataParallelPlugin(fsdp_version=1), raising=False)
    with pytest.raises(ConfigurationError, match=r"FSDP version 1.*fsdp_version: 2"):
        check_supported(acc)


def test_vllm_with_sharded_training_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """vLLM's weight reload takes whole tensors and the pair has never run: refused before anything is built."""
    from proxim.errors import ConfigurationError
    from proxim.train import TrainConfig, sharding, train

    monkeypatch.setattr(sharding, "is_sharded", lambda accelerator: True)
    with pytest.raises(ConfigurationError, match=r"generator='vllm' with sharded training .*--generator hf"):
        train(TrainConfig(generator="vllm", steps=1, warmstart_steps=0, output_dir=str(tmp_path), quiet=True, tracker="none"))
    assert list(tmp_path.iterdir()) == []  # no run folder was made


if __name__ == "__main__":  # the driver, under accelerate launch: python -m accelerate.commands.launch ... test_fsdp.py OUT RUN...
    from proxim.train.distributed import leave_process_group

    try:
        train_runs(Path(sys.argv[1]), sys.argv[2:])
    finally:
        leave_process_group()
