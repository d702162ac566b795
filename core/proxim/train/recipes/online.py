"""Online RL (``proxim train``): the recipe calls the composed objective and never asks which algorithm runs.

One step (`Trainer.step`)::

    prompts  --generator-->  G responses each  --rewards-->  R [B]
    no grad: old log-probs (policy), reference log-probs (only if the objective needs them), values
             (only if it has a critic)                       -> proxim.Rollout
    stage 1: est = objective.advantages(rollout)              (once per rollout)
    stage 2: E epochs x shuffled minibatches x micro-batches:
             objective.loss(logprobs, rollout[idx], est[idx], values, normalizer=global count, entropy)
             one update each (`proxim.train.optimization`: accumulate, clip, skip and count non-finite)
    log the step's metrics

Run it with ``proxim train`` (see ``proxim train --help``) or ``proxim.train.train(TrainConfig(...))``;
drive it yourself with `Trainer` (built whole by its constructor; `step`, `sample`, `score`, `rollout`,
`update` and `evaluate` are public); distributed with ``accelerate launch -m proxim train ...``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

import proxim
from proxim.errors import ConfigurationError, TrainingError
from proxim.ops import kl_estimate, masked_mean, masked_sum
from proxim.train import checkpoint, distributed, models
from proxim.train.config import TrainConfig
from proxim.train.critic import ValueModel, build_critic, response_values
from proxim.train.figures import Panel, Series, informative, write_figure
from proxim.train.generation import Generation, GeneratorContext, make_generator
from proxim.train.logprobs import PolicyScorer, response_logprobs
from proxim.train.loop import StepLoop, step_seed
from proxim.train.optimization import Optimization, parameter_groups
from proxim.train.evaluation import evaluate_prompts
from proxim.train.prompts import columns, prompt_source
from proxim.train.reporting import Progress
from proxim.train.results import EvalResult, RunResult, summary_table
from proxim.train.rewards import RewardSpec, build_rewards, score_rows
from proxim.train.run_folder import RunFolder, default_name
from proxim.train.warmstart import initial_policy_dir


@attrs.frozen
class Scores:
    """The rewards of a step's completions: the weighted total [B] and each reward function's raw values."""

    totals: torch.Tensor
    parts: dict[str, list[float]]


class Trainer:
    """An online RL run, fully built by its constructor (models, optimiser, generator, rewards; the
    checkpoint when resuming). `run()` trains; `step(k)` is one step, made of the public parts below."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        objective: proxim.Objective | None = None,
        rewards: Sequence[RewardSpec] | None = None,
        prompts: Iterable[Mapping[str, Any]] | None = None,
        eval_prompts: Iterable[Mapping[str, Any]] | None = None,
        resume: str | os.PathLike[str] | None = None,
        registry: proxim.Registry | None = None,
    ):
        self.t_start = time.perf_counter()
        c = self.config = config
        # -- everything that can fail without a model, first ---------------------------------------
        if rewards and config.rewards != TrainConfig.default("rewards"):
            raise ConfigurationError(f"rewards are given twice: config.rewards={config.rewards} and rewards={list(rewards)}; give one of them.")
        self.accelerator = acc = distributed.make_accelerator(c.mixed_precision, c.tracker, Path(resume).resolve().parent if resume else c.output_dir)
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.registry = registry or proxim.default_registry()
        checked = config.check(self.registry, self.world, custom_rewards=bool(rewards), custom_prompts=prompts is not None)
        self.objective: proxim.Objective = objective if objective is not None else checked
        self.fingerprint = self.objective.fingerprint
        distributed.agree(acc, self.fingerprint, "objective fingerprint")
        distributed.agree(acc, json.dumps(config.to_dict(), sort_keys=True, default=str), "configuration")
        self.task = config.load_task(self.registry)
        self.prompts = prompt_source(
            self.task, c.seed, rows=prompts, prompts_file=c.prompts_file, held_out=eval_prompts, eval_prompts_file=c.eval_prompts_file, eval_size=c.eval_size,
        )
        self.max_new_tokens = c.max_new_tokens_for(self.task if c.prompts_file is None else None)
        label = c.run_label() if objective is None else objective.preset or "custom"
        self.folder = RunFolder.existing(resume, acc) if resume else RunFolder.create(c.output_dir, c.run_name or default_name(label, c.run_source()), acc)
        self.progress = Progress(c.quiet, self.is_main)
        # -- models: the initial policy, a reference and a critic only when the objective needs them --
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the training bar
        self.init_dir = initial_policy_dir(c, c, self.task, c.seed, self.folder.path, acc, self.progress, resuming=resume is not None)
        own_folder = self.init_dir == self.folder.path / "init"  # the tokenizer was saved beside the initial policy
        self.tokenizer = models.load_tokenizer(self.init_dir if own_folder else c.tokenizer or self.init_dir, c.trust_remote_code)
        lm = models.load_causal_lm(self.init_dir, c.trust_remote_code)
        self.eos_ids = models.eos_ids(self.tokenizer, lm)
        self.n_params = sum(p.numel() for p in lm.parameters())
        self.reference: PolicyScorer | None = None
        if "ref_logprobs" in self.objective.requires or c.adaptive_kl:
            frozen = models.load_causal_lm(self.init_dir, c.trust_remote_code).to(acc.device).eval().requires_grad_(False)
            self.reference = PolicyScorer(frozen, c.logprob_chunk_size)
        critic = build_critic(lm, c.critic_model, c.trust_remote_code) if self.objective.has_critic else None
        policy = PolicyScorer(lm, c.logprob_chunk_size)
        groups = [(policy, c.lr)] + ([(critic, c.critic_lr if c.critic_lr is not None else c.lr)] if critic is not None else [])
        self.updates_per_step = c.epochs * -(-self.local_batch // (c.minibatch_size or self.local_batch))
        self.optimization = Optimization(acc, parameter_groups(groups), c, horizon=c.steps * self.updates_per_step)
        prepared = self.optimization.prepare(policy, *([critic] if critic is not None else []))
        self.policy, self.critic = prepared[0], prepared[1] if critic is not None else None
        self.generator = make_generator(c.generator, GeneratorContext(self.lm, self.init_dir, self.tokenizer, self.eos_ids, c.seed + self.rank, c.generation_batch_size, c.vllm_gpu_memory_utilization))
        self.rewards = build_rewards(
            c.rewards, c.reward_weights, self.task, custom=rewards, reward_model=c.reward_model, reward_model_weight=c.reward_model_weight,
            trust_remote_code=c.trust_remote_code, device=acc.device,
        )
        # -- where the run starts: step 0, or the latest checkpoint --------------------------------
        self.start_step, self.time_before = 0, 0.0
        if resume is not None:
            self._restore()
        self.generator.sync(self.lm)
        self.kl_controller = proxim.AdaptiveKLController(value=self.objective.options.kl_coef, target=c.kl_target, horizon=c.kl_horizon) if c.adaptive_kl else None

    @property
    def local_batch(self) -> int:
        """Sequences per step on this process: its prompts x G."""
        return int(self.config.prompts_per_step // self.world * self.config.group_size)

    @property
    def lm(self) -> Any:
        """The policy's causal LM, unwrapped."""
        return self.accelerator.unwrap_model(self.policy).lm

    # -- one step --------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """One step of online RL, in the order of the algorithm; returns its metrics, averaged over processes."""
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(self.config.seed, step, self.rank))
        rows = self.prompts.batch(step, self.rank, self.world, self.config.prompts_per_step // self.world)
        t_generate = time.perf_counter()
        generation = self.sample(rows)
        t_generate = time.perf_counter() - t_generate
        scores = self.score(rows, generation, step)
        batch = self.rollout(generation, scores)
        estimate = self.objective.advantages(batch)
        metrics = {**self._rollout_metrics(rows, generation, scores, batch), "time/generate": t_generate}
        metrics.update({k if k not in metrics else f"objective/{k}": float(v) for k, v in estimate.metrics.items()})
        metrics.update(self.update(generation, batch, estimate, step))
        self.generator.sync(self.lm)
        self._adapt_kl(metrics, batch)
        metrics["time/step"] = time.perf_counter() - t0
        metrics["kl/coef"] = self.objective.options.kl_coef
        self._log_samples(step, rows, generation, scores)
        return {**distributed.reduce_mean(self.accelerator, metrics), "optim/skipped_total": float(self.optimization.nonfinite_total)}

    @torch.no_grad()
    def sample(self, rows: Sequence[Mapping[str, Any]], n: int | None = None, greedy: bool = False) -> Generation:
        """`n` (default G) responses to each row's prompt (greedy: the most likely one), on this process's device."""
        c = self.config
        prompt_ids = [list(ids) for ids in self.tokenizer([r["prompt"] for r in rows])["input_ids"]]
        generation = self.generator.generate(prompt_ids, n or c.group_size, c.temperature, c.top_p, self.max_new_tokens, greedy=greedy)
        return generation.to(self.accelerator.device)

    def score(self, rows: Sequence[Mapping[str, Any]], generation: Generation, step: int) -> Scores:
        """The rewards of the completions (`self.rewards`, which a custom loop may replace between steps)."""
        totals, parts = score_rows(self.rewards, rows, generation.completions, step)
        return Scores(torch.tensor(totals, dtype=torch.float32, device=self.accelerator.device), parts)

    @torch.no_grad()
    def rollout(self, generation: Generation, scores: Scores) -> proxim.Rollout:
        """The `proxim.Rollout` of a generation: old log-probs, and reference log-probs and values when needed."""
        c, acc = self.config, self.accelerator
        old, ref, values = [], [], []
        if c.old_logprobs == "sampler":
            if generation.rollout_logprobs is None:
                raise TrainingError(f"old_logprobs='sampler': the {c.generator} generator reported no log-probs for this sampling setting; use old_logprobs='recompute'.")
            old.append(generation.rollout_logprobs.float())
        for idx in self._chunks(len(generation.completions)):
            with acc.autocast():
                if c.old_logprobs != "sampler":
                    old.append(response_logprobs(acc.unwrap_model(self.policy), generation, idx, c.temperature)[0])
                if self.reference is not None:
                    ref.append(response_logprobs(self.reference, generation, idx, c.temperature)[0])
                if self.critic is not None:
                    values.append(response_values(acc.unwrap_model(self.critic), generation, idx))
        B = len(generation.completions)
        return proxim.Rollout(
            old_logprobs=torch.cat(old),
            mask=generation.response_mask,
            rewards=scores.totals,
            group=torch.arange(B // c.group_size, device=acc.device).repeat_interleave(c.group_size),
            ref_logprobs=torch.cat(ref) if ref else None,
            values=torch.cat(values) if values else None,
            rollout_logprobs=generation.rollout_logprobs.float() if generation.rollout_logprobs is not None else None,
        )

    def update(self, generation: Generation, batch: proxim.Rollout, estimate: proxim.Estimate, step: int) -> dict[str, float]:
        """Stage 2: E epochs of shuffled minibatches, one optimiser update each; the mean of their metrics."""
        c, acc, obj = self.config, self.accelerator, self.objective
        B = batch.batch_size
        size = c.minibatch_size or B
        sums: dict[str, torch.Tensor] = {}
        norms: list[float] = []
        count = skipped = 0
        for epoch in range(c.epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(step_seed(c.seed, step, self.rank, epoch))).to(acc.device)
            for start in range(0, B, size):
                idx = order[start : start + size]
                normalizer = obj.normalizer(batch.mask[idx]).float()
                if self.world > 1:  # a global count, scaled so that DDP's mean of gradients is the full-batch gradient
                    normalizer = acc.reduce(normalizer, reduction="sum") / self.world

                def loss_of(micro: torch.Tensor, normalizer: torch.Tensor = normalizer) -> torch.Tensor:
                    nonlocal count
                    with acc.autocast():
                        lp, entropy = response_logprobs(self.policy, generation, micro, c.temperature, obj.needs_entropy)
                        values = response_values(self.critic, generation, micro) if self.critic is not None else None
                    out = obj.loss(lp, batch[micro], estimate[micro], values=values, normalizer=normalizer, entropy=entropy)
                    for key, v in out.metrics.items():
                        sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=acc.device)) + v.detach().double()
                    count += 1
                    return out.loss

                micro = c.micro_batch_size or len(idx)
                update = self.optimization.update([idx[i : i + micro] for i in range(0, len(idx), micro)], loss_of)
                skipped += update.skipped
                norms += [] if update.grad_norm is None else [update.grad_norm]
        metrics = {k: float(v / max(count, 1)) for k, v in sums.items()}
        metrics["optim/grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        metrics["optim/lr"] = self.optimization.lr
        metrics["optim/skipped"] = float(skipped)
        return metrics

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, label: str) -> EvalResult:
        """Greedy decoding of the held-out prompts, scored by the rewards; every completion in ``eval_<label>.jsonl``."""
        result, records = evaluate_prompts(
            self.prompts.eval_rows(), generator=self.generator, tokenizer=self.tokenizer, rewards=self.rewards, task=self.task,
            max_new_tokens=self.max_new_tokens, rank=self.rank, world=self.world,
        )
        self.folder.write_jsonl(f"eval_{label}.jsonl", records)
        return result

    def periodic_evaluation(self, step: int) -> dict[str, float]:
        result = self.evaluate(f"step_{step:06d}")
        return {"eval/mean_reward": result.mean_reward, **({"eval/accuracy": result.accuracy} if result.accuracy is not None else {})}

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Train from the start step to ``config.steps``; evaluate before and after; write the run folder."""
        c = self.config
        self.folder.write_config(c)
        self.folder.write_text("objective.txt", f"{self.objective!r}\n\nfingerprint: {self.fingerprint}\n")
        history = self.folder.history(upto=self.start_step) if self.start_step else []
        self.folder.start_metrics(history)
        if not self.start_step:
            self.folder.write_text("samples.jsonl", "")
        self.progress.say(
            f"run folder: {self.folder.path}\nobjective: {self.objective!r}\n"
            f"model: {c.start_model() or 'built-in tiny Llama'} ({self.n_params / 1e6:.2f} M parameters); "
            f"reference: {'yes' if self.reference is not None else 'no'}; critic: {'yes' if self.critic is not None else 'no'}; "
            f"processes: {self.world}; device: {self.accelerator.device}"
        )
        stored = self.folder.load_eval("before") if self.start_step else None
        before = EvalResult(**stored) if stored else self.evaluate("before")
        self.folder.store_eval("before", attrs.asdict(before))
        loop = StepLoop(
            accelerator=self.accelerator, run=self.folder, total=c.steps, start=self.start_step, save_every=c.save_every, save=self.save,
            progress=self.progress, describe=_describe, desc=self.objective.preset or "train", tracker_config=c.to_dict(), time_before=self.time_before,
        )
        outcome = loop.run_steps(self.step, self.periodic_evaluation, c.eval_every)
        if outcome.interrupted is not None:
            self.progress.notice(f"interrupted (signal {outcome.interrupted}) after step {outcome.steps}; checkpoint in {self.folder.path / 'checkpoints'}. Continue with: proxim train --resume {self.folder.path}")
            return RunResult(self.folder.path, outcome.steps, before, None, time.perf_counter() - self.t_start, outcome.train_time, outcome.interrupted)
        after = self.evaluate("after")
        self.folder.store_eval("after", attrs.asdict(after))
        result = RunResult(self.folder.path, c.steps, before, after, time.perf_counter() - self.t_start, outcome.train_time)
        if self.is_main:
            models.save_model_dir(self.lm, self.tokenizer, self.folder.path / "model")
            write_figure(self.folder.path / "plot.png", informative(run_panels(self.folder.history(), before, after)), title=f"{self.objective.preset or 'custom'} on {c.task or 'prompts'}: {c.steps} steps")
        self.folder.write_summary(summary_table(result, self.objective.preset or "custom"))
        self.generator.close()
        self.accelerator.wait_for_everyone()  # the main process writes the model and table; the others wait
        return result

    def save(self, completed: int, train_time: float) -> None:
        """Checkpoint the run after `completed` steps (collective)."""
        state = {
            "kl_coef": self.objective.options.kl_coef, "train_time": train_time, "fingerprint": self.fingerprint,
            "world_size": self.world, "init_dir": str(self.init_dir), "proxim": proxim.__version__,
        }
        trained: dict[str, torch.nn.Module] = {"model": self.lm}
        if self.critic is not None:
            trained["critic"] = self.accelerator.unwrap_model(self.critic)
        checkpoint.save(
            self.folder.path, completed, accelerator=self.accelerator, models=trained, optimization=self.optimization,
            state=state, config_toml=self.config.to_toml(), keep=self.config.keep_checkpoints,
        )

    # -- helpers ---------------------------------------------------------------------------------
    def _restore(self) -> None:
        latest = checkpoint.latest(self.folder.path)
        assert latest is not None  # RunFolder.existing checked it
        trained: dict[str, torch.nn.Module] = {"model": self.lm}
        if self.critic is not None:
            trained["critic"] = self.accelerator.unwrap_model(self.critic)
        state = checkpoint.load(latest, accelerator=self.accelerator, models=trained, optimization=self.optimization)
        if state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"--resume {self.folder.path}: the objective differs from the checkpoint's.\n  checkpoint: {state.get('fingerprint')}\n  now:        {self.fingerprint}")
        if state.get("world_size") != self.world:
            self.progress.say(f"warning: the checkpoint was written by {state.get('world_size')} processes, this run has {self.world}: prompts and sampling will differ from an uninterrupted run.")
        if self.config.steps * self.updates_per_step > self.optimization.horizon and self.config.lr_schedule != "constant":
            self.progress.say(f"note: the {self.config.lr_schedule} schedule spans the first {self.optimization.horizon} updates of this run; later updates keep its final learning rate.")
        self.start_step, self.time_before = int(state["step"]), float(state.get("train_time", 0.0))
        if state.get("kl_coef") != self.objective.options.kl_coef:
            self.objective = self.objective.override(kl_coef=float(state["kl_coef"]))
        self.progress.say(f"resuming {self.folder.path} from step {self.start_step} ({latest.name})")

    def _chunks(self, n: int) -> list[torch.Tensor]:
        size = self.config.micro_batch_size or self.config.minibatch_size or n
        return [torch.arange(i, min(i + size, n), device=self.accelerator.device) for i in range(0, n, size)]

    def _rollout_metrics(self, rows: Sequence[Mapping[str, Any]], generation: Generation, scores: Scores, batch: proxim.Rollout) -> dict[str, float]:
        rewards, mask, B = scores.totals, batch.mask, batch.batch_size
        metrics = {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if B > 1 else 0.0,
            "response/length": float(mask.sum(1).float().mean()), "response/truncated": float(generation.truncated.float().mean()),
        }
        metrics.update({f"reward/{name}": sum(values) / len(values) for name, values in scores.parts.items()})
        answers = columns(rows, B // max(len(rows), 1)).get("answer")
        if self.task is not None and answers is not None:
            metrics["reward/accuracy"] = sum(self.task.correct(comp, ans) for comp, ans in zip(generation.completions, answers)) / B
        if batch.ref_logprobs is not None:
            metrics["kl/ref"] = float(masked_mean(kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k3"), mask))
            metrics["kl/ref_sequence"] = float(masked_sum(kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k1"), mask, dim=1).mean())
        return metrics

    def _adapt_kl(self, metrics: Mapping[str, float], batch: proxim.Rollout) -> None:
        if self.kl_controller is not None and "kl/ref_sequence" in metrics:
            self.kl_controller.update(metrics["kl/ref_sequence"], batch.batch_size * self.world)
            self.objective = self.objective.override(kl_coef=self.kl_controller.value)

    def _log_samples(self, step: int, rows: Sequence[Mapping[str, Any]], generation: Generation, scores: Scores) -> None:
        from accelerate.utils import gather_object

        G = len(generation.completions) // max(len(rows), 1)
        totals = scores.totals.tolist()
        samples = [
            {"step": step, "prompt": rows[i // G]["prompt"], "completion": generation.completions[i], "reward": totals[i], **{k: v[i] for k, v in scores.parts.items()}}
            for i in range(0, len(totals), max(1, G))[: self.config.log_samples]
        ]
        self.folder.append_jsonl("samples.jsonl", gather_object(samples) if self.world > 1 else samples)


def _describe(record: Mapping[str, float]) -> dict[str, str]:
    kl = record.get("kl/ref", record.get("region/approx_kl", float("nan")))
    shown = {"reward": f"{record['reward/mean']:.3f}", "kl": f"{kl:.4f}"}
    return {**shown, "acc": f"{record['reward/accuracy']:.2f}"} if "reward/accuracy" in record else shown


def run_panels(history: Sequence[Mapping[str, float]], before: EvalResult | None = None, after: EvalResult | None = None) -> list[Panel]:
    """The panels of an online run's plot (diagnostics that stay at zero are dropped by `informative`)."""

    def series(key: str, label: str | None = None, style: str = "auto") -> Series:
        return Series(label or key, [(h["step"], h[key]) for h in history if key in h], style=style)  # type: ignore[arg-type]

    parts = sorted({k for h in history for k in h if k.startswith("reward/")} - {"reward/mean", "reward/std", "reward/accuracy"})
    rewards = [series("reward/mean", "mean (train)"), *(series(k) for k in parts if len(parts) > 1)]
    held_out: list[tuple[float, float]] = [(0.0, before.accuracy)] if before is not None and before.accuracy is not None else []
    held_out += [(history[-1]["step"], after.accuracy)] if history and after is not None and after.accuracy is not None else []
    evaluated = sorted(held_out + [(h["step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h])
    region = sorted({k for h in history for k in h if k.startswith("region/") and any(w in k for w in ("clip", "frac", "mask"))})
    return [
        Panel("Reward", "reward", rewards, essential=True),
        Panel("Accuracy", "accuracy", [series("reward/accuracy", "train (sampled)"), Series("held-out (greedy)", evaluated, style="dashed")], percent=True, essential=True),
        Panel("KL", "nats / token", [series("kl/ref", "sampling policy to reference"), series("loss/kl", "policy to reference (in the loss)"), series("region/approx_kl", "policy to old policy")]),
        Panel("Trust region", "fraction of tokens", [series(k) for k in region], percent=True),
        Panel("Loss", "loss", [series(k) for k in ("loss/total", "loss/policy", "loss/value", "loss/entropy")]),
        Panel("Gradient norm", "L2 norm (before clipping)", [series("optim/grad_norm")]),
        Panel("Response length", "tokens", [series("response/length")]),
    ]


def train(
    config: TrainConfig | None = None,
    *,
    objective: proxim.Objective | None = None,
    rewards: Sequence[RewardSpec] | None = None,
    prompts: Iterable[Mapping[str, Any]] | None = None,
    eval_prompts: Iterable[Mapping[str, Any]] | None = None,
    resume: str | os.PathLike[str] | None = None,
    registry: proxim.Registry | None = None,
) -> RunResult:
    """One online RL run (see `Trainer` for the arguments); returns its `RunResult`."""
    trainer = Trainer(config or TrainConfig(), objective=objective, rewards=rewards, prompts=prompts, eval_prompts=eval_prompts, resume=resume, registry=registry)
    return trainer.run()
