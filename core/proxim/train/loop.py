"""The online RL loop. It calls the composed objective and nothing else: it never asks which algorithm runs.

One step::

    prompts  --generator-->  G responses each  --rewards-->  R [B]
    no grad: old log-probs (policy), reference log-probs (only if the objective needs them), values
             (only if it has a critic)                       -> proxim.Rollout
    stage 1: est = objective.advantages(rollout)              (once per rollout)
    stage 2: E epochs x shuffled minibatches x micro-batches:
             objective.loss(logprobs, rollout[idx], est[idx], values, normalizer=global count, entropy)
             backward per micro-batch; clip; AdamW step (skipped, and counted, if non-finite); LR schedule
    log metrics; checkpoint every N steps and on SIGINT/SIGTERM

Run it with ``proxim train`` (see ``proxim train --help``) or ``proxim.train.train(TrainConfig(...))``;
distributed with ``accelerate launch --num_processes 2 -m proxim train ...``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import proxim
import torch
from proxim.errors import ConfigurationError, ProximError
from proxim.ops import kl_estimate, masked_mean, masked_sum
from proxim.train import checkpoint as ckpt
from proxim.train import models
from proxim.train.config import TrainConfig
from proxim.train.data import (
    PromptSource,
    RowSource,
    TaskSource,
    as_rows,
    columns,
    read_jsonl,
)
from proxim.train.rewards import Reward, RewardFn, RewardModel, load_function, score

if TYPE_CHECKING:
    from proxim.train.generation import Generator

PLOT_FILE = "plot.png"


class TrainingError(ProximError, RuntimeError):
    """A run that cannot continue (too many non-finite updates in a row, ranks that disagree)."""


@attrs.frozen
class EvalResult:
    """Held-out evaluation with greedy decoding: `accuracy` (None without a task) and mean total reward."""

    n: int
    accuracy: float | None
    mean_reward: float


@attrs.frozen
class RunResult:
    run_dir: Path
    steps: int
    before: EvalResult | None
    after: EvalResult | None
    wall_time: float
    train_time: float
    interrupted: int | None = None  # the signal number that stopped the run early, if one did

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.train_time if self.train_time > 0 else float("nan")


def step_seed(seed: int, *parts: int) -> int:
    """A seed that is a pure function of (seed, parts): how a resumed run draws what the first would have."""
    return random.Random("proxim-" + "-".join(map(str, (seed, *parts)))).getrandbits(63)


def check_same_across_ranks(values: Sequence[str], what: str) -> None:
    """Raise `TrainingError` naming each rank's value unless all processes hold the same `what`."""
    if len(set(values)) > 1:
        listing = "\n".join(f"  rank {i}: {v}" for i, v in enumerate(values))
        raise TrainingError(
            f"the processes disagree on the {what}; every process must build the same objective "
            f"(same proxim version, plugins and configuration):\n{listing}"
        )


