"""``ProximGRPOTrainer``: TRL's ``GRPOTrainer`` with a proxim objective for its advantages and loss.

TRL keeps everything else: generation (transformers, or vLLM in server or colocate mode), the reward
functions, the data flow (generation batches buffered over ``steps_per_generation`` and
``num_iterations``), accelerate/DeepSpeed/FSDP, logging and callbacks. Three methods are overridden:

- ``_calculate_rewards``: TRL's, keeping the rewards it gathered from every process.
- ``_generate_and_score_completions``: TRL's, then proxim's stage 1 on the whole gathered generation
  batch (every process's completions; groups of ``num_generations`` consecutive completions, as TRL's
  sampler lays them out) in place of TRL's advantages: ``advantages`` becomes this process's [B, T] rows,
  and ``proxim_normalizer`` the aggregation's count over the generation batch.
- ``_compute_loss``: TRL's policy forward, then proxim's stage 2 on the same tensors (completion mask
  with tool mask, old, reference and sampling log-probs), normalised over the optimiser step.

Importing this module imports TRL (pinned by the ``proxim[trl]`` extra; tested with trl 1.16).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import proxim
from proxim.integrations.common import reads_old_logprobs

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(f"proxim.integrations.trl needs TRL: pip install 'proxim[trl]' ({exc})") from exc

__all__ = ["ProximGRPOTrainer"]

#: Keyword arguments of ``_get_per_token_logps_and_entropies`` that TRL's loss forwards from the batch (multimodal).
_MODEL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
#: GRPOConfig loss features that have no counterpart in a proxim objective; set, they are ignored with a warning.
_IGNORED: dict[str, Callable[[Any], bool]] = {
    "top_entropy_quantile": lambda a: a.top_entropy_quantile < 1.0,
    "off_policy_mask_threshold": lambda a: a.off_policy_mask_threshold is not None,
    "delta": lambda a: a.delta is not None,
    "importance_sampling_level": lambda a: a.importance_sampling_level != "token",
    "entropy_coef": lambda a: bool(getattr(a, "entropy_coef", 0.0)),
    "vllm_importance_sampling_correction": lambda a: a.use_vllm and a.vllm_importance_sampling_correction,
}


class ProximGRPOTrainer(GRPOTrainer):  # type: ignore[misc, unused-ignore]
    """TRL's ``GRPOTrainer`` whose advantages come from ``objective.advantages`` and whose loss is
    ``objective.loss`` (aggregation, KL, entropy bonus, metrics): ``ProximGRPOTrainer(model, reward_funcs,
    args=GRPOConfig(...), train_dataset=..., objective=proxim.objective("drpo"))``. Every other argument is
    GRPOTrainer's.

    The objective supersedes TRL's loss settings (``loss_type``, ``epsilon``, ``epsilon_high``,
    ``scale_rewards``, ``use_bias_correction_kl``, ``beta``): ``args.beta`` is set to the objective's
    ``kl_coef`` (on a copy of ``args``), so that TRL computes the reference log-probs exactly when the
    objective needs them. Loss features of TRL with no proxim counterpart (see ``_IGNORED``) are ignored
    with a warning. Objectives with a critic (``ppo``) are refused: GRPOTrainer has no value model.
    Metrics go to TRL's log as ``proxim/<key>`` (stage 1's once per generation batch, stage 2's per step).
    """

    def __init__(self, *args: Any, objective: proxim.Objective | str, **kwargs: Any) -> None:
        obj = proxim.objective(objective) if isinstance(objective, str) else objective
        if not isinstance(obj, proxim.Objective):
            raise proxim.ConfigurationError(f"objective= takes a proxim.Objective or a preset name, got {objective!r}.")
        if obj.has_critic:
            raise proxim.ConfigurationError(f"{obj!r} trains a critic, and TRL's GRPOTrainer has no value model: use a critic-free objective.")
        positional = list(args)
        config = positional[2] if len(positional) > 2 else kwargs.get("args")
        if config is None:
            model = positional[0] if positional else kwargs["model"]
            name = model if isinstance(model, str) else model.config._name_or_path
            config = GRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        if config.multi_objective_aggregation != "sum_then_normalize":
            raise proxim.ConfigurationError("ProximGRPOTrainer gives proxim one reward per completion: use multi_objective_aggregation='sum_then_normalize'.")
        ignored = sorted(key for key, active in _IGNORED.items() if active(config))
        if ignored:
            warnings.warn(f"ProximGRPOTrainer: TRL loss settings {ignored} have no counterpart in {obj!r} and are ignored.", stacklevel=2)
        config = copy.copy(config)
        config.beta = float(obj.options.kl_coef)
        if len(positional) > 2:
            positional[2] = config
        else:
            kwargs["args"] = config
        self.objective = obj
        self._proxim_rewards: Tensor | None = None
        super().__init__(*positional, **kwargs)

    # -- stage 1 --------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Tensor:
        rewards_per_func: Tensor = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._proxim_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        output: dict[str, Any] = super()._generate_and_score_completions(inputs)
        per_func, self._proxim_rewards = self._proxim_rewards, None
        assert per_func is not None, "TRL's _generate_and_score_completions no longer calls _calculate_rewards"
        mode = "train" if self.model.training else "eval"
        mask = _loss_mask(output)
        if output.get("old_per_token_logps") is None and reads_old_logprobs(self.objective):
            output["old_per_token_logps"] = self._old_logprobs(output)
        old = output.get("old_per_token_logps")
        local = {"old_logprobs": torch.zeros(mask.shape, device=mask.device) if old is None else old, "mask": mask}
        if "ref_per_token_logps" in output:
            local["ref_logprobs"] = output["ref_per_token_logps"]
        if "sampling_per_token_logps" in output:
            local["rollout_logprobs"] = _sampling_logprobs(output, local["old_logprobs"])
        every = {field: self._gather_rows(t) for field, t in local.items()}  # the generation batch of every process
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        scorable = ~torch.isnan(per_func).all(dim=1)  # TRL: an unscorable completion gets advantage 0
        generations = self.num_generations if mode == "train" else self.num_generations_eval
        group = torch.arange(rewards.shape[0], device=rewards.device) // generations
        keep = torch.nonzero(scorable).flatten()
        batch = proxim.Rollout(rewards=rewards[keep].to(every["old_logprobs"].dtype), group=group[keep], **{f: t[keep] for f, t in every.items()})
        est = self.objective.advantages(batch)
        advantages = torch.zeros(every["mask"].shape, dtype=est.advantages.dtype, device=est.advantages.device)
        advantages[keep] = est.advantages
        rows = slice(self.accelerator.process_index * mask.shape[0], (self.accelerator.process_index + 1) * mask.shape[0])
        output["advantages"] = advantages[rows, : mask.shape[1]]
        output["proxim_normalizer"] = self.objective.normalizer(every["mask"]).clamp(min=1).float()
        self._replace_logged_advantages(advantages, every["mask"])
        for key, value in est.metrics.items():
            self._metrics[mode][f"proxim/{key}"].append(float(value))
        return output

    def _old_logprobs(self, output: dict[str, Any]) -> Tensor:
        """The policy's log-probs of the completions before the update, when TRL skipped them (on-policy)
        but the objective's stage 1 reads them: one no-grad forward, as TRL computes them when it needs them."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            logps: Tensor = self._get_per_token_logps_and_entropies(
                self.model, ids, attention, output["completion_ids"].size(1), **{k: output.get(k) for k in _MODEL_INPUTS}
            )[0]
        return logps

    def _gather_rows(self, t: Tensor) -> Tensor:
        """`t` [B, T] of every process, padded to the longest T (one process: `t` itself)."""
        if self.accelerator.num_processes == 1:
            return t
        gathered: Tensor = self.accelerator.gather(self.accelerator.pad_across_processes(t, dim=1, pad_index=0))
        return gathered

    def _replace_logged_advantages(self, advantages: Tensor, mask: Tensor) -> None:
        """The completions table (``log_completions``) shows proxim's advantages (mean over each row's tokens)."""
        logged = self._logs["advantages"]
        per_row = (advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        for _ in range(min(len(per_row), len(logged))):
            logged.pop()
        logged.extend(per_row.tolist())

    # -- stage 2 --------------------------------------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _MODEL_INPUTS},
        )
        mask = _loss_mask(inputs)
        old = inputs.get("old_per_token_logps")
        batch = proxim.Rollout(
            old_logprobs=logps.detach() if old is None else old,  # TRL's shortcut: on-policy, old = current
            mask=mask,
            rewards=torch.zeros(mask.shape[0], dtype=logps.dtype, device=mask.device),
            ref_logprobs=inputs.get("ref_per_token_logps"),
            rollout_logprobs=_sampling_logprobs(inputs, logps.detach() if old is None else old) if "sampling_per_token_logps" in inputs else None,
        )
        mode = "train" if self.model.training else "eval"
        # The count over the generation batch of every process, scaled to one optimiser step (TRL's dapo
        # normaliser); times the number of processes, because DDP averages their gradients.
        share = self.current_gradient_accumulation_steps / self.args.steps_per_generation if mode == "train" else 1.0
        out = self.objective.loss(
            logps,
            batch,
            proxim.Estimate(advantages=inputs["advantages"]),
            normalizer=inputs["proxim_normalizer"] * share,
            entropy=entropies if self.objective.needs_entropy else None,
        )
        loss: Tensor = out.loss * self.accelerator.num_processes
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)
        entropy = (entropies.detach() * mask).sum() / mask.sum().clamp(min=1)
        keys = ["entropy", *(f"proxim/{k}" for k in out.metrics)]
        values = torch.stack([entropy.float(), *(v.float() for v in out.metrics.values())])
        for key, value in zip(keys, self.accelerator.gather(values.unsqueeze(0)).nanmean(dim=0).tolist()):
            self._metrics[mode][key].append(value)
        return loss


def _sampling_logprobs(batch: dict[str, Any], old: Tensor) -> Tensor:
    """vLLM's log-probs of the sampled tokens (the behaviour policy), `old` where vLLM reported NaN (could
    not score the token; TRL applies no correction there either)."""
    sampled: Tensor = batch["sampling_per_token_logps"]
    return torch.where(torch.isnan(sampled), old, sampled)


def _loss_mask(batch: dict[str, Any]) -> Tensor:
    """TRL's loss mask: the completion mask, times the tool mask in multi-turn rollouts; bool."""
    mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
    result: Tensor = mask.bool()
    return result
