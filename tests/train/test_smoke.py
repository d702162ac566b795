"""A two-step run of every preset on the tiny model: it trains, logs, checkpoints and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

import proxim
from proxim.train import train

PRESETS = ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "dppo", "drpo", "lampo")


def _registered(name: str) -> bool:
    return name in proxim.available()["preset"]


@pytest.mark.parametrize("preset", PRESETS)
def test_two_steps(preset: str, tiny_config) -> None:
    if not _registered(preset):
        pytest.skip(f"preset {preset!r} is not registered yet")
    config = tiny_config(preset=preset, save_every=1, log_samples=2)
    obj = config.build_objective()
    result = train(config)
    run = result.run_dir
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert math.isfinite(h["loss/total"]), h
        assert h["optim/skipped"] == 0
    # a reference model exists exactly when the objective has a KL term; a critic exactly when it has a critic
    assert ("kl/ref" in history[0]) == ("ref_logprobs" in obj.requires)
    assert ("loss/value" in history[0]) == (obj.has_critic and obj.options.value_coef > 0)
    last = run / "checkpoints" / "step_000002"
    assert (last / "model.safetensors").is_file() and (last / "optimizer.pt").is_file()
    assert (last / "critic.safetensors").is_file() == obj.has_critic
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.after is not None and result.after.n == 8
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2
    assert (Path(run) / "config.toml").is_file() and (Path(run) / "model" / "config.json").is_file()


def _lowercase(prompts, completions, **batch):
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def test_adaptive_kl_moves_the_coefficient(tiny_config) -> None:
    """After each rollout, beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al.)."""
    config = tiny_config(preset="grpo", steps=4, adaptive_kl=True, kl_target=0.01, kl_horizon=10, lr=1e-2)
    result = train(config, rewards=[_lowercase])
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    beta = 0.04  # grpo's kl_coef
    for h in history:  # n = 16 sequences per rollout
        error = min(max(h["kl/ref_sequence"] / 0.01 - 1, -0.2), 0.2)
        beta *= 1 + error * 16 / 10
        assert abs(h["kl/coef"] - beta) < 1e-9
    assert history[0]["kl/coef"] < 0.04  # policy == reference at the first rollout: KL 0, below target
    assert max(h["kl/coef"] for h in history[1:]) > history[0]["kl/coef"]  # the policy moved away: beta grows


def test_eval_every_logs_held_out_numbers_between_before_and_after(tiny_config) -> None:
    result = train(tiny_config(steps=4, eval_every=2))
    run = result.run_dir
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ["eval/accuracy" in h for h in history] == [False, True, False, False]  # step 4 is the "after" evaluation
    completions = [json.loads(line) for line in (run / "eval_step_000002.jsonl").read_text().splitlines()]
    assert len(completions) == 8
    assert history[1]["eval/accuracy"] == sum(c["correct"] for c in completions) / 8
    assert history[1]["eval/mean_reward"] == pytest.approx(sum(c["reward"] for c in completions) / 8)


def test_sampler_old_logprobs_equal_a_recomputed_forward(tiny_config) -> None:
    """--old-logprobs sampler: the generator's recorded log-probs stand in for the policy forward after sampling."""
    import torch

    from proxim.train import Trainer
    from proxim.train.logprobs import response_logprobs

    trainer = Trainer(tiny_config(old_logprobs="sampler", warmstart_steps=20))
    rows = trainer.prompts.batch(0, 0, 1, 4)  # the public parts of a step, driven by hand
    generation = trainer.sample(rows)
    batch = trainer.rollout(generation, trainer.score(rows, generation, step=0))
    with torch.no_grad():
        recomputed, _ = response_logprobs(trainer.policy, generation, torch.arange(batch.batch_size), temperature=1.0)
    mask = batch.mask
    assert bool(mask.any())
    torch.testing.assert_close(batch.old_logprobs[mask], recomputed[mask], rtol=0, atol=1e-5)
    assert bool((batch.old_logprobs[~mask] == 0).all())


def test_sampler_old_logprobs_refuse_a_nucleus(tiny_config) -> None:
    with pytest.raises(proxim.ConfigurationError, match="old_logprobs='sampler' needs top_p=1"):
        tiny_config(old_logprobs="sampler", top_p=0.9).check()


@pytest.mark.parametrize(
    ("settings", "precision", "expected"),
    [
        ({}, "no", "sampler"),
        ({"top_p": 0.9}, "no", "recompute"),
        ({}, "bf16", "recompute"),
        ({"generator": "vllm"}, "no", "recompute"),
        ({"set": {"rollout_correction": "tis"}}, "no", "recompute"),
        ({"old_logprobs": "recompute"}, "no", "recompute"),
        ({"old_logprobs": "sampler"}, "bf16", "sampler"),
    ],
)
def test_auto_old_logprobs_take_the_sampler_only_where_it_is_the_forward(tiny_config, settings, precision, expected) -> None:
    config = tiny_config(**settings)
    objective = proxim.objective("grpo", **config.set)
    generator = SimpleNamespace(name=config.generator, forward_logprobs=config.generator == "hf")  # as the two built-ins declare
    source, reason = config.old_logprobs_source(objective, precision, generator)
    assert source == expected, reason
    if config.old_logprobs == "auto" and expected == "recompute":
        assert reason.startswith("auto: ") and len(reason) > len("auto: ")


def test_only_the_hf_generator_declares_forward_logprobs() -> None:
    """vLLM's kernels are not the trainer's: its records are never taken as old log-probs by ``auto``."""
    from proxim.train.hf_generator import HFGenerator
    from proxim.train.vllm_generator import VLLMGenerator

    assert HFGenerator.forward_logprobs is True
    assert VLLMGenerator.forward_logprobs is False
