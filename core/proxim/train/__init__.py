"""proxim.train: training on transformers and accelerate (``proxim train``, ``sft``, ``reward-model``, ``compare``).

    from proxim.train import TrainConfig, train
    result = train(TrainConfig(preset="grpo", task="arithmetic", steps=100))
    print(result.before, result.after, result.run_dir)

``train`` with a preference preset (dpo, ipo, hinge) trains offline and returns a `PreferenceRunResult`.
The layout (components and recipes) is described in docs/architecture.md.

Importing this package loads only the configuration; transformers, accelerate and the recipes are
imported on first use of `train`, `Trainer` and the other names below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from proxim.errors import TrainingError
from proxim.train.config import CompareConfig, PreferenceConfig, RewardModelConfig, SFTConfig, TrainConfig

if TYPE_CHECKING:
    from proxim.train.api import compare, train
    from proxim.train.recipes.online import Trainer
    from proxim.train.recipes.preference import PreferenceRunResult, PreferenceTrainer
    from proxim.train.recipes.reward_model import train_reward_model
    from proxim.train.recipes.sft import sft
    from proxim.train.results import EvalResult, RunResult

__all__ = [
    "CompareConfig",
    "EvalResult",
    "PreferenceConfig",
    "PreferenceRunResult",
    "PreferenceTrainer",
    "RewardModelConfig",
    "RunResult",
    "SFTConfig",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "compare",
    "sft",
    "train",
    "train_reward_model",
]

_LAZY = {
    "EvalResult": "proxim.train.results",
    "RunResult": "proxim.train.results",
    "Trainer": "proxim.train.recipes.online",
    "PreferenceRunResult": "proxim.train.recipes.preference",
    "PreferenceTrainer": "proxim.train.recipes.preference",
    "sft": "proxim.train.recipes.sft",
    "train_reward_model": "proxim.train.recipes.reward_model",
    "train": "proxim.train.api",
    "compare": "proxim.train.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'proxim.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
