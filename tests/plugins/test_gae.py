"""GAE (arXiv 1506.02438) with the critic baseline: hand values, a loop reference, and invariant 9 of docs/invariants.md.

delta_t = rew_t + gamma V_{t+1} - V_t (V after the last valid token = 0), A_t = delta_t + gamma lam A_{t+1},
Ret_t = A_t + V_t. Padding inside a row is skipped (masked positions neither take a value nor break the
recursion), and values at masked positions, even NaN or inf, never reach a valid token.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxim
from proxim_plugins.ppo import GAE, CriticBaseline

F64 = torch.float64
TOL: dict[str, Any] = {"atol": 1e-12, "rtol": 0.0}
NAN, INF = float("nan"), float("inf")

REWARD = st.integers(-200, 200).map(lambda k: k / 20)
VALUE = st.floats(-5.0, 5.0, allow_nan=False, allow_subnormal=False)
JUNK = st.sampled_from([NAN, INF, -INF, 1e6, -3.0])


def gae(**kw: object) -> proxim.Objective:
    return proxim.objective(advantage="gae", region="none", **kw)


def make(rewards: object, mask: object, values: object, **extra: torch.Tensor) -> proxim.Rollout:
    mask = torch.as_tensor(mask, dtype=torch.bool)
    return proxim.Rollout(
        old_logprobs=-0.5 * torch.ones(mask.shape, dtype=F64),
        mask=mask,
        rewards=torch.as_tensor(rewards, dtype=F64),
        values=torch.as_tensor(values, dtype=F64),
        **extra,
    )


@st.composite
def batches(draw: st.DrawFn, max_b: int = 4, max_t: int = 6, token_rewards: bool | None = None) -> proxim.Rollout:
    """Random padding (inside rows too, fully masked rows included); junk values and rewards at padded positions."""
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    mask = draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b))
    values = [[draw(VALUE) if m else draw(JUNK) for m in row] for row in mask]
    token = draw(st.booleans()) if token_rewards is None else token_rewards
    rewards: object = [[draw(REWARD) if m else NAN for m in row] for row in mask] if token else draw(st.lists(REWARD, min_size=b, max_size=b))
    return make(rewards, mask, values)


def token_rewards(batch: proxim.Rollout) -> list[list[float]]:
    """rew_t on valid tokens: given [B, T], or R_i on the row's last valid token."""
    out = [[0.0] * batch.mask.shape[1] for _ in range(batch.batch_size)]
    for i in range(batch.batch_size):
        valid = [t for t in range(batch.mask.shape[1]) if batch.mask[i, t]]
        if batch.rewards.dim() == 2:
            for t in valid:
                out[i][t] = float(batch.rewards[i, t])
        elif valid:
            out[i][valid[-1]] = float(batch.rewards[i])
    return out


