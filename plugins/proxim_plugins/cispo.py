"""CISPO, clipped importance-sampling policy optimisation (MiniMax-M1, arXiv 2506.13585, Eq. 4).

Registers the region ``cispo`` and the ``cispo`` preset; baseline and advantage are GRPO's.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import ge


@attrs.frozen
class CISPO(proxim.TrustRegion):
    """Clip the importance weight, detach it, and keep every token's gradient.

    g_t = dj/dlogp = clip(r_t, 1 - eps_low, 1 + eps_high) A_t, so |g_t| <= (1 + eps_high) |A_t| and it is
    never 0 when A_t != 0. Written ratio-valued, j_t = sg(clip(r_t) / r_t) r_t A_t, so that the loss
    value is -clip(r) A (= -A at the anchor) and comparable with the other regions; the paper's form
    sg(clip(r)) A logp has the same gradient (verl and TRL compute that one's value).

    Hyperparameters: eps_low 1.0 (>= 0; 1.0 means no lower bound, as the paper sets it large),
    eps_high 0.28 (>= 0; Trinity's default; verl clamps to [1 - low, 1 + high] too, TRL caps r at an
    absolute value instead). Shapes [B, T]. Requires nothing.
    Metrics: clip_fraction_low / clip_fraction_high, the fractions of tokens whose weight is clipped
    below / above, whatever the sign of A (CISPO clips the weight itself, not one side of the update);
    none with ``metrics=False``.
    """

    name: ClassVar[str] = "cispo"
    properties: ClassVar[frozenset[str]] = frozenset({"pg_at_anchor", "value_at_anchor", "bounded_weight", "positively_homogeneous", "tokens_independent"})

    eps_low: float = attrs.field(default=1.0, validator=ge(0.0))
    eps_high: float = attrs.field(default=0.28, validator=ge(0.0))

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor, metrics: bool = True) -> proxim.RegionOutput:
        ratio = ops.log_ratio(logprobs, anchor).exp()
        low, high = max(1.0 - self.eps_low, 0.0), 1.0 + self.eps_high
        weight = ratio.detach().clamp(low, high) / ratio.detach()
        loss = -(weight * ratio * advantages)
        if not metrics:
            return proxim.RegionOutput(loss=loss)
        return proxim.RegionOutput(loss=loss, metrics={"clip_fraction_low": ratio < low, "clip_fraction_high": ratio > high})


@proxim.hookimpl
def proxim_register_regions(register: proxim.Register[type[proxim.TrustRegion]]) -> None:
    register(CISPO)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="cispo",
            baseline="group_mean",
            advantage="group_normalized",
            region="cispo",
            settings={"region.eps_low": 1.0, "region.eps_high": 0.28, "aggregation": "token_mean", "kl_coef": 0.0},
            summary="CISPO: group z-score, detached clipped IS weight times logp (no token dropped), token mean, no KL.",
            source="arXiv 2506.13585 (MiniMax-M1)",
        )
    )
