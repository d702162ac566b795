"""Supervised fine-tuning: ``proxim sft [--data sft.jsonl]``, the first stage of the RLHF pipeline.

Without ``--data`` it trains on the task's reference answers: exactly the warm start of ``proxim train``
(`proxim.train.warmstart`: same settings, same cache), saved as a model directory, so that
``proxim train --init RUN/model`` and ``proxim reward-model --init RUN/model`` start from it. With
``--data`` it trains on ``{"prompt", "response"}`` records (`proxim.train.records`): ``prompt -> response
<eos>``, loss on the response (`proxim.train.supervised.SupervisedStep`, the same step as the warm start),
with checkpoints and ``--resume`` like every recipe; the first `eval_size` records (default 10%, at most
200) are held out.

Before and after, it reports the held-out loss (mean negative log-likelihood per response token) and,
with a task, the held-out accuracy with greedy decoding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

import proxim
from proxim.errors import ConfigurationError
from proxim.figures import informative, write_figure
from proxim.tasks import Task
from proxim.train import adapters, distributed, models
from proxim.train.config import SFTConfig
from proxim.train.evaluation import task_accuracy
from proxim.train.loop import Outcome
from proxim.train.optimization import Optimization, parameter_groups
from proxim.train.panels import supervised_panels
from proxim.train.prompts import RowSource
from proxim.train.records import SUPERVISED_FIELDS, Record, read_records, render_prompts
from proxim.train.reporting import before_after_table, number, pct
from proxim.train.run_folder import default_name
from proxim.train.session import Session
from proxim.train.step_sections import SupervisedOptimizer
from proxim.train.supervised import SupervisedStep, record_batches, supervised_loss
from proxim.train.warmstart import warm_start


@attrs.frozen
class SupervisedEval:
    """Held-out records: mean NLL per response token, and the task's greedy accuracy (None without a task)."""

    n: int
    loss: float
    accuracy: float | None


@attrs.frozen
class SupervisedResult:
    run_dir: Path
    steps: int
    before: SupervisedEval
    after: SupervisedEval | None
    wall_time: float
    interrupted: int | None = None


def sft(config: SFTConfig, *, resume: str | os.PathLike[str] | None = None, registry: proxim.Registry | None = None) -> SupervisedResult:
    """Fine-tune the starting model (`config.model`, or the built-in tiny model) and save it; see the module docstring."""
    t_start = time.perf_counter()
    reg = registry or proxim.default_registry()
    config.check(reg)
    records = read_records(config.data, SUPERVISED_FIELDS) if config.data is not None else None  # before any model is built
    session = Session(config, resume)
    task = config.load_task(reg)
    session.open(config.run_name or default_name("sft", Path(config.data).stem if config.data else config.task or "records"))
    steps = config.warmstart_steps if config.warmstart_steps is not None else config.warmstart_steps_for(None)
    lm, tokenizer, identity = models.start_policy(config, config.seed)
    lm.to(session.accelerator.device)
    if records is None:  # the task's answers: the warm start itself, from the same cache
        assert task is not None
        session.begin()
        held_out = [{"prompt": e.prompt, "response": task.completion(e)} for e in _held_out_examples(task, config.eval_size)]
        before = _evaluate(lm, tokenizer, held_out, task, config)
        if config.gradient_checkpointing:
            adapters.enable_checkpointing(lm)  # the same numbers, less memory
        entry, hit = warm_start(
            lm, tokenizer, task, model_identity=identity, steps=steps, settings=config, seed=config.seed, accelerator=session.accelerator,
            progress=session.progress.enabled, optimizer=SupervisedOptimizer.of(config),
        )  # fmt: skip
        session.progress.say(f"warm start: {steps} supervised steps on {task.name}, {'loaded from the cache' if hit else 'trained and cached'} ({entry})")
        outcome = Outcome(steps, None, time.perf_counter() - t_start)
    else:
        lm, held_out, before, outcome = _on_records(session, config, lm, tokenizer, records, task, steps)
    if outcome.interrupted is not None:
        return SupervisedResult(session.path, outcome.steps, before, None, time.perf_counter() - t_start, outcome.interrupted)
    after = _evaluate(lm, tokenizer, held_out, task, config)
    result = SupervisedResult(session.path, outcome.steps, before, after, time.perf_counter() - t_start)
    session.folder.store_eval("before", attrs.asdict(before))
    session.folder.store_eval("after", attrs.asdict(after))
    if session.is_main:
        write_figure(session.path / "plot.png", informative(supervised_panels(session.folder.history())), title=f"sft: {outcome.steps} steps")
    session.folder.write_summary(supervised_table(result))
    session.save_trained(lm, tokenizer, config.merge_lora)  # last: merging changes the model
    session.accelerator.wait_for_everyone()
    return result


