"""Offline preference objectives (DPO and relatives): a `Preference` part applied to pairs of responses.

Unlike the online objectives, there is no rollout, baseline or trust region: each example is a prompt
with a chosen (y_w) and a rejected (y_l) response, scored by the policy and a frozen reference.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from proxim.aggregation import check_normalizer
from proxim.diagnostics import mean_or_zero
from proxim.errors import BatchError
from proxim.ops import compute_dtype
from proxim.parts import Preference
from proxim.registry import PartInfo
from proxim.rollout import LossOutput
from proxim.routing import route_preference

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
        """A copy with hyperparameters changed (``beta=0.2`` or ``"preference.beta"``), checked like
        `proxim.preference_objective`: an unknown name is an `UnknownNameError`, a bad value a
        `ConfigurationError` naming the loss and the field."""
        return attrs.evolve(self, preference=route_preference(self.preference, overrides, origin="override"))

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
        so that micro-batch losses sum to the full-batch loss (default: this batch's B), a positive finite
        number. Computed in float32 at least (half-precision inputs are upcast; the gradient reaches them in
        their dtype). An empty batch (B = 0) gives loss 0 and metrics of 0.
        """
        tensors = (chosen_logprobs, rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs)
        _check_pairs(tensors)
        check_normalizer(normalizer)
        w, lo, ref_w, ref_l = (t.to(compute_dtype(t.dtype)) for t in tensors)
        chosen = w - ref_w.detach()
        rejected = lo - ref_l.detach()
        per_pair = self.preference(chosen, rejected)
        if normalizer is None:  # this batch's pairs, at least 1 (no pairs: loss 0)
            denom = torch.as_tensor(max(chosen.shape[0], 1), dtype=per_pair.dtype, device=per_pair.device)
        else:
            denom = torch.as_tensor(normalizer, dtype=per_pair.dtype, device=per_pair.device)
        loss = per_pair.sum() / denom
        beta = getattr(self.preference, "beta", 1.0)
        with torch.no_grad():
            chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
            metrics = {
                "loss/preference": loss.detach(),
                "preference/chosen_reward": mean_or_zero(chosen_reward),
                "preference/rejected_reward": mean_or_zero(rejected_reward),
                "preference/margin": mean_or_zero(chosen_reward - rejected_reward),
                "preference/accuracy": mean_or_zero((chosen_reward > rejected_reward).to(per_pair.dtype)),
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