def ref_gae(batch: proxim.Rollout, gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """The GAE recursion over each row's valid positions only (a loop): (A, Ret), 0 on padding."""
    rew = token_rewards(batch)
    adv = [[0.0] * batch.mask.shape[1] for _ in range(batch.batch_size)]
    ret = [[0.0] * batch.mask.shape[1] for _ in range(batch.batch_size)]
    for i in range(batch.batch_size):
        valid = [t for t in range(batch.mask.shape[1]) if batch.mask[i, t]]
        running, next_value = 0.0, 0.0
        for t in reversed(valid):
            v = float(batch.values[i, t])
            delta = rew[i][t] + gamma * next_value - v
            running = delta + gamma * lam * running
            adv[i][t], ret[i][t] = running, running + v
            next_value = v
    return adv, ret


def whiten(adv: list[list[float]], mask: torch.Tensor, eps: float = 1e-8) -> list[list[float]]:
    vals = [a for row, m in zip(adv, mask.tolist()) for a, keep in zip(row, m) if keep]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    var = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    return [[(a - mean) / math.sqrt(var + eps) if keep else 0.0 for a, keep in zip(row, m)] for row, m in zip(adv, mask.tolist())]


# -- values by hand ------------------------------------------------------------------------------------------


HAND_MASK = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
HAND_VALUES = torch.tensor([[0.5, 0.2, 0.4], [1.0, NAN, 0.5], [INF, NAN, 2.0]], dtype=F64)


def test_gae_by_hand() -> None:
    batch = make([1.0, 2.0, 7.0], HAND_MASK, HAND_VALUES)
    est = gae(gamma=0.9, lam=0.8, whiten=False).advantages(batch)
    # gamma*lam = 0.72. Row 0 (R = 1 on the last token; V = 0.5, 0.2, 0.4):
    #   delta_2 = 1 - 0.4 = 0.6, delta_1 = 0.9*0.4 - 0.2 = 0.16, delta_0 = 0.9*0.2 - 0.5 = -0.32
    #   A_2 = 0.6, A_1 = 0.16 + 0.72*0.6 = 0.592, A_0 = -0.32 + 0.72*0.592 = 0.10624; Ret = A + V = 1, 0.792, 0.60624.
    # Row 1 (position 1 is padding with V = NaN, skipped; R = 2): delta_2 = 2 - 0.5 = 1.5,
    #   delta_0 = 0.9*0.5 - 1 = -0.55, A_0 = -0.55 + 0.72*1.5 = 0.53; Ret = 1.53, 0, 2.
    # Row 2 is fully masked: zeros, whatever its values.
    expected_a = torch.tensor([[0.10624, 0.592, 0.6], [0.53, 0.0, 1.5], [0.0, 0.0, 0.0]], dtype=F64)
    expected_r = torch.tensor([[0.60624, 0.792, 1.0], [1.53, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(est.advantages, expected_a, **TOL)
    torch.testing.assert_close(est.returns, expected_r, **TOL)
    # Called directly on a batch with token rewards (the objective's placement of R on the last token).
    direct = GAE(gamma=0.9, lam=0.8, whiten=False)(make(token_rewards(batch), HAND_MASK, HAND_VALUES), CriticBaseline()(batch))
    torch.testing.assert_close(torch.where(HAND_MASK, direct.advantages, torch.zeros((), dtype=F64)), expected_a, **TOL)


def test_gae_whitening_by_hand() -> None:
    batch = make([1.0, 2.0, 7.0], HAND_MASK, HAND_VALUES)
    est = gae(gamma=0.9, lam=0.8).advantages(batch)  # whiten=True, eps=1e-8 by default
    # Valid raw advantages: 0.10624, 0.592, 0.6, 0.53, 1.5 -> mean 3.32824/5, Bessel variance, whiten.
    raw = [0.10624, 0.592, 0.6, 0.53, 1.5]
    mean = sum(raw) / 5
    scale = 1 / math.sqrt(sum((a - mean) ** 2 for a in raw) / 4 + 1e-8)
    w = [(a - mean) * scale for a in raw]
    expected = torch.tensor([[w[0], w[1], w[2]], [w[3], 0.0, w[4]], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(est.advantages, expected, **TOL)
    # Returns are the critic's targets from the raw advantages, unaffected by whitening.
    torch.testing.assert_close(est.returns, torch.tensor([[0.60624, 0.792, 1.0], [1.53, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64), **TOL)


# -- loop reference -----------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=50)
@given(batches(), st.sampled_from([1.0, 0.99, 0.5, 0.0]), st.sampled_from([1.0, 0.95, 0.5, 0.0]))
def test_gae_matches_a_loop(batch: proxim.Rollout, gamma: float, lam: float) -> None:
    adv, ret = ref_gae(batch, gamma, lam)
    raw = gae(gamma=gamma, lam=lam, whiten=False).advantages(batch)
    torch.testing.assert_close(raw.advantages, torch.tensor(adv, dtype=F64), atol=1e-11, rtol=0.0)
    torch.testing.assert_close(raw.returns, torch.tensor(ret, dtype=F64), atol=1e-11, rtol=0.0)
    white = gae(gamma=gamma, lam=lam).advantages(batch)
    torch.testing.assert_close(white.advantages, torch.tensor(whiten(adv, batch.mask), dtype=F64), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(white.returns, raw.returns, **TOL)


# -- invariant 9 -------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(batches(token_rewards=False))
def test_lambda_one_gamma_one_terminal_reward_gives_reward_minus_value(batch: proxim.Rollout) -> None:
    # The deltas telescope: sum_{u >= t} (rew_u + V_{u+1} - V_u) = R - V_t.
    est = gae(gamma=1.0, lam=1.0, whiten=False).advantages(batch)
    expected = torch.zeros(batch.mask.shape, dtype=F64)
    for i in range(batch.batch_size):
        for t in range(batch.mask.shape[1]):
            if batch.mask[i, t]:
                expected[i, t] = batch.rewards[i] - batch.values[i, t]
    torch.testing.assert_close(est.advantages, expected, atol=1e-12, rtol=0.0)
    # and Ret_t = R on every valid token.
    torch.testing.assert_close(est.returns, torch.where(batch.mask, batch.rewards.unsqueeze(1).expand(batch.mask.shape), torch.zeros((), dtype=F64)), **TOL)


@settings(deadline=None, max_examples=40)
@given(batches(), st.sampled_from([1.0, 0.9, 0.3]))
def test_lambda_zero_gives_the_td_residual(batch: proxim.Rollout, gamma: float) -> None:
    rew = token_rewards(batch)
    est = gae(gamma=gamma, lam=0.0, whiten=False).advantages(batch)
    expected = torch.zeros(batch.mask.shape, dtype=F64)
    for i in range(batch.batch_size):
        valid = [t for t in range(batch.mask.shape[1]) if batch.mask[i, t]]
        for k, t in enumerate(valid):
            next_value = float(batch.values[i, valid[k + 1]]) if k + 1 < len(valid) else 0.0  # the next valid token's V
            expected[i, t] = rew[i][t] + gamma * next_value - float(batch.values[i, t])
    torch.testing.assert_close(est.advantages, expected, atol=1e-12, rtol=0.0)


@settings(deadline=None, max_examples=40)
@given(batches(), st.sampled_from([1.0, 0.9, 0.5]), st.sampled_from([1.0, 0.95, 0.5, 0.0]))
def test_zero_values_give_discounted_reward_sums(batch: proxim.Rollout, gamma: float, lam: float) -> None:
    zero_v = batch.replace(values=torch.where(batch.mask, torch.zeros((), dtype=F64), batch.values))
    rew = token_rewards(batch)
    est = gae(gamma=gamma, lam=lam, whiten=False).advantages(zero_v)
    expected = torch.zeros(batch.mask.shape, dtype=F64)
    for i in range(batch.batch_size):
        valid = [t for t in range(batch.mask.shape[1]) if batch.mask[i, t]]
        for k, t in enumerate(valid):
            expected[i, t] = sum((gamma * lam) ** lag * rew[i][u] for lag, u in enumerate(valid[k:]))
    torch.testing.assert_close(est.advantages, expected, atol=1e-11, rtol=0.0)


@settings(deadline=None, max_examples=40)
@given(batches(), st.sampled_from([1.0, 0.9]), st.sampled_from([0.95, 0.5]), st.booleans())
def test_returns_are_advantages_plus_values(batch: proxim.Rollout, gamma: float, lam: float, white: bool) -> None:
    est = gae(gamma=gamma, lam=lam, whiten=white).advantages(batch)
    raw = gae(gamma=gamma, lam=lam, whiten=False).advantages(batch).advantages
    expected = torch.where(batch.mask, raw + torch.where(batch.mask, batch.values, torch.zeros((), dtype=F64)), torch.zeros((), dtype=F64))
    torch.testing.assert_close(est.returns, expected, **TOL)


@settings(deadline=None, max_examples=40)
@given(batches(), st.data())
def test_values_at_masked_positions_do_not_matter(batch: proxim.Rollout, data: st.DataObject) -> None:
    junk = torch.tensor([[data.draw(JUNK) for _ in range(batch.mask.shape[1])] for _ in range(batch.batch_size)], dtype=F64)
    other = batch.replace(values=torch.where(batch.mask, batch.values, junk))
    for white in (False, True):
        a, b = gae(whiten=white).advantages(batch), gae(whiten=white).advantages(other)
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)
        assert bool(torch.isfinite(b.advantages).all())


@settings(deadline=None, max_examples=40)
@given(batches())
def test_whitened_gae_has_mean_zero_and_unit_std(batch: proxim.Rollout) -> None:
    a = gae().advantages(batch).advantages[batch.mask].tolist()
    adv, _ = ref_gae(batch, 1.0, 0.95)
    raw = [Fraction(x) for row, m in zip(adv, batch.mask.tolist()) for x, keep in zip(row, m) if keep]
    if len(a) < 2:
        return
    mean = sum(raw) / len(raw)
    var = float(sum((x - mean) ** 2 for x in raw) / (len(raw) - 1))  # exact: 0 only when every raw A is equal
    # The code's float mean of the raw advantages may miss by ~1e-15 of their size; whitening divides by sqrt(var + eps).
    slack = 1e-14 * max(1.0, max(abs(float(x)) for x in raw)) / math.sqrt(var + 1e-8)
    assert abs(sum(a) / len(a)) < slack
    std = math.sqrt(sum((x - sum(a) / len(a)) ** 2 for x in a) / (len(a) - 1))
    assert std == pytest.approx(math.sqrt(var / (var + 1e-8)), abs=max(slack, 1e-12))


# -- KL in the reward, metrics and bad input ------------------------------------------------------------------


def test_gae_with_per_token_kl_in_the_reward() -> None:
    mask = torch.tensor([[True, True]])
    old = torch.tensor([[-0.5, -1.0]], dtype=F64)
    ref = torch.tensor([[-0.7, -0.4]], dtype=F64)
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.tensor([1.0], dtype=F64), values=torch.tensor([[0.3, 0.1]], dtype=F64), ref_logprobs=ref)
    beta = 0.5
    # k1: d = (0.2, -0.6), so rew = (-0.1, 1 + 0.3) = (-0.1, 1.3). gamma = lam = 1:
    # A_1 = 1.3 - 0.1 = 1.2, A_0 = -0.1 + 0.1 - 0.3 + A_1 = 0.9.
    est = gae(gamma=1.0, lam=1.0, whiten=False, kl_in="reward", kl_coef=beta, kl_estimator="k1").advantages(batch)
    torch.testing.assert_close(est.rewards, torch.tensor([[-0.1, 1.3]], dtype=F64), **TOL)
    torch.testing.assert_close(est.advantages, torch.tensor([[0.9, 1.2]], dtype=F64), **TOL)
    zero = gae(gamma=1.0, lam=1.0, whiten=False, kl_in="reward", kl_coef=0.0).advantages(batch)
    assert torch.equal(zero.advantages, gae(gamma=1.0, lam=1.0, whiten=False).advantages(batch).advantages)


def test_gae_needs_a_critic_and_values() -> None:
    with pytest.raises(proxim.ConfigurationError, match=r"advantage 'gae' bootstraps from state values V\(s_t\), which baseline 'group_mean' does not provide"):
        gae(baseline="group_mean")
    batch = proxim.Rollout(old_logprobs=-torch.ones(1, 2, dtype=F64), mask=torch.ones(1, 2, dtype=torch.bool), rewards=torch.ones(1, dtype=F64))
    with pytest.raises(proxim.BatchError, match=r"Rollout\.values \(needed by baseline 'critic', advantage 'gae'\)"):
        gae().advantages(batch)
    with pytest.raises(proxim.ConfigurationError, match=r"advantage 'gae' \(override\): 'lam' must be <= 1\.0: 1\.5"):
        gae(lam=1.5)


def test_fully_masked_batch_gives_zero_advantages_and_returns() -> None:
    mask = torch.zeros(2, 3, dtype=torch.bool)
    batch = make([1.0, 2.0], mask, torch.full((2, 3), NAN))
    for white in (True, False):
        est = gae(whiten=white).advantages(batch)
        assert torch.equal(est.advantages, torch.zeros(2, 3, dtype=F64)) and torch.equal(est.returns, torch.zeros(2, 3, dtype=F64))
        assert all(math.isfinite(v.item()) for v in est.metrics.values())