def _on_records(
    session: Session, config: SFTConfig, lm: Any, tokenizer: Any, records: list[Record], task: Task | None, steps: int
) -> tuple[Any, list[Record], SupervisedEval, Outcome]:
    """Train on ``{"prompt", "response"}`` records through the step loop: (the model, the held-out records, the
    evaluation before, how the loop ended)."""
    acc = session.accelerator
    train_rows, held_out = _split(config, tokenizer, records)
    lm = adapters.prepare(lm, config, config.seed)  # LoRA and gradient checkpointing, as asked
    optimization = Optimization(acc, parameter_groups([(lm, config.warmstart_lr)]), config, horizon=steps)
    (prepared,) = optimization.prepare(lm)
    found = session.folder.load_eval("before") if session.resume else None
    before = SupervisedEval(**found) if found else _evaluate(lm, tokenizer, held_out, task, config)
    session.folder.store_eval("before", attrs.asdict(before))
    if session.resume is not None:
        session.restore({"model": lm}, optimization)
    session.begin()
    source = RowSource(train_rows, config.seed, held_out, origin=config.data or "records")
    batches = record_batches(source, tokenizer, config.warmstart_batch_size, session.rank, session.world, acc.device)
    step = SupervisedStep(prepared, batches, optimization, config.micro_batch_size)

    def save(completed: int, train_time: float) -> None:
        session.save(completed, train_time, {"model": lm}, optimization, {"proxim": proxim.__version__})

    outcome = session.run_steps(lambda k: distributed.reduce_mean(acc, step(k)), total=steps, save=save, describe=_describe, desc="sft")
    return lm, held_out, before, outcome


def _describe(record: Mapping[str, float]) -> dict[str, str]:
    return {"loss": f"{record['loss/supervised']:.3f}"}


def _held_out_examples(task: Task, eval_size: int | None) -> list[Any]:
    return task.eval_set()[:eval_size] if eval_size else task.eval_set()


def _split(config: SFTConfig, tokenizer: Any, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records, chat prompts rendered; the first `eval_size` (default 10%, at most 200) held out."""
    records = render_prompts(records, tokenizer, config.data or "records", config.system_prompt)
    k = config.eval_size if config.eval_size is not None else min(200, len(records) // 10)
    if k >= len(records):
        raise ConfigurationError(f"{config.data}: {len(records)} records leave none to train on after holding out {k}; add records or lower --eval-size.")
    return records[k:], records[:k]


def _evaluate(lm: Any, tokenizer: Any, held_out: Sequence[Mapping[str, Any]], task: Task | None, config: SFTConfig) -> SupervisedEval:
    lm.eval()
    accuracy = task_accuracy(lm, tokenizer, task, config.max_new_tokens_for(task), config.eval_size) if task is not None else None
    return SupervisedEval(len(held_out), supervised_loss(lm, tokenizer, [(r["prompt"], r["response"]) for r in held_out]), accuracy)


def supervised_table(result: SupervisedResult) -> str:
    b, a = result.before, result.after
    rows = [("loss (NLL per response token)", number(b.loss), number(a.loss if a else None))]
    if b.accuracy is not None:
        rows.append(("task accuracy (greedy)", pct(b.accuracy), pct(a.accuracy if a else None)))
    return before_after_table(
        f"held-out evaluation ({b.n} records) -- sft, {result.steps} steps",
        rows,
        f"wall time {result.wall_time:.0f} s; model saved in {result.run_dir / 'model'}",
    )
