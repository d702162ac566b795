"""proxim.train: the online RL trainer on transformers and accelerate (``proxim train``).

    from proxim.train import TrainConfig, train
    result = train(TrainConfig(preset="grpo", task="arithmetic", steps=100))
    print(result.before, result.after, result.run_dir)

``train`` with a preference preset (dpo, ipo, hinge) trains offline and returns a `PreferenceRunResult`.

Importing this package loads only the configuration; transformers, accelerate and the loop are
imported on first use of `train`, `Trainer` and the other names below.
"""

from __future__ import annotations

from typing import Any

from proxim.train.config import TrainConfig

__all__ = ["EvalResult", "PreferenceRunResult", "RunResult", "TrainConfig", "Trainer", "TrainingError", "compare", "train"]

_LAZY = {
    "EvalResult": "proxim.train.loop",
    "RunResult": "proxim.train.loop",
    "Trainer": "proxim.train.loop",
    "TrainingError": "proxim.train.loop",
    "train": "proxim.train.loop",
    "compare": "proxim.train.compare",
    "PreferenceRunResult": "proxim.train.offline",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'proxim.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
