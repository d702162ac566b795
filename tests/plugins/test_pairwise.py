"""LamPO's pairwise-decomposed advantage (the labelled reconstruction in docs/parts.md; paper withdrawn).

  l_i  = sum_t old_logprobs (divided by the valid-token count when length_norm)
  w_ij = sigmoid(-sign(x_i - x_j) (l_i - l_j) / tau),   x = R - b
  A_i  = (1/Z_i) sum_{j in group, j != i} w_ij (x_i - x_j),  Z_i = G_i - 1 | sum_j w_ij | 1
  then optionally / (std + eps) per group or over the batch.

Expected values come from hand computations or the loop reference below. Invariant 12 of docs/invariants.md,
plus 6 and 7 (permutation equivariance, group independence).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from stage_one import REWARD, draw_groups, draw_mask

import proxim
from proxim_plugins.lampo import Pairwise
from proxim_plugins.ppo import NoBaseline

F64 = torch.float64
TOL: dict[str, Any] = {"atol": 1e-12, "rtol": 0.0}
NAN = float("nan")

LOGPROB = st.floats(-5.0, 0.0, allow_subnormal=False)
SCALES = st.sampled_from([0.05, 0.5, 2.0, 3.0, 7.5])


def pairwise(**kw: object) -> proxim.Objective:
    return proxim.objective(baseline=kw.pop("baseline", "none"), advantage="pairwise", region="none", **kw)


LAMPO = pairwise()  # tau 1, length_norm True, normalizer "count", scale "none"
RLOO = proxim.objective(baseline="leave_one_out", advantage="diff", region="none")


def make(rewards: object, group: list[int], mask: object, old: object) -> proxim.Rollout:
    return proxim.Rollout(
        old_logprobs=torch.as_tensor(old, dtype=F64),
        mask=torch.as_tensor(mask, dtype=torch.bool),
        rewards=torch.as_tensor(rewards, dtype=F64),
        group=torch.as_tensor(group, dtype=torch.long),
    )


def per_row(obj: proxim.Objective, batch: proxim.Rollout) -> torch.Tensor:
    """[B] sequence advantages, read at each row's first valid token (0 for a fully masked row)."""
    adv = obj.advantages(batch).advantages
    first = batch.mask.to(torch.long).argmax(dim=1)
    return torch.where(batch.mask.any(dim=1), adv.gather(1, first.unsqueeze(1)).squeeze(1), torch.zeros((), dtype=F64))


