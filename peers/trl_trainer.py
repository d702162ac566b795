"""TRL 1.16's ``GRPOTrainer`` set up to run what ``proxim train --preset grpo`` runs (benchmarks/train.py).

Not part of the ``proxim`` package; loaded by file path like ``trl_harness.py``. It imports only the standard
library at load time, trl and datasets when called. `grpo_trainer` maps proxim's settings onto a
``GRPOConfig`` one by one; `SETTINGS` lists the TRL settings that have no proxim flag and why each has the
value it has, so that the benchmark's documentation can print them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: GRPOConfig fields fixed here, with the reason (proxim's behaviour they match, or the overhead they remove).
SETTINGS: dict[str, tuple[Any, str]] = {
    "loss_type": ("grpo", "per-sequence token mean, then the batch mean: proxim grpo's seq_mean_token_mean"),
    "epsilon": (0.2, "proxim grpo's clip (region.eps_low = eps_high = 0.2)"),
    "scale_rewards": ("group", "group z-score: proxim grpo's advantage.scale=group"),
    "use_bias_correction_kl": (False, "plain k3 in the loss, as proxim (TRL 1.16 defaults to True)"),
    "num_iterations": (1, "one epoch over each rollout (proxim epochs=1)"),
    "steps_per_generation": (1, "one optimiser update per rollout (proxim: minibatch = the whole rollout)"),
    "gradient_accumulation_steps": (1, "one forward/backward per update (proxim: no micro-batches)"),
    "lr_scheduler_type": ("constant", "proxim's default lr_schedule"),
    "warmup_steps": (0, "proxim warmup_updates=0"),
    "weight_decay": (0.0, "proxim's default"),
    "adam_beta1": (0.9, "proxim's default"),
    "adam_beta2": (0.99, "proxim's default (TRL: 0.999)"),
    "adam_epsilon": (1e-8, "proxim's default"),
    "max_grad_norm": (1.0, "proxim's default"),
    "top_p": (1.0, "proxim's default"),
    "top_k": (0, "off, as proxim's generator"),
    "repetition_penalty": (1.0, "off, as proxim's generator"),
    "shuffle_dataset": (False, "the dataset is proxim's prompts in proxim's order, one step's prompts after another"),
    "bf16": (False, "float32, as proxim (mixed_precision=no)"),
    "fp16": (False, "float32"),
    "use_cpu": (True, "CPU, as proxim on this machine"),
    "report_to": ("none", "no tracker (proxim: tracker=none)"),
    "save_strategy": ("no", "no checkpoints (proxim: save_every=0 and its final save is outside the timed loop)"),
    "eval_strategy": ("no", "no evaluation (proxim's before/after evaluation is outside the timed loop)"),
    "logging_steps": (1, "metrics every step, as proxim writes metrics.jsonl every step"),
    "log_completions": (False, "no completion tables (proxim writes 4 samples a step to samples.jsonl)"),
    "disable_tqdm": (True, "no progress bar (proxim: quiet)"),
    "dataloader_num_workers": (0, "no worker processes (proxim has none)"),
    "gradient_checkpointing": (False, "proxim does not checkpoint the decoder"),
}


def task_prompts_and_reward(task: Any, seed: int, steps: int, prompts_per_step: int) -> tuple[list[dict[str, Any]], Callable[..., list[float]]]:
    """The rows `proxim train` draws from `task` (a proxim Task) at steps 0..steps-1, in that order, and the task's
    reward as a TRL reward function (it reads the dataset's ``answer`` column)."""
    from proxim.train.prompts import TaskSource

    source = TaskSource(task, seed)
    rows = [row for step in range(steps) for row in source.batch(step, 0, 1, prompts_per_step)]

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return list(task.reward(prompts, completions, answer=answer))

    return rows, reward


def grpo_trainer(
    model_dir: str,
    prompts: Sequence[dict[str, Any]],
    reward: Callable[..., list[float]],
    *,
    output_dir: str,
    group_size: int,
    prompts_per_step: int,
    steps: int,
    max_new_tokens: int,
    lr: float,
    beta: float,
    temperature: float,
    seed: int,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``GRPOTrainer`` on the model saved in `model_dir` (model and tokenizer) and the rows `prompts`
    (each with "prompt" and the columns `reward` reads), ``prompts_per_step * group_size`` completions per step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=prompts_per_step * group_size,
        num_generations=group_size,
        max_completion_length=max_new_tokens,
        max_steps=steps,
        learning_rate=lr,
        beta=beta,
        temperature=temperature,
        seed=seed,
        **{k: v for k, (v, _) in SETTINGS.items()},
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(list(prompts)), processing_class=tokenizer, callbacks=list(callbacks)
    )
