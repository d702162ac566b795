"""Tasks: prompt sources with a verifiable reward and a fixed held-out set, registered by plugins.

A task is a class with a `name`, registered through the ``proxim_register_tasks(register)`` hook::

    import random
    import proxim
    from proxim.tasks import Example, Task

    class Double(Task):
        name = "double"
        max_new_tokens = 6

        def sample(self, rng: random.Random, n: int) -> list[Example]:
            xs = [rng.randint(1, 499) for _ in range(n)]
            return [Example(prompt=f"2*{x}=", answer=str(2 * x)) for x in xs]

        def reward(self, prompts, completions, **batch):
            return [float(c.strip() == a) for c, a in zip(completions, batch["answer"])]

    @proxim.hookimpl
    def proxim_register_tasks(register):
        register(Double)

The trainer (``proxim.train``) draws training prompts with `train_examples` (which never returns a
held-out prompt), scores completions with `reward`, warm-starts on `completion(example)`, and reports
held-out accuracy with `correct` on `eval_set()`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
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
    eval_size: ClassVar[int] = 200
    """Size of the fixed held-out evaluation set."""
    max_new_tokens: ClassVar[int] = 16
    """A generation limit (tokens of a byte-level tokenizer, EOS included) long enough for a correct answer."""

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        """`n` fresh examples drawn with `rng` (deterministic given the state of `rng`)."""
        raise NotImplementedError

    def reward(self, prompts: Sequence[str], completions: Sequence[str], **batch: Any) -> list[float]:
        """One reward per completion; ``batch["answer"]`` holds the reference answers."""
        raise NotImplementedError

    def correct(self, completion: str, answer: str) -> bool:
        """Whether a completion counts as solved in the accuracy column: by default, reward >= 1."""
        return self.reward([""], [completion], answer=[answer])[0] >= 1.0

    def completion(self, example: Example) -> str:
        """The target completion for supervised warm-starting (before the end-of-sequence token)."""
        return example.answer

    def eval_set(self) -> list[Example]:
        """The fixed held-out set: the same examples on every call and every machine."""
        return self.sample(random.Random(f"proxim-eval-{self.name}"), self.eval_size)

    def train_examples(self, rng: random.Random, n: int) -> list[Example]:
        """`n` training examples drawn with `rng`, never one whose prompt is in `eval_set()`."""
        held_out = self._held_out_prompts()
        out: list[Example] = []
        for _ in range(100):
            out.extend(e for e in self.sample(rng, n - len(out)) if e.prompt not in held_out)
            if len(out) >= n:
                return out[:n]
        raise RuntimeError(f"task {self.name!r}: could not draw {n} training prompts outside its held-out set.")

    def _held_out_prompts(self) -> frozenset[str]:
        cached = self.__dict__.get("_held_out")
        if cached is None:
            cached = frozenset(e.prompt for e in self.eval_set())
            self.__dict__["_held_out"] = cached
        return cached
