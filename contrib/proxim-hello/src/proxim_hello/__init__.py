"""proxim-hello: a minimal proxim plugin that adds one trust region, ``truncated_is``."""

from __future__ import annotations

from typing import ClassVar

import attrs
from torch import Tensor

import proxim
from proxim import ops


@attrs.frozen
class TruncatedIS(proxim.TrustRegion):
    """Truncated importance sampling: the policy gradient weighted by the ratio, capped at C.

    j_t = sg(min(r_t, C) / r_t) r_t A_t,  so  dj_t/dlogp_t = min(r_t, C) A_t;  loss_t = -j_t,
    r_t = exp(clamp(logp_t - anchor_t, -20, 20)). The value is -min(r, C) A (-A at the anchor);
    the usual form sg(min(r, C)) A logp has the same gradient. No token's gradient is dropped, and
    none is weighted more than C. The DPPO paper (arXiv 2602.04879) uses C = 5 in its scaling runs.

    Hyperparameters: cap C 5.0, >= 1. Shapes [B, T]. Requires nothing.
    Metrics: truncated_fraction, the tokens with r > C.
    """

    name: ClassVar[str] = "truncated_is"
    properties: ClassVar[frozenset[str]] = frozenset({"pg_at_anchor", "value_at_anchor", "bounded_weight", "positively_homogeneous", "tokens_independent"})

    cap: float = attrs.field(default=5.0, validator=attrs.validators.ge(1.0))

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> proxim.RegionOutput:
        ratio = ops.log_ratio(logprobs, anchor).exp()
        weight = ratio.detach().clamp(max=self.cap) / ratio.detach()
        return proxim.RegionOutput(loss=-(weight * ratio * advantages), metrics={"truncated_fraction": ratio > self.cap})


@proxim.hookimpl
def proxim_register_regions(register: proxim.Register[type[proxim.TrustRegion]]) -> None:
    register(TruncatedIS)
