"""The diagnostics an objective reports beside its results: stage 1's advantage and reward statistics,
stage 2's trust-region metrics and ratio statistics. All are detached 0-d tensors; none enters a loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from proxim.ops import LOG_RATIO_CLAMP, Padding, group_index, masked_mean, masked_sum, sequence_rewards
from proxim.rollout import Rollout


def stage_one_metrics(batch: Rollout, adv: Tensor) -> dict[str, Tensor]:
    """``advantage/mean``, ``advantage/std`` and ``reward/mean``, and with group ids ``advantage/zero_std_groups``."""
    mask = batch.mask
    mean = masked_mean(adv, mask)
    count = mask.sum().clamp(min=2).to(adv.dtype)
    std = (masked_sum((adv - mean) ** 2, mask) / (count - 1)).sqrt()
    seq_rewards = sequence_rewards(batch.rewards.to(adv.dtype), mask)
    metrics = {"advantage/mean": mean, "advantage/std": std, "reward/mean": seq_rewards.mean()}
    if batch.group is not None:
        # A group has zero spread when its largest and smallest rewards are equal: exact, unlike a std
        # taken around a rounded mean (three rewards of 0.1 have std ~1e-17). Groups of one count.
        index, k = group_index(batch.group)
        fill = torch.full((k,), torch.inf, dtype=seq_rewards.dtype, device=seq_rewards.device)
        high = (-fill).scatter_reduce(0, index, seq_rewards, "amax")
        low = fill.scatter_reduce(0, index, seq_rewards, "amin")
        metrics["advantage/zero_std_groups"] = (high == low).sum().to(adv.dtype)
    return metrics


def region_metrics(per_token: Mapping[str, Tensor], lp: Tensor, anchor: Tensor, padding: Padding) -> dict[str, Tensor]:
    """Masked means of the region's per-token metrics, and ratio statistics. `lp` and `anchor` are 0 where
    the mask is False (as `Objective.loss` passes them), so the log-ratio there is exactly 0.

    Written for the eager hot path, where it would otherwise cost as much as the loss on CPU: the
    `Padding`'s token count, boolean metrics counted in int32 (no float copy) through one scratch buffer,
    one ``expm1`` for both the ratio and the approximate KL (the ratio is taken as ``expm1(lr) + 1``,
    within one rounding of ``exp(lr)``), and in-place arithmetic on its own temporaries (on CPU a fresh
    [B, T] buffer costs more in page faults than the arithmetic written into it).
    """
    mask = padding.mask
    count = padding.tokens
    out: dict[str, Tensor] = {}
    scratch: Tensor | None = None  # one buffer for every boolean metric's `& mask`
    for key, value in per_token.items():
        value = value.detach()
        if value.dtype == torch.bool and value.shape == mask.shape:
            scratch = torch.logical_and(value, mask, out=torch.empty_like(mask) if scratch is None else scratch)
            out[f"region/{key}"] = scratch.sum(dtype=torch.int32).to(lp.dtype) / count
        elif value.dtype == torch.bool:
            out[f"region/{key}"] = (value & mask).sum(dtype=torch.int32).to(lp.dtype) / count
        else:
            out[f"region/{key}"] = padding.sum(value.to(lp.dtype)) / count
    lr = (lp - anchor).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # ops.log_ratio, in place
    excess = torch.expm1(lr)
    out["region/approx_kl"] = lr.neg_().add_(excess).sum() / count  # expm1(lr) - lr; 0 where masked (lr = 0)
    ratio = excess.add_(1.0)  # exactly 1 where masked (lr = 0 there), so masking by multiplication is exact
    ratio = padding.zero(ratio) if padding.weights is None else ratio.mul_(padding.weights)
    out["region/ratio_mean"] = ratio.sum() / count
    out["region/ratio_max"] = ratio.amax()
    return out
