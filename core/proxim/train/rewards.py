"""Rewards: Python callables with weights, and sequence-classification reward models.

A reward function is ``fn(prompts, completions, **batch) -> list[float]``, one float per completion.
``batch`` holds ``answer`` (reference answers, when the prompts have them), every other column of a
prompts file, and ``step``. Several functions combine as a weighted sum; each one's mean is logged as
``reward/<name>``.

Named in a config as:
  ``task``                  the task's own reward (the default)
  ``package.module:func``   an importable function
  ``path/to/file.py:func``  a function in a Python file
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
import torch

RewardFn = Callable[..., Sequence[float]]


@attrs.frozen
class Reward:
    """One reward function, its weight, and the name its metric is logged under."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def load_function(spec: str) -> RewardFn:
    """The callable named by ``module:attr`` or ``file.py:attr``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"reward {spec!r}: write 'package.module:function' or 'path/to/file.py:function' (or 'task').")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"reward {spec!r}: no file {target!r}.")
        module_name = f"proxim_reward_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ImportError(f"reward {spec!r}: cannot import {target!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"reward {spec!r}: {target} has no callable {attr!r}.")
    if not callable(fn):
        raise TypeError(f"reward {spec!r}: {target}.{attr} is a {type(fn).__name__}, not a function.")
    return cast(RewardFn, fn)


class RewardModel:
    """A transformers sequence-classification model as a reward: the score of ``prompt + completion``.

    The model must have one output label (``num_labels=1``); its logit is the reward. Texts are scored
    in batches of `batch_size`, padded on the side the tokenizer asks for; transformers reads the score at
    each sequence's last non-pad token.
    """

    def __init__(self, path: str | os.PathLike[str], device: torch.device | str = "cpu", batch_size: int = 64, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"reward model {str(path)!r} is not a local directory (save one with save_pretrained).")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=trust_remote_code, dtype=torch.float32)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path}: expected one output label (a scalar score), found num_labels={self.model.config.num_labels}.")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.__name__ = f"reward_model({Path(path).name})"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **batch: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True).to(self.device)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str], batch: dict[str, Any]) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total per completion, and each function's raw values by name."""
    totals = [0.0] * len(completions)
    parts: dict[str, list[float]] = {}
    for reward in rewards:
        values = [float(v) for v in reward.fn(list(prompts), list(completions), **batch)]
        if len(values) != len(completions):
            raise ValueError(f"reward {reward.name!r} returned {len(values)} values for {len(completions)} completions.")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward {reward.name!r} returned a non-finite value at completion {bad[0]} ({completions[bad[0]]!r}): {values[bad[0]]}.")
        parts[reward.name] = values
        totals = [t + reward.weight * v for t, v in zip(totals, values)]
    return totals, parts
