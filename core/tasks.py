"""Tasks: prompt sources with a verifiable reward and a fixed held-out set, registered by plugins.

A task is a class with a `name`, registered through the ``proxim_register_tasks(register)`` hook.
The trainer (``proxim.train``) samples prompts from it and scores completions with its reward.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import attrs


@attrs.frozen
class Example:
    """One prompt and the reference answer the reward checks against."""

    prompt: str
    answer: str


class Task:
    """Base class of tasks. Subclasses set `name` and implement `sample` and `reward`."""

    kind: ClassVar[str] = "task"
    name: ClassVar[str]
    #: Size of the fixed held-out evaluation set.
    eval_size: ClassVar[int] = 200

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        """`n` fresh training examples drawn with `rng`."""
        raise NotImplementedError

    def reward(self, prompts: list[str], completions: list[str], **batch: Any) -> list[float]:
        """One reward per completion; ``batch["answer"]`` holds the reference answers."""
        raise NotImplementedError

    def eval_set(self) -> list[Example]:
        """The fixed held-out set: the same examples on every call and every machine."""
        return self.sample(random.Random(f"proxim-eval-{self.name}"), self.eval_size)
