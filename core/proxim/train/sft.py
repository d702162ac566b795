"""Supervised fine-tuning: ``proxim sft [--data sft.jsonl]``, the first stage of the RLHF pipeline.

Without ``--data`` it trains on the task's reference answers: exactly the warm start of ``proxim train``
(`proxim.train.warmstart`, same settings, same cache), run on its own and saved as a model directory,
so that ``proxim train --init RUN/model`` and ``proxim reward-model --init RUN/model`` start from it.
With ``--data``, it trains on ``{"prompt", "response"}`` records (`proxim.train.records`) with the same
recipe: ``prompt -> response <eos>``, loss on the response, AdamW with a linear warm-up over 100 steps;
the first `eval_size` records (default 10%, at most 200) are held out.

Before and after, it reports the held-out loss (mean negative log-likelihood per response token) and,
with a task, the held-out accuracy with greedy decoding. One process: ``accelerate`` picks the device.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import proxim
import torch
from proxim.errors import ConfigurationError
from proxim.tasks import Task

from proxim.train import models
from proxim.train.config import TrainConfig
from proxim.train.data import RowSource
from proxim.train.records import SUPERVISED_FIELDS, Record, read_records, render_prompts
from proxim.train.warmstart import encode_supervised, train_supervised

EVAL_BATCH = 64
"""Held-out records per forward pass, and prompts per generate call."""
DEFAULT_STEPS = 600
"""Supervised steps when warmstart_steps is not set (the warm start's default for the built-in model)."""


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
    after: SupervisedEval
    wall_time: float


def new_run_dir(config: TrainConfig, label: str) -> Path:
    """``OUTPUT_DIR/<run_name or label-source-date-time>``, created; an existing folder is an error."""
    when = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.output_dir) / (config.run_name or config.default_run_name(when, label))
    if run_dir.exists():
        raise ConfigurationError(f"{run_dir} already exists; choose another --run-name.")
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config.to_toml())
    return run_dir


def say(config: TrainConfig, message: str) -> None:
    """A progress message on stderr, unless `config.quiet`."""
    if not config.quiet:
        print(message, file=sys.stderr, flush=True)


def load_task(config: TrainConfig) -> Task | None:
    return proxim.default_registry().get("task", config.task)() if config.task is not None else None


@torch.no_grad()
def task_accuracy(lm: Any, tokenizer: Any, task: Task, max_new_tokens: int, eval_size: int | None = None) -> tuple[int, float]:
    """(prompts, accuracy) of greedy decoding on the task's held-out prompts (the first `eval_size`)."""
    from proxim.train.generation import HFGenerator

    examples = task.eval_set()[:eval_size] if eval_size else task.eval_set()
    generator = HFGenerator(lm, tokenizer, models.eos_ids(tokenizer, lm), EVAL_BATCH)
    gen = generator.generate(tokenizer([e.prompt for e in examples])["input_ids"], 1, 1.0, 1.0, max_new_tokens, greedy=True)
    correct = sum(task.correct(c, e.answer) for c, e in zip(gen.completions, examples))
    return len(examples), correct / len(examples)


