"""Prompt sources: where each step's prompts and the held-out prompts come from (a task, rows, a JSONL file).

A row is a dict with a ``"prompt"`` string and any other columns (``"answer"`` for the built-in tasks);
every column except the prompt reaches the reward functions as a keyword argument, one value per
completion. Draws are a pure function of (seed, step, process), so a resumed run sees the same prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from proxim.errors import ConfigurationError
from proxim.tasks import Task

Row = dict[str, Any]


class PromptSource(Protocol):
    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        """The `n` prompts process `rank` (of `world`) trains on at `step`."""
        ...

    def eval_rows(self) -> list[Row]:
        """The fixed held-out prompts."""
        ...


class TaskSource:
    """Prompts drawn from a task; the held-out set is the task's and never appears in training."""

    def __init__(self, task: Task, seed: int, eval_size: int | None = None):
        self.task, self.seed, self.eval_size = task, seed, eval_size

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        rng = random.Random(f"proxim-train-{self.task.name}-{self.seed}-{step}-{rank}")
        return [{"prompt": e.prompt, "answer": e.answer} for e in self.task.train_examples(rng, n)]

    def eval_rows(self) -> list[Row]:
        rows = [{"prompt": e.prompt, "answer": e.answer} for e in self.task.eval_set()]
        return rows[: self.eval_size] if self.eval_size else rows


class TaskWithHeldOut:
    """A task's training prompts, with held-out rows given separately."""

    def __init__(self, task: Task, seed: int, held_out: Sequence[Mapping[str, Any]]):
        self.inner, self.held_out = TaskSource(task, seed), [dict(r) for r in held_out]

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        return self.inner.batch(step, rank, world, n)

    def eval_rows(self) -> list[Row]:
        return [dict(r) for r in self.held_out]


class NoPrompts:
    """No prompts at all (an offline run without a task: only its pairs are evaluated)."""

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        return []

    def eval_rows(self) -> list[Row]:
        return []


class RowSource:
    """Prompts from rows (a JSONL file, a list of dicts, a `datasets.Dataset`), reshuffled every pass.

    Without separate held-out rows, the first `eval_size` rows (default 10%, at most 200) are held out.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        seed: int,
        eval_rows: Sequence[Mapping[str, Any]] | None = None,
        eval_size: int | None = None,
        origin: str = "prompts",
    ):
        rows = [_check_row(r, origin, i) for i, r in enumerate(rows)]
        if eval_rows is None:
            k = eval_size if eval_size is not None else min(200, len(rows) // 10)
            eval_rows, rows = rows[:k], rows[k:]
        else:
            eval_rows = [_check_row(r, f"{origin} (held-out)", i) for i, r in enumerate(eval_rows)]
            if eval_size is not None:
                eval_rows = eval_rows[:eval_size]
        if not rows:
            raise ConfigurationError(f"{origin}: no training prompts left after holding out {len(eval_rows)} for evaluation.")
        self.rows, self.held_out, self.seed = rows, list(eval_rows), seed
        self._orders: dict[int, list[int]] = {}

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        start = (step * world + rank) * n
        return [self._at(start + i) for i in range(n)]

    def _at(self, index: int) -> Row:
        epoch, pos = divmod(index, len(self.rows))
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(self.rows)))
            random.Random(f"proxim-rows-{self.seed}-{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return dict(self.rows[order[pos]])

    def eval_rows(self) -> list[Row]:
        return [dict(r) for r in self.held_out]


def _check_row(row: Any, origin: str, index: int, line: bool = False) -> Row:
    where = f"{origin}:{index}" if line else f"{origin}: row {index}"
    if not isinstance(row, Mapping):
        raise ConfigurationError(
            f'{where}: expected a JSON object such as {{"prompt": "2+2=", "answer": "4"}}, got {type(row).__name__} {json.dumps(row)[:60]}.'
        )
    if not isinstance(row.get("prompt"), str):
        raise ConfigurationError(f"{where} has no string 'prompt' field: {dict(row)!r}.")
    return dict(row)


def read_jsonl(path: str | Path) -> list[Row]:
    """The rows of a JSONL prompts file: one JSON object per line with a string "prompt"; errors name the line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigurationError(f"{path}:{n}: not JSON: {exc}") from exc
                rows.append(_check_row(row, str(path), n, line=True))
    return rows


def columns(rows: Sequence[Mapping[str, Any]], repeat: int) -> dict[str, list[Any]]:
    """Every non-prompt column, each value repeated `repeat` times (one per sampled response)."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k != "prompt" and k not in keys)
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in keys}


def as_rows(data: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Rows from any iterable of mappings (a list of dicts, a `datasets.Dataset`)."""
    return [dict(r) for r in data]


def prompt_source(
    task: Task | None,
    seed: int,
    *,
    rows: Iterable[Mapping[str, Any]] | None = None,
    prompts_file: str | None = None,
    held_out: Iterable[Mapping[str, Any]] | None = None,
    eval_prompts_file: str | None = None,
    eval_size: int | None = None,
) -> PromptSource:
    """The run's prompts: `rows` given in code, else `prompts_file`, else the task's; held out: `held_out`, else
    `eval_prompts_file`, else the task's held-out set (or the first `eval_size` rows of the training rows)."""
    evaluation = as_rows(held_out) if held_out is not None else read_jsonl(eval_prompts_file) if eval_prompts_file else None
    if rows is not None:
        return RowSource(as_rows(rows), seed, evaluation, eval_size, origin="prompts")
    if prompts_file:
        return RowSource(read_jsonl(prompts_file), seed, evaluation, eval_size, origin=prompts_file)
    if task is None:
        return NoPrompts()
    if evaluation is not None:
        return TaskWithHeldOut(task, seed, evaluation[:eval_size] if eval_size else evaluation)
    return TaskSource(task, seed, eval_size)
