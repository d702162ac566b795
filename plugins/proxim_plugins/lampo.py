"""LamPO's pairwise-decomposed advantage (arXiv 2605.21235, WITHDRAWN). EXPERIMENTAL reconstruction.

Only the structure of the method is public (abstract and introduction); every choice below is a
parameter. See docs/parts.md (``pairwise``). Registers the advantage ``pairwise`` and the
``lampo`` preset; the region is PPO's ``clip``, reused by name.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import boolean, choice, ge, gt


@attrs.frozen
class Pairwise(proxim.Advantage):
    """A LambdaRank-style pairwise-decomposed advantage, confidence-weighted by the policy's own log-probs.

    With x_i = R_i - b_i and l_i = log pi_old(y_i | x) (sum over tokens; divided by |y_i| if length_norm):
      w_ij = sigmoid(-sign(x_i - x_j) (l_i - l_j) / tau)    (pairs the policy already orders right count less)
      A_i  = (1 / Z_i) sum_{j in group(i), j != i} w_ij (x_i - x_j)
      Z_i  = G_i - 1 ("count": zero-sum per group), sum_j w_ij ("weight_sum"), or 1 ("none")
    then optionally divided by the group or batch std of A (``scale``). With equal log-probs and
    Z = G - 1, A = RLOO / 2. Log-probs are the detached sampling-time ones: A is a constant. A pair with a
    fully masked row (no log-prob evidence) gets the neutral weight 1/2.

    Hyperparameters (all unconfirmed by the withdrawn paper): tau 1.0 > 0, length_norm True,
    normalizer "count" | "weight_sum" | "none", scale "none" | "group" | "batch", eps 1e-6 >= 0.
    Output [B, T] (broadcast). Requires ``group``; default baseline ``none``.
    """

    name: ClassVar[str] = "pairwise"
    properties: ClassVar[frozenset[str]] = frozenset(
        {"group_independent", "permutation_equivariant", "shift_invariant", "zero_sum_per_group", "degenerate_groups_zero", "outcome_broadcast"}
    )
    requires: ClassVar[frozenset[str]] = frozenset({"group"})
    accepts_state_values: ClassVar[bool] = False

    tau: float = attrs.field(default=1.0, validator=gt(0.0))
    length_norm: bool = attrs.field(default=True, validator=boolean)
    normalizer: str = attrs.field(default="count", validator=choice(("count", "weight_sum", "none")))
    scale: str = attrs.field(default="none", validator=choice(("none", "group", "batch")))
    eps: float = attrs.field(default=1e-6, validator=ge(0.0))

    def declared_properties(self) -> frozenset[str]:
        # Z = sum_j w_ij differs per response, so only the "count" and "none" normalizers sum to zero;
        # scale="batch" divides by a batch statistic, so groups are no longer independent.
        dropped = {"zero_sum_per_group"} if self.normalizer == "weight_sum" else set()
        dropped |= {"group_independent"} if self.scale == "batch" else set()
        return self.properties - dropped

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        assert batch.group is not None
        x = batch.rewards - baseline
        confidence = ops.masked_sum(batch.old_logprobs, batch.mask, dim=1)
        if self.length_norm:
            confidence = confidence / batch.mask.sum(dim=1).clamp(min=1).to(confidence.dtype)
        gather, valid, rows = ops.to_groups(batch.group)
        xg, lg = x[gather], confidence[gather]  # [K, G]
        empty = ~batch.mask.any(dim=1)[gather]  # a fully masked row carries no log-prob evidence
        pair = valid.unsqueeze(2) & valid.unsqueeze(1) & ~torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
        gap = xg.unsqueeze(2) - xg.unsqueeze(1)  # x_i - x_j
        weight = torch.sigmoid(-torch.sign(gap) * (lg.unsqueeze(2) - lg.unsqueeze(1)) / self.tau)
        weight = torch.where(empty.unsqueeze(2) | empty.unsqueeze(1), torch.full_like(weight, 0.5), weight)
        weight = torch.where(pair, weight, torch.zeros_like(weight))
        total = (weight * gap).sum(dim=2)
        if self.normalizer == "count":
            total = total / (pair.sum(dim=2).clamp(min=1)).to(total.dtype)
        elif self.normalizer == "weight_sum":
            z = weight.sum(dim=2)
            total = torch.where(z > 0, total / z.clamp(min=torch.finfo(z.dtype).tiny), torch.zeros_like(total))
        advantages = total.flatten()[rows]
        if self.scale != "none":
            if self.scale == "group":
                std = ops.group_std(advantages, batch.group)
            else:  # a batch of one has no Bessel std (torch gives NaN and warns); take 1, as group_normalized does
                std = advantages.std() if advantages.numel() > 1 else torch.ones((), dtype=advantages.dtype, device=advantages.device)
            advantages = torch.where(std + self.eps > 0, advantages / (std + self.eps), torch.zeros_like(advantages))
        return proxim.Estimate(advantages=ops.broadcast_to_tokens(advantages, batch.mask))


@proxim.hookimpl
def proxim_register_advantages(register: proxim.Register[type[proxim.Advantage]]) -> None:
    register(Pairwise)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="lampo",
            baseline="none",
            advantage="pairwise",
            region="clip",
            settings={
                "advantage.tau": 1.0,
                "advantage.length_norm": True,
                "advantage.normalizer": "count",
                "region.eps_low": 0.2,
                "aggregation": "seq_mean_token_mean",
                "kl_coef": 0.0,
            },
            summary="LamPO (experimental reconstruction; paper withdrawn): pairwise confidence-weighted advantage, clip 0.2.",
            source="arXiv 2605.21235 (withdrawn); reconstruction in docs/parts.md",
        )
    )
