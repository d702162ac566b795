"""REINFORCE++ (Hu et al. 2025, arXiv 2501.03262): token returns with global batch normalisation.

Registers the advantages ``return_to_go`` and ``whitened`` and the ``reinforce_pp`` preset; the
region ``clip`` and baseline ``none`` are reused by name from the ``ppo`` plugin.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import between, gt


def _centred_returns(batch: proxim.Rollout, baseline: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    returns = ops.discounted_returns(batch.rewards, batch.mask, gamma)
    base = baseline if baseline.dim() == 2 else ops.broadcast_to_tokens(baseline, batch.mask)
    return ops.broadcast_to_tokens(returns - base, batch.mask), returns


@attrs.frozen
class ReturnToGo(proxim.Advantage):
    """A_t = G_t - b with G_t = sum_{u >= t} gamma^(u - t) rew_u over the response's valid tokens.

    Token rewards [B, T] (an outcome reward sits on the last valid token, so with gamma = 1 every token
    gets R). The baseline is broadcast ([B]) or per token ([B, T], a critic: Monte-Carlo advantage).
    Returns G_t are the critic's targets. Hyperparameters: gamma 1.0 in [0, 1]. Requires nothing.
    """

    name: ClassVar[str] = "return_to_go"
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "permutation_equivariant"})
    token_level: ClassVar[bool] = True

    gamma: float = attrs.field(default=1.0, validator=between(0.0, 1.0))

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        advantages, returns = _centred_returns(batch, baseline, self.gamma)
        return proxim.Estimate(advantages=advantages, returns=returns)


@attrs.frozen
class Whitened(proxim.Advantage):
    """REINFORCE++'s globally normalised advantage (arXiv 2501.03262, section 3).

    A_t = (x_t - mean) / sqrt(var + eps),  x_t = G_t - b,  with the mean and the Bessel-corrected
    variance over all valid tokens of the batch (token-weighted, as verl's ``masked_whiten``; the
    paper's description normalises per sequence, i.e. ``group_normalized(scale="batch")``). With baseline ``none`` this is
    REINFORCE++; with ``group_mean`` it is REINFORCE++-baseline.

    Hyperparameters: gamma 1.0 in [0, 1]; eps 1e-8 > 0. Token rewards. Requires nothing.
    """

    name: ClassVar[str] = "whitened"
    properties: ClassVar[frozenset[str]] = frozenset({"permutation_equivariant"})
    token_level: ClassVar[bool] = True

    gamma: float = attrs.field(default=1.0, validator=between(0.0, 1.0))
    eps: float = attrs.field(default=1e-8, validator=gt(0.0))

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        centred, returns = _centred_returns(batch, baseline, self.gamma)
        return proxim.Estimate(advantages=ops.masked_whiten(centred, batch.mask, self.eps), returns=returns)


@proxim.hookimpl
def proxim_register_advantages(register: proxim.Register[type[proxim.Advantage]]) -> None:
    register(ReturnToGo)
    register(Whitened)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="reinforce_pp",
            baseline="none",
            advantage="whitened",
            region="clip",
            settings={
                "region.eps_low": 0.2,
                "aggregation": "token_mean",
                "kl_coef": 0.01,
                "kl_estimator": "k1",
                "kl_in": "reward",
            },
            summary="REINFORCE++: token returns with k1 KL in the reward, whitened over the batch, clip 0.2, token mean.",
            source="arXiv 2501.03262",
        )
    )