@torch.no_grad()
def supervised_loss(lm: Any, tokenizer: Any, records: Sequence[Record]) -> float:
    """Mean negative log-likelihood per target token (response and EOS) of `records` under `lm`."""
    device = next(lm.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(records), EVAL_BATCH):
        part = records[i : i + EVAL_BATCH]
        ids, mask, labels = encode_supervised(tokenizer, [(r["prompt"], r["response"]) for r in part], int(tokenizer.eos_token_id), device)
        n = int((labels[:, 1:] != -100).sum())  # transformers shifts the labels by one
        total += float(lm(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        tokens += n
    return total / max(tokens, 1)


def _split(config: TrainConfig, task: Task | None, tokenizer: Any, records: list[Record] | None) -> tuple[list[Record], list[Record]]:
    """(training, held-out) of the --data `records`; without them, no training records and the task's held-out answers."""
    if records is None or config.data is None:
        assert task is not None
        held = task.eval_set()[: config.eval_size] if config.eval_size else task.eval_set()
        return [], [{"prompt": e.prompt, "response": task.completion(e)} for e in held]
    records = render_prompts(records, tokenizer, config.data)
    k = config.eval_size if config.eval_size is not None else min(200, len(records) // 10)
    if k >= len(records):
        raise ConfigurationError(f"{config.data}: {len(records)} records leave none to train on after holding out {k}; add records or lower --eval-size.")
    return records[k:], records[:k]


def sft(config: TrainConfig) -> SupervisedResult:
    """Fine-tune the starting model (`config.model`, or the built-in tiny model) and save it; see the module docstring."""
    from accelerate import Accelerator
    from proxim.train.loop import base_policy, warm_start_policy
    from transformers.utils import logging as hf_logging

    t_start = time.perf_counter()
    config.check_inputs()
    if config.data is None and config.task is None:
        raise ConfigurationError("proxim sft needs --data sft.jsonl ({\"prompt\", \"response\"} records), or a task whose answers to train on.")
    records = read_records(config.data, SUPERVISED_FIELDS) if config.data is not None else None  # before any model is built
    hf_logging.disable_progress_bar()
    accelerator = Accelerator()
    task = load_task(config)
    run_dir = new_run_dir(config, "sft")
    lm, tokenizer, identity = base_policy(config)
    lm.to(accelerator.device)
    train_rows, held_out = _split(config, task, tokenizer, records)
    max_new_tokens = config.resolved_max_new_tokens(task)

    def evaluate() -> SupervisedEval:
        lm.eval()
        accuracy = task_accuracy(lm, tokenizer, task, max_new_tokens, config.eval_size)[1] if task is not None else None
        return SupervisedEval(len(held_out), supervised_loss(lm, tokenizer, held_out), accuracy)

    before = evaluate()
    steps = config.warmstart_steps if config.warmstart_steps is not None else DEFAULT_STEPS
    say(config, f"run folder: {run_dir}\nmodel: {config.model or 'built-in tiny Llama'}; device: {accelerator.device}")
    if config.data is None:
        assert task is not None
        say(config, warm_start_policy(config, task, lm, tokenizer, identity, steps, accelerator, not config.quiet))
    else:
        source = RowSource(train_rows, config.seed, held_out, origin=config.data)
        eos, device = int(tokenizer.eos_token_id), accelerator.device

        def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rows = source.batch(step, 0, 1, config.warmstart_batch_size)
            return encode_supervised(tokenizer, [(r["prompt"], r["response"]) for r in rows], eos, device)

        losses = train_supervised(lm, batches, steps, config.warmstart_lr, config.seed, not config.quiet, "sft")
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": k + 1, "loss/supervised": v}) + "\n" for k, v in enumerate(losses)))
    after = evaluate()
    models.save_model_dir(lm, tokenizer, run_dir / "model")
    result = SupervisedResult(run_dir, steps, before, after, time.perf_counter() - t_start)
    write_evaluation(run_dir, before, after, supervised_table(result))
    return result


def write_evaluation(run_dir: Path, before: Any, after: Any, table: str) -> None:
    """eval.json (the before/after attrs records) and summary.md (`table`, also printed) of a finished run."""
    (run_dir / "eval.json").write_text(json.dumps({"before": attrs.asdict(before), "after": attrs.asdict(after)}, indent=2))
    (run_dir / "summary.md").write_text(table + "\n")
    print(table)


def supervised_table(result: SupervisedResult) -> str:
    from proxim.train.loop import _pct

    b, a = result.before, result.after
    lines = [
        f"held-out evaluation ({a.n} records) -- sft, {result.steps} steps",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        f"| loss (NLL per response token) | {b.loss:.3f} | {a.loss:.3f} |",
    ]
    if a.accuracy is not None:
        lines.append(f"| task accuracy (greedy) | {_pct(b.accuracy)} | {_pct(a.accuracy)} |")
    lines += ["", f"wall time {result.wall_time:.0f} s; model saved in {result.run_dir / 'model'}"]
    return "\n".join(lines)
