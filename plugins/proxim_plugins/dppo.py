"""DPPO, divergence-masked policy optimisation (Qi et al. 2026, arXiv 2602.04879, Eqs. 11-12).

Registers the region ``divergence_mask`` (Binary-TV and Binary-KL) and the ``dppo`` preset; the
baseline and advantage are GRPO's, reused by name (mean-centred, no std, as in the paper's study).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import choice, gt, optional

_DEFAULT_DELTA = {"tv": 0.15, "kl": 0.05}


def binary_kl(mu: Tensor, logp: Tensor, log_mu: Tensor) -> Tensor:
    """KL between the two-outcome distributions {sampled token, rest} of mu and pi (verl's 1e-8 guard)."""
    p = logp.exp()
    return mu * (log_mu - logp) + (1 - mu) * torch.log((1.0 - mu + 1e-8) / (1.0 - p + 1e-8))


@attrs.frozen
class DivergenceMask(proxim.TrustRegion):
    """Mask tokens whose divergence from the anchor grew in the direction the advantage pushes.

    j_t = M_t * sg(min(r_t, C) / r_t) * r_t * A_t,  so g_t = M_t min(r_t, C) A_t (the paper's unified
    gradient; C = ``is_cap``, truncated importance sampling). M_t = 0 iff
      Binary-TV: (A > 0 and p - mu > delta_high) or (A < 0 and mu - p > delta_low)
      Binary-KL: (A > 0 and p > mu and D_KL > delta_high) or (A < 0 and p < mu and D_KL > delta_low)
    with p = pi(y_t), mu = anchor prob of y_t, D_KL the KL between {y_t, rest} under mu and pi. M is
    detached. Loss values are ratio-valued (-A at the anchor); verl's form -A sg(min(r, C)) M logp has
    the same gradient.

    Hyperparameters: divergence "tv" | "kl"; delta_low, delta_high > 0 or None (None: 0.15 for TV, the
    paper's stability study; 0.05 for KL, resolved when called, so switching `divergence` by override
    keeps the right default); is_cap None (no truncation, the paper's study) or C > 0 (the paper's
    scaling runs used 5, verl 20). Shapes [B, T]. Requires nothing; the paper anchors on the rollout
    engine's log-probs (objective option ``anchor="rollout"``).
    Metrics: clip_fraction_high / clip_fraction_low, the masked fractions on the A > 0 / A < 0 side;
    none with ``metrics=False``.
    """

    name: ClassVar[str] = "divergence_mask"
    properties: ClassVar[frozenset[str]] = frozenset(
        {"pg_at_anchor", "value_at_anchor", "zero_grad_clipped_side", "positively_homogeneous", "tokens_independent"}
    )

    divergence: str = attrs.field(default="tv", validator=choice(("tv", "kl")))
    delta_low: float | None = attrs.field(default=None, validator=optional(gt(0.0)))
    delta_high: float | None = attrs.field(default=None, validator=optional(gt(0.0)))
    is_cap: float | None = attrs.field(default=None, validator=optional(gt(0.0)))

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor, metrics: bool = True) -> proxim.RegionOutput:
        default = _DEFAULT_DELTA[self.divergence]
        delta_low = default if self.delta_low is None else self.delta_low
        delta_high = default if self.delta_high is None else self.delta_high
        ratio = ops.log_ratio(logprobs, anchor).exp()
        logp = logprobs.detach()
        p, mu = logp.exp(), anchor.exp()
        if self.divergence == "tv":
            # The shift in the direction A pushes: p - mu for A > 0, mu - p = -(p - mu) (exactly) for A < 0,
            # 0 for A = 0; so one comparison against that side's threshold decides the mask.
            pushed = advantages.sign() * (p - mu)
            threshold = delta_high if delta_high == delta_low else torch.where(advantages > 0, delta_high, delta_low)
            masked = pushed > threshold
        else:
            divergence = binary_kl(mu, logp, anchor)
            masked = ((advantages > 0) & (p > mu) & (divergence > delta_high)) | ((advantages < 0) & (p < mu) & (divergence > delta_low))
        keep = ops.float_mask(masked.logical_not(), ratio.dtype)
        weight = keep if self.is_cap is None else keep * ratio.detach().clamp(max=self.is_cap) / ratio.detach()
        loss = -(weight * ratio * advantages)
        if not metrics:
            return proxim.RegionOutput(loss=loss)
        fractions = {"clip_fraction_low": (advantages < 0).logical_and_(masked), "clip_fraction_high": (advantages > 0).logical_and_(masked)}
        return proxim.RegionOutput(loss=loss, metrics=fractions)


@proxim.hookimpl
def proxim_register_regions(register: proxim.Register[type[proxim.TrustRegion]]) -> None:
    register(DivergenceMask)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="dppo",
            baseline="group_mean",
            advantage="group_normalized",
            region="divergence_mask",
            settings={
                "advantage.scale": "none",
                "region.divergence": "tv",
                "aggregation": "token_mean",
                "kl_coef": 0.0,
            },
            summary="DPPO: mean-centred advantage, Binary-TV divergence mask (delta 0.15), token mean, no KL.",
            source="arXiv 2602.04879",
        )
    )
