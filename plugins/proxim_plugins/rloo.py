"""RLOO, REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740; Kool et al. 2019).

Registers the baseline ``leave_one_out`` and the ``rloo`` preset; the advantage ``diff`` and the
region ``clip`` are reused by name from the ``ppo`` plugin.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from torch import Tensor

import proxim
from proxim import ops


@attrs.frozen
class LeaveOneOutBaseline(proxim.Baseline):
    """b_i = (1 / (G_i - 1)) sum_{j in group(i), j != i} R_j, the mean of the other responses to the prompt.

    With ``diff``: A_i = R_i - b_i = G/(G-1) (R_i - mean_group R) (arXiv 2402.14740, Eq. 6).
    Shape [B]. Requires ``group`` with at least 2 responses per group (checked once per rollout).
    """

    name: ClassVar[str] = "leave_one_out"
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "permutation_equivariant", "shift_equivariant"})
    requires: ClassVar[frozenset[str]] = frozenset({"group"})
    min_group_size: ClassVar[int] = 2

    def __call__(self, batch: proxim.Rollout) -> Tensor:
        assert batch.group is not None
        rewards = ops.sequence_rewards(batch.rewards, batch.mask)
        others = ops.group_sum(rewards, batch.group) - rewards
        return others / (ops.group_count(batch.group, rewards.dtype) - 1).clamp(min=1)


@proxim.hookimpl
def proxim_register_baselines(register: proxim.Register[type[proxim.Baseline]]) -> None:
    register(LeaveOneOutBaseline)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="rloo",
            baseline="leave_one_out",
            advantage="diff",
            region="clip",
            settings={
                "region.eps_low": 0.2,
                "aggregation": "seq_mean_token_sum",
                "kl_coef": 0.05,
                "kl_estimator": "k1",
                "kl_in": "reward",
            },
            summary="RLOO: leave-one-out baseline on sequence rewards, sequence-summed k1 KL in the reward (beta 0.05), clip 0.2 as TRL.",
            source="arXiv 2402.14740",
        )
    )
