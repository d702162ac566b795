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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import attrs
import torch

from proxim.errors import ConfigurationError
from proxim.train.prompts import columns, encode_prompts

if TYPE_CHECKING:
    from proxim.tasks import Task


class RewardSettings(Protocol):
    """The settings of a reward model among the rewards (`proxim.train.sections.Rewards` and ``trust_remote_code``)."""

    @property
    def reward_model(self) -> str | None: ...
    @property
    def reward_model_weight(self) -> float: ...
    @property
    def trust_remote_code(self) -> bool: ...


RewardFn = Callable[..., Sequence[float]]
"""``fn(prompts, completions, **batch) -> list[float]``, one reward per completion."""
RewardSpec = RewardFn | tuple[RewardFn, float]
"""A reward function, or a (function, weight) pair."""


@attrs.frozen
class Reward:
    """One reward function, its weight, and the name its metric is logged under."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def load_function(spec: str) -> RewardFn:
    """The callable named by ``module:attr`` or ``file.py:attr``; `ConfigurationError` naming the spec otherwise."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigurationError(f"reward {spec!r}: write 'package.module:function' or 'path/to/file.py:function' (or 'task').")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigurationError(f"reward {spec!r}: no file {target!r}.")
        module_name = f"proxim_reward_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise ConfigurationError(f"reward {spec!r}: {target}, line {exc.lineno}: {exc.msg}.") from exc
        except Exception as exc:
            raise ConfigurationError(f"reward {spec!r}: running {target} raised {type(exc).__name__}: {exc}.") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigurationError(f"reward {spec!r}: cannot import {target!r}: {exc}") from exc
        except Exception as exc:
            raise ConfigurationError(f"reward {spec!r}: importing {target} raised {type(exc).__name__}: {exc}.") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigurationError(f"reward {spec!r}: {target} has no callable {attr!r}.")
    if not callable(fn):
        raise ConfigurationError(f"reward {spec!r}: {target}.{attr} is a {type(fn).__name__}, not a function.")
    return cast(RewardFn, fn)


def build_rewards(
    specs: Sequence[str],
    weights: Sequence[float],
    task: Task | None,
    *,
    custom: Sequence[RewardSpec] | None = None,
    model: RewardSettings | None = None,
    device: torch.device | str = "cpu",
) -> list[Reward]:
    """The rewards of a run: the `custom` callables when given, else the named `specs` ('task', 'module:fn',
    'file.py:fn') with `weights` (default 1); plus the reward model of `model` when it names one (its
    ``reward_model`` folder, with its ``reward_model_weight``). Names are made unique."""
    out: list[Reward] = []
    if custom:
        for item in custom:
            fn, weight = item if isinstance(item, tuple) else (item, 1.0)
            out.append(Reward(getattr(fn, "__name__", type(fn).__name__), fn, float(weight)))
    else:
        for spec, w in zip(specs, weights or [1.0] * len(specs)):
            if spec == "task":
                if task is None:
                    raise ConfigurationError("the reward 'task' needs a task; name one, or list your own reward functions.")
                out.append(Reward(task.name, task.reward, w))
            else:
                out.append(Reward(spec.rpartition(":")[2], load_function(spec), w))
    if model is not None and model.reward_model is not None:
        scorer = RewardModel(model.reward_model, device, trust_remote_code=model.trust_remote_code)
        out.append(Reward("reward_model", scorer, model.reward_model_weight))
    names = [r.name for r in out]
    return [attrs.evolve(r, name=f"{r.name}_{i}") if names.count(r.name) > 1 else r for i, r in enumerate(out)]


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
            enc = self.tokenizer.pad({"input_ids": encode_prompts(self.tokenizer, texts[i : i + self.batch_size])}, return_tensors="pt").to(self.device)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


def score_rows(
    rewards: Sequence[Reward], rows: Sequence[Mapping[str, Any]], completions: Sequence[str], step: int
) -> tuple[list[float], dict[str, list[float]]]:
    """`score` the completions of prompt rows (the same number of completions for each row, in row order):
    every non-prompt column of the rows and ``step`` reach the reward functions."""
    repeat = len(completions) // max(len(rows), 1)
    batch: dict[str, Any] = {**columns(rows, repeat), "step": step}
    return score(rewards, [r["prompt"] for r in rows for _ in range(repeat)], completions, batch)


class RewardError(ConfigurationError):
    """A reward function that raised, or returned something other than one finite number per completion.

    `reward` names the function; `completion` is one offending completion (None when the fault is not
    one completion's, such as a wrong count)."""

    def __init__(self, reward: str, problem: str, completion: str | None = None):
        shown = f"; for example the completion {completion!r}" if completion is not None else ""
        super().__init__(f"reward {reward!r} {problem}{shown}.")
        self.reward, self.problem, self.completion = reward, problem, completion


def reward_values(reward: Reward, prompts: Sequence[str], completions: Sequence[str], batch: dict[str, Any]) -> list[float]:
    """`reward`'s values for the completions, checked: one finite number each, or `RewardError` saying what went wrong."""
    try:
        raw = reward.fn(list(prompts), list(completions), **batch)
    except Exception as exc:
        raise RewardError(reward.name, f"raised {type(exc).__name__}: {exc}", completions[0] if completions else None) from exc
    if raw is None or isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
        raise RewardError(reward.name, f"returned {type(raw).__name__} {raw!r:.60}, not a list of {len(completions)} numbers (one per completion)")
    if len(raw) != len(completions):
        raise RewardError(reward.name, f"returned {len(raw)} values for {len(completions)} completions")
    values = []
    for value, completion in zip(raw, completions):
        if not isinstance(value, (int, float)) and not (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):  # bools count as 0/1
            raise RewardError(reward.name, f"returned {type(value).__name__} {value!r:.40} where a number belongs", completion)
        number = float(value)
        if not math.isfinite(number):
            raise RewardError(reward.name, f"returned {number}", completion)
        values.append(number)
    return values


def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str], batch: dict[str, Any]) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total per completion, and each function's raw values by name (`RewardError` for a bad reward)."""
    totals = [0.0] * len(completions)
    parts: dict[str, list[float]] = {}
    for reward in rewards:
        values = reward_values(reward, prompts, completions, batch)
        parts[reward.name] = values
        totals = [t + reward.weight * v for t, v in zip(totals, values)]
    return totals, parts


def probe_rewards(rewards: Sequence[Reward], rows: Sequence[Mapping[str, Any]]) -> None:
    """Call every reward once on made-up completions of `rows` (empty, and each row's answer when it has one),
    before anything expensive is built: a reward that cannot score raises `RewardError` in seconds."""
    if not rows:
        return
    completions = [text for r in rows for text in ("", str(r.get("answer", "")))]
    try:
        score_rows(rewards, rows, completions, step=0)
    except RewardError as exc:
        raise RewardError(exc.reward, f"{exc.problem} when tried before training on made-up completions", exc.completion) from exc
