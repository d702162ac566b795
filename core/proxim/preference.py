"""Offline preference objectives (DPO and relatives): a `Preference` part applied to pairs of responses.

Unlike the online objectives, there is no rollout, baseline or trust region: each example is a prompt
with a chosen (y_w) and a rejected (y_l) response, scored by the policy and a frozen reference.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
import torch
from torch import Tensor

from proxim.errors import BatchError
from proxim.parts import Preference
from proxim.registry import PartInfo
from proxim.rollout import LossOutput

_INPUTS = ("chosen_logprobs", "rejected_logprobs", "ref_chosen_logprobs", "ref_rejected_logprobs")


@attrs.frozen(kw_only=True, eq=False)
class PreferenceObjective:
    """A preference loss ready to call. Build it with ``proxim.preference_objective("dpo", beta=0.1)``
    (or ``proxim.objective("dpo", beta=0.1)``)."""

    preference: Preference
    source: PartInfo | None = None

    @property
    def requires(self) -> frozenset[str]:
        """Preference objectives need no Rollout fields: they take sequence log-probs directly."""
        return frozenset()

    @property
    def fingerprint(self) -> str:
        info = self.source
        origin = f"{info.distribution}=={info.version}" if info else type(self.preference).__qualname__
        return f"preference={self.preference.describe()}@{origin}"

    def override(self, **overrides: object) -> PreferenceObjective:
        # cast: mypy's attrs plugin cannot see that every concrete Part is an attrs class.
        return attrs.evolve(self, preference=attrs.evolve(cast(Any, self.preference), **overrides))

    def __repr__(self) -> str:
        return f"PreferenceObjective({self.preference.describe()})"

    def loss(
        self,
        chosen_logprobs: Tensor,
        rejected_logprobs: Tensor,
        ref_chosen_logprobs: Tensor,
        ref_rejected_logprobs: Tensor,
        normalizer: Tensor | int | None = None,
    ) -> LossOutput:
        """The mean per-pair loss, with implicit-reward metrics.

        Each argument is [B]: the sum over response tokens of the sampled tokens' log-probs, under the
        policy (with grad) or the frozen reference. `normalizer`: the number of pairs in the whole step,
        so that micro-batch losses sum to the full-batch loss (default: this batch's B).
        """
        tensors = (chosen_logprobs, rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs)
        _check_pairs(tensors)
        chosen = chosen_logprobs - ref_chosen_logprobs.detach()
        rejected = rejected_logprobs - ref_rejected_logprobs.detach()
        per_pair = self.preference(chosen, rejected)
        denom = chosen.shape[0] if normalizer is None else normalizer
        loss = per_pair.sum() / torch.as_tensor(denom, dtype=per_pair.dtype, device=per_pair.device).clamp(min=1)
        beta = getattr(self.preference, "beta", 1.0)
        with torch.no_grad():
            chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
            metrics = {
                "loss/preference": loss.detach(),
                "preference/chosen_reward": chosen_reward.mean(),
                "preference/rejected_reward": rejected_reward.mean(),
                "preference/margin": (chosen_reward - rejected_reward).mean(),
                "preference/accuracy": (chosen_reward > rejected_reward).to(per_pair.dtype).mean(),
            }
        return LossOutput(loss=loss, metrics=metrics)


def _check_pairs(tensors: tuple[Tensor, ...]) -> None:
    first = tensors[0]
    for name, t in zip(_INPUTS, tensors):
        if not isinstance(t, Tensor) or t.dim() != 1:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise BatchError(f"{name} must be a [B] tensor of sequence log-probs (sum over response tokens), got {got}.")
        if t.shape != first.shape:
            raise BatchError(f"{name} has shape {tuple(t.shape)} but chosen_logprobs has {tuple(first.shape)}; pass one value per pair.")
        if not t.is_floating_point():
            raise BatchError(f"{name} must be floating point, got dtype {t.dtype}.")
        if t.device != first.device:
            raise BatchError(f"{name} is on {t.device} but chosen_logprobs is on {first.device}.")
