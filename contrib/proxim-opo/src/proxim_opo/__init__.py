"""proxim-opo: the optimal reward baseline of OPO (Hao et al. 2025, "On-Policy RL with Optimal Reward
Baseline", arXiv 2505.23585), as the baseline ``length_weighted_mean``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops


@attrs.frozen
class LengthWeightedMean(proxim.Baseline):
    """b_i = sum_{j in group(i)} |y_j| R_j / sum_{j in group(i)} |y_j|, the group's length-weighted mean reward.

    The baseline that minimises the variance of the policy gradient is
    b* = E[||grad log pi(y|x)||^2 R] / E[||grad log pi(y|x)||^2]; OPO takes the squared gradient norm of
    a response to grow in proportion to its length |y| (its number of valid tokens), which gives this
    weighted mean of the rewards of the prompt's responses. Use it with the advantage ``diff``
    (A_i = R_i - b_i, no std division), as the paper does.

    Choices: a group of one is its own baseline (advantage 0), like the built-in ``group_mean``
    (verl's ``opo`` estimator uses 0 there, i.e. the raw reward as advantage); a group whose responses
    all have no valid token falls back to the plain mean. Rewards: sequence rewards [B], or token
    rewards [B, T] summed over valid tokens. Output [B]. Requires ``group``.
    """

    name: ClassVar[str] = "length_weighted_mean"
    requires: ClassVar[frozenset[str]] = frozenset({"group"})
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "permutation_equivariant", "shift_equivariant"})

    def __call__(self, batch: proxim.Rollout) -> Tensor:
        assert batch.group is not None
        rewards = ops.sequence_rewards(batch.rewards, batch.mask)
        lengths = batch.mask.sum(dim=1).to(rewards.dtype)
        total = ops.group_sum(lengths, batch.group)
        weighted = ops.group_sum(lengths * rewards, batch.group) / total.clamp(min=1)
        return torch.where(total > 0, weighted, ops.group_mean(rewards, batch.group))


@proxim.hookimpl
def proxim_register_baselines(register: proxim.Register[type[proxim.Baseline]]) -> None:
    register(LengthWeightedMean)
