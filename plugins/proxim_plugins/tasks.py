"""Built-in tasks: small problems with a verifiable reward, for ``proxim train`` on a laptop CPU.

  arithmetic  two-digit addition, ``"37+45="`` -> ``"82"``; reward 1 for an exact match, else 0.
  reverse     reverse a short lowercase string, ``"rev abcde="`` -> ``"edcba"``; partial credit per character.
  count       count one letter in a short string, ``"count b: abbab="`` -> ``"3"``; exact match.

Completions are compared after stripping surrounding whitespace. Each task's held-out set is fixed
(200 examples drawn from a seed named after the task) and never appears among its training prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

import proxim
from proxim.tasks import Example, Task


def _answers(batch: dict[str, Any], n: int, task: str) -> Sequence[str]:
    answers: Sequence[str] | None = batch.get("answer")
    if answers is None or len(answers) != n:
        raise ValueError(f"task {task!r}: its reward needs batch['answer'], one reference answer per completion.")
    return answers


class Arithmetic(Task):
    """Two-digit addition: ``a+b=`` with a, b uniform in [10, 99]; exact-match reward."""

    name: ClassVar[str] = "arithmetic"
    max_new_tokens: ClassVar[int] = 5  # at most 3 digits and the end-of-sequence token, plus one spare

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append(Example(prompt=f"{a}+{b}=", answer=str(a + b)))
        return out

    def reward(self, prompts: Sequence[str], completions: Sequence[str], **batch: Any) -> list[float]:
        answers = _answers(batch, len(completions), self.name)
        return [float(c.strip() == a) for c, a in zip(completions, answers)]


class Reverse(Task):
    """Reverse a string of 3-6 letters from ``a``-``h``; reward = matching positions / max(len(answer), len(completion))."""

    name: ClassVar[str] = "reverse"
    max_new_tokens: ClassVar[int] = 8

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            s = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
            out.append(Example(prompt=f"rev {s}=", answer=s[::-1]))
        return out

    def reward(self, prompts: Sequence[str], completions: Sequence[str], **batch: Any) -> list[float]:
        answers = _answers(batch, len(completions), self.name)
        scores = []
        for c, a in zip(completions, answers):
            c = c.strip()
            hits = sum(x == y for x, y in zip(c, a))
            scores.append(hits / max(len(a), len(c), 1))
        return scores


class Count(Task):
    """Count the occurrences of one letter in a string of 4-10 letters from ``a``-``c``; exact match."""

    name: ClassVar[str] = "count"
    max_new_tokens: ClassVar[int] = 4

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            s = "".join(rng.choice("abc") for _ in range(rng.randint(4, 10)))
            letter = rng.choice("abc")
            out.append(Example(prompt=f"count {letter}: {s}=", answer=str(s.count(letter))))
        return out

    def reward(self, prompts: Sequence[str], completions: Sequence[str], **batch: Any) -> list[float]:
        answers = _answers(batch, len(completions), self.name)
        return [float(c.strip() == a) for c, a in zip(completions, answers)]


@proxim.hookimpl
def proxim_register_tasks(register: proxim.Register[type[Task]]) -> None:
    register(Arithmetic)
    register(Reverse)
    register(Count)
