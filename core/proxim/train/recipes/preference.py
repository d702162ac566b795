"""Offline preference training (DPO, IPO, hinge): ``proxim train --preset dpo [--data pairs.jsonl]``.

The policy starts from the same initial policy as an online run (the cached warm start, ``--model`` or
``--init``); the reference is a frozen copy of it. Pairs come from ``--data`` or are built from the
task's reward (`proxim.train.preferences`). One step (`PreferenceTrainer.step`)::

    prompts_per_step pairs (over all processes)
    log pi(y|x) of each chosen and rejected response: the sum over its tokens (and EOS) of the token
        log-probs, gathered in chunks (no [B, T, V] log-softmax); the same under the reference, no grad
    objective.loss(chosen, rejected, ref_chosen, ref_rejected) per micro-batch, weighted by its share of the step
    one update (`proxim.train.optimization`: accumulate, clip, skip and count non-finite)

Before and after training (and every ``eval_every`` steps) it evaluates the held-out pairs and, with a
task, the held-out prompts (greedy decoding, as ``proxim train``). Runs checkpoint and resume like every
recipe (``proxim train --resume RUN_DIR``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

import proxim
from proxim.errors import ConfigurationError
from proxim.figures import informative, write_figure
from proxim.train import adapters, distributed, models, sharding
from proxim.train.config import PreferenceConfig
from proxim.train.evaluation import evaluate_prompts
from proxim.train.generation import GeneratorContext, make_generator
from proxim.train.logprobs import PolicyScorer
from proxim.train.optimization import Optimization, parameter_groups
from proxim.train.panels import preference_panels
from proxim.train.preferences import preference_set
from proxim.train.prompts import NoPrompts, TaskSource
from proxim.train.records import Record, sequence_logprobs
from proxim.train.reporting import before_after_table, number, pct
from proxim.train.results import EvalResult, RunResult
from proxim.train.rewards import build_rewards
from proxim.train.run_folder import default_name
from proxim.train.session import Session
from proxim.train.warmstart import initial_policy_dir

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


class PreferenceTrainer:
    """An offline run of a `proxim.PreferenceObjective`, fully built by its constructor; `run()` trains."""

    def __init__(
        self,
        config: PreferenceConfig,
        *,
        objective: proxim.PreferenceObjective | None = None,
        resume: str | os.PathLike[str] | None = None,
        registry: proxim.Registry | None = None,
    ):
        self.t_start = time.perf_counter()
        c = self.config = config
        self.session = session = Session(c, resume)
        self.accelerator, self.rank, self.world = acc, rank, world = session.accelerator, session.rank, session.world
        self.registry = registry or proxim.default_registry()
        checked = config.check(self.registry, world)
        self.objective = objective if objective is not None else checked
        distributed.agree(acc, self.objective.fingerprint, "objective fingerprint")
        self.task = config.load_task(self.registry)
        self.prompts = TaskSource(self.task, c.seed, c.eval_size) if self.task is not None else NoPrompts()
        session.open(c.run_name or default_name(self.name, Path(c.data).stem if c.data else c.task or "pairs"))
        with session.building():  # a failed start leaves no empty run folder
            # -- the policy and its frozen reference: the same initial policy ----------------------------
            self.init_dir = initial_policy_dir(c, c, self.task, c.seed, session.path, acc, session.progress, resuming=resume is not None)
            lm, self.tokenizer = models.load_policy(self.init_dir, c, tokenizer_beside=self.init_dir == session.path / "init")
            lm.to(acc.device)
            self.eos_ids = models.eos_ids(self.tokenizer, lm)
            self.n_params = sum(p.numel() for p in lm.parameters())
            self.pairs = preference_set(c, self.task, lm, self.tokenizer, self.eos_ids, acc)  # from the initial policy
            lm = adapters.prepare(lm, c, c.seed)  # LoRA and gradient checkpointing, as asked
            policy = PolicyScorer(lm, c.logprob_chunk_size)
            if adapters.is_adapted(lm):  # the reference: the policy (under FSDP its sharded scorer) with its adapter disabled, or a frozen copy
                self.reference: torch.nn.Module = adapters.WithoutAdapter(policy, lm)
            else:
                self.reference = sharding.prepare_frozen(acc, PolicyScorer(models.frozen_copy(self.init_dir, c, acc.device), c.logprob_chunk_size))
            for what, rows in (("training", self.pairs.train), ("held-out", self.pairs.held_out)):
                if not rows:
                    raise ConfigurationError(f"{self.pairs.origin}: no {what} pairs (every sampled pair tied); raise --preference-prompts or --eval-size.")
            self.source = self.pairs.source(c.seed)
            self.optimization = Optimization(acc, parameter_groups([(policy, c.lr)]), c, horizon=c.steps)
            (self.policy,) = self.optimization.prepare(policy)
            self.generator = make_generator(
                "hf", GeneratorContext(self.lm, self.init_dir, self.tokenizer, self.eos_ids, c.seed + rank, c.generation_batch_size)
            )
            self.rewards = build_rewards(["task"], [], self.task) if self.task is not None else []
            if resume is not None:
                session.restore({"model": self.lm}, self.optimization, self.objective.fingerprint)

    @property
    def name(self) -> str:
        """The preference loss's name (dpo, ipo, hinge, or a plugin's)."""
        return self.objective.preference.name

    @property
    def lm(self) -> Any:
        return self.accelerator.unwrap_model(self.policy).lm

    # -- one step --------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """One update on this step's pairs (micro-batches weighted by their share); its metrics, averaged over processes."""
        c, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        rows = self.source.batch(step, self.rank, self.world, c.prompts_per_step // self.world)
        size = c.micro_batch_size or len(rows)
        sums: dict[str, torch.Tensor] = {}

        def loss_of(part: Sequence[Record]) -> torch.Tensor:
            share = len(part) / len(rows)
            out = self.pair_loss(part)
            for key, v in out.metrics.items():
                sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=acc.device)) + v.double() * share
            return out.loss * share

        update = self.optimization.update([rows[i : i + size] for i in range(0, len(rows), size)], loss_of)
        metrics = {k: float(v) for k, v in sums.items()}
        metrics.update(
            {
                "optim/grad_norm": float("nan") if update.grad_norm is None else update.grad_norm,
                "optim/lr": self.optimization.lr,
                "optim/skipped": float(update.skipped),
            }
        )
        metrics["time/step"] = time.perf_counter() - t0
        return {**distributed.reduce_mean(acc, metrics), "optim/skipped_total": float(self.optimization.nonfinite_total)}

    def pair_loss(self, rows: Sequence[Record]) -> proxim.LossOutput:
        """The objective's mean loss over `rows`, with the policy's log-probs carrying the gradient."""
        prompts = [r["prompt"] for r in rows] * 2
        responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        eos, b = int(self.tokenizer.eos_token_id), len(rows)
        with self.accelerator.autocast():
            with torch.no_grad():
                ref = sequence_logprobs(self.reference, self.tokenizer, prompts, responses, eos)
            lp = sequence_logprobs(self.policy, self.tokenizer, prompts, responses, eos)
        return self.objective.loss(chosen_logprobs=lp[:b], rejected_logprobs=lp[b:], ref_chosen_logprobs=ref[:b], ref_rejected_logprobs=ref[b:])

    # -- evaluation ------------------------------------------------------------------------------
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
        m = self.objective.loss(
            chosen_logprobs=c, rejected_logprobs=r, ref_chosen_logprobs=torch.cat(ref_chosen), ref_rejected_logprobs=torch.cat(ref_rejected)
        ).metrics
        return PairEval(len(rows), float((c > r).double().mean()), float(m["preference/accuracy"]), float(m["loss/preference"]), float(m["preference/margin"]))

    def evaluate(self, label: str) -> tuple[EvalResult | None, PairEval]:
        """The held-out pairs, and with a task its held-out prompts; both stored in ``eval.json`` under `label`."""
        pairs = self.evaluate_pairs(self.pairs.held_out)
        self.session.folder.store_eval(f"pairs_{label}", attrs.asdict(pairs))
        if self.task is None:
            return None, pairs
        task, records = evaluate_prompts(
            self.prompts.eval_rows(),
            generator=self.generator,
            tokenizer=self.tokenizer,
            rewards=self.rewards,
            task=self.task,
            max_new_tokens=self.config.max_new_tokens_for(self.task),
            rank=self.rank,
            world=self.world,
        )
        self.session.folder.write_jsonl(f"eval_{label}.jsonl", records)
        self.session.folder.store_eval(label, attrs.asdict(task))
        return task, pairs

    def periodic_evaluation(self, step: int) -> dict[str, float]:
        task, pairs = self.evaluate(f"step_{step:06d}")
        metrics = {"eval/preference_accuracy": pairs.accuracy, "eval/reward_accuracy": pairs.reward_accuracy}
        return {**metrics, **({"eval/accuracy": task.accuracy} if task is not None and task.accuracy is not None else {})}

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> PreferenceRunResult:
        c, session, folder = self.config, self.session, self.session.folder
        session.begin()
        session.progress.say(
            f"run folder: {folder.path}\nobjective: {self.objective!r}\n"
            f"pairs: {len(self.pairs.train)} training, {len(self.pairs.held_out)} held out ({self.pairs.origin})\n"
            f"model: {c.start_model() or 'built-in tiny Llama'} ({self.n_params / 1e6:.2f} M parameters); reference: the initial policy; "
            f"processes: {self.world}; device: {self.accelerator.device}"
        )
        before, pairs_before = self._stored("before") or self.evaluate("before")
        outcome = session.run_steps(
            self.step, total=c.steps, save=self.save, describe=_describe, desc=self.name, evaluate=self.periodic_evaluation, eval_every=c.eval_every
        )
        if outcome.interrupted is not None:
            wall = time.perf_counter() - self.t_start
            return PreferenceRunResult(folder.path, outcome.steps, before, None, wall, outcome.train_time, outcome.interrupted, pairs_before, None)
        after, pairs_after = self.evaluate("after")
        wall = time.perf_counter() - self.t_start
        result = PreferenceRunResult(folder.path, c.steps, before, after, wall, outcome.train_time, None, pairs_before, pairs_after)
        if session.is_main:
            panels = informative(preference_panels(folder.history()))
            write_figure(folder.path / "plot.png", panels, title=f"{self.name} on {self.pairs.origin}: {c.steps} steps")
        folder.write_summary(preference_table(result, self.name))
        session.save_trained(self.lm, self.tokenizer, c.merge_lora)  # last: merging changes the model
        self.accelerator.wait_for_everyone()
        return result

    def save(self, completed: int, train_time: float) -> None:
        """Checkpoint the run after `completed` steps (collective)."""
        state = {"fingerprint": self.objective.fingerprint, "proxim": proxim.__version__}
        self.session.save(completed, train_time, {"model": self.lm}, self.optimization, state)

    def _stored(self, label: str) -> tuple[EvalResult | None, PairEval] | None:
        """The evaluation a resumed run made before it was interrupted."""
        pairs = self.session.folder.load_eval(f"pairs_{label}") if self.session.start_step else None
        if pairs is None:
            return None
        task = self.session.folder.load_eval(label)
        return (EvalResult(**task) if task else None), PairEval(**pairs)