def _reduce_mean(accelerator: Any, values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """One all-reduce for all metrics (keys are the same on every process); returns Python floats."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu().reshape(()) for k in keys]).to(accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.cpu().tolist()))


def _tracker(config: TrainConfig) -> str | None:
    if config.tracker == "none":
        return None
    import importlib.util

    available = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
    if config.tracker == "tensorboard":
        if not available:
            raise ConfigurationError("tracker='tensorboard' but neither tensorboard nor tensorboardX is installed.")
        return "tensorboard"
    return "tensorboard" if available else None


def _cpu_processes() -> bool:
    """True for a multi-process launch (torchrun's WORLD_SIZE > 1) on a machine without CUDA.

    accelerate only forms a CPU process group (gloo) when told it runs on CPU; `accelerate launch
    --multi_gpu --num_processes N` or `torchrun --nproc_per_node N` on a CPU-only machine sets the
    process variables but not that flag, and each process would otherwise train alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return not torch.cuda.is_available()
    if os.environ.get("MASTER_ADDR") and "ACCELERATE_MIXED_PRECISION" in os.environ and not torch.cuda.is_available():
        # accelerate's simple launcher: `--num_processes N` without --multi_gpu starts ONE process on CPU
        print(
            "proxim: accelerate started a single process. On a machine without GPUs, accelerate launch needs "
            "--multi_gpu to start several (it then runs them on CPU): accelerate launch --multi_gpu --num_processes 2 -m proxim train",
            file=sys.stderr,
        )
    return False


def base_policy(config: TrainConfig) -> tuple[Any, Any, dict[str, Any]]:
    """The model before any warm start (the built-in tiny model, or `init` / `model`), its tokenizer, and its cache identity."""
    start = config.start_model()
    if start is None:
        tiny = models.tiny_config(config.tiny_hidden_size, config.tiny_layers, config.tiny_heads)
        return models.build_tiny_model(tiny, config.seed), models.byte_tokenizer(), {"builtin": tiny.to_dict(), "seed": config.seed}
    tokenizer = models.load_tokenizer(config.tokenizer or start, config.trust_remote_code)
    lm = models.load_causal_lm(start, config.trust_remote_code)
    mtime = max((p.stat().st_mtime for p in Path(start).glob("*.safetensors")), default=0)
    return lm, tokenizer, {"path": str(Path(start).resolve()), "mtime": mtime}


def warm_start_policy(config: TrainConfig, task: Any, lm: Any, tokenizer: Any, identity: dict[str, Any], steps: int, accelerator: Any, progress: bool) -> str:
    """Fine-tune `lm` in place on `task`'s answers for `steps` supervised steps (cached); returns what happened, in words."""
    from proxim.train.warmstart import warm_start

    lm.to(accelerator.device)
    t0 = time.perf_counter()
    entry, hit = warm_start(
        lm, tokenizer, task, model_identity=identity, steps=steps, lr=config.warmstart_lr,
        batch_size=config.warmstart_batch_size, seed=config.seed, cache_dir=config.cache_dir, accelerator=accelerator, progress=progress,
    )
    how = "loaded from the cache" if hit else f"trained in {time.perf_counter() - t0:.0f} s and cached"
    return f"warm start: {steps} supervised steps on {task.name}, {how} ({entry})"


class Trainer:
    """A training run: built from a `TrainConfig`, run with `run()`. See the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        objective: proxim.Objective | None = None,
        rewards: Sequence[RewardFn | tuple[RewardFn, float]] | None = None,
        prompts: Iterable[Mapping[str, Any]] | None = None,
        eval_prompts: Iterable[Mapping[str, Any]] | None = None,
        resume: str | os.PathLike[str] | None = None,
        registry: proxim.Registry | None = None,
    ):
        self.t_start = time.perf_counter()
        self.config = config
        from accelerate import Accelerator

        # Trackers write under <run folder>/tensorboard: the project dir is the folder that holds run folders.
        project_dir = Path(resume).resolve().parent if resume is not None else Path(config.output_dir)
        accelerator = Accelerator(
            cpu=_cpu_processes(),
            mixed_precision=config.mixed_precision,
            log_with=_tracker(config),
            project_dir=str(project_dir),
            step_scheduler_with_optimizer=False,
        )
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.rank: int
        self.world: int
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.registry = registry or proxim.default_registry()
        # -- everything that can fail without a model, first ------------------------------------
        checked = config.check(self.registry, self.world, custom_rewards=bool(rewards), custom_prompts=prompts is not None)
        self.objective = objective if objective is not None else checked
        self.objective_given = objective
        self.base_fingerprint = self.objective.fingerprint
        from accelerate.utils import gather_object

        check_same_across_ranks(gather_object([self.base_fingerprint]), "objective fingerprint")
        check_same_across_ranks(gather_object([json.dumps(config.to_dict(), sort_keys=True, default=str)]), "configuration")
        self.task = self.registry.get("task", config.task)() if config.task is not None else None
        self.source = self._prompt_source(prompts, eval_prompts)
        self.max_new_tokens = config.resolved_max_new_tokens(self.task)
        self.run_dir = self._run_dir(resume)
        self.resuming = resume is not None
        self.progress = not config.quiet and self.is_main
        self.last_saved = -1
        self.nonfinite_total = self.nonfinite_streak = 0
        self.train_time_before = 0.0

    # -- setup ----------------------------------------------------------------------------------
    def _prompt_source(self, prompts: Iterable[Mapping[str, Any]] | None, eval_prompts: Iterable[Mapping[str, Any]] | None) -> PromptSource:
        c = self.config
        held_out = as_rows(eval_prompts) if eval_prompts is not None else (read_jsonl(c.eval_prompts_file) if c.eval_prompts_file else None)
        if prompts is not None:
            return RowSource(as_rows(prompts), c.seed, held_out, c.eval_size, origin="prompts")
        if c.prompts_file:
            return RowSource(read_jsonl(c.prompts_file), c.seed, held_out, c.eval_size, origin=c.prompts_file)
        assert self.task is not None
        if held_out is not None:
            return _TaskWithHeldOut(TaskSource(self.task, c.seed), held_out[: c.eval_size] if c.eval_size else held_out)
        return TaskSource(self.task, c.seed, c.eval_size)

    def _run_dir(self, resume: str | os.PathLike[str] | None) -> Path:
        from accelerate.utils import broadcast_object_list

        if resume is not None:
            run_dir = Path(resume)
            if ckpt.latest(run_dir) is None:
                raise ConfigurationError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}.")
            return run_dir
        when = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        label = None if self.objective_given is None else (self.objective_given.preset or "custom")
        name = [self.config.run_name or self.config.default_run_name(when, label)]
        name = broadcast_object_list(name) if self.world > 1 else name
        run_dir = Path(self.config.output_dir) / name[0]
        if ckpt.latest(run_dir) is not None:
            raise ConfigurationError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another --run-name.")
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        return run_dir

    def _say(self, message: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def _build(self, rewards: Any) -> None:
        from proxim.train.generation import HFGenerator, VLLMGenerator
        from proxim.train.logprobs import PolicyScorer, build_critic
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the training bar
        c, acc = self.config, self.accelerator
        init_dir = self.run_dir / "init"
        # -- the initial policy (after any warm start) lives in init_dir, or is the user's model directory
        if not self.resuming:
            self._make_initial_policy(init_dir)
        start = c.start_model()
        source_dir = init_dir if (init_dir / "config.json").is_file() else Path(start) if start else None
        if source_dir is None:
            raise TrainingError(f"{self.run_dir} has no init/ folder and the configuration names no model to start from.")
        self.init_dir = source_dir
        tok_dir = source_dir if source_dir == init_dir else Path(c.tokenizer or start)  # type: ignore[arg-type]
        self.tokenizer = models.load_tokenizer(tok_dir, c.trust_remote_code)
        lm = models.load_causal_lm(source_dir, c.trust_remote_code)
        self.eos_ids = models.eos_ids(self.tokenizer, lm)
        self.n_params = sum(p.numel() for p in lm.parameters())
        # -- reference policy: only when the objective has a KL term ------------------------------
        self.reference = None
        if self._wants_reference():
            ref = models.load_causal_lm(source_dir, c.trust_remote_code).to(acc.device).eval().requires_grad_(False)
            self.reference = PolicyScorer(ref, c.logprob_chunk_size)
        # -- critic: only when the objective learns state values ----------------------------------
        critic = None
        if self._wants_critic():
            backbone = None
            if c.critic_model:
                from transformers import AutoModel

                backbone = AutoModel.from_pretrained(c.critic_model, trust_remote_code=c.trust_remote_code, dtype=torch.float32)
            critic = build_critic(lm, backbone)
        policy = PolicyScorer(lm, c.logprob_chunk_size)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": c.lr}]
        if critic is not None:
            groups.append({"params": list(critic.parameters()), "lr": c.critic_lr if c.critic_lr is not None else c.lr})
        optimizer = torch.optim.AdamW(groups, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps, weight_decay=c.weight_decay)
        self.updates_per_step = c.epochs * math.ceil(self.local_batch / (c.minibatch_size or self.local_batch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(c.steps * self.updates_per_step))
        if critic is not None:
            self.policy, self.critic, self.optimizer = acc.prepare(policy, critic, optimizer)
        else:
            self.policy, self.optimizer = acc.prepare(policy, optimizer)
            self.critic = None
        # -- generator ------------------------------------------------------------------------
        self.generator: Generator
        if c.generator == "vllm":
            max_len = int(getattr(self.lm.config, "max_position_embeddings", 2048))
            self.generator = VLLMGenerator(source_dir, self.tokenizer, self.eos_ids, c.seed + self.rank, max_len, c.vllm_gpu_memory_utilization)
        else:
            self.generator = HFGenerator(self.lm, self.tokenizer, self.eos_ids, c.generation_batch_size)
        self.rewards = self._rewards(rewards)

    def _wants_reference(self) -> bool:
        return "ref_logprobs" in self.objective.requires or self.config.adaptive_kl

    def _wants_critic(self) -> bool:
        return bool(self.objective.has_critic)

    @property
    def local_batch(self) -> int:
        return self.config.prompts_per_step // self.world * self.config.group_size

    @property
    def lm(self) -> Any:
        return self.accelerator.unwrap_model(self.policy).lm

    def _lr_lambda(self, total: int) -> Callable[[int], float]:
        c = self.config

        def factor(k: int) -> float:
            if k < c.warmup_updates:
                return (k + 1) / c.warmup_updates
            if c.lr_schedule == "constant":
                return 1.0
            frac = min(1.0, (k - c.warmup_updates) / max(1, total - c.warmup_updates))
            return 1.0 - frac if c.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

        return factor

    def _make_initial_policy(self, init_dir: Path) -> None:
        c, acc = self.config, self.accelerator
        steps = c.resolved_warmstart_steps()
        if c.start_model() is not None and steps == 0:
            return  # the user's directory is the initial policy; nothing to copy
        if steps > 0 and self.task is None:
            raise ConfigurationError("warmstart_steps > 0 needs a task (its answers are the supervised targets); set warmstart_steps=0.")
        lm, tokenizer, identity = base_policy(c)
        if steps > 0:
            assert self.task is not None
            self._say(warm_start_policy(c, self.task, lm, tokenizer, identity, steps, acc, self.progress))
        if self.is_main:
            tmp = init_dir.with_name(".tmp-init")
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            models.save_model_dir(lm, tokenizer, tmp)
            shutil.rmtree(init_dir, ignore_errors=True)
            os.replace(tmp, init_dir)
        acc.wait_for_everyone()

    def _rewards(self, custom: Any) -> list[Reward]:
        c = self.config
        out: list[Reward] = []
        if custom:
            for item in custom:
                fn, weight = item if isinstance(item, tuple) else (item, 1.0)
                out.append(Reward(getattr(fn, "__name__", type(fn).__name__), fn, float(weight)))
        else:
            weights = c.reward_weights or [1.0] * len(c.rewards)
            for spec, w in zip(c.rewards, weights):
                if spec == "task":
                    assert self.task is not None
                    out.append(Reward(self.task.name, self.task.reward, w))
                else:
                    out.append(Reward(spec.rpartition(":")[2], load_function(spec), w))
        if c.reward_model is not None:
            rm = RewardModel(c.reward_model, self.accelerator.device, trust_remote_code=c.trust_remote_code)
            out.append(Reward("reward_model", rm, c.reward_model_weight))
        names = [r.name for r in out]
        for i, r in enumerate(out):
            if names.count(r.name) > 1:
                out[i] = attrs.evolve(r, name=f"{r.name}_{i}")
        return out

    # -- pieces of a step -----------------------------------------------------------------------
    def _encode(self, rows: Sequence[Mapping[str, Any]]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer([r["prompt"] for r in rows])["input_ids"]]

    def _score(self, scorer: Any, gen: Any, idx: torch.Tensor, grad: bool, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs [b, T] (and entropy) of rows `idx`, forwarding only up to their last response token."""
        T = gen.response_ids.shape[1]
        ids, mask, width = _sequences(gen, idx)
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            lp, ent = scorer(ids, mask, gen.response_ids[idx, :width], self.config.temperature, entropy)
        pad = (0, T - width)
        return torch.nn.functional.pad(lp.float(), pad), None if ent is None else torch.nn.functional.pad(ent.float(), pad)

    def _values(self, critic: Any, gen: Any, idx: torch.Tensor, grad: bool) -> torch.Tensor:
        T = gen.response_ids.shape[1]
        ids, mask, width = _sequences(gen, idx)
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            v = critic(ids, mask, width)
        return torch.nn.functional.pad(v.float(), (0, T - width))

    def _chunks(self, n: int) -> list[torch.Tensor]:
        size = self.config.micro_batch_size or self.config.minibatch_size or n
        return [torch.arange(i, min(i + size, n), device=self.accelerator.device) for i in range(0, n, size)]

    @torch.no_grad()
    def _rollout(self, step: int) -> tuple[Any, proxim.Rollout, dict[str, float], list[dict[str, Any]]]:
        c, acc = self.config, self.accelerator
        torch.manual_seed(step_seed(c.seed, step, self.rank))
        rows = self.source.batch(step, self.rank, self.world, c.prompts_per_step // self.world)
        t0 = time.perf_counter()
        gen = self.generator.generate(self._encode(rows), c.group_size, c.temperature, c.top_p, self.max_new_tokens)
        gen = _to(gen, acc.device)
        t_gen = time.perf_counter() - t0
        prompts = [r["prompt"] for r in rows for _ in range(c.group_size)]
        batch_cols: dict[str, Any] = columns(rows, c.group_size)
        batch_cols["step"] = step
        totals, parts = score(self.rewards, prompts, gen.completions, batch_cols)
        rewards = torch.tensor(totals, dtype=torch.float32, device=acc.device)
        B = len(totals)
        unwrapped = acc.unwrap_model(self.policy)
        old, ref, values = [], [], []
        sampled = c.old_logprobs == "sampler"
        if sampled:
            if gen.rollout_logprobs is None:
                raise TrainingError(f"old_logprobs='sampler': the {c.generator} generator reported no log-probs for this sampling setting; use old_logprobs='recompute'.")
            old.append(gen.rollout_logprobs.float())
        for idx in self._chunks(B):
            if not sampled:
                old.append(self._score(unwrapped, gen, idx, grad=False)[0])
            if self.reference is not None:
                ref.append(self._score(self.reference, gen, idx, grad=False)[0])
            if self.critic is not None:
                values.append(self._values(acc.unwrap_model(self.critic), gen, idx, grad=False))
        mask = gen.response_mask
        group = torch.arange(len(rows), device=acc.device).repeat_interleave(c.group_size)
        batch = proxim.Rollout(
            old_logprobs=torch.cat(old),
            mask=mask,
            rewards=rewards,
            group=group,
            ref_logprobs=torch.cat(ref) if ref else None,
            values=torch.cat(values) if values else None,
            rollout_logprobs=gen.rollout_logprobs.float() if gen.rollout_logprobs is not None else None,
        )
        metrics: dict[str, float] = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if B > 1 else 0.0,
            "response/length": float(mask.sum(1).float().mean()),
            "response/truncated": float(gen.truncated.float().mean()),
            "time/generate": t_gen,
        }
        for name, values_ in parts.items():
            metrics[f"reward/{name}"] = sum(values_) / len(values_)
        if self.task is not None and "answer" in batch_cols:
            metrics["reward/accuracy"] = sum(self.task.correct(comp, ans) for comp, ans in zip(gen.completions, batch_cols["answer"])) / B
        if batch.ref_logprobs is not None:
            metrics["kl/ref"] = float(masked_mean(kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k3"), mask))
            metrics["kl/ref_sequence"] = float(masked_sum(kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k1"), mask, dim=1).mean())
        samples = [
            {"step": step, "prompt": prompts[i], "completion": gen.completions[i], "reward": totals[i], **{k: v[i] for k, v in parts.items()}}
            for i in range(0, B, max(1, c.group_size))[: c.log_samples]
        ]
        return gen, batch, metrics, samples

    def _update(self, gen: Any, batch: proxim.Rollout, est: proxim.Estimate, step: int) -> dict[str, float]:
        c, acc, obj = self.config, self.accelerator, self.objective
        B = batch.batch_size
        mb = c.minibatch_size or B
        want_entropy = obj.options.entropy_coef > 0
        sums: dict[str, torch.Tensor] = {}
        count = 0
        norms: list[float] = []
        skipped = 0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for epoch in range(c.epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(step_seed(c.seed, step, self.rank, epoch))).to(acc.device)
            for start in range(0, B, mb):
                idx = order[start : start + mb]
                normalizer = obj.normalizer(batch.mask[idx]).float()
                if self.world > 1:  # a global count, scaled so that DDP's mean of gradients is the full-batch gradient
                    normalizer = acc.reduce(normalizer, reduction="sum") / self.world
                micro = [idx[i : i + (c.micro_batch_size or mb)] for i in range(0, len(idx), c.micro_batch_size or mb)]
                loss_total = torch.zeros((), device=acc.device)
                for k, mi in enumerate(micro):
                    with contextlib.ExitStack() as stack:
                        if k < len(micro) - 1:
                            stack.enter_context(acc.no_sync(self.policy))
                            if self.critic is not None:
                                stack.enter_context(acc.no_sync(self.critic))
                        lp, ent = self._score(self.policy, gen, mi, grad=True, entropy=want_entropy)
                        values = self._values(self.critic, gen, mi, grad=True) if self.critic is not None else None
                        out = obj.loss(lp, batch[mi], est[mi], values=values, normalizer=normalizer, entropy=ent)
                        acc.backward(out.loss)
                    loss_total = loss_total + out.loss.detach()
                    for key, v in out.metrics.items():
                        sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=acc.device)) + v.detach().double()
                    count += 1
                grad_norm = self._optimizer_step(params, loss_total)
                if grad_norm is None:
                    skipped += 1
                else:
                    norms.append(grad_norm)
                if self.nonfinite_streak >= c.max_nonfinite:
                    self._save(step, force=True, completed=step)
                    raise TrainingError(
                        f"{self.nonfinite_streak} optimiser updates in a row had a non-finite loss or gradient (step {step}); "
                        f"stopped. The last good state is checkpointed in {self.run_dir / 'checkpoints'}. Lower the learning "
                        f"rate, check the rewards, or raise max_nonfinite."
                    )
        metrics = {k: float(v / max(count, 1)) for k, v in sums.items()}
        metrics["optim/grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["optim/skipped"] = float(skipped)
        return metrics

    def _optimizer_step(self, params: list[torch.Tensor], loss_total: torch.Tensor) -> float | None:
        """Clip the gradients and step, or skip a non-finite update and count it; returns the gradient norm (None if skipped)."""
        c, acc = self.config, self.accelerator
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(params, max_norm)
        finite = torch.isfinite(torch.as_tensor(grad_norm, device=acc.device)) & torch.isfinite(loss_total)
        if self.world > 1:
            finite = acc.reduce(finite.float(), reduction="min") > 0
        ok = bool(finite)
        if ok:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_streak = 0
        else:
            if acc.scaler is not None:  # fp16: the loss scaler skips the step itself and lowers its scale
                self.optimizer.step()
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm) if ok else None

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, label: str) -> EvalResult:
        from accelerate.utils import gather_object

        rows = self.source.eval_rows()
        mine = rows[self.rank :: self.world]
        records: list[dict[str, Any]] = []
        if mine:
            gen = self.generator.generate(self._encode(mine), 1, 1.0, 1.0, self.max_new_tokens, greedy=True)
            cols: dict[str, Any] = columns(mine, 1)
            cols["step"] = -1
            totals, _ = score(self.rewards, [r["prompt"] for r in mine], gen.completions, cols)
            for r, comp, total in zip(mine, gen.completions, totals):
                correct = self.task.correct(comp, r["answer"]) if self.task is not None and "answer" in r else None
                records.append({"prompt": r["prompt"], "answer": r.get("answer"), "completion": comp, "reward": total, "correct": correct})
        everything = gather_object(records) if self.world > 1 else records
        if self.is_main:
            with open(self.run_dir / f"eval_{label}.jsonl", "w") as fh:
                fh.writelines(json.dumps(rec) + "\n" for rec in everything)
        n = len(everything)
        flags = [r["correct"] for r in everything if r["correct"] is not None]
        accuracy = sum(flags) / len(flags) if flags and len(flags) == n else None
        return EvalResult(n=n, accuracy=accuracy, mean_reward=sum(r["reward"] for r in everything) / max(n, 1))

    # -- bookkeeping ----------------------------------------------------------------------------
    def _state(self, completed: int) -> dict[str, Any]:
        return {
            "step": completed,
            "kl_coef": self.objective.options.kl_coef,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_streak": self.nonfinite_streak,
            "train_time": self.train_time_before + (time.perf_counter() - self.t_loop),
            "fingerprint": self.base_fingerprint,
            "world_size": self.world,
            "init_dir": str(self.init_dir),
            "proxim": proxim.__version__,
        }

    def _save(self, step: int, force: bool = False, completed: int | None = None) -> None:
        done = step + 1 if completed is None else completed
        if done == self.last_saved and not force:
            return
        ckpt.save(
            self.run_dir, done, accelerator=self.accelerator, lm=self.lm,
            critic=self.accelerator.unwrap_model(self.critic) if self.critic is not None else None,
            optimizer=self.optimizer, scheduler=self.scheduler, state=self._state(done),
            config_toml=self.config.to_toml(), keep=self.config.keep_checkpoints,
        )
        self.last_saved = done

    def _write_config(self) -> None:
        if self.is_main:
            (self.run_dir / "config.toml").write_text(self.config.to_toml())
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True, default=str))
            (self.run_dir / "objective.txt").write_text(f"{self.objective!r}\n\nfingerprint: {self.base_fingerprint}\n")

    def _plot(self, history: list[dict[str, Any]], before: EvalResult | None, after: EvalResult | None) -> None:
        from proxim.train.plot import line_chart

        def series(key: str) -> list[tuple[float, float]]:
            return [(h["step"], h[key]) for h in history if key in h]

        reward_panel = {k.split("/", 1)[1]: series(k) for k in ("reward/mean", "reward/accuracy") if any(k in h for h in history)}
        kl_keys = [k for k in ("kl/ref", "region/approx_kl") if any(k in h for h in history)]
        kl_panel = {k: series(k) for k in kl_keys}
        region_keys = sorted({k for h in history for k in h if k.startswith("region/") and any(w in k for w in ("clip", "frac", "mask"))})
        clip_panel = {k.split("/", 1)[1]: series(k) for k in region_keys}
        line_chart(self.run_dir / PLOT_FILE, [("reward", reward_panel), ("kl", kl_panel), ("clip fractions", clip_panel)])

    # -- the loop -------------------------------------------------------------------------------
    def run(self, rewards: Any = None) -> RunResult:
        c, acc = self.config, self.accelerator
        self._build(rewards)
        start_step = 0
        self.nonfinite_total = self.nonfinite_streak = 0
        self.train_time_before = 0.0
        self.last_saved = -1
        kl_ctl = None
        if self.resuming:
            latest = ckpt.latest(self.run_dir)
            assert latest is not None
            state = ckpt.load(latest, accelerator=acc, lm=self.lm, critic=acc.unwrap_model(self.critic) if self.critic is not None else None, optimizer=self.optimizer, scheduler=self.scheduler)
            if state.get("fingerprint") != self.base_fingerprint:
                raise TrainingError(f"--resume {self.run_dir}: the objective differs from the checkpoint's.\n  checkpoint: {state.get('fingerprint')}\n  now:        {self.base_fingerprint}")
            if state.get("world_size") != self.world:
                self._say(f"warning: the checkpoint was written by {state.get('world_size')} processes, this run has {self.world}: prompts and sampling will differ from an uninterrupted run.")
            start_step = int(state["step"])
            self.nonfinite_total, self.nonfinite_streak = int(state["nonfinite_total"]), int(state["nonfinite_streak"])
            self.train_time_before = float(state.get("train_time", 0.0))
            self.last_saved = start_step
            if state.get("kl_coef") != self.objective.options.kl_coef:
                self.objective = self.objective.override(kl_coef=float(state["kl_coef"]))
            self.generator.sync(self.lm)
            self._say(f"resuming {self.run_dir} from step {start_step} ({latest.name})")
        elif c.generator == "vllm":
            self.generator.sync(self.lm)
        if c.adaptive_kl:
            kl_ctl = proxim.AdaptiveKLController(value=self.objective.options.kl_coef, target=c.kl_target, horizon=c.kl_horizon)
        self._write_config()
        metrics_path = self.run_dir / "metrics.jsonl"
        history = _read_history(metrics_path, start_step) if self.resuming else []
        if self.is_main:
            with open(metrics_path, "w") as fh:
                fh.writelines(json.dumps(h) + "\n" for h in history)
            if not self.resuming:
                (self.run_dir / "samples.jsonl").write_text("")
        if self.progress:
            self._say(
                f"run folder: {self.run_dir}\nobjective: {self.objective!r}\n"
                f"model: {c.start_model() or 'built-in tiny Llama'} ({self.n_params / 1e6:.2f} M parameters); "
                f"reference: {'yes' if self.reference is not None else 'no'}; critic: {'yes' if self.critic is not None else 'no'}; "
                f"processes: {self.world}; device: {acc.device}"
            )
        before = self._load_eval("before") if self.resuming else None
        if before is None:
            before = self.evaluate("before")
            self._store_eval("before", before)
        if acc.log_with:
            acc.init_trackers(f"{self.run_dir.name}/tensorboard", config={k: v for k, v in c.to_dict().items() if isinstance(v, (int, float, str, bool))})

        stop: list[int] = []
        handlers = self._install_signal_handlers(stop)
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=start_step, desc=self.objective.preset or "train", unit="step", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        self.t_loop = time.perf_counter()
        interrupted = None
        step = start_step
        try:
            for step in range(start_step, c.steps):
                t0 = time.perf_counter()
                gen, batch, metrics, samples = self._rollout(step)
                est = self.objective.advantages(batch)
                for key, v in est.metrics.items():
                    metrics[key if key not in metrics else f"objective/{key}"] = float(v)
                metrics.update(self._update(gen, batch, est, step))
                if c.generator != "hf":
                    self.generator.sync(self.lm)
                if kl_ctl is not None and "kl/ref_sequence" in metrics:
                    kl_ctl.update(metrics["kl/ref_sequence"], batch.batch_size * self.world)
                    self.objective = self.objective.override(kl_coef=kl_ctl.value)
                metrics["time/step"] = time.perf_counter() - t0
                metrics["kl/coef"] = self.objective.options.kl_coef
                reduced = _reduce_mean(acc, metrics)
                reduced["optim/skipped_total"] = float(self.nonfinite_total)
                record = {"step": step + 1, **reduced}
                if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < c.steps:
                    periodic = self.evaluate(f"step_{step + 1:06d}")
                    record["eval/mean_reward"] = periodic.mean_reward
                    if periodic.accuracy is not None:
                        record["eval/accuracy"] = periodic.accuracy
                history.append(record)
                self._log(record, samples)
                kl = reduced.get("kl/ref", reduced.get("region/approx_kl", float("nan")))
                postfix = {"reward": f"{reduced['reward/mean']:.3f}", "kl": f"{kl:.4f}"}
                if "reward/accuracy" in reduced:
                    postfix["acc"] = f"{reduced['reward/accuracy']:.2f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                signalled = torch.tensor(float(stop[0]) if stop else 0.0, device=acc.device)
                if self.world > 1:
                    signalled = acc.reduce(signalled, reduction="max")
                if c.save_every and (step + 1) % c.save_every == 0:
                    self._save(step)
                if float(signalled) > 0:
                    interrupted = int(float(signalled))
                    self._save(step)
                    break
            else:
                step = c.steps - 1
        finally:
            bar.close()
            self._restore_signal_handlers(handlers)
        train_time = self.train_time_before + time.perf_counter() - self.t_loop
        if interrupted is not None:
            if self.is_main:
                print(f"interrupted (signal {interrupted}) after step {step + 1}; checkpoint in {self.run_dir / 'checkpoints'}. Continue with: proxim train --resume {self.run_dir}", file=sys.stderr)
            self._finish_trackers()
            return RunResult(self.run_dir, step + 1, before, None, time.perf_counter() - self.t_start, train_time, interrupted)
        self._save(c.steps - 1)
        after = self.evaluate("after")
        self._store_eval("after", after)
        if self.is_main:
            models.save_model_dir(self.lm, self.tokenizer, self.run_dir / "model")
            self._plot(history, before, after)
        result = RunResult(self.run_dir, c.steps, before, after, time.perf_counter() - self.t_start, train_time)
        if self.is_main:
            table = summary_table(result, label=self.objective.preset or "custom")
            (self.run_dir / "summary.md").write_text(table + "\n")
            print(table)
        self._finish_trackers()
        self.generator.close()
        self.accelerator.wait_for_everyone()  # the main process writes the model and table; the others wait
        return result

    def _finish_trackers(self) -> None:
        if self.accelerator.log_with:
            self.accelerator.end_training()

    def _log(self, record: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        from accelerate.utils import gather_object

        everything = gather_object(samples) if self.world > 1 else samples
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            with open(self.run_dir / "samples.jsonl", "a") as fh:
                fh.writelines(json.dumps(s) + "\n" for s in everything)
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _store_eval(self, label: str, result: EvalResult) -> None:
        if self.is_main:
            path = self.run_dir / "eval.json"
            data = json.loads(path.read_text()) if path.is_file() else {}
            data[label] = attrs.asdict(result)
            path.write_text(json.dumps(data, indent=2))

    def _load_eval(self, label: str) -> EvalResult | None:
        path = self.run_dir / "eval.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text()).get(label)
        return EvalResult(**data) if data else None

    def _install_signal_handlers(self, stop: list[int]) -> dict[int, Any]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if stop:  # a second signal: stop now, without a checkpoint
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            stop.append(signum)
            if self.is_main:
                print(f"\nsignal {signum}: finishing this step, then saving a checkpoint (send it again to stop at once)", file=sys.stderr)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)


class _TaskWithHeldOut:
    def __init__(self, inner: TaskSource, held_out: list[dict[str, Any]]):
        self.inner, self.held_out = inner, held_out

    def batch(self, step: int, rank: int, world: int, n: int) -> list[dict[str, Any]]:
        return self.inner.batch(step, rank, world, n)

    def eval_rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.held_out]


