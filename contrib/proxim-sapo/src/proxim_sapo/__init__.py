"""proxim-sapo: SAPO, soft adaptive policy optimisation (Gao et al. 2025, arXiv 2511.20347).

Registers the trust region ``sapo`` and the preset ``sapo`` (GRPO's group z-scored advantage with
the SAPO region, per-sequence token mean, no KL), as verl's ``loss_mode="sapo"`` and TRL's
``loss_type="sapo"`` run it.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops


@attrs.frozen
class SoftGate(proxim.TrustRegion):
    """SAPO's sigmoid gate in place of PPO's hard clip (arXiv 2511.20347; verl ``compute_policy_loss_sapo``).

    j_t = f(r_t) A_t,  f(r) = (4 / tau) sigmoid(tau (r - 1)),  tau = tau_pos if A_t > 0 else tau_neg;
    loss_t = -j_t,  r_t = exp(clamp(logp_t - anchor_t, -20, 20)).

    Gradient: dj_t/dlogp_t = 4 s (1 - s) r_t A_t with s = sigmoid(tau (r_t - 1)): exactly A_t at r = 1
    (the plain policy gradient); far from r = 1 it fades smoothly to 0 (s (1 - s) decays like
    exp(-tau |r - 1|)) instead of PPO's jump to 0 at 1 +- eps, and it never changes sign. A larger tau
    makes it fade sooner; tau_neg > tau_pos damps negative-advantage tokens more. The loss value at
    r = 1 is -2 A / tau (verl and TRL compute the same value), so only gradients compare with the
    ratio-valued regions. A_t = 0 takes tau_neg, as verl does (its loss is 0 either way).

    Hyperparameters: tau_pos 1.0 > 0, tau_neg 1.05 > 0 (the defaults of verl, TRL and the paper's
    recipe). Shapes [B, T]. Requires nothing.
    Metrics: gradient_weight, the factor 4 s (1 - s) r that multiplies A in the gradient.
    """

    name: ClassVar[str] = "sapo"
    properties: ClassVar[frozenset[str]] = frozenset({"pg_at_anchor", "bounded_weight", "positively_homogeneous", "tokens_independent"})

    tau_pos: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    tau_neg: float = attrs.field(default=1.05, validator=attrs.validators.gt(0.0))

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> proxim.RegionOutput:
        ratio = ops.log_ratio(logprobs, anchor).exp()
        positive = torch.full_like(advantages, self.tau_pos)
        tau = torch.where(advantages > 0, positive, torch.full_like(advantages, self.tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1.0))
        s = gate.detach()
        return proxim.RegionOutput(
            loss=-(4.0 / tau) * gate * advantages,
            metrics={"gradient_weight": 4.0 * s * (1.0 - s) * ratio.detach()},
        )


@proxim.hookimpl
def proxim_register_regions(register: proxim.Register[type[proxim.TrustRegion]]) -> None:
    register(SoftGate)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="sapo",
            baseline="group_mean",
            advantage="group_normalized",
            region="sapo",
            settings={
                "advantage.scale": "group",
                "region.tau_pos": 1.0,
                "region.tau_neg": 1.05,
                "aggregation": "seq_mean_token_mean",
                "kl_coef": 0.0,
            },
            summary="SAPO: group z-score, soft sigmoid gate (tau 1.0 / 1.05) instead of a hard clip, per-sequence token mean, no KL.",
            source="arXiv 2511.20347; verl compute_policy_loss_sapo",
        )
    )
