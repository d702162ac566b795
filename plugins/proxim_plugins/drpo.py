"""DRPO, divergence-regularised policy optimisation (Yao et al. 2026, arXiv 2606.09821, Eq. 8).

Registers the region ``quadratic`` (DRPO; SPO when ``mu_weighted=False``) and the ``drpo`` preset;
baseline and advantage are GRPO's, reused by name (mean-centred, no std, as in the reference recipe).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import boolean, gt


@attrs.frozen
class Quadratic(proxim.TrustRegion):
    """A smooth advantage-weighted quadratic penalty on the probability shift (DRPO Eq. 8; SPO, arXiv 2401.16025).

    loss_t = -A_t r_t + |A_t| w_t (r_t - 1)^2 / (2 delta),  w_t = mu_t (DRPO) or 1 (SPO, ``mu_weighted=False``),
    r_t = exp(clamp(logp - anchor, -20, 20)) differentiable, mu_t = exp(anchor) constant.
    Gradient: g_t = A_t r_t (1 - sign(A_t) (p_t - mu_t) / delta) for DRPO, so the weight falls linearly to
    0 at the Binary-TV boundary |p - mu| = delta and turns corrective beyond it (DPPO's mask is its
    0/1 step version); SPO's weight is 1 - sign(A) (r - 1) / delta.

    Hyperparameters: delta 12.5 (> 0), mu_weighted True. The default 12.5 is the reference
    implementation's literal "regularization threshold"; read as a TV radius it can never be reached
    (w stays in [0.92, 1.08]), so the penalty is weak. An inverse reading (delta = 0.08) is plausible;
    the paper's text is ambiguous (docs/parts.md, the delta scale question), so try e.g. delta=0.1 too. Shapes [B, T].
    Metrics: clip_fraction_high / clip_fraction_low, the fractions beyond the boundary (w < 0) with
    A > 0 / A < 0; weight_mean, the mean of w over valid tokens (w = 1 where A = 0); none with
    ``metrics=False``.
    """

    name: ClassVar[str] = "quadratic"
    properties: ClassVar[frozenset[str]] = frozenset({"pg_at_anchor", "value_at_anchor", "positively_homogeneous", "tokens_independent"})

    delta: float = attrs.field(default=12.5, validator=gt(0.0))
    mu_weighted: bool = attrs.field(default=True, validator=boolean)

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor, metrics: bool = True) -> proxim.RegionOutput:
        ratio = ops.log_ratio(logprobs, anchor).exp()
        scale = anchor.exp() if self.mu_weighted else 1.0
        penalty = advantages.abs() * scale * (ratio - 1.0) ** 2 / (2.0 * self.delta)
        loss = -advantages * ratio + penalty
        if not metrics:
            return proxim.RegionOutput(loss=loss)
        # weight = 1 - sign(A) * scale * (r - 1) / delta, in place on its own temporaries (each new [B, T]
        # buffer costs page faults on CPU); the same operations in the same order, so the same numbers.
        shift = (ratio.detach() - 1.0).mul_(scale).div_(self.delta)
        weight = advantages.sign().mul_(shift).neg_().add_(1.0)
        beyond = weight < 0
        fractions = {
            "clip_fraction_low": (advantages < 0).logical_and_(beyond),
            "clip_fraction_high": (advantages > 0).logical_and_(beyond),
            "weight_mean": weight,
        }
        return proxim.RegionOutput(loss=loss, metrics=fractions)


@proxim.hookimpl
def proxim_register_regions(register: proxim.Register[type[proxim.TrustRegion]]) -> None:
    register(Quadratic)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="drpo",
            baseline="group_mean",
            advantage="group_normalized",
            region="quadratic",
            settings={
                "advantage.scale": "none",
                "region.delta": 12.5,
                "region.mu_weighted": True,
                "aggregation": "seq_mean_token_sum_norm",
                "kl_coef": 0.0,
            },
            summary="DRPO: mean-centred advantage, mu-weighted quadratic regulariser (delta 12.5, see docs), token sum / L_max, no KL.",
            source="arXiv 2606.09821; reference implementation Tencent-Hunyuan/UniRL",
        )
    )
