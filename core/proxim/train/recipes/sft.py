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
from proxim.tasks import Task
from proxim.train import checkpoint, distributed, models
from proxim.train.config import SFTConfig
from proxim.train.sections import SupervisedOptimizer
from proxim.train.evaluation import task_accuracy
from proxim.train.figures import Panel, Series, informative, write_figure
from proxim.train.loop import StepLoop
from proxim.train.optimization import Optimization, parameter_groups
from proxim.train.prompts import RowSource
from proxim.train.records import SUPERVISED_FIELDS, Record, read_records, render_prompts
from proxim.train.reporting import Progress, before_after_table, number, pct
from proxim.train.run_folder import RunFolder, default_name
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    acc = distributed.make_accelerator(config.mixed_precision, config.tracker, Path(resume).resolve().parent if resume else config.output_dir)
    task = config.load_task(reg)
    run = RunFolder.existing(resume, acc) if resume else RunFolder.create(config.output_dir, config.run_name or default_name("sft", Path(config.data).stem if config.data else config.task or "records"), acc)
    progress = Progress(config.quiet, acc.is_main_process)
    run.write_config(config)
    steps = config.warmstart_steps if config.warmstart_steps is not None else config.warmstart_steps_for(None)
    lm, tokenizer, identity = models.start_policy(config, config.seed)
    lm.to(acc.device)
    if records is None:  # the task's answers: the warm start itself, from the same cache
        assert task is not None
        held_out = [{"prompt": e.prompt, "response": task.completion(e)} for e in _held_out_examples(task, config.eval_size)]
        before = _evaluate(lm, tokenizer, held_out, task, config, acc)
        entry, hit = warm_start(
            lm, tokenizer, task, model_identity=identity, steps=steps, settings=config, seed=config.seed, accelerator=acc,
            progress=progress.enabled, optimizer=SupervisedOptimizer.of(config),
        )
        progress.say(f"warm start: {steps} supervised steps on {task.name}, {'loaded from the cache' if hit else 'trained and cached'} ({entry})")
        outcome_steps, interrupted = steps, None
    else:
        train_rows, held_out = _split(config, tokenizer, records)
        optimization = Optimization(acc, parameter_groups([(lm, config.warmstart_lr)]), config, horizon=steps)
        (lm,) = optimization.prepare(lm)
        before = _stored(run) or _evaluate(lm, tokenizer, held_out, task, config, acc)
        run.store_eval("before", attrs.asdict(before))
        start, time_before = 0, 0.0
        if resume is not None:
            state = checkpoint.load(checkpoint.latest(run.path) or run.path, accelerator=acc, models={"model": acc.unwrap_model(lm)}, optimization=optimization)
            start, time_before = int(state["step"]), float(state.get("train_time", 0.0))
        run.start_metrics(run.history(upto=start) if start else [])
        source = RowSource(train_rows, config.seed, held_out, origin=config.data or "records")
        step = SupervisedStep(lm, record_batches(source, tokenizer, config.warmstart_batch_size, acc.process_index, acc.num_processes, acc.device), optimization, config.micro_batch_size)

        def save(completed: int, train_time: float) -> None:
            state = {"train_time": train_time, "proxim": proxim.__version__}
            checkpoint.save(run.path, completed, accelerator=acc, models={"model": acc.unwrap_model(lm)}, optimization=optimization, state=state,
                            config_toml=config.to_toml(), keep=config.keep_checkpoints)

        loop = StepLoop(accelerator=acc, run=run, total=steps, start=start, save_every=config.save_every, save=save, progress=progress,
                        describe=lambda r: {"loss": f"{r['loss/supervised']:.3f}"}, desc="sft", tracker_config=config.to_dict(), time_before=time_before)
        outcome = loop.run_steps(lambda k: distributed.reduce_mean(acc, step(k)))
        lm = acc.unwrap_model(lm)
        outcome_steps, interrupted = outcome.steps, outcome.interrupted
    if interrupted is not None:
        progress.notice(f"interrupted (signal {interrupted}) after step {outcome_steps}. Continue with: proxim sft --resume {run.path}")
        return SupervisedResult(run.path, outcome_steps, before, None, time.perf_counter() - t_start, interrupted)
    after = _evaluate(lm, tokenizer, held_out, task, config, acc)
    result = SupervisedResult(run.path, outcome_steps, before, after, time.perf_counter() - t_start)
    run.store_eval("before", attrs.asdict(before))
    run.store_eval("after", attrs.asdict(after))
    if acc.is_main_process:
        models.save_model_dir(lm, tokenizer, run.path / "model")
        write_figure(run.path / "plot.png", informative(sft_panels(run.history())), title=f"sft: {outcome_steps} steps")
    run.write_summary(supervised_table(result))
    acc.wait_for_everyone()
    return result


def _held_out_examples(task: Task, eval_size: int | None) -> list[Any]:
    return task.eval_set()[:eval_size] if eval_size else task.eval_set()


def _split(config: SFTConfig, tokenizer: Any, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records, chat prompts rendered; the first `eval_size` (default 10%, at most 200) held out."""
    records = render_prompts(records, tokenizer, config.data or "records")
    k = config.eval_size if config.eval_size is not None else min(200, len(records) // 10)
    if k >= len(records):
        raise ConfigurationError(f"{config.data}: {len(records)} records leave none to train on after holding out {k}; add records or lower --eval-size.")
    return records[k:], records[:k]


def _evaluate(lm: Any, tokenizer: Any, held_out: Sequence[Mapping[str, Any]], task: Task | None, config: SFTConfig, acc: Any) -> SupervisedEval:
    model = acc.unwrap_model(lm)
    model.eval()
    accuracy = task_accuracy(model, tokenizer, task, config.max_new_tokens_for(task), config.eval_size) if task is not None else None
    return SupervisedEval(len(held_out), supervised_loss(model, tokenizer, [(r["prompt"], r["response"]) for r in held_out]), accuracy)


def _stored(run: RunFolder) -> SupervisedEval | None:
    found = run.load_eval("before")
    return SupervisedEval(**found) if found else None


def sft_panels(history: Sequence[Mapping[str, float]]) -> list[Panel]:
    """The panels of a supervised run's plot."""
    return [
        Panel("Supervised loss", "NLL per response token (nats)", [Series("loss/supervised", [(h["step"], h["loss/supervised"]) for h in history if "loss/supervised" in h])], log=True, essential=True),
        Panel("Gradient norm", "L2 norm (before clipping)", [Series("optim/grad_norm", [(h["step"], h["optim/grad_norm"]) for h in history if "optim/grad_norm" in h])]),
    ]


def supervised_table(result: SupervisedResult) -> str:
    b, a = result.before, result.after
    rows = [("loss (NLL per response token)", number(b.loss), number(a.loss if a else None))]
    if b.accuracy is not None:
        rows.append(("task accuracy (greedy)", pct(b.accuracy), pct(a.accuracy if a else None)))
    return before_after_table(f"held-out evaluation ({b.n} records) -- sft, {result.steps} steps", rows, f"wall time {result.wall_time:.0f} s; model saved in {result.run_dir / 'model'}")

