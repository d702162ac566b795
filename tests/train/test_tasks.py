"""The built-in tasks and the task hook: rewards by hand, fixed held-out sets, a plugin's own task."""

from __future__ import annotations

import json
import random
import types
from typing import Any, ClassVar

import proxim
from proxim.tasks import Example, Task
from proxim.train import train


def test_builtin_tasks_are_registered() -> None:
    registry = proxim.default_registry()
    for name in ("arithmetic", "reverse", "count"):
        cls = registry.get("task", name)
        assert issubclass(cls, Task) and cls.name == name
        assert registry.info("task", name).distribution == "proxim"


def test_arithmetic_reward_is_exact_match() -> None:
    task = proxim.default_registry().get("task", "arithmetic")()
    examples = task.sample(random.Random(1), 50)
    for e in examples:
        a, b = e.prompt.rstrip("=").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and e.answer == str(int(a) + int(b))
    assert task.reward(["37+45="] * 4, ["82", " 82\n", "83", "820"], answer=["82"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert task.correct("82", "82") and not task.correct("8", "82")


def test_reverse_gives_partial_credit_per_character() -> None:
    task = proxim.default_registry().get("task", "reverse")()
    e = task.sample(random.Random(0), 1)[0]
    assert e.prompt == f"rev {e.answer[::-1]}="
    # answer "dcba": 3 of 4 positions right; 4 of max(4, 5) = 0.8; nothing; all
    got = task.reward(["rev abcd="] * 4, ["dcxa", "dcbaa", "", "dcba"], answer=["dcba"] * 4)
    assert got == [0.75, 0.8, 0.0, 1.0]


def test_count_reward() -> None:
    task = proxim.default_registry().get("task", "count")()
    for e in task.sample(random.Random(2), 30):
        letter, s = e.prompt[len("count ")], e.prompt.split(": ")[1].rstrip("=")
        assert e.answer == str(s.count(letter))
    assert task.reward(["count a: aab="] * 2, ["2", "3"], answer=["2", "2"]) == [1.0, 0.0]


def test_held_out_sets_are_fixed_and_never_trained_on() -> None:
    for name in ("arithmetic", "reverse", "count"):
        cls = proxim.default_registry().get("task", name)
        first, second = cls().eval_set(), cls().eval_set()
        assert first == second and len(first) == 200
        held_out = {e.prompt for e in first}
        drawn = cls().train_examples(random.Random(3), 2000)
        assert len(drawn) == 2000 and not held_out & {e.prompt for e in drawn}


class Double(Task):
    """A task a plugin adds without touching proxim: ``2*x=`` -> ``2x``."""

    name: ClassVar[str] = "double"
    eval_size: ClassVar[int] = 6
    max_new_tokens: ClassVar[int] = 5

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        return [Example(prompt=f"2*{x}=", answer=str(2 * x)) for x in (rng.randint(1, 499) for _ in range(n))]

    def reward(self, prompts: Any, completions: Any, **batch: Any) -> list[float]:
        return [float(c.strip() == a) for c, a in zip(completions, batch["answer"])]


def test_a_plugin_task_trains_through_the_hook(tiny_config) -> None:
    plugin = types.ModuleType("my_tasks")
    plugin.proxim_register_tasks = proxim.hookimpl(lambda register: register(Double))  # type: ignore[attr-defined]
    registry = proxim.build_registry(plugins=[("my_tasks", plugin)])
    assert registry.get("task", "double") is Double
    result = train(tiny_config(task="double", eval_size=None), registry=registry)
    rows = [json.loads(line) for line in (result.run_dir / "eval_after.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [e.prompt for e in Double().eval_set()]
