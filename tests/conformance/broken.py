"""Deliberately broken parts, each violating one clause of the contract the conformance kit checks.

Each is otherwise a plausible part (it would pass a smoke test), so the check that catches it is doing
real work. `CAUGHT_BY` maps each to the check that must name it.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops


@attrs.frozen
class IgnoresMask(proxim.TrustRegion):
    """GSPO-style sequence ratio, but averaged over all T positions instead of the valid tokens."""

    name: ClassVar[str] = "ignores_mask"

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> proxim.RegionOutput:
        sequence = (logprobs - anchor).mean(dim=1, keepdim=True).clamp(-20, 20)  # BUG: padding counts
        return proxim.RegionOutput(loss=-sequence.exp().expand_as(advantages) * advantages)


@attrs.frozen
class LeaksGradient(proxim.Baseline):
    """A learned scale on the group mean, computed with gradient tracking switched back on."""

    name: ClassVar[str] = "leaks_gradient"
    requires: ClassVar[frozenset[str]] = frozenset({"group"})

    def __call__(self, batch: proxim.Rollout) -> Tensor:
        assert batch.group is not None
        with torch.enable_grad():  # BUG: stage 1 output now carries a graph
            scale = torch.ones((), dtype=batch.rewards.dtype, requires_grad=True)
            return scale * ops.group_mean(ops.sequence_rewards(batch.rewards, batch.mask), batch.group)


@attrs.frozen
class ReducesOverBatch(proxim.TrustRegion):
    """The importance-weighted policy gradient, but averaged over the batch inside the region."""

    name: ClassVar[str] = "reduces_over_batch"

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> proxim.RegionOutput:
        per_token = -ops.log_ratio(logprobs, anchor).exp() * advantages
        return proxim.RegionOutput(loss=per_token.mean(dim=0, keepdim=True).expand_as(per_token))  # BUG: mixes rows


@attrs.frozen
class MixesGroups(proxim.Advantage):
    """Group-centred rewards over the batch's std, while claiming that groups are independent."""

    name: ClassVar[str] = "mixes_groups"
    requires: ClassVar[frozenset[str]] = frozenset({"group"})
    accepts_state_values: ClassVar[bool] = False
    default_baseline: ClassVar[str] = "group_mean"
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "zero_sum_per_group"})

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        centred = batch.rewards - baseline
        std = centred.std() if centred.numel() > 1 else torch.ones((), dtype=centred.dtype)
        return proxim.Estimate(advantages=ops.broadcast_to_tokens(centred / (std + 1e-6), batch.mask))  # BUG: batch std


@attrs.frozen
class NaNOnEmptyRow(proxim.Advantage):
    """A per-token share of the sequence advantage, (R - b) / |y|, without guarding |y| = 0."""

    name: ClassVar[str] = "nan_on_empty_row"
    accepts_state_values: ClassVar[bool] = False

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        lengths = batch.mask.sum(dim=1).to(batch.rewards.dtype)  # BUG: 0 for a fully masked row
        share = (batch.rewards - baseline) / lengths
        return proxim.Estimate(advantages=share.unsqueeze(1) * batch.mask)  # inf * 0 = NaN on that row


@attrs.frozen
class MutatesInput(proxim.TrustRegion):
    """PPO's clip, but it clamps the advantages in place first."""

    name: ClassVar[str] = "mutates_input"

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> proxim.RegionOutput:
        advantages.clamp_(-10.0, 10.0)  # BUG: writes into the caller's tensor
        ratio = ops.log_ratio(logprobs, anchor).exp()
        return proxim.RegionOutput(loss=-torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages))


@attrs.frozen
class CreatesCPUTensor(proxim.TrustRegion):
    """The plain policy gradient plus a zero built without a device: fine on the CPU, broken on a GPU."""

    name: ClassVar[str] = "creates_cpu_tensor"

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> proxim.RegionOutput:
        offset = torch.zeros(advantages.shape, dtype=advantages.dtype)  # BUG: on the CPU whatever the inputs
        return proxim.RegionOutput(loss=-ops.log_ratio(logprobs, anchor).exp() * advantages + offset)


#: broken part -> the check that must catch it (on the CPU)
CAUGHT_BY: dict[type[proxim.Part], str] = {
    IgnoresMask: "masked_positions_ignored",
    LeaksGradient: "no_gradient_leak",
    ReducesOverBatch: "rows_independent",
    MixesGroups: "group_independent",
    NaNOnEmptyRow: "fully_masked_rows",
    MutatesInput: "inputs_not_mutated",
}
