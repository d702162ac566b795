"""Offline preference training (DPO, IPO, hinge): ``proxim train --preset dpo [--data pairs.jsonl]``.

The policy starts from the same initial policy as an online run (the cached warm start, ``--model`` or
``--init``); the reference is a frozen copy of it. Pairs come from ``--data`` or are built from the
task's reward (`proxim.train.preferences`). One step::

    prompts_per_step pairs (over all processes)
    log pi(y|x) of each chosen and rejected response: the sum over its tokens (and EOS) of the token
        log-probs, gathered in chunks (no [B, T, V] log-softmax); the same under the reference, no grad
    objective.loss(chosen, rejected, ref_chosen, ref_rejected) per micro-batch, weighted by its share of the step
    backward; clip; AdamW step (skipped, and counted, if non-finite); LR schedule

Before and after training (and every ``eval_every`` steps) it evaluates the held-out pairs and, with a
task, the held-out prompts (greedy decoding, as ``proxim train``). The run folder holds what an online
run's does, without checkpoints: an offline run is short and starts over rather than resuming.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import proxim
import torch
from proxim.errors import ConfigurationError
from proxim.train import models
from proxim.train.config import TrainConfig
from proxim.train.data import PromptSource, Row
from proxim.train.loop import (
    PLOT_FILE,
    EvalResult,
    RunResult,
    Trainer,
    TrainingError,
    _pct,
    _reduce_mean,
)
from proxim.train.preferences import preference_set
from proxim.train.records import Record, sequence_logprobs
from proxim.train.rewards import Reward

EVAL_BATCH = 64
"""Pairs per forward pass when evaluating."""


@attrs.frozen
class PairEval:
    """Held-out pairs. `accuracy`: how often the policy gives the chosen response the higher log-prob.
    `reward_accuracy`: how often the implicit reward beta * log(pi / pi_ref) ranks it strictly higher (0 before
    training, where the policy is the reference). `loss` and `margin` (chosen minus rejected implicit reward): means."""

    n: int
    accuracy: float
    reward_accuracy: float
    loss: float
    margin: float


@attrs.frozen
class PreferenceRunResult(RunResult):
    """A `RunResult` with the held-out pair evaluation before and after training."""

    pairs_before: PairEval | None = None
    pairs_after: PairEval | None = None


class _NoPrompts:
    """No task: no held-out prompts to decode (the pairs are evaluated all the same)."""

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        return []

    def eval_rows(self) -> list[Row]:
        return []


class PreferenceTrainer(Trainer):
    """An offline run of a `proxim.PreferenceObjective`: built from a `TrainConfig`, run with `run()`."""

    def __init__(self, config: TrainConfig, *, objective: Any = None, registry: proxim.Registry | None = None):
        super().__init__(config, objective=objective, registry=registry)
        if not isinstance(self.objective, proxim.PreferenceObjective):
            raise ConfigurationError(f"{self.objective!r} is not a preference objective; train it online with proxim train.")
        self.preference: proxim.PreferenceObjective = self.objective

    def _prompt_source(self, prompts: Iterable[Mapping[str, Any]] | None, eval_prompts: Iterable[Mapping[str, Any]] | None) -> PromptSource:
        return super()._prompt_source(prompts, eval_prompts) if self.task is not None else _NoPrompts()

    def _wants_reference(self) -> bool:
        return True

    def _wants_critic(self) -> bool:
        return False

    def _rewards(self, custom: Any) -> list[Reward]:
        return super()._rewards(custom) if self.task is not None else []

    # -- a step ---------------------------------------------------------------------------------
    def _pair_loss(self, rows: Sequence[Record]) -> proxim.LossOutput:
        """The objective's mean loss over `rows`, the policy's log-probs with grad (when enabled)."""
        prompts = [r["prompt"] for r in rows] * 2
        responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        eos, b = int(self.tokenizer.eos_token_id), len(rows)
        with self.accelerator.autocast():
            with torch.no_grad():
                ref = sequence_logprobs(self.reference, self.tokenizer, prompts, responses, eos)
            lp = sequence_logprobs(self.policy, self.tokenizer, prompts, responses, eos)
        return self.preference.loss(chosen_logprobs=lp[:b], rejected_logprobs=lp[b:], ref_chosen_logprobs=ref[:b], ref_rejected_logprobs=ref[b:])

    def _update_pairs(self, rows: Sequence[Record], step: int) -> dict[str, float]:
        c, acc = self.config, self.accelerator
        size = c.micro_batch_size or len(rows)
        parts = [rows[i : i + size] for i in range(0, len(rows), size)]
        sums: dict[str, torch.Tensor] = {}
        loss_total = torch.zeros((), device=acc.device)
        for k, part in enumerate(parts):
            share = len(part) / len(rows)
            with contextlib.ExitStack() as stack:
                if k < len(parts) - 1:
                    stack.enter_context(acc.no_sync(self.policy))
                out = self._pair_loss(part)
                acc.backward(out.loss * share)
            loss_total = loss_total + out.loss.detach() * share
            for key, v in out.metrics.items():
                sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=acc.device)) + v.double() * share
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = self._optimizer_step(params, loss_total)
        if self.nonfinite_streak >= c.max_nonfinite:
            raise TrainingError(
                f"{self.nonfinite_streak} optimiser updates in a row had a non-finite loss or gradient (step {step}); stopped. "
                "Lower the learning rate, check the pairs, or raise max_nonfinite."
            )
        metrics = {k: float(v) for k, v in sums.items()}
        metrics["optim/grad_norm"] = float("nan") if grad_norm is None else grad_norm
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["optim/skipped"] = float(grad_norm is None)
        return metrics

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_pairs(self, rows: Sequence[Record]) -> PairEval:
        """The policy and the reference on every held-out pair (each process scores them all)."""
        chosen, rejected, ref_chosen, ref_rejected = [], [], [], []
        eos = int(self.tokenizer.eos_token_id)
        for i in range(0, len(rows), EVAL_BATCH):
            part = rows[i : i + EVAL_BATCH]
            prompts, b = [r["prompt"] for r in part] * 2, len(part)
            responses = [r["chosen"] for r in part] + [r["rejected"] for r in part]
            with self.accelerator.autocast():
                lp = sequence_logprobs(self.accelerator.unwrap_model(self.policy), self.tokenizer, prompts, responses, eos)
                ref = sequence_logprobs(self.reference, self.tokenizer, prompts, responses, eos)
            chosen.append(lp[:b])
            rejected.append(lp[b:])
            ref_chosen.append(ref[:b])
            ref_rejected.append(ref[b:])
        c, r = torch.cat(chosen), torch.cat(rejected)
        out = self.preference.loss(chosen_logprobs=c, rejected_logprobs=r, ref_chosen_logprobs=torch.cat(ref_chosen), ref_rejected_logprobs=torch.cat(ref_rejected))
        m = out.metrics
        return PairEval(len(rows), float((c > r).double().mean()), float(m["preference/accuracy"]), float(m["loss/preference"]), float(m["preference/margin"]))

    def _evaluate_all(self, label: str, held_out: Sequence[Record]) -> tuple[EvalResult | None, PairEval]:
        pairs = self.evaluate_pairs(held_out)
        if self.is_main:
            path = self.run_dir / "eval.json"
            data = json.loads(path.read_text()) if path.is_file() else {}
            data[f"pairs_{label}"] = attrs.asdict(pairs)
            path.write_text(json.dumps(data, indent=2))
        if self.task is None:
            return None, pairs
        task = self.evaluate(label)
        self._store_eval(label, task)
        return task, pairs

    # -- the run --------------------------------------------------------------------------------
    def run(self, rewards: Any = None) -> PreferenceRunResult:
        c, acc = self.config, self.accelerator
        self._build(None)
        pairs = preference_set(c, self.task, self.lm, self.tokenizer, self.eos_ids, acc)
        for name, rows in (("training", pairs.train), ("held-out", pairs.held_out)):
            if not rows:
                raise ConfigurationError(f"{pairs.origin}: no {name} pairs (every sampled pair tied); raise --preference-prompts or --eval-size.")
        source = pairs.source(c.seed)
        self._write_config()
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main:
            metrics_path.write_text("")
        self._say(
            f"run folder: {self.run_dir}\nobjective: {self.preference!r}\n"
            f"pairs: {len(pairs.train)} training, {len(pairs.held_out)} held out ({pairs.origin})\n"
            f"model: {c.start_model() or 'built-in tiny Llama'} ({self.n_params / 1e6:.2f} M parameters); reference: the initial policy; "
            f"processes: {self.world}; device: {acc.device}"
        )
        before, pairs_before = self._evaluate_all("before", pairs.held_out)
        if acc.log_with:
            acc.init_trackers(f"{self.run_dir.name}/tensorboard", config={k: v for k, v in c.to_dict().items() if isinstance(v, (int, float, str, bool))})
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, desc=self.preference.preference.name, unit="step", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        history: list[dict[str, Any]] = []
        self.t_loop = time.perf_counter()
        try:
            for step in range(c.steps):
                t0 = time.perf_counter()
                rows = source.batch(step, self.rank, self.world, c.prompts_per_step // self.world)
                metrics = self._update_pairs(rows, step)
                metrics["time/step"] = time.perf_counter() - t0
                reduced = _reduce_mean(acc, metrics)
                reduced["optim/skipped_total"] = float(self.nonfinite_total)
                record: dict[str, Any] = {"step": step + 1, **reduced}
                if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < c.steps:
                    task, periodic = self._evaluate_all(f"step_{step + 1:06d}", pairs.held_out)
                    record["eval/preference_accuracy"] = periodic.accuracy
                    record["eval/reward_accuracy"] = periodic.reward_accuracy
                    if task is not None and task.accuracy is not None:
                        record["eval/accuracy"] = task.accuracy
                history.append(record)
                self._log(record, [])
                bar.set_postfix({"loss": f"{reduced['loss/preference']:.3f}", "acc": f"{reduced['preference/accuracy']:.2f}", "margin": f"{reduced['preference/margin']:.2f}"}, refresh=False)
                bar.update(1)
        finally:
            bar.close()
        train_time = time.perf_counter() - self.t_loop
        after, pairs_after = self._evaluate_all("after", pairs.held_out)
        if self.is_main:
            models.save_model_dir(self.lm, self.tokenizer, self.run_dir / "model")
            self._plot_pairs(history)
        result = PreferenceRunResult(self.run_dir, c.steps, before, after, time.perf_counter() - self.t_start, train_time, None, pairs_before, pairs_after)
        if self.is_main:
            table = preference_table(result, label=self.preference.preference.name)
            (self.run_dir / "summary.md").write_text(table + "\n")
            print(table)
        self._finish_trackers()
        acc.wait_for_everyone()
        return result

    def _plot_pairs(self, history: list[dict[str, Any]]) -> None:
        from proxim.train.plot import line_chart

        def series(key: str) -> list[tuple[float, float]]:
            return [(h["step"], h[key]) for h in history if key in h]

        accuracy = {"train (implicit reward)": series("preference/accuracy")}
        if any("eval/preference_accuracy" in h for h in history):
            accuracy["held-out (log-prob)"] = series("eval/preference_accuracy")
        line_chart(self.run_dir / PLOT_FILE, [("loss", {"preference": series("loss/preference")}), ("accuracy", accuracy), ("margin", {"margin": series("preference/margin")})])


def preference_table(result: PreferenceRunResult, label: str) -> str:
    """The before/after table of an offline run (markdown): held-out pairs, then the task, then wall time."""
    pb, pa, b, a = result.pairs_before, result.pairs_after, result.before, result.after
    n = pa.n if pa is not None else pb.n if pb is not None else 0
    lines = [
        f"held-out evaluation ({n} pairs) -- {label}, {result.steps} steps",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        f"| preference accuracy (log-prob of chosen > rejected) | {_pct(pb.accuracy if pb else None)} | {_pct(pa.accuracy if pa else None)} |",
        f"| implicit-reward accuracy | {_pct(pb.reward_accuracy if pb else None)} | {_pct(pa.reward_accuracy if pa else None)} |",
        f"| preference loss | {pb.loss if pb else math.nan:.3f} | {pa.loss if pa else math.nan:.3f} |",
        f"| implicit-reward margin | {pb.margin if pb else math.nan:.3f} | {pa.margin if pa else math.nan:.3f} |",
    ]
    if b is not None or a is not None:
        shown = a or b
        lines += [
            f"| task accuracy ({shown.n if shown else 0} prompts, greedy) | {_pct(b.accuracy if b else None)} | {_pct(a.accuracy if a else None)} |",
            f"| task mean reward | {b.mean_reward if b else math.nan:.3f} | {a.mean_reward if a else math.nan:.3f} |",
        ]
    lines += ["", f"wall time {result.wall_time:.0f} s (training loop {result.train_time:.0f} s, {result.steps_per_second:.2f} steps/s); run folder {result.run_dir}"]
    return "\n".join(lines)


def train_offline(config: TrainConfig, *, objective: Any = None, registry: proxim.Registry | None = None) -> PreferenceRunResult:
    """One offline run of a preference objective (``config.preset`` dpo, ipo or hinge, or `objective`)."""
    return PreferenceTrainer(config, objective=objective, registry=registry).run()

