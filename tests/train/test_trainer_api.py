"""The Trainer API: everything given to the constructor is used, the constructor builds everything, and a user
can drive the step's public parts (for example a custom schedule of rewards) without private methods."""

from __future__ import annotations

import json

import pytest

import proxim
from proxim.train import TrainConfig, Trainer, train
from proxim.train.rewards import Reward


def lowercase_share(prompts, completions, **batch):
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def digit_share(prompts, completions, **batch):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _history(run) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rewards_given_to_the_constructor_are_the_rewards_trained_on(tiny_config) -> None:
    # before: Trainer(config, rewards=[fn]).run() trained on config.rewards (the task reward) and ignored fn
    trainer = Trainer(tiny_config(), rewards=[lowercase_share])
    assert [r.name for r in trainer.rewards] == ["lowercase_share"]
    result = trainer.run()
    history = _history(result.run_dir)
    assert all("reward/lowercase_share" in h and "reward/arithmetic" not in h for h in history)
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reward"] == pytest.approx(lowercase_share([], [s["completion"]])[0]) for s in samples)


def test_rewards_and_prompts_in_code_need_no_task(tiny_config) -> None:
    # before: failed with "the reward 'task' needs a task", though the task reward was not used
    rows = [{"prompt": f"say {w}:"} for w in ("cat", "dog", "owl", "bee", "ant", "elk", "cow", "pig")] * 3
    result = train(tiny_config(task=None, eval_size=4, max_new_tokens=4), rewards=[lowercase_share], prompts=rows)
    assert result.after is not None and result.after.n == 4 and result.after.accuracy is None


def test_rewards_given_twice_are_refused(tiny_config) -> None:
    with pytest.raises(proxim.ConfigurationError, match="rewards are given twice"):
        Trainer(tiny_config(rewards=["proxim_plugins.tasks:missing"]), rewards=[lowercase_share])


def test_a_custom_loop_drives_the_public_step(tiny_config) -> None:
    """The constructor builds the run; a loop of the user's switches the reward between steps, then saves."""
    trainer = Trainer(tiny_config(steps=4))
    assert trainer.policy is not None and trainer.generator is not None and trainer.optimization is not None
    seen = []
    for k in range(4):
        trainer.rewards = [Reward("lowercase", lowercase_share) if k < 2 else Reward("digits", digit_share)]
        seen.append(trainer.step(k))
    assert ["reward/lowercase" in m for m in seen] == [True, True, False, False]
    assert ["reward/digits" in m for m in seen] == [False, False, True, True]
    trainer.save(4, train_time=0.0)
    assert (trainer.session.path / "checkpoints" / "step_000004" / "model.safetensors").is_file()


def test_resume_with_more_steps_continues_the_schedule(tiny_config) -> None:
    """The linear schedule spans the first run's updates (its horizon is saved): a resumed run with --steps 4
    continues that curve (lr 0 after the horizon) instead of stretching it over 4 updates."""
    config = tiny_config(steps=2, lr=1e-3, lr_schedule="linear", save_every=1)
    first = train(config, rewards=[lowercase_share])
    resumed = train(TrainConfig(**{**config.to_dict(), "steps": 4}), rewards=[lowercase_share], resume=first.run_dir)
    lrs = [h["optim/lr"] for h in _history(resumed.run_dir)]
    # transformers' linear schedule over 2 updates: the lr for update k+1 after k updates is 1e-3 * (2 - k) / 2
    assert lrs == pytest.approx([5e-4, 0.0, 0.0, 0.0], abs=1e-15)


def test_logged_losses_do_not_depend_on_the_micro_batch_size(tiny_config) -> None:
    """A micro-batch's loss is its share of the minibatch's (normalised by the whole minibatch's count): an update's
    logged ``loss/*`` is their sum, so micro-batching (gradient accumulation) logs the same loss as one forward."""
    whole = _history(train(tiny_config(steps=1, run_name="whole"), rewards=[lowercase_share]).run_dir)
    parts = _history(train(tiny_config(steps=1, run_name="parts", micro_batch_size=3), rewards=[lowercase_share]).run_dir)
    assert whole[0]["loss/policy"] != 0.0
    for key in ("loss/policy", "loss/total"):
        assert parts[0][key] == pytest.approx(whole[0][key], rel=1e-5, abs=1e-7)
