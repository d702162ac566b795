"""PPO (Schulman et al. 2017, arXiv 1707.06347) with GAE (arXiv 1506.02438), and the plain parts others build on.

Registers the baselines ``none``, ``batch_mean`` and ``critic``; the advantages ``diff`` and ``gae``;
the trust regions ``clip`` (with asymmetric and dual clip) and ``none``; and the ``ppo`` preset
(InstructGPT/StackLLaMA-style RLHF defaults as in TRL's PPOConfig).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import Tensor

import proxim
from proxim import ops
from proxim_plugins.validators import between, boolean, ge, gt, optional


def _seq(batch: proxim.Rollout) -> Tensor:
    return ops.sequence_rewards(batch.rewards, batch.mask)


@attrs.frozen
class NoBaseline(proxim.Baseline):
    """b = 0. Shape [B]. Requires nothing."""

    name: ClassVar[str] = "none"
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "permutation_equivariant"})

    def __call__(self, batch: proxim.Rollout) -> Tensor:
        return torch.zeros_like(_seq(batch))


@attrs.frozen
class BatchMeanBaseline(proxim.Baseline):
    """b = mean_j R_j over the whole batch (sequence rewards). Shape [B]. Requires nothing."""

    name: ClassVar[str] = "batch_mean"
    properties: ClassVar[frozenset[str]] = frozenset({"permutation_equivariant"})

    def __call__(self, batch: proxim.Rollout) -> Tensor:
        rewards = _seq(batch)
        return rewards.mean().expand_as(rewards)


@attrs.frozen
class CriticBaseline(proxim.Baseline):
    """b_t = V(s_t), the critic's value at sampling time (``Rollout.values``). Shape [B, T].

    Provides state values, so bootstrapping advantages (``gae``) can use it, and makes the objective
    train the critic with the (optionally clipped) value loss. Requires ``values``.
    """

    name: ClassVar[str] = "critic"
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "permutation_equivariant"})
    requires: ClassVar[frozenset[str]] = frozenset({"values"})
    provides_state_values: ClassVar[bool] = True

    def __call__(self, batch: proxim.Rollout) -> Tensor:
        assert batch.values is not None
        return batch.values.to(batch.old_logprobs.dtype)


@attrs.frozen
class Difference(proxim.Advantage):
    """A_{i,t} = R_i - b_i, broadcast over the response's tokens (REINFORCE with a baseline).

    With a state-value baseline (critic), A_{i,t} = R_i - V(s_t) and the critic's returns are R_i.
    Rewards: sequence rewards [B] (token rewards are summed). Output [B, T]. Requires nothing.
    """

    name: ClassVar[str] = "diff"
    properties: ClassVar[frozenset[str]] = frozenset({"group_independent", "permutation_equivariant", "outcome_broadcast"})

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        rewards, mask = batch.rewards, batch.mask
        if baseline.dim() == 2:
            returns = ops.broadcast_to_tokens(rewards, mask)
            return proxim.Estimate(advantages=returns - baseline, returns=returns)
        return proxim.Estimate(advantages=ops.broadcast_to_tokens(rewards - baseline, mask))


@attrs.frozen
class GAE(proxim.Advantage):
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438, Eq. 16).

    delta_t = rew_t + gamma * V(s_{t+1}) - V(s_t)  (V after the last token = 0)
    A_t = delta_t + gamma * lam * A_{t+1};  Ret_t = A_t + V(s_t)  (the critic's target, before whitening)

    Token rewards [B, T] (an outcome reward sits on the last valid token). Padding inside a row is
    skipped: masked positions neither take a value nor break the recursion (as verl does).

    Hyperparameters: gamma 1.0 in [0, 1], lam 0.95 in [0, 1] (TRL's LLM defaults; the PPO paper used
    gamma 0.99 for control), whiten True (verl whitens advantages over the batch's valid tokens, Bessel,
    eps 1e-8; not part of GAE itself), eps 1e-8.
    Requires ``values`` and a baseline that provides state values (``critic``).
    """

    name: ClassVar[str] = "gae"
    properties: ClassVar[frozenset[str]] = frozenset({"permutation_equivariant"})
    requires: ClassVar[frozenset[str]] = frozenset({"values"})
    token_level: ClassVar[bool] = True
    needs_state_values: ClassVar[bool] = True
    default_baseline: ClassVar[str] = "critic"

    gamma: float = attrs.field(default=1.0, validator=between(0.0, 1.0))
    lam: float = attrs.field(default=0.95, validator=between(0.0, 1.0))
    whiten: bool = attrs.field(default=True, validator=boolean)
    eps: float = attrs.field(default=1e-8, validator=gt(0.0))

    def __call__(self, batch: proxim.Rollout, baseline: Tensor) -> proxim.Estimate:
        rewards, mask, values = batch.rewards, batch.mask, baseline
        advantages = torch.zeros_like(rewards)
        zero_row = torch.zeros_like(rewards[:, 0])
        next_value, running = zero_row, zero_row
        for t in range(rewards.shape[1] - 1, -1, -1):
            valid = mask[:, t]
            delta = rewards[:, t] + self.gamma * next_value - values[:, t]
            candidate = delta + self.gamma * self.lam * running
            running = torch.where(valid, candidate, running)
            next_value = torch.where(valid, values[:, t], next_value)
            advantages[:, t] = torch.where(valid, candidate, zero_row)
        returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
        if self.whiten:
            advantages = ops.masked_whiten(advantages, mask, self.eps)
        return proxim.Estimate(advantages=advantages, returns=returns)