def _describe(record: Mapping[str, float]) -> dict[str, str]:
    return {"loss": f"{record['loss/preference']:.3f}", "acc": f"{record['preference/accuracy']:.2f}", "margin": f"{record['preference/margin']:.2f}"}


def preference_table(result: PreferenceRunResult, label: str) -> str:
    """The before/after table of an offline run (markdown): held-out pairs, then the task, then wall time."""
    pb, pa, b, a = result.pairs_before, result.pairs_after, result.before, result.after
    rows = [
        ("preference accuracy (log-prob of chosen > rejected)", pct(pb.accuracy if pb else None), pct(pa.accuracy if pa else None)),
        ("implicit-reward accuracy", pct(pb.reward_accuracy if pb else None), pct(pa.reward_accuracy if pa else None)),
        ("preference loss", number(pb.loss if pb else math.nan), number(pa.loss if pa else math.nan)),
        ("implicit-reward margin", number(pb.margin if pb else math.nan), number(pa.margin if pa else math.nan)),
    ]
    if b is not None or a is not None:
        shown = a or b
        rows += [
            (f"task accuracy ({shown.n if shown else 0} prompts, greedy)", pct(b.accuracy if b else None), pct(a.accuracy if a else None)),
            ("task mean reward", number(b.mean_reward if b else math.nan), number(a.mean_reward if a else math.nan)),
        ]
    n = pa.n if pa is not None else pb.n if pb is not None else 0
    footer = f"wall time {result.wall_time:.0f} s (training loop {result.train_time:.0f} s, {result.steps_per_second:.2f} steps/s); run folder {result.run_dir}"
    return before_after_table(f"held-out evaluation ({n} pairs) -- {label}, {result.steps} steps", rows, footer)


def train_offline(
    config: PreferenceConfig,
    *,
    objective: proxim.PreferenceObjective | None = None,
    resume: str | os.PathLike[str] | None = None,
    registry: proxim.Registry | None = None,
) -> PreferenceRunResult:
    """One offline run of a preference objective (``config.preset`` dpo, ipo or hinge, or `objective`)."""
    return PreferenceTrainer(config, objective=objective, resume=resume, registry=registry).run()