def _to(gen: Any, device: torch.device) -> Any:
    fields = {}
    for a in attrs.fields(type(gen)):
        v = getattr(gen, a.name)
        fields[a.name] = v.to(device) if isinstance(v, torch.Tensor) else v
    return type(gen)(**fields)


def _read_history(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("step", 0) <= upto:
                out.append(rec)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary_table(result: RunResult, label: str) -> str:
    """The before/after held-out table (markdown), with wall time and speed."""
    b, a = result.before, result.after
    shown = a or b
    n = shown.n if shown is not None else 0
    lines = [
        f"held-out evaluation ({n} prompts, greedy) -- {label}, {result.steps} steps",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        f"| accuracy | {_pct(b.accuracy if b else None)} | {_pct(a.accuracy if a else None)} |",
        f"| mean reward | {b.mean_reward if b else float('nan'):.3f} | {a.mean_reward if a else float('nan'):.3f} |",
        "",
        f"wall time {result.wall_time:.0f} s (training loop {result.train_time:.0f} s, {result.steps_per_second:.2f} steps/s); run folder {result.run_dir}",
    ]
    return "\n".join(lines)


def _sequences(gen: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows `idx` of a generation as model input: prompt + response cut after the last response token any
    row has (ids, attention mask as int64), and that response width."""
    valid = gen.response_mask[idx]
    width = int(valid.any(0).nonzero().max()) + 1 if bool(valid.any()) else 1
    ids = torch.cat([gen.prompt_ids[idx], gen.response_ids[idx, :width]], 1)
    mask = torch.cat([gen.prompt_mask[idx], valid[:, :width]], 1).long()
    return ids, mask, width


def train(
    config: TrainConfig | None = None,
    *,
    objective: proxim.Objective | None = None,
    rewards: Sequence[RewardFn | tuple[RewardFn, float]] | None = None,
    prompts: Iterable[Mapping[str, Any]] | None = None,
    eval_prompts: Iterable[Mapping[str, Any]] | None = None,
    resume: str | os.PathLike[str] | None = None,
    registry: proxim.Registry | None = None,
) -> RunResult:
    """Run one training run and return its `RunResult`.

    config:       a `TrainConfig` (default: the embedded demo, GRPO on arithmetic).
    objective:    a composed `proxim.Objective` to use instead of the config's preset/parts.
    rewards:      reward callables ``fn(prompts, completions, **batch) -> list[float]``, or (fn, weight)
                  pairs, instead of the config's reward specs.
    prompts:      rows with a "prompt" (a list of dicts or a `datasets.Dataset`) instead of the task's.
    eval_prompts: held-out rows; default the task's held-out set, or the first rows of `prompts`.
    resume:       a run folder to continue from its latest checkpoint.

    A preference objective (preset dpo, ipo or hinge) trains offline instead (`proxim.train.offline`), and
    returns a `PreferenceRunResult`.
    """
    config = config or TrainConfig()
    if isinstance(objective if objective is not None else config.build_objective(registry), proxim.PreferenceObjective):
        given = [name for name, value in (("rewards", rewards), ("prompts", prompts), ("eval_prompts", eval_prompts), ("resume", resume)) if value is not None]
        if given:
            raise ConfigurationError(f"{', '.join(given)}: not for an offline preference objective, which trains on pairs (config.data, or pairs built from the task).")
        from proxim.train.offline import train_offline

        return train_offline(config, objective=objective, registry=registry)
    trainer = Trainer(config, objective=objective, rewards=rewards, prompts=prompts, eval_prompts=eval_prompts, resume=resume, registry=registry)
    return trainer.run(rewards)
