"""Batch builders shared by the stage-1 tests (baselines and advantages)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import proxim

F64 = torch.float64

# Rewards on a grid of 1/20 (not dyadic, so group means round) in [-10, 10]; ties are common.
REWARD = st.integers(-200, 200).map(lambda k: k / 20)


def draw_groups(draw: st.DrawFn, min_group: int, max_group: int, max_groups: int) -> list[int]:
    """One group id per row: ragged groups with sparse, unsorted ids, the rows shuffled."""
    sizes = draw(st.lists(st.integers(min_group, max_group), min_size=1, max_size=max_groups))
    ids = draw(st.lists(st.integers(-100, 100), min_size=len(sizes), max_size=len(sizes), unique=True))
    group = [gid for gid, n in zip(ids, sizes) for _ in range(n)]
    order = draw(st.permutations(range(len(group))))
    return [group[i] for i in order]


def draw_mask(draw: st.DrawFn, b: int, t: int, every_row_valid: bool = False) -> list[list[bool]]:
    """A random [b, t] mask (fully masked rows included, unless `every_row_valid` makes each row's first token valid)."""
    mask = draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b))
    return [[True, *row[1:]] for row in mask] if every_row_valid else mask


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