def _ratio(logprobs: Tensor, anchor: Tensor) -> Tensor:
    return ops.log_ratio(logprobs, anchor).exp()


@attrs.frozen
class Clip(proxim.TrustRegion):
    """PPO's clipped surrogate (arXiv 1707.06347, Eq. 7), with clip-higher (DAPO) and dual clip (arXiv 1912.09729).

    j_t = min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t);   with dual_clip = c, for A_t < 0:
    j_t = max(j_t, c A_t).   loss_t = -j_t,   r_t = exp(clamp(logp - anchor, -20, 20)).

    Hyperparameters: eps_low 0.2 in [0, 1); eps_high None (= eps_low; DAPO uses 0.28), >= 0;
    dual_clip None (off) or c > 1 (the paper and verl use 3). Shapes [B, T]. Requires nothing.
    Metrics: clip_fraction_low (A < 0, r < 1 - eps_low), clip_fraction_high (A > 0, r > 1 + eps_high),
    dual_clip_fraction (A < 0, r > c) when dual clip is on; none with ``metrics=False``.
    """

    name: ClassVar[str] = "clip"
    properties: ClassVar[frozenset[str]] = frozenset(
        {"pg_at_anchor", "value_at_anchor", "zero_grad_clipped_side", "positively_homogeneous", "tokens_independent"}
    )

    eps_low: float = attrs.field(default=0.2, validator=between(0.0, 1.0, high_open=True))
    eps_high: float | None = attrs.field(default=None, validator=optional(ge(0.0)))
    dual_clip: float | None = attrs.field(default=None, validator=optional(gt(1.0)))

    def declared_properties(self) -> frozenset[str]:
        # Dual clip caps |g / A| at c for A < 0; without it the weight r of a negative advantage is unbounded.
        return self.properties | {"bounded_weight"} if self.dual_clip is not None else self.properties

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor, metrics: bool = True) -> proxim.RegionOutput:
        low = 1.0 - self.eps_low
        high = 1.0 + (self.eps_low if self.eps_high is None else self.eps_high)
        ratio = _ratio(logprobs, anchor)
        objective = torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)
        if self.dual_clip is not None:
            objective = torch.where(advantages < 0, torch.maximum(objective, self.dual_clip * advantages), objective)
        if not metrics:
            return proxim.RegionOutput(loss=-objective)
        # In-place `&` on fresh temporaries: each new [B, T] buffer costs page faults on CPU.
        negative = advantages < 0
        fractions = {
            "clip_fraction_low": (ratio < low).logical_and_(negative),
            "clip_fraction_high": (ratio > high).logical_and_(advantages > 0),
        }
        if self.dual_clip is not None:
            fractions["dual_clip_fraction"] = (ratio > self.dual_clip).logical_and_(negative)
        return proxim.RegionOutput(loss=-objective, metrics=fractions)


@attrs.frozen
class NoRegion(proxim.TrustRegion):
    """The importance-weighted policy gradient with no trust region: j_t = r_t A_t, so g_t = A_t r_t.

    At r = 1 this is REINFORCE. Shapes [B, T]. Requires nothing. No hyperparameters.
    """

    name: ClassVar[str] = "none"
    properties: ClassVar[frozenset[str]] = frozenset({"pg_at_anchor", "value_at_anchor", "positively_homogeneous", "tokens_independent"})

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor, metrics: bool = True) -> proxim.RegionOutput:
        return proxim.RegionOutput(loss=-_ratio(logprobs, anchor) * advantages)


@proxim.hookimpl
def proxim_register_baselines(register: proxim.Register[type[proxim.Baseline]]) -> None:
    register(NoBaseline)
    register(BatchMeanBaseline)
    register(CriticBaseline)


@proxim.hookimpl
def proxim_register_advantages(register: proxim.Register[type[proxim.Advantage]]) -> None:
    register(Difference)
    register(GAE)


@proxim.hookimpl
def proxim_register_regions(register: proxim.Register[type[proxim.TrustRegion]]) -> None:
    register(Clip)
    register(NoRegion)


@proxim.hookimpl
def proxim_register_presets(register: proxim.Register[proxim.Preset]) -> None:
    register(
        proxim.Preset(
            name="ppo",
            baseline="critic",
            advantage="gae",
            region="clip",
            settings={
                "advantage.gamma": 1.0,
                "advantage.lam": 0.95,
                "region.eps_low": 0.2,
                "aggregation": "token_mean",
                "kl_coef": 0.05,
                "kl_estimator": "k1",
                "kl_in": "reward",
                "value_coef": 0.1,
                "value_clip": 0.2,
            },
            summary="PPO-RLHF: critic + GAE, ratio clip 0.2, value clip 0.2, per-token k1 KL in the reward (TRL PPOConfig).",
            source="arXiv 1707.06347; 1506.02438; 2203.02155",
            training={"epochs": 4},  # 4 passes over each rollout (TRL PPOConfig num_ppo_epochs=4, OpenAI baselines ppo2)
        )
    )