def members(group: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for row, gid in enumerate(group):
        out.setdefault(gid, []).append(row)
    return out


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def sign(z: float) -> float:
    return (z > 0) - (z < 0)


def confidence(batch: proxim.Rollout, length_norm: bool) -> list[float]:
    out = []
    for i in range(batch.batch_size):
        vals = [float(batch.old_logprobs[i, t]) for t in range(batch.mask.shape[1]) if batch.mask[i, t]]
        out.append(sum(vals) / max(len(vals), 1) if length_norm else sum(vals))
    return out


def bessel_std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def ref_pairwise(
    batch: proxim.Rollout, baseline: list[float], tau: float = 1.0, length_norm: bool = True, normalizer: str = "count", scale: str = "none", eps: float = 1e-6
) -> list[float]:
    """The reconstruction written as loops over each group's ordered pairs (j != i)."""
    x = [r - b for r, b in zip(batch.rewards.tolist(), baseline)]
    lc = confidence(batch, length_norm)
    empty = [not any(row) for row in batch.mask.tolist()]
    groups = members(batch.group.tolist())
    adv = []
    for i, gid in enumerate(batch.group.tolist()):
        total = z = 0.0
        for j in groups[gid]:
            if j == i:
                continue
            w = 0.5 if empty[i] or empty[j] else sigmoid(-sign(x[i] - x[j]) * (lc[i] - lc[j]) / tau)
            total += w * (x[i] - x[j])
            z += w
        if normalizer == "count":
            total /= max(len(groups[gid]) - 1, 1)
        elif normalizer == "weight_sum":
            total = total / z if z > 0 else 0.0
        adv.append(total)
    if scale == "group":
        std = [bessel_std([adv[j] for j in groups[gid]]) if len(groups[gid]) > 1 else 1.0 for gid in batch.group.tolist()]
    elif scale == "batch":
        std = [bessel_std(adv) if len(adv) > 1 else 1.0] * len(adv)
    else:
        return adv
    return [a / (s + eps) if s + eps > 0 else 0.0 for a, s in zip(adv, std)]


def tokens(per_row_values: list[float], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=F64)
    for i, value in enumerate(per_row_values):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                out[i, t] = value
    return out


@st.composite
def grouped(draw: st.DrawFn, min_group: int = 1, max_group: int = 5, max_groups: int = 3, max_t: int = 4, every_row_valid: bool = False) -> proxim.Rollout:
    """Ragged groups, sparse unsorted ids, random padding (NaN log-probs there); optionally every row has a token."""
    group = draw_groups(draw, min_group, max_group, max_groups)
    b, t = len(group), draw(st.integers(1, max_t))
    mask = draw_mask(draw, b, t, every_row_valid)
    old = [[draw(LOGPROB) if m else NAN for m in row] for row in mask]
    rewards = draw(st.lists(REWARD, min_size=b, max_size=b))
    return make(rewards, group, mask, old)


# -- values by hand -------------------------------------------------------------------------------------------


def test_pairwise_by_hand() -> None:
    # One group of three, one token each (length_norm changes nothing): R = (1, 0, 0), l = (-1, -2, -1).
    batch = make([1.0, 0.0, 0.0], [0, 0, 0], [[True], [True], [True]], [[-1.0], [-2.0], [-1.0]])
    s1, s0 = sigmoid(-1.0), 0.5
    # Pair (0, 1): R_0 > R_1 and l_0 - l_1 = 1 (policy already agrees): w = sigmoid(-1). Pair (0, 2): l equal, w = 1/2.
    # Pair (1, 2): tie in R, gap 0 (its weight sigmoid(0) = 1/2 only matters to "weight_sum").
    # count (Z = 2): A_0 = (s1*1 + 0.5*1)/2, A_1 = (s1*(-1) + 0)/2, A_2 = (0.5*(-1) + 0)/2.
    expected = [(s1 + s0) / 2, -s1 / 2, -s0 / 2]
    torch.testing.assert_close(LAMPO.advantages(batch).advantages[:, 0], torch.tensor(expected, dtype=F64), **TOL)
    # weight_sum: Z_0 = s1 + 0.5, Z_1 = s1 + 0.5, Z_2 = 0.5 + 0.5.
    ws = [(s1 + s0) / (s1 + s0), -s1 / (s1 + s0), -s0 / 1.0]
    torch.testing.assert_close(pairwise(normalizer="weight_sum").advantages(batch).advantages[:, 0], torch.tensor(ws, dtype=F64), **TOL)
    # none (Z = 1) and tau = 2 (w_01 = sigmoid(-1/2)).
    torch.testing.assert_close(pairwise(normalizer="none").advantages(batch).advantages[:, 0], torch.tensor([s1 + s0, -s1, -s0], dtype=F64), **TOL)
    s_half = sigmoid(-0.5)
    torch.testing.assert_close(pairwise(tau=2.0).advantages(batch).advantages[:, 0], torch.tensor([(s_half + 0.5) / 2, -s_half / 2, -0.25], dtype=F64), **TOL)
    direct = Pairwise()(batch, NoBaseline()(batch))
    torch.testing.assert_close(direct.advantages[:, 0], torch.tensor(expected, dtype=F64), **TOL)


def test_length_normalisation_by_hand() -> None:
    # Row 0: 2 tokens summing to -2 (mean -1); row 1: 1 token, -1.5; row 2 padding holds NaN.
    mask = [[True, True], [True, False]]
    batch = make([1.0, 0.0], [5, 5], mask, [[-0.5, -1.5], [-1.5, NAN]])
    # length_norm: l = (-1, -1.5), l_0 - l_1 = 0.5, w = sigmoid(-0.5); A = (w, -w) (Z = 1).
    w = sigmoid(-0.5)
    torch.testing.assert_close(LAMPO.advantages(batch).advantages, torch.tensor([[w, w], [-w, 0.0]], dtype=F64), **TOL)
    # Sums: l = (-2, -1.5), l_0 - l_1 = -0.5: the policy prefers the worse response, so w = sigmoid(0.5) > 1/2.
    w = sigmoid(0.5)
    torch.testing.assert_close(pairwise(length_norm=False).advantages(batch).advantages, torch.tensor([[w, w], [-w, 0.0]], dtype=F64), **TOL)


# -- loop reference ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalizer", ["count", "weight_sum", "none"])
@settings(deadline=None, max_examples=30)
@given(batch=grouped(), tau=st.sampled_from([0.1, 1.0, 3.0]), length_norm=st.booleans(), scale=st.sampled_from(["none", "group", "batch"]))
def test_pairwise_matches_a_loop(normalizer: str, batch: proxim.Rollout, tau: float, length_norm: bool, scale: str) -> None:
    obj = pairwise(tau=tau, length_norm=length_norm, normalizer=normalizer, scale=scale)
    expected = ref_pairwise(batch, [0.0] * batch.batch_size, tau, length_norm, normalizer, scale)
    torch.testing.assert_close(obj.advantages(batch).advantages, tokens(expected, batch.mask), atol=1e-12, rtol=1e-12)


@settings(deadline=None, max_examples=30)
@given(grouped())
def test_pairwise_with_a_group_mean_baseline_matches_a_loop(batch: proxim.Rollout) -> None:
    r, groups = batch.rewards.tolist(), members(batch.group.tolist())
    b = [sum(r[j] for j in groups[gid]) / len(groups[gid]) for gid in batch.group.tolist()]
    expected = ref_pairwise(batch, b)
    torch.testing.assert_close(pairwise(baseline="group_mean").advantages(batch).advantages, tokens(expected, batch.mask), atol=1e-12, rtol=0.0)


# -- invariant 12 ------------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(st.lists(st.tuples(REWARD, REWARD, LOGPROB, LOGPROB), min_size=1, max_size=5), st.sampled_from([0.3, 1.0, 2.0]))
def test_weights_are_symmetric_and_strictly_between_zero_and_one(pairs: list[tuple[float, float, float, float]], tau: float) -> None:
    # Groups of two with distinct rewards: A_a = w_ab (R_a - R_b) and A_b = w_ba (R_b - R_a), so w is readable.
    pairs = [p for p in pairs if p[0] != p[1]]
    assume(pairs)
    rewards = [r for ra, rb, _, _ in pairs for r in (ra, rb)]
    old = [[lp] for _, _, la, lb in pairs for lp in (la, lb)]
    group = [k for k in range(len(pairs)) for _ in range(2)]
    adv = pairwise(tau=tau).advantages(make(rewards, group, [[True]] * len(old), old)).advantages[:, 0]
    for k, (ra, rb, la, lb) in enumerate(pairs):
        w_ab, w_ba = adv[2 * k].item() / (ra - rb), adv[2 * k + 1].item() / (rb - ra)
        assert w_ab == pytest.approx(w_ba, abs=1e-12)
        assert 0.0 < w_ab < 1.0
        assert w_ab == pytest.approx(sigmoid(-sign(ra - rb) * (la - lb) / tau), abs=1e-12)


@pytest.mark.parametrize("normalizer", ["count", "none"])
@settings(deadline=None, max_examples=30)
@given(batch=grouped(every_row_valid=True))
def test_zero_sum_per_group_with_a_constant_normalizer(normalizer: str, batch: proxim.Rollout) -> None:
    rows = per_row(pairwise(normalizer=normalizer), batch)
    for idx in members(batch.group.tolist()).values():
        assert abs(float(rows[idx].sum())) < 1e-12


def test_weight_sum_normaliser_is_not_zero_sum() -> None:
    # The hand example above: A = (1, -s1/(s1 + 1/2), -1/2) under weight_sum; its sum is not 0.
    batch = make([1.0, 0.0, 0.0], [0, 0, 0], [[True], [True], [True]], [[-1.0], [-2.0], [-1.0]])
    total = pairwise(normalizer="weight_sum").advantages(batch).advantages.sum().item()
    s1 = sigmoid(-1.0)
    assert total == pytest.approx(1 - s1 / (s1 + 0.5) - 0.5, abs=1e-12) and abs(total) > 0.1


@settings(deadline=None, max_examples=30)
@given(grouped(), st.data())
def test_identical_rewards_give_zero(batch: proxim.Rollout, data: st.DataObject) -> None:
    g = batch.group.tolist()
    level = {gid: data.draw(REWARD, label=f"level {gid}") for gid in sorted(set(g))}
    flat = batch.replace(rewards=torch.tensor([level[gid] for gid in g], dtype=F64))
    for normalizer in ("count", "weight_sum", "none"):
        for scale in ("none", "group", "batch"):
            # Every gap x_i - x_j is exactly 0.
            assert torch.equal(pairwise(normalizer=normalizer, scale=scale).advantages(flat).advantages, torch.zeros(batch.mask.shape, dtype=F64))


@settings(deadline=None, max_examples=30)
@given(grouped(min_group=2, every_row_valid=True), st.floats(-3.0, 0.0))
def test_equal_logprobs_give_half_the_rloo_advantage(batch: proxim.Rollout, level: float) -> None:
    # Every valid log-prob equal: with length_norm the l_i are all equal, w_ij = 1/2, A_i = (R_i - mean_{j != i} R_j)/2.
    flat = batch.replace(old_logprobs=torch.where(batch.mask, torch.full_like(batch.old_logprobs, level), batch.old_logprobs))
    expected = RLOO.advantages(flat).advantages / 2
    torch.testing.assert_close(LAMPO.advantages(flat).advantages, expected, **TOL)


@settings(deadline=None, max_examples=30)
@given(grouped(), st.data())
def test_shift_invariance_and_scale_equivariance_in_rewards(batch: proxim.Rollout, data: st.DataObject) -> None:
    g = batch.group.tolist()
    shift = {gid: data.draw(REWARD, label=f"shift {gid}") for gid in sorted(set(g))}
    a = data.draw(SCALES, label="scale")
    for normalizer in ("count", "weight_sum"):
        obj = pairwise(normalizer=normalizer)
        base = obj.advantages(batch).advantages
        shifted = batch.replace(rewards=batch.rewards + torch.tensor([shift[gid] for gid in g], dtype=F64))
        # Grid rewards: a shift never turns a gap's sign (gaps are multiples of 0.05 up to ~1e-15 rounding).
        torch.testing.assert_close(obj.advantages(shifted).advantages, base, atol=1e-12, rtol=0.0)
        torch.testing.assert_close(obj.advantages(batch.replace(rewards=a * batch.rewards)).advantages, a * base, atol=1e-12, rtol=1e-12)


@settings(deadline=None, max_examples=40)
@given(REWARD, REWARD, LOGPROB, st.floats(0.0, 4.0), st.floats(0.01, 4.0), st.sampled_from([0.5, 1.0, 2.0]))
def test_attenuation_of_a_correctly_ordered_pair(r_hi: float, r_lo: float, l_lo: float, margin: float, extra: float, tau: float) -> None:
    # A group of two with R_0 > R_1: A_0 = w_01 (R_0 - R_1), the pair's whole contribution. Raising
    # l_0 - l_1 (the policy is more confident in the better response) must lower it strictly.
    assume(r_hi > r_lo)
    l_lo = max(l_lo, -10.0) - 10.0  # room below 0 for l_0 = l_1 + margin + extra

    def contribution(diff: float) -> float:
        batch = make([r_hi, r_lo], [0, 0], [[True], [True]], [[l_lo + diff], [l_lo]])
        return pairwise(tau=tau).advantages(batch).advantages[0, 0].item()

    low, high = contribution(margin), contribution(margin + extra)
    assert 0 < high < low
    assert low == pytest.approx(sigmoid(-margin / tau) * (r_hi - r_lo), abs=1e-12)


@settings(deadline=None, max_examples=30)
@given(grouped(every_row_valid=True), st.data())
def test_advantage_decreases_as_the_policy_grows_more_confident(batch: proxim.Rollout, data: st.DataObject) -> None:
    # Raising l_i lowers w_ij on pairs i wins (positive gaps) and raises it on pairs i loses (negative
    # gaps): A_i can only go down (count normaliser); other rows' l are unchanged.
    i = data.draw(st.integers(0, batch.batch_size - 1), label="row")
    bump = data.draw(st.floats(0.1, 3.0), label="bump")
    old = batch.old_logprobs.clone()
    old[i] = torch.where(batch.mask[i], old[i] - 4.0, old[i])  # lower every log-prob of row i first, to leave room
    lowered = batch.replace(old_logprobs=old)
    raised = batch.replace(old_logprobs=torch.where(batch.mask & (torch.arange(batch.batch_size) == i).unsqueeze(1), old + bump, old))
    a_low, a_high = per_row(LAMPO, lowered)[i].item(), per_row(LAMPO, raised)[i].item()
    assert a_high <= a_low + 1e-12
    rivals = [j for j, gid in enumerate(batch.group.tolist()) if gid == batch.group[i].item() and batch.rewards[j] != batch.rewards[i]]
    if rivals:
        assert a_high < a_low


@settings(deadline=None, max_examples=30)
@given(grouped(), st.sampled_from([0.5, 2.0, 4.0]))
def test_only_the_ratio_of_log_prob_gaps_to_tau_matters(batch: proxim.Rollout, c: float) -> None:
    scaled = batch.replace(old_logprobs=c * batch.old_logprobs)
    torch.testing.assert_close(pairwise(tau=c).advantages(scaled).advantages, LAMPO.advantages(batch).advantages, atol=1e-12, rtol=1e-12)


@settings(deadline=None, max_examples=30)
@given(grouped(), st.data())
def test_permutation_equivariance_and_group_independence(batch: proxim.Rollout, data: st.DataObject) -> None:
    base = LAMPO.advantages(batch).advantages
    perm = torch.tensor(data.draw(st.permutations(range(batch.batch_size)), label="perm"))
    moved = make(batch.rewards[perm], batch.group[perm].tolist(), batch.mask[perm], batch.old_logprobs[perm])
    torch.testing.assert_close(LAMPO.advantages(moved).advantages, base[perm], atol=1e-12, rtol=0.0)
    g = batch.group.tolist()
    target = data.draw(st.sampled_from(sorted(set(g))), label="group")
    rows = [k for k, gid in enumerate(g) if gid == target]
    new = batch.rewards.clone()
    new[rows] = torch.tensor(data.draw(st.lists(REWARD, min_size=len(rows), max_size=len(rows)), label="new"), dtype=F64)
    others = torch.tensor([gid != target for gid in g])
    assert torch.equal(LAMPO.advantages(batch.replace(rewards=new)).advantages[others], base[others])


@settings(deadline=None, max_examples=30)
@given(grouped(), st.data())
def test_padding_log_probs_do_not_matter(batch: proxim.Rollout, data: st.DataObject) -> None:
    junk = data.draw(st.sampled_from([NAN, float("inf"), -float("inf"), -1e6]), label="junk")
    other = batch.replace(old_logprobs=torch.where(batch.mask, batch.old_logprobs, torch.full_like(batch.old_logprobs, junk)))
    for length_norm in (True, False):
        obj = pairwise(length_norm=length_norm)
        assert torch.equal(obj.advantages(other).advantages, obj.advantages(batch).advantages)


def test_singleton_group_gets_zero_and_group_ids_are_required() -> None:
    batch = make([3.0, 1.0, 2.0], [7, 8, 8], [[True], [True], [True]], [[-1.0], [-1.0], [-2.0]])
    assert LAMPO.advantages(batch).advantages[0, 0].item() == 0.0  # no peers: an empty sum
    no_group = proxim.Rollout(old_logprobs=-torch.ones(2, 1, dtype=F64), mask=torch.ones(2, 1, dtype=torch.bool), rewards=torch.ones(2, dtype=F64))
    with pytest.raises(proxim.BatchError, match=r"Rollout\.group \(needed by advantage 'pairwise'\), but the batch has None there"):
        LAMPO.advantages(no_group)


def test_batch_scale_of_a_single_row_is_zero_without_a_warning() -> None:
    # One row: no peers, so A = 0; the batch std of one value is taken as 1 (torch's std() would give NaN
    # and warn about degrees of freedom).
    batch = make([2.0], [0], [[True, True]], [[-1.0, -0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adv = pairwise(scale="batch").advantages(batch).advantages
    assert torch.equal(adv, torch.zeros(1, 2, dtype=F64))


def test_a_fully_masked_row_gets_the_neutral_weight() -> None:
    # Group of three, row 2 fully masked (its summed log-prob would read as 0, "maximally confident").
    # Pairs with row 2 take w = 1/2. Rows 0, 1: l = -1 and -3 (length_norm over 1 token), R = (1, 0, 2), tau 1.
    # w01 = sigmoid(-sign(1 - 0) * (-1 - (-3))) = sigmoid(-2); A_0 = (w01 * 1 + 0.5 * (1 - 2)) / 2.
    import math

    old = torch.tensor([[-1.0], [-3.0], [-0.5]], dtype=torch.float64)
    mask = torch.tensor([[True], [True], [False]])
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), group=torch.zeros(3, dtype=torch.long))
    est = proxim.objective(advantage="pairwise", region="none").advantages(batch)
    w01 = 1 / (1 + math.exp(2.0))
    assert est.advantages[0, 0].item() == pytest.approx((w01 * 1 + 0.5 * (1 - 2)) / 2, abs=1e-12)
    assert est.advantages[1, 0].item() == pytest.approx((w01 * -1 + 0.5 * (0 - 2)) / 2, abs=1e-12)
