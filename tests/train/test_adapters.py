"""LoRA adapters (peft) and gradient checkpointing, in every recipe where they make sense."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from proxim.train import RewardModelConfig, SFTConfig, TrainConfig, Trainer, train
from proxim.train.adapters import WithoutAdapter

from .helpers import TINY
from .test_offline import OFFLINE_TINY, PAIRS, write_jsonl

pytest.importorskip("peft")

LORA = {"lora_rank": 4, "lora_alpha": 8.0}


def lowercase_share(prompts, completions, **batch):
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def _history(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_trains_the_adapter_only_against_the_same_model_without_it(tiny_config) -> None:
    trainer = Trainer(tiny_config(steps=3, lr=1e-2, **LORA, merge_lora=True, old_logprobs="recompute"), rewards=[lowercase_share])
    assert isinstance(trainer.reference, WithoutAdapter)
    policy_weights = {p.data_ptr() for p in trainer.lm.parameters()}
    assert {p.data_ptr() for p in trainer.reference.parameters()} <= policy_weights  # no second copy of the model
    trainable = [n for n, p in trainer.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in trainer.lm.named_parameters() if not p.requires_grad}
    result = trainer.run()
    history = _history(result.run_dir)
    assert history[0]["kl/ref"] == 0.0  # the adapter starts at zero: the policy is the reference at the first rollout (recomputed: same forward)
    assert history[-1]["kl/ref"] > 0.0  # and moves away from it
    model = result.run_dir / "model"
    assert (model / "adapter_config.json").is_file() and (model / "adapter_model.safetensors").is_file() and not (model / "model.safetensors").exists()
    checkpoint = result.run_dir / "checkpoints" / "step_000003"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    merged = result.run_dir / "model-merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    # the frozen base weights did not move; the merged model differs from the initial one by exactly the adapter
    initial = load_file(str(result.run_dir / "init" / "model.safetensors"))
    merged_weights = load_file(str(merged / "model.safetensors"))
    assert all(torch.equal(p, base_before[n]) for n, p in trainer.lm.named_parameters() if n in base_before)
    moved = [k for k in initial if not torch.equal(initial[k], merged_weights[k])]
    assert moved and all("proj" in k for k in moved)  # only the adapted linear layers changed


def test_a_merged_model_scores_like_the_adapted_one(tiny_config) -> None:
    from peft import PeftModel

    from proxim.train.models import byte_tokenizer, load_causal_lm

    result = train(tiny_config(steps=2, lr=3e-2, **LORA, merge_lora=True), rewards=[lowercase_share])
    tok = byte_tokenizer()
    ids = torch.tensor([tok("12+34=46")["input_ids"]])
    adapted = PeftModel.from_pretrained(load_causal_lm(result.run_dir / "init"), str(result.run_dir / "model"))
    merged = load_causal_lm(result.run_dir / "model-merged")
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_lora_run_resumes_exactly(tiny_config) -> None:
    full = train(tiny_config(steps=4, save_every=2, **LORA, run_name="full"), rewards=[lowercase_share])
    half = train(tiny_config(steps=2, save_every=2, **LORA, run_name="half"), rewards=[lowercase_share])
    resumed = train(TrainConfig(**{**tiny_config(steps=4, save_every=2, **LORA, run_name="half").to_dict()}), rewards=[lowercase_share], resume=half.run_dir)
    want = load_file(str(full.run_dir / "checkpoints" / "step_000004" / "adapter_model.safetensors"))
    got = load_file(str(resumed.run_dir / "checkpoints" / "step_000004" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [h["loss/total"] for h in _history(resumed.run_dir)] == [h["loss/total"] for h in _history(full.run_dir)]


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_gradient_checkpointing_changes_no_number(preset: str, tiny_config) -> None:
    """Recomputing activations in the backward pass gives the gradients of keeping them (policy and, for ppo, critic)."""
    plain = train(tiny_config(preset=preset, steps=2, lr=1e-2, run_name="plain"), rewards=[lowercase_share])
    checkpointed = train(tiny_config(preset=preset, steps=2, lr=1e-2, gradient_checkpointing=True, run_name="gc"), rewards=[lowercase_share])
    for a, b in zip(_history(plain.run_dir), _history(checkpointed.run_dir)):
        assert a["loss/total"] == pytest.approx(b["loss/total"], abs=1e-6)
        assert a["optim/grad_norm"] == pytest.approx(b["optim/grad_norm"], rel=1e-5)


def test_lora_in_the_offline_recipes(tmp_path: Path) -> None:
    base = {k: v for k, v in TINY.items() if k in SFTConfig.names()} | {"output_dir": str(tmp_path / "runs"), **LORA}
    records = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"count a: {'a' * n}=", "response": str(n)} for n in range(1, 13)])
    from proxim.train import sft, train_reward_model

    supervised = sft(SFTConfig(**{**base, "task": None, "data": str(records), "warmstart_steps": 3, "eval_size": 2, "run_name": "sft"}))
    assert (supervised.run_dir / "model" / "adapter_config.json").is_file() and supervised.after is not None
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [p for p in PAIRS if isinstance(p["prompt"], str)] * 3)
    rm_base = {k: v for k, v in base.items() if k in RewardModelConfig.names()}
    rm = train_reward_model(
        RewardModelConfig(**{**rm_base, "task": None, "data": str(pairs), "steps": 2, "prompts_per_step": 4, "eval_size": 3, "run_name": "rm"})
    )
    assert (rm.run_dir / "model" / "adapter_config.json").is_file()
    offline = {**OFFLINE_TINY, **LORA, "output_dir": str(tmp_path / "runs"), "preset": "dpo", "task": None, "data": str(pairs), "eval_size": 3}
    dpo = train(TrainConfig(**{**offline, "run_name": "dpo", "prompts_per_step": 4}))
    assert (dpo.run_dir / "model" / "adapter_config.json").is_file()
