"""The RLHF pipeline on a tiny budget: sft -> reward-model -> ppo with the reward model, and the Bradley-Terry loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from proxim.train import RewardModelConfig, SFTConfig, TrainConfig, train
from proxim.train.recipes.reward_model import bradley_terry_loss, train_reward_model
from proxim.train.recipes.sft import sft
from proxim.train.rewards import RewardModel

from .helpers import TINY
from .test_offline import PAIRS, write_jsonl


def test_bradley_terry_loss_by_hand() -> None:
    # pair 1: r_w - r_l = 2 - 1 = 1   -> -log sigmoid(1)  = log(1 + e^-1) = 0.31326168751822286
    # pair 2: r_w - r_l = 0 - 1 = -1  -> -log sigmoid(-1) = log(1 + e)    = 1.3132616875182228
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.e)) / 2  # 0.8132616875182228
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_sft_then_reward_model_then_ppo(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    base = {**TINY, "task": "count", "output_dir": runs, "eval_size": 3}
    # 1. SFT on the task's answers (the warm start recipe), saved as a model directory
    supervised = sft(SFTConfig(**{**{k: v for k, v in base.items() if k in SFTConfig.names()}, "warmstart_steps": 40, "run_name": "sft"}))
    sft_dir = supervised.run_dir / "model"
    assert (sft_dir / "config.json").is_file() and (sft_dir / "tokenizer.json").is_file()
    assert supervised.after.loss < supervised.before.loss
    # 2. A reward model on the SFT backbone, from pairs in a file (the first 3 held out)
    pairs = [p for p in PAIRS if isinstance(p["prompt"], str)] * 2
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    rm_base = {k: v for k, v in base.items() if k in RewardModelConfig.names()}
    rm = train_reward_model(
        RewardModelConfig(**{**rm_base, "init": str(sft_dir), "data": str(data), "steps": 3, "prompts_per_step": 4, "warmstart_steps": None, "run_name": "rm"})
    )
    rm_dir = rm.run_dir / "model"
    # the trainer's own loader scores with it; its pairwise accuracy is the one the command reported
    loader = RewardModel(rm_dir, batch_size=2)
    assert loader.model.config.pad_token_id == 256  # the byte tokenizer's <pad>
    held = pairs[:3]
    chosen = loader([p["prompt"] for p in held], [p["chosen"] for p in held])
    rejected = loader([p["prompt"] for p in held], [p["rejected"] for p in held])
    assert rm.after.n == 3
    assert rm.after.accuracy == sum(c > r for c, r in zip(chosen, rejected)) / 3
    # 3. PPO from the SFT model, rewarded by the reward model only, KL (k1, in the reward) to the SFT model
    result = train(TrainConfig(**{**base, "preset": "ppo", "init": str(sft_dir), "reward_model": str(rm_dir), "rewards": [], "run_name": "ppo"}))
    assert not (result.run_dir / "init").exists()  # the SFT directory is the initial policy, as is
    objective = (result.run_dir / "objective.txt").read_text()
    assert "kl_in='reward'" in objective and "critic" in objective
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for h in history:
        assert math.isfinite(h["reward/reward_model"]) and math.isfinite(h["kl/ref"]) and "loss/value" in h
    assert abs(history[0]["kl/ref"]) < 1e-9  # the first rollout is sampled by the reference itself (old log-probs: the sampler's, equal up to rounding)
