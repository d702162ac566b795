"""Stage 1 against verl 0.9.x: group-normalized (GRPO), leave-one-out (RLOO) and GAE advantages (docs/parity.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import proxim
from proxim import ops

from ._helpers import assert_close, make_batch

SEEDS = (0, 1, 2)
SIZES = (4, 3, 5, 4, 2, 8)


def index_of(group: torch.Tensor) -> Any:
    """verl's group index: a numpy object array of uid strings."""
    import numpy as np

    return np.array([f"uid-{int(g)}" for g in group], dtype=object)


def outcome_batch(seed: int, sizes: tuple[int, ...] = SIZES, constant_group: bool = True) -> Any:
    batch = make_batch(seed, sizes=sizes)
    if constant_group:  # a zero-variance group: both give 0 there
        batch.rewards[batch.group == batch.group[0]] = 0.5
    return batch


@pytest.mark.parametrize("eps", [1e-6, 1e-4])
@pytest.mark.parametrize("seed", SEEDS)
def test_group_normalized_equals_verl_grpo(core_algos: Any, eps: float, seed: int) -> None:
    batch = outcome_batch(seed)
    mine = proxim.objective("grpo", eps=eps).advantages(batch.rollout()).advantages
    token_rewards = ops.sequence_to_token_rewards(batch.rewards, batch.mask)
    theirs, returns = core_algos.compute_grpo_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group), epsilon=eps)
    assert_close(mine, theirs, "advantages")
    assert_close(returns, theirs)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_normalized_with_token_rewards_equals_verl_grpo(core_algos: Any, seed: int) -> None:
    """Dense token rewards are summed per sequence by both (proxim over valid tokens; zero elsewhere here)."""
    batch = outcome_batch(seed)
    g = torch.Generator().manual_seed(seed)
    token_rewards = torch.where(batch.mask, torch.randn(batch.mask.shape, generator=g, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    mine = proxim.objective("grpo").advantages(batch.rollout(rewards=token_rewards)).advantages
    theirs, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group))
    assert_close(mine, theirs, "advantages")


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_centred_equals_verl_grpo_without_std(core_algos: Any, seed: int) -> None:
    """Dr. GRPO / DPPO / DRPO: scale='none' = norm_adv_by_std_in_grpo=False."""
    batch = outcome_batch(seed)
    mine = proxim.objective("dr_grpo").advantages(batch.rollout()).advantages
    token_rewards = ops.sequence_to_token_rewards(batch.rewards, batch.mask)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group), norm_adv_by_std_in_grpo=False)
    assert_close(mine, theirs, "advantages")


@pytest.mark.parametrize("scale", ["group", "none"])
def test_pinned_group_of_one(core_algos: Any, scale: str) -> None:
    """Intentional difference: a group of one gets advantage 0 in proxim (TRL's convention: its own
    baseline), the raw reward in verl (mean 0, std 1)."""
    batch = make_batch(0, sizes=(4, 1, 3, 1))
    single = torch.isin(batch.group, torch.tensor([int(batch.group[4]), int(batch.group[8])]))
    mine = proxim.objective("grpo", scale=scale).advantages(batch.rollout()).advantages
    token_rewards = ops.sequence_to_token_rewards(batch.rewards, batch.mask)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group), norm_adv_by_std_in_grpo=scale == "group")
    assert bool((mine[single] == 0).all())
    raw = ops.broadcast_to_tokens(batch.rewards, batch.mask)
    assert_close(theirs[single], raw[single], "verl: raw reward")
    assert_close(mine[~single], theirs[~single], "groups of two or more")


def test_pinned_epsilon(core_algos: Any) -> None:
    """proxim and verl add 1e-6 to the group std; TRL adds 1e-4 (its advantages are inline, not callable).
    eps=1e-4 reproduces TRL's scaling; the two differ by the factor (std + 1e-6) / (std + 1e-4)."""
    batch = outcome_batch(0, constant_group=False)
    assert proxim.objective("grpo").advantage.eps == 1e-6
    rollout = batch.rollout()
    default = proxim.objective("grpo").advantages(rollout).advantages
    trl_like = proxim.objective("grpo", eps=1e-4).advantages(rollout).advantages
    std = ops.broadcast_to_tokens(ops.group_std(batch.rewards, batch.group), batch.mask)
    factor = torch.where(batch.mask, (std + 1e-6) / (std + 1e-4), torch.zeros_like(std))
    assert_close(trl_like, default * factor)
    assert not torch.allclose(trl_like, default, atol=1e-6, rtol=0)
    # TRL's formula, written out (trl/trainer/grpo_trainer.py, scale_rewards="group"):
    r = batch.rewards
    trl = (r - ops.group_mean(r, batch.group)) / (ops.group_std(r, batch.group) + 1e-4)
    assert_close(trl_like, ops.broadcast_to_tokens(trl, batch.mask), "TRL formula")


@pytest.mark.parametrize("seed", SEEDS)
def test_leave_one_out_equals_verl_rloo(core_algos: Any, seed: int) -> None:
    batch = outcome_batch(seed)
    mine = proxim.objective("rloo", kl_coef=0.0).advantages(batch.rollout()).advantages
    token_rewards = ops.sequence_to_token_rewards(batch.rewards, batch.mask)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group))
    assert_close(mine, theirs, "advantages")
    vectorized, _ = core_algos.compute_rloo_vectorized_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group))
    assert_close(mine, vectorized, "advantages (vectorized)")


def test_pinned_rloo_group_of_one(core_algos: Any) -> None:
    """Intentional difference: proxim refuses a group of one for leave_one_out (there is no other response);
    verl's rloo returns the raw reward there, rloo_vectorized 0."""
    batch = make_batch(0, sizes=(4, 1, 3))
    with pytest.raises(proxim.BatchError, match="at least 2 responses"):
        proxim.objective("rloo", kl_coef=0.0).advantages(batch.rollout())
    token_rewards = ops.sequence_to_token_rewards(batch.rewards, batch.mask)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group))
    vectorized, _ = core_algos.compute_rloo_vectorized_outcome_advantage(token_rewards, batch.mask.double(), index_of(batch.group))
    assert_close(theirs[4], token_rewards[4].sum() * batch.mask[4].double())
    assert bool((vectorized[4] == 0).all())


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 1.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_gae_equals_verl(core_algos: Any, gamma: float, lam: float, seed: int) -> None:
    """With whitening (verl always whitens) and without (against verl's returns - values); interior
    masked positions are skipped by both."""
    batch = make_batch(seed)
    g = torch.Generator().manual_seed(seed + 30)
    token_rewards = torch.where(batch.mask, 0.3 * torch.randn(batch.mask.shape, generator=g, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    token_rewards = token_rewards + ops.sequence_to_token_rewards(batch.rewards, batch.mask)
    rollout = batch.rollout(rewards=token_rewards, values=batch.values)
    theirs, returns = core_algos.compute_gae_advantage_return(token_rewards, batch.values, batch.mask.double(), gamma, lam)
    m = batch.mask
    whitened = proxim.objective("ppo", kl_coef=0.0, gamma=gamma, lam=lam).advantages(rollout)
    assert_close(whitened.advantages[m], theirs[m], "whitened advantages")
    assert_close(whitened.returns[m], returns[m], "returns")
    raw = proxim.objective("ppo", kl_coef=0.0, gamma=gamma, lam=lam, whiten=False).advantages(rollout)
    assert_close(raw.advantages[m], (returns - batch.values)[m], "unwhitened advantages")
    assert_close(raw.returns[m], returns[m], "returns")
    assert bool((whitened.advantages[~m] == 0).all())
