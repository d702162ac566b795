"""GSPO, group sequence policy optimisation (Zheng et al. 2025, arXiv 2507.18071).

Registers the region ``sequence_clip`` (GSPO and GSPO-token) and the ``gspo`` preset; the baseline
and advantage are GRPO's, reused by name.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import boolean, ge

_MAX_SEQUENCE_LOG_RATIO = 10.0
"""verl clamps the sequence log-ratio at 10 from above; below, the usual -20."""


@attrs.frozen
class SequenceClip(proxim.TrustRegion):
    """PPO's clip on the length-normalised sequence ratio (arXiv 2507.18071, Eqs. 5-7).

    s_i = exp((1/|y_i|) sum_t (logp_{i,t} - anchor_{i,t})), clamped in log space to [-20, 10];
    j_{i,t} = min(s A_{i,t}, clip(s, 1 - eps_low, 1 + eps_high) A_{i,t}),  loss_{i,t} = -j_{i,t}.
    ``token_level=False`` (GSPO): s = s_i, its gradient spreads over the whole sequence.
    ``token_level=True`` (GSPO-token): s_{i,t} = sg(s_i) p_{i,t} / sg(p_{i,t}); equal in value and gradient
    to GSPO when A is constant within a sequence, and allows per-token advantages.
    Aggregate with ``seq_mean_token_mean`` to get the paper's (1/G) sum_i j_i. Clipping is all or
    nothing per sequence.

    Hyperparameters: eps_low 3e-4, eps_high 4e-4 (>= 0; the paper's values, tiny because s is a
    geometric mean: PPO's 0.2 would disable clipping), token_level False. Shapes [B, T].
    Metrics: clip_fraction_low (A < 0, s < 1 - eps_low), clip_fraction_high (A > 0, s > 1 + eps_high),
    per token; none with ``metrics=False``.
    """

    name: ClassVar[str] = "sequence_clip"
    properties: ClassVar[frozenset[str]] = frozenset({"value_at_anchor", "zero_grad_clipped_side", "positively_homogeneous"})

    eps_low: float = attrs.field(default=3e-4, validator=ge(0.0))
    eps_high: float = attrs.field(default=4e-4, validator=ge(0.0))
    token_level: bool = attrs.field(default=False, validator=boolean)

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor, metrics: bool = True) -> proxim.RegionOutput:
        padding = ops.Padding.of(mask, logprobs.dtype)  # masking operands and row lengths, derived once
        sequence = (padding.sum(logprobs - anchor, dim=1) / padding.lengths).unsqueeze(1)
        sequence = sequence.clamp(-ops.LOG_RATIO_CLAMP, _MAX_SEQUENCE_LOG_RATIO)
        if self.token_level:
            log_s = sequence.detach() + logprobs - logprobs.detach()
        else:
            log_s = sequence  # [B, 1]: exp and clip once per sequence; broadcasting against A gives [B, T]
        s = log_s.exp()
        low, high = 1.0 - self.eps_low, 1.0 + self.eps_high
        objective = torch.minimum(s * advantages, s.clamp(low, high) * advantages)
        if not metrics:
            return proxim.RegionOutput(loss=-objective)
        fractions = {
            "clip_fraction_low": (advantages < 0).logical_and_(s < low),
            "clip_fraction_high": (advantages > 0).logical_and_(s > high),
        }
        return proxim.RegionOutput(loss=-objective, metrics=fractions)


@proxim.hookimpl
def proxim_register_regions(register: proxim.Register[type[proxim.TrustRegion]]) -> None:
    register(SequenceClip)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="gspo",
            baseline="group_mean",
            advantage="group_normalized",
            region="sequence_clip",
            settings={"region.eps_low": 3e-4, "region.eps_high": 4e-4, "aggregation": "seq_mean_token_mean", "kl_coef": 0.0},
            summary="GSPO: group z-score, sequence-level ratio clipped to (3e-4, 4e-4), sequence mean, no KL.",
            source="arXiv 2507.18071",
            training={"epochs": 1, "minibatches": 4},  # GSPO section 5.1: each rollout batch split into four minibatches
        )
    )
