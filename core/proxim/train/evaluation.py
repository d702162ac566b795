"""Held-out evaluation of prompts: greedy decoding, scored by the run's rewards, accuracy by the task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from proxim.train.prompts import encode_prompts
from proxim.train.results import EvalResult
from proxim.train.rewards import Reward, score_rows

if TYPE_CHECKING:
    from proxim.tasks import Task
    from proxim.train.generation import Generator


@torch.no_grad()
def evaluate_prompts(
    rows: Sequence[Mapping[str, Any]],
    *,
    generator: Generator,
    tokenizer: Any,
    rewards: Sequence[Reward],
    task: Task | None,
    max_new_tokens: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[EvalResult, list[dict[str, Any]]]:
    """Process `rank` of `world` decodes its share of `rows` greedily; returns the result over all processes and
    every completion record (prompt, answer, completion, reward, correct: None without a task or an answer)."""
    rows = list(rows)
    mine = rows[rank::world]
    # every process decodes as many prompts (the last ones repeat a row, and are dropped): with sharded models
    # each decoding step is a collective, so every process makes the same generate calls
    decoded = mine + rows[: -(-len(rows) // world) - len(mine)]
    records: list[dict[str, Any]] = []
    if decoded:
        prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in decoded])
        generation = generator.generate(prompt_ids, 1, 1.0, 1.0, max_new_tokens, greedy=True)
        totals, _ = score_rows(rewards, mine, generation.completions[: len(mine)], step=-1)
        for r, completion, total in zip(mine, generation.completions, totals):
            correct = task.correct(completion, r["answer"]) if task is not None and "answer" in r else None
            records.append({"prompt": r["prompt"], "answer": r.get("answer"), "completion": completion, "reward": total, "correct": correct})
    if world > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    flags = [r["correct"] for r in records if r["correct"] is not None]
    accuracy = sum(flags) / len(flags) if flags and len(flags) == len(records) else None
    mean_reward = sum(r["reward"] for r in records) / max(len(records), 1)
    return EvalResult(n=len(records), accuracy=accuracy, mean_reward=mean_reward), records


def task_accuracy(lm: Any, tokenizer: Any, task: Task, max_new_tokens: int, eval_size: int | None = None, batch_size: int = 64) -> float | None:
    """Greedy accuracy of `lm` on the task's held-out prompts (the first `eval_size`), in this process alone."""
    from proxim.train import models
    from proxim.train.hf_generator import HFGenerator

    examples = task.eval_set()[:eval_size] if eval_size else task.eval_set()
    generator = HFGenerator(lm, tokenizer, models.eos_ids(tokenizer, lm), batch_size)
    rows = [{"prompt": e.prompt, "answer": e.answer} for e in examples]
    result, _ = evaluate_prompts(
        rows, generator=generator, tokenizer=tokenizer, rewards=[Reward(task.name, task.reward)], task=task, max_new_tokens=max_new_tokens
    )
    return result.accuracy
