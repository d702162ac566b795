"""The entry points of training from Python: `train` (online RL, or offline for a preference preset) and `compare`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import proxim
from proxim.errors import ConfigurationError
from proxim.train.config import CompareConfig, TrainConfig
from proxim.train.recipes import compare as comparison
from proxim.train.recipes import online, preference
from proxim.train.results import RunResult
from proxim.train.rewards import RewardSpec


def train(
    config: TrainConfig | None = None,
    *,
    objective: proxim.Objective | proxim.PreferenceObjective | None = None,
    rewards: Sequence[RewardSpec] | None = None,
    prompts: Iterable[Mapping[str, Any]] | None = None,
    eval_prompts: Iterable[Mapping[str, Any]] | None = None,
    resume: str | os.PathLike[str] | None = None,
    registry: proxim.Registry | None = None,
) -> RunResult:
    """Run one training run and return its `RunResult`.

    config:       a `TrainConfig` (default: the embedded demo, GRPO on arithmetic).
    objective:    a composed `proxim.Objective` to use instead of the config's preset/parts.
    rewards:      reward callables ``fn(prompts, completions, **batch) -> list[float]``, or (fn, weight)
                  pairs, instead of the config's reward specs.
    prompts:      rows with a "prompt" (a list of dicts or a `datasets.Dataset`) instead of the task's.
    eval_prompts: held-out rows; default the task's held-out set, or the first rows of `prompts`.
    resume:       a run folder to continue from its latest checkpoint.

    The preset's training regime (`proxim.Preset.training`, e.g. PPO's 4 epochs) fills the settings the
    config was not given (`TrainConfig.with_preset_training`).

    A preference objective (preset dpo, ipo or hinge) trains offline instead (`proxim.train.recipes.preference`)
    with the config's `PreferenceConfig` settings, and returns a `PreferenceRunResult`.
    """
    config = config or TrainConfig()
    if isinstance(objective, proxim.PreferenceObjective) or (objective is None and config.is_offline(registry)):
        given = [name for name, value in (("rewards", rewards), ("prompts", prompts), ("eval_prompts", eval_prompts)) if value is not None]
        if given:
            raise ConfigurationError(
                f"{', '.join(given)}: not for an offline preference objective, which trains on pairs (config.data, or pairs built from the task)."
            )
        chosen = objective if isinstance(objective, proxim.PreferenceObjective) else None
        return preference.train_offline(config.offline(), objective=chosen, resume=resume, registry=registry)
    assert not isinstance(objective, proxim.PreferenceObjective)  # for the type checker: handled above
    config, _ = config.with_preset_training(registry, preset=None if objective is None else objective.preset or "")
    trainer = online.Trainer(config, objective=objective, rewards=rewards, prompts=prompts, eval_prompts=eval_prompts, resume=resume, registry=registry)
    return trainer.run()


def compare(config: CompareConfig, presets: Sequence[str], name: str | None = None) -> list[RunResult]:
    """Train `config` once per preset (`train`) and write the comparison (`proxim.train.recipes.compare`)."""
    return comparison.compare(config, presets, run=train, name=name)
