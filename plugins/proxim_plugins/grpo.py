"""GRPO (Shao et al. 2024, arXiv 2402.03300) and its descendants Dr. GRPO (arXiv 2503.20783) and DAPO (arXiv 2503.14476).

Registers the baseline ``group_mean``, the advantage ``group_normalized``, and the presets ``grpo``,
``dr_grpo`` and ``dapo``. The trust region is PPO's ``clip``, reused by name from the ``ppo`` plugin.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import choice, ge


@attrs.frozen
class GroupMeanBaseline(proxim.Baseline):
    """b_i = mean_{j in group(i)} R_j (sequence rewards). Shape [B]. Requires ``group``.

    A group of one is its own baseline (advantage 0 with ``diff``).
    """

    name: ClassVar[str] = "group_mean"
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "permutation_equivariant", "shift_equivariant"})
    requires: ClassVar[frozenset[str]] = frozenset({"group"})

    def __call__(self, batch: proxim.Rollout) -> Tensor:
        assert batch.group is not None
        return ops.group_mean(ops.sequence_rewards(batch.rewards, batch.mask), batch.group)


@attrs.frozen
class GroupNormalized(proxim.Advantage):
    """GRPO's outcome advantage (arXiv 2402.03300, section 4.1.2), broadcast to every token.

    A_i = (R_i - b_i) / (std + eps), with std the Bessel-corrected standard deviation of the centred
    rewards R - b: within the group (``scale="group"``, GRPO), over the batch (``"batch"``,
    REINFORCE++-baseline), or no division at all (``"none"``, Dr. GRPO). With the ``group_mean``
    baseline the group std of R - b equals the group std of R.

    Choices: eps 1e-6 as verl (TRL uses 1e-4), added to the std. A group of one has std taken as 1
    (so with group_mean its advantage is 0, TRL's convention; verl returns the raw reward there).
    A zero-variance group gives 0 even with eps = 0.

    Hyperparameters: scale "group" | "batch" | "none"; eps 1e-6, >= 0. Output [B, T].
    Requires ``group``; default baseline ``group_mean``.
    """

    name: ClassVar[str] = "group_normalized"
    properties: ClassVar[frozenset[str]] = frozenset(
        {"group_independent", "permutation_equivariant", "shift_invariant", "zero_sum_per_group", "degenerate_groups_zero", "outcome_broadcast"}
    )
    requires: ClassVar[frozenset[str]] = frozenset({"group"})
    accepts_state_values: ClassVar[bool] = False
    default_baseline: ClassVar[str] = "group_mean"

    scale: str = attrs.field(default="group", validator=choice(("group", "batch", "none")))
    eps: float = attrs.field(default=1e-6, validator=ge(0.0))

    def declared_properties(self) -> frozenset[str]:
        # scale="batch" divides by a statistic of the whole batch, so groups are no longer independent.
        return self.properties - {"group_independent"} if self.scale == "batch" else self.properties

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        assert batch.group is not None
        centred = batch.rewards - baseline
        if self.scale == "group":
            std = ops.group_std(centred, batch.group, singleton=1.0)
        elif self.scale == "batch":
            std = centred.std() if centred.numel() > 1 else torch.ones((), dtype=centred.dtype, device=centred.device)
        else:
            return proxim.Estimate(advantages=ops.broadcast_to_tokens(centred, batch.mask))
        denom = std + self.eps
        advantages = torch.where(denom > 0, centred / denom, torch.zeros_like(centred))
        return proxim.Estimate(advantages=ops.broadcast_to_tokens(advantages, batch.mask))


@proxim.hookimpl
def proxim_register_baselines(register: proxim.Register[type[proxim.Baseline]]) -> None:
    register(GroupMeanBaseline)


@proxim.hookimpl
def proxim_register_advantages(register: proxim.Register[type[proxim.Advantage]]) -> None:
    register(GroupNormalized)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="grpo",
            baseline="group_mean",
            advantage="group_normalized",
            region="clip",
            settings={
                "advantage.scale": "group",
                "region.eps_low": 0.2,
                "aggregation": "seq_mean_token_mean",
                "kl_coef": 0.04,
                "kl_estimator": "k3",
                "kl_in": "loss",
            },
            summary="GRPO: group z-scored outcome advantage, clip 0.2, k3 KL in the loss (beta 0.04), 1/|o_i| per sequence.",
            source="arXiv 2402.03300 (DeepSeekMath), Eq. 3 and section 4.1.2",
            training={"epochs": 1},  # DeepSeekMath: one update per rollout (TRL num_iterations=1), the trainer's default split
        )
    )
    register(
        proxim.Preset(
            name="dr_grpo",
            baseline="group_mean",
            advantage="group_normalized",
            region="clip",
            settings={"advantage.scale": "none", "region.eps_low": 0.2, "aggregation": "seq_mean_token_sum_norm", "kl_coef": 0.0},
            summary="Dr. GRPO: mean-centred advantage (no std), token sum over a constant max length, no KL.",
            source="arXiv 2503.20783",
        )
    )
    register(
        proxim.Preset(
            name="dapo",
            baseline="group_mean",
            advantage="group_normalized",
            region="clip",
            settings={"advantage.scale": "group", "region.eps_low": 0.2, "region.eps_high": 0.28, "aggregation": "token_mean", "kl_coef": 0.0},
            summary="DAPO: group z-score, clip-higher (0.2, 0.28), token-mean over the batch, no KL.",
            source="arXiv 2503.14476",
            training={"epochs": 1, "minibatches": 16},  # DAPO section 4.1: mini-batches of 512 of 8192 responses, 16 updates per rollout
        )
    )
