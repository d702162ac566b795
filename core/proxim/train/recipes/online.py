"""Online RL (``proxim train``): the recipe calls the composed objective and never asks which algorithm runs.

One step (`Trainer.step`)::

    prompts  --generator-->  G responses each  --rewards-->  R [B]
    (a colocated vLLM engine sleeps from here to the weight sync, and the trainer has the GPU)
    no grad: old log-probs (policy), reference log-probs (only if the objective needs them), values
             (only if it has a critic)                       -> proxim.Rollout
    stage 1: est = objective.advantages(rollout)              (once per rollout)
    stage 2: E epochs x shuffled minibatches x micro-batches:
             objective.loss(logprobs, rollout[idx], est[idx], values, normalizer=global count, entropy)
             one update each (`proxim.train.optimization`: accumulate, clip, skip and count non-finite)
    the generator syncs to the new weights (a sleeping engine wakes: weights, sync, KV cache)
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
from typing import Any

import attrs
import torch

import proxim
from proxim.diagnostics import GradientDiagnostics, combine_gradient_diagnostics
from proxim.errors import ConfigurationError, TrainingError
from proxim.figures import informative, write_figure
from proxim.ops import kl_estimate, masked_mean, masked_sum
from proxim.train import adapters, distributed, models, sharding
from proxim.train.config import TrainConfig
from proxim.train.critic import build_critic, response_values
from proxim.train.evaluation import evaluate_prompts
from proxim.train.generation import Generation, GeneratorContext, generator_class, make_generator, put_to_sleep
from proxim.train.logprobs import PolicyScorer, response_logprobs
from proxim.train.loop import step_seed
from proxim.train.optimization import Optimization, parameter_groups
from proxim.train.panels import online_panels
from proxim.train.prompts import columns, encode_prompts, prompt_source
from proxim.train.results import EvalResult, RunResult, summary_table
from proxim.train.rewards import RewardError, RewardSpec, build_rewards, probe_rewards, score_rows
from proxim.train.run_folder import default_name
from proxim.train.session import Session
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
        self.session = session = Session(c, resume)
        self.accelerator, self.rank, self.world = acc, rank, world = session.accelerator, session.rank, session.world
        if sharding.splits_parameters(acc) and not generator_class(c.generator).split_parameters:
            raise ConfigurationError(
                f"generator={c.generator!r} with sharded training (FSDP or DeepSpeed) is not supported: the engine's weight reload "
                "takes whole tensors, and this combination has never run. Use --generator hf with FSDP/DeepSpeed, or vLLM "
                "with data-parallel training (examples/accelerate/ddp.yaml)."
            )
        self.registry = registry or proxim.default_registry()
        checked = config.check(self.registry, world, custom_rewards=bool(rewards), custom_prompts=prompts is not None)
        self.objective: proxim.Objective = objective if objective is not None else checked
        self.fingerprint = self.objective.fingerprint
        distributed.agree(acc, self.fingerprint, "objective fingerprint")
        distributed.agree(acc, json.dumps(config.to_dict(), sort_keys=True, default=str), "configuration")
        self.task = config.load_task(self.registry)
        self.prompts = prompt_source(
            self.task, c.seed, rows=prompts, prompts_file=c.prompts_file, held_out=eval_prompts, eval_prompts_file=c.eval_prompts_file, eval_size=c.eval_size,
            tokenizer=models.start_tokenizer(c), system_prompt=c.system_prompt,
        )  # fmt: skip
        self.max_new_tokens = c.max_new_tokens_for(self.task if c.prompts_file is None else None)
        self.rewards = build_rewards(c.rewards, c.reward_weights, self.task, custom=rewards, device=acc.device, model=c)
        probe_rewards(self.rewards, self.prompts.batch(0, rank, world, min(2, c.prompts_per_step // world)))  # fails in seconds
        self.reward_failures = 0
        session.open(c.run_name or default_name(c.run_label() if objective is None else objective.preset or "custom", c.run_source()))
        with session.building():  # a failed start leaves no empty run folder
            # -- models: the initial policy, a reference and a critic only when the objective needs them --
            self.init_dir = initial_policy_dir(c, c, self.task, c.seed, session.path, acc, session.progress, resuming=resume is not None)
            lm, self.tokenizer = models.load_policy(self.init_dir, c, tokenizer_beside=self.init_dir == session.path / "init")
            self.eos_ids = models.eos_ids(self.tokenizer, lm)
            self.n_params = sum(p.numel() for p in lm.parameters())
            lm = adapters.prepare(lm, c, c.seed)  # LoRA and gradient checkpointing, as asked
            policy = PolicyScorer(lm, c.logprob_chunk_size)
            self.reference = self._reference(lm, policy) if "ref_logprobs" in self.objective.requires or c.adaptive_kl else None
            critic = build_critic(lm, c.critic_model, c.trust_remote_code, c.gradient_checkpointing) if self.objective.has_critic else None
            groups = [(policy, c.lr)] + ([(critic, c.critic_lr if c.critic_lr is not None else c.lr)] if critic is not None else [])
            self.updates_per_step = c.epochs * -(-self.local_batch // c.minibatch_for(self.local_batch))
            self.optimization = Optimization(acc, parameter_groups(groups), c, horizon=c.steps * self.updates_per_step)
            prepared = self.optimization.prepare(policy, *([critic] if critic is not None else []))
            self.policy, self.critic = prepared[0], prepared[1] if critic is not None else None
            context = GeneratorContext(
                self.lm, self.init_dir, self.tokenizer, self.eos_ids, c.seed + rank, c.generation_batch_size, c.vllm_gpu_memory_utilization, c.vllm_sleep_mode
            )
            self.generator = make_generator(c.generator, context)
            self.old_source, self.old_source_reason = c.old_logprobs_source(self.objective, acc.mixed_precision, self.generator)
            # -- where the run starts: step 0, or the latest checkpoint --------------------------------
            if resume is not None:
                state = session.restore(self.trained_models(), self.optimization, self.fingerprint, updates=c.steps * self.updates_per_step)
                if state.get("kl_coef") != self.objective.options.kl_coef:
                    self.objective = self.objective.override(kl_coef=float(state["kl_coef"]))
                self.reward_failures = int(state.get("reward_failures", 0))
            self.generator.sync(self.lm)
            kl_coef = self.objective.options.kl_coef
            self.kl_controller = proxim.AdaptiveKLController(value=kl_coef, target=c.kl_target, horizon=c.kl_horizon) if c.adaptive_kl else None

    def _reference(self, lm: Any, policy: PolicyScorer) -> torch.nn.Module:
        """The reference policy: the initial policy, frozen (sharded like the policy under FSDP); with LoRA, the
        policy's own scorer (under FSDP the sharded module itself) with its adapter disabled."""
        c = self.config
        if adapters.is_adapted(lm):
            return adapters.WithoutAdapter(policy, lm)
        frozen = PolicyScorer(models.frozen_copy(self.init_dir, c, self.accelerator.device), c.logprob_chunk_size)
        return sharding.prepare_frozen(self.accelerator, frozen)

    @property
    def local_batch(self) -> int:
        """Sequences per step on this process: its prompts x G."""
        return self.config.prompts_per_step // self.world * self.config.group_size

    @property
    def lm(self) -> Any:
        """The policy's causal LM, unwrapped."""
        return self.accelerator.unwrap_model(self.policy).lm

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds: the policy, and the critic when there is one (unwrapped)."""
        trained: dict[str, torch.nn.Module] = {"model": self.lm}
        if self.critic is not None:
            trained["critic"] = self.accelerator.unwrap_model(self.critic)
        return trained

    # -- one step --------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """One step of online RL, in the order of the algorithm; returns its metrics, averaged over processes."""
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(self.config.seed, step, self.rank))
        rows = self.prompts.batch(step, self.rank, self.world, self.config.prompts_per_step // self.world)
        t_generate = time.perf_counter()
        generation = self.sample(rows)
        t_generate = time.perf_counter() - t_generate
        put_to_sleep(self.generator)  # a colocated engine frees the GPU for training; the sync below wakes it
        scores, failure = self._try_score(rows, generation, step)
        if distributed.any_process(self.accelerator, scores is None):  # every process skips with the one whose rewards failed
            return self._skip(step, failure, t0)
        assert scores is not None
        self.reward_failures = 0
        batch = self.rollout(generation, scores)
        estimate = self.objective.advantages(batch)
        metrics = {**self._rollout_metrics(rows, generation, scores, batch), "time/generate": t_generate}
        metrics.update({k if k not in metrics else f"objective/{k}": float(v) for k, v in estimate.metrics.items()})
        metrics.update(self.update(generation, batch, estimate, step))
        t_sync = time.perf_counter()
        self.generator.sync(self.lm)
        metrics["time/sync"] = time.perf_counter() - t_sync
        self._adapt_kl(metrics, batch)
        metrics.update({"time/step": time.perf_counter() - t0, "kl/coef": self.objective.options.kl_coef, "reward/failed": 0.0})
        self._log_samples(step, rows, generation, scores)
        return {**distributed.reduce_mean(self.accelerator, metrics), "optim/skipped_total": float(self.optimization.nonfinite_total)}

    @torch.no_grad()
    def sample(self, rows: Sequence[Mapping[str, Any]], n: int | None = None, greedy: bool = False) -> Generation:
        """`n` (default G) responses to each row's prompt (greedy: the most likely one), on this process's device."""
        c = self.config
        prompt_ids = encode_prompts(self.tokenizer, [r["prompt"] for r in rows])
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
        from_sampler = self.old_source == "sampler"
        if from_sampler:
            if generation.rollout_logprobs is None:
                raise TrainingError(f"old_logprobs='sampler': the {c.generator} generator reported no log-probs here; use old_logprobs='recompute'.")
            old.append(generation.rollout_logprobs.float())
        B = len(generation.completions)
        size = c.micro_batch_size or c.minibatch_for(B)
        for idx in (torch.arange(i, min(i + size, B), device=acc.device) for i in range(0, B, size)):
            with acc.autocast():
                if not from_sampler:
                    old.append(response_logprobs(acc.unwrap_model(self.policy), generation, idx, c.temperature)[0])
                if self.reference is not None:
                    ref.append(response_logprobs(self.reference, generation, idx, c.temperature)[0])
                if self.critic is not None:
                    values.append(response_values(acc.unwrap_model(self.critic), generation, idx))
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
        """Stage 2: E epochs of shuffled minibatches, one optimiser update each; the mean of their metrics.

        An update's loss terms (``loss/*``) are the sums over its micro-batches (each is normalised by the whole
        minibatch's count, so they add up to the minibatch's loss); the other metrics are means per micro-batch."""
        c, acc, obj = self.config, self.accelerator, self.objective
        B = batch.batch_size
        size = c.minibatch_for(B)
        sums: dict[str, torch.Tensor] = {}
        norms: list[float] = []
        gradients: list[GradientDiagnostics] = []
        count = updates = skipped = 0
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
                    rows, estimated = batch[micro], estimate[micro]
                    out = obj.loss(lp, rows, estimated, values=values, normalizer=normalizer, entropy=entropy)
                    gradients.append(obj.gradient_diagnostics(lp, rows, estimated))
                    for key, v in out.metrics.items():
                        sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=acc.device)) + v.detach().double()
                    count += 1
                    return out.loss

                micro = c.micro_batch_size or len(idx)
                update = self.optimization.update([idx[i : i + micro] for i in range(0, len(idx), micro)], loss_of)
                updates += 1
                skipped += update.skipped
                norms += [] if update.grad_norm is None else [update.grad_norm]
        metrics = {k: float(v / max(updates if k.startswith("loss/") else count, 1)) for k, v in sums.items()}
        mean_norm = sum(norms) / len(norms) if norms else float("nan")
        metrics.update(combine_gradient_diagnostics(gradients))
        return {**metrics, "optim/grad_norm": mean_norm, "optim/lr": self.optimization.lr, "optim/skipped": float(skipped)}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, label: str) -> EvalResult:
        """Greedy decoding of the held-out prompts, scored by the rewards; every completion in ``eval_<label>.jsonl``."""
        where = {"rank": self.rank, "world": self.world, "max_new_tokens": self.max_new_tokens}
        rows = self.prompts.eval_rows()
        result, records = evaluate_prompts(rows, generator=self.generator, tokenizer=self.tokenizer, rewards=self.rewards, task=self.task, **where)
        self.session.folder.write_jsonl(f"eval_{label}.jsonl", records)
        return result

    def periodic_evaluation(self, step: int) -> dict[str, float]:
        result = self.evaluate(f"step_{step:06d}")
        return {"eval/mean_reward": result.mean_reward, **({"eval/accuracy": result.accuracy} if result.accuracy is not None else {})}

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Train from the start step to ``config.steps``; evaluate before and after; write the run folder."""
        c, session, folder = self.config, self.session, self.session.folder
        session.begin()
        folder.write_text("objective.txt", f"{self.objective!r}\n\nfingerprint: {self.fingerprint}\n")
        if not session.start_step:
            folder.write_text("samples.jsonl", "")
        session.progress.say(
            f"run folder: {folder.path}\nobjective: {self.objective!r}\n"
            f"model: {c.start_model() or 'built-in tiny Llama'} ({self.n_params / 1e6:.2f} M parameters); "
            f"reference: {'yes' if self.reference is not None else 'no'}; critic: {'yes' if self.critic is not None else 'no'}; "
            f"processes: {self.world}; device: {self.accelerator.device}; old log-probs: {self.old_source} ({self.old_source_reason})\n"
            f"updates per step: {self.updates_per_step} ({c.epochs} pass{'es' if c.epochs > 1 else ''} over {self.local_batch} sequences "
            f"in minibatches of {c.minibatch_for(self.local_batch)}{'; only the first is on-policy' if self.updates_per_step > 1 else ', on-policy'})"
        )
        stored = folder.load_eval("before") if session.start_step else None
        before = EvalResult(**stored) if stored else self.evaluate("before")
        folder.store_eval("before", attrs.asdict(before))
        label = self.objective.preset or "custom"
        outcome = session.run_steps(
            self.step, total=c.steps, save=self.save, describe=_describe, desc=label, evaluate=self.periodic_evaluation, eval_every=c.eval_every
        )
        if outcome.interrupted is not None:
            return RunResult(folder.path, outcome.steps, before, None, time.perf_counter() - self.t_start, outcome.train_time, outcome.interrupted)
        after = self.evaluate("after")
        folder.store_eval("after", attrs.asdict(after))
        result = RunResult(folder.path, c.steps, before, after, time.perf_counter() - self.t_start, outcome.train_time)
        if session.is_main:
            panels = informative(online_panels(folder.history(), before, after))
            write_figure(folder.path / "plot.png", panels, title=f"{label} on {c.task or 'prompts'}: {c.steps} steps")
        folder.write_summary(summary_table(result, label))
        session.save_trained(self.lm, self.tokenizer, c.merge_lora)  # last: merging changes the model
        self.generator.close()
        self.accelerator.wait_for_everyone()  # the main process writes the model and table; the others wait
        return result

    def save(self, completed: int, train_time: float) -> None:
        """Checkpoint the run after `completed` steps (collective)."""
        state = {
            "kl_coef": self.objective.options.kl_coef, "fingerprint": self.fingerprint, "init_dir": str(self.init_dir),
            "reward_failures": self.reward_failures, "proxim": proxim.__version__,
        }  # fmt: skip
        self.session.save(completed, train_time, self.trained_models(), self.optimization, state)

    def _try_score(self, rows: Sequence[Mapping[str, Any]], generation: Generation, step: int) -> tuple[Scores | None, RewardError | None]:
        try:
            return self.score(rows, generation, step), None
        except RewardError as failure:
            return None, failure

    def _skip(self, step: int, failure: RewardError | None, t0: float) -> dict[str, float]:
        """A step whose rewards failed (on this process: `failure`, or on another): no update; `max_reward_failures`
        such steps in a row stop the run (the step loop checkpoints the steps done)."""
        self.reward_failures += 1
        limit = self.config.max_reward_failures
        reason = str(failure) if failure is not None else "a reward failed on another process"
        if self.reward_failures >= limit:
            raise TrainingError(
                f"{self.reward_failures} steps in a row had rewards that failed; the last: {reason} Fix the reward, or raise max_reward_failures."
            )
        self.session.progress.notice(f"step {step + 1}: {reason} The step's update is skipped ({self.reward_failures} in a row; the run stops at {limit}).")
        metrics = {"reward/failed": 1.0, "optim/skipped": 1.0, "time/step": time.perf_counter() - t0, "kl/coef": self.objective.options.kl_coef}
        return {**distributed.reduce_mean(self.accelerator, metrics), "optim/skipped_total": float(self.optimization.nonfinite_total)}

    # -- the parts of a step's log -----------------------------------------------------------------
    def _rollout_metrics(self, rows: Sequence[Mapping[str, Any]], generation: Generation, scores: Scores, batch: proxim.Rollout) -> dict[str, float]:
        rewards, mask, B = scores.totals, batch.mask, batch.batch_size
        metrics = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if B > 1 else 0.0,
            "response/length": float(mask.sum(1).float().mean()),
            "response/truncated": float(generation.truncated.float().mean()),
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

        G, totals = len(generation.completions) // max(len(rows), 1), scores.totals.tolist()
        samples = [
            {
                "step": step,
                "prompt": rows[i // G]["prompt"],
                "completion": generation.completions[i],
                "reward": totals[i],
                **{k: v[i] for k, v in scores.parts.items()},
            }
            for i in range(0, len(totals), max(1, G))[: self.config.log_samples]
        ]
        self.session.folder.append_jsonl("samples.jsonl", gather_object(samples) if self.world > 1 else samples)


def _describe(record: Mapping[str, float]) -> dict[str, str]:
    if record.get("reward/failed"):
        return {"reward": "failed (step skipped)"}
    kl = record.get("kl/ref", record.get("region/approx_kl", float("nan")))
    shown = {"reward": f"{record['reward/mean']:.3f}", "kl": f"{kl:.4f}"}
    return {**shown, "acc": f"{record['reward/accuracy']:.2f}"} if "reward/accuracy" in record else shown
