"""Batch builders shared by the stage-1 tests (baselines and advantages)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import proxim

F64 = torch.float64

# Rewards on a grid of 1/20 (not dyadic, so group means round) in [-10, 10]; ties are common.
REWARD = st.integers(-200, 200).map(lambda k: k / 20)


def make(rewards: list[float] | torch.Tensor, group: list[int] | None, mask: list[list[bool]] | torch.Tensor, **extra: torch.Tensor) -> proxim.Rollout:
    mask = torch.as_tensor(mask, dtype=torch.bool)
    old = extra.pop("old_logprobs", None)
    if old is None:
        old = -0.1 - torch.arange(mask.numel(), dtype=F64).reshape(mask.shape) / 10
    return proxim.Rollout(
        old_logprobs=old,
        mask=mask,
        rewards=torch.as_tensor(rewards, dtype=F64),
        group=None if group is None else torch.as_tensor(group, dtype=torch.long),
        **extra,
    )


def tokens(per_row: list[float], mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per row over its valid tokens, 0 on masked ones (written as a loop)."""
    out = torch.zeros(mask.shape, dtype=F64)
    for i, value in enumerate(per_row):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                out[i, t] = value
    return out


def per_row(obj: proxim.Objective, batch: proxim.Rollout) -> torch.Tensor:
    """[B] sequence advantages: the same batch with every token valid, first column."""
    full = batch.replace(mask=torch.ones_like(batch.mask))
    return obj.advantages(full).advantages[:, 0]
