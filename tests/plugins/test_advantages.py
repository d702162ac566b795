"""Advantage estimators (stage 1): group_normalized (GRPO, Dr. GRPO, batch std), return_to_go and whitened
(REINFORCE++), KL-in-reward shaping, the stage-1 metrics, and bad input.

Expected values come from hand computations (comments) or plain-Python loops written here, never from the
code under test. See docs/parts.md (Advantages, Penalties) and docs/invariants.md, invariants 1-4, 6-8, 10 and 38.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from stage_one import REWARD, draw_groups, draw_mask, make, per_row, tokens

import proxim
from proxim_plugins.grpo import GroupMeanBaseline, GroupNormalized
from proxim_plugins.ppo import NoBaseline
from proxim_plugins.reinforce_pp import ReturnToGo, Whitened

F64 = torch.float64
TOL: dict[str, Any] = {"atol": 1e-12, "rtol": 0.0}
NAN, INF = float("nan"), float("inf")


def grpo(**kw: object) -> proxim.Objective:
    return proxim.objective(baseline=kw.pop("baseline", "group_mean"), advantage="group_normalized", region="none", **kw)


GRPO = grpo()  # scale="group", eps=1e-6
GRPO_EXACT = grpo(eps=0.0)
DR_GRPO = grpo(scale="none")
BATCH_STD = grpo(scale="batch")
RTG = proxim.objective(advantage="return_to_go", region="none")
WHITENED = proxim.objective(advantage="whitened", region="none")
WHITENED_BASELINE = proxim.objective(baseline="group_mean", advantage="whitened", region="none")

SCALES = st.sampled_from([0.05, 0.5, 2.0, 3.0, 7.5])


def members(group: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for row, gid in enumerate(group):
        out.setdefault(gid, []).append(row)
    return out


def bessel_std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def exact_var(values: list[float] | list[Fraction]) -> Fraction:
    """Bessel variance in exact rational arithmetic (0 exactly for equal values, unlike a float mean)."""
    xs = [Fraction(v) for v in values]
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


@st.composite
def grouped(
    draw: st.DrawFn, min_group: int = 1, max_group: int = 6, max_groups: int = 4, max_t: int = 4, token_rewards: bool = False, every_row_valid: bool = False
) -> proxim.Rollout:
    """Ragged groups with sparse, unsorted ids (rows shuffled), random padding including fully masked rows.

    With `token_rewards`, [B, T] rewards with NaN at padded positions (allowed there by the Rollout contract).
    With `every_row_valid`, each row's first token is valid (no fully masked rows).
    """
    group = draw_groups(draw, min_group, max_group, max_groups)
    b, t = len(group), draw(st.integers(1, max_t))
    mask = draw_mask(draw, b, t, every_row_valid)
    if token_rewards:
        rewards: object = [[draw(REWARD) if m else NAN for m in row] for row in mask]
    else:
        rewards = draw(st.lists(REWARD, min_size=b, max_size=b))
    old = draw(st.lists(st.lists(st.floats(-5.0, 0.0), min_size=t, max_size=t), min_size=b, max_size=b))
    return make(rewards, group, mask, old_logprobs=torch.tensor(old, dtype=F64))


def ref_returns(rew: torch.Tensor, mask: torch.Tensor, gamma: float) -> list[list[float]]:
    """G_t = sum over valid u >= t of gamma^(valid steps between) rew_u; 0 on padding (a loop)."""
    out = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for i in range(mask.shape[0]):
        running = 0.0
        for t in reversed(range(mask.shape[1])):
            if mask[i, t]:
                running = float(rew[i, t]) + gamma * running
                out[i][t] = running
    return out


def placed(batch: proxim.Rollout) -> torch.Tensor:
    """Token rewards as the token-level estimators see them: given [B, T] on valid tokens, or R_i on the last valid token."""
    out = torch.zeros(batch.mask.shape, dtype=F64)
    for i in range(batch.batch_size):
        valid = [t for t in range(batch.mask.shape[1]) if batch.mask[i, t]]
        if batch.rewards.dim() == 2:
            for t in valid:
                out[i, t] = batch.rewards[i, t]
        elif valid:
            out[i, valid[-1]] = batch.rewards[i]
    return out


# -- group_normalized: values by hand ---------------------------------------------------------------------------


GROUP6 = [4, 8, 4, 1, 8, 4]
REWARDS6 = [1.0, 2.0, 0.0, 3.0, 5.0, 0.0]
MASK6 = torch.tensor([[True, True], [True, False], [False, False], [True, True], [True, True], [False, True]])


def test_group_normalized_by_hand() -> None:
    batch = make(REWARDS6, GROUP6, MASK6)
    # Group 4 (rows 0, 2, 5; rewards 1, 0, 0): mean 1/3, centred (2/3, -1/3, -1/3), Bessel var (4+1+1)/9/2 = 1/3.
    # Group 8 (rows 1, 4; rewards 2, 5): mean 3.5, centred (-1.5, 1.5), Bessel var 4.5.
    # Group 1 (row 3): a group of one; centred 0, std taken as 1, so A = 0.
    s4, s8, eps = math.sqrt(1 / 3), math.sqrt(4.5), 1e-6
    expected = [(2 / 3) / (s4 + eps), -1.5 / (s8 + eps), (-1 / 3) / (s4 + eps), 0.0, 1.5 / (s8 + eps), (-1 / 3) / (s4 + eps)]
    torch.testing.assert_close(GRPO.advantages(batch).advantages, tokens(expected, MASK6), **TOL)
    # eps = 0: the exact z-scores 2/sqrt(3), -1/sqrt(2), -1/sqrt(3), 0, 1/sqrt(2), -1/sqrt(3).
    exact = [2 / math.sqrt(3), -1 / math.sqrt(2), -1 / math.sqrt(3), 0.0, 1 / math.sqrt(2), -1 / math.sqrt(3)]
    torch.testing.assert_close(GRPO_EXACT.advantages(batch).advantages, tokens(exact, MASK6), **TOL)
    # Dr. GRPO: the centred rewards themselves.
    torch.testing.assert_close(DR_GRPO.advantages(batch).advantages, tokens([2 / 3, -1.5, -1 / 3, 0.0, 1.5, -1 / 3], MASK6), **TOL)
    # Batch std of the centred rewards (mean 0): squares 4/9 + 1/9 + 1/9 + 2.25 + 2.25 + 0 = 31/6, Bessel /5: var 31/30.
    sb = math.sqrt(31 / 30)
    torch.testing.assert_close(BATCH_STD.advantages(batch).advantages, tokens([c / (sb + eps) for c in [2 / 3, -1.5, -1 / 3, 0.0, 1.5, -1 / 3]], MASK6), **TOL)


def test_group_normalized_called_directly_matches_the_objective() -> None:
    batch = make(REWARDS6, GROUP6, MASK6)
    for scale in ("group", "batch", "none"):
        part = GroupNormalized(scale=scale)
        direct = part(batch, GroupMeanBaseline()(batch))
        assert direct.returns is None
        torch.testing.assert_close(direct.advantages, grpo(scale=scale).advantages(batch).advantages, **TOL)


def test_group_normalized_without_a_baseline_divides_raw_rewards() -> None:
    batch = make(REWARDS6, GROUP6, MASK6)
    # baseline="none": A_i = R_i / (std_group(R) + eps); the singleton's std is taken as 1, so A = 3 / (1 + eps).
    s4, s8, eps = math.sqrt(1 / 3), math.sqrt(4.5), 1e-6
    expected = [1 / (s4 + eps), 2 / (s8 + eps), 0.0, 3 / (1 + eps), 5 / (s8 + eps), 0.0]
    torch.testing.assert_close(grpo(baseline="none").advantages(batch).advantages, tokens(expected, MASK6), **TOL)


def test_singleton_groups_get_zero_advantage_with_group_mean() -> None:
    # Documented (GroupNormalized docstring): a group of one has std taken as 1, so with group_mean its
    # advantage is R - R = 0 (TRL's convention), for every scale.
    batch = make([3.0, -7.0, 0.5], [10, 20, 30], torch.ones(3, 2, dtype=torch.bool))
    for scale in ("group", "batch", "none"):
        assert torch.equal(grpo(scale=scale).advantages(batch).advantages, torch.zeros(3, 2, dtype=F64))


def test_fully_masked_row_still_counts_in_its_group() -> None:
    # Masking a row zeroes its own advantages; its reward still enters the group statistics (as TRL's
    # mask_truncated_completions masks the loss only). Group mean of (0, 1, 2) is 1: A = (-1, 0, [masked]).
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    est = DR_GRPO.advantages(make([0.0, 1.0, 2.0], [0, 0, 0], mask))
    assert torch.equal(est.advantages, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]], dtype=F64))


# -- group_normalized: loop reference and invariants ------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(grouped(), st.sampled_from([0.0, 1e-6, 0.1, 1.0]))
def test_group_normalized_matches_a_loop(batch: proxim.Rollout, eps: float) -> None:
    # Exact rational arithmetic for means and variances (the grid rewards are exact in Fraction), so the
    # reference has no rounding of its own; only the final square root and division are floats.
    r, g = [Fraction(v) for v in batch.rewards.tolist()], batch.group.tolist()
    groups = members(g)
    centred = [r[i] - sum(r[j] for j in groups[gid]) / len(groups[gid]) for i, gid in enumerate(g)]

    def std(values: list[Fraction]) -> float:
        m = sum(values) / len(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))

    std_g = [std([centred[j] for j in groups[gid]]) if len(groups[gid]) > 1 else 1.0 for gid in g]
    by_group = [float(c) / (s + eps) if s + eps > 0 else 0.0 for c, s in zip(centred, std_g)]
    std_b = std(centred) if len(centred) > 1 else 1.0
    by_batch = [float(c) / (std_b + eps) if std_b + eps > 0 else 0.0 for c in centred]
    torch.testing.assert_close(grpo(eps=eps).advantages(batch).advantages, tokens(by_group, batch.mask), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grpo(eps=eps, scale="batch").advantages(batch).advantages, tokens(by_batch, batch.mask), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(DR_GRPO.advantages(batch).advantages, tokens([float(c) for c in centred], batch.mask), **TOL)


@settings(deadline=None, max_examples=40)
@given(grouped(), st.sampled_from([0.0, 1e-6, 0.5, 2.0]))
def test_group_z_score_has_mean_zero_and_std_s_over_s_plus_eps(batch: proxim.Rollout, eps: float) -> None:
    """Invariant 1: within each group of two or more, mean(A) = 0 and Bessel std(A) = s / (s + eps)."""
    rows = per_row(grpo(eps=eps), batch).tolist()
    r = batch.rewards.tolist()
    for idx in members(batch.group.tolist()).values():
        if len(idx) < 2:
            continue
        s = math.sqrt(exact_var([r[j] for j in idx]))
        a = [rows[j] for j in idx]
        assert abs(sum(a) / len(a)) < 1e-12
        if s > 0:
            assert bessel_std(a) == pytest.approx(s / (s + eps), abs=1e-12)
        else:
            assert a == [0.0] * len(a)  # invariant 2


@settings(deadline=None, max_examples=40)
@given(grouped(), st.data())
def test_identical_rewards_in_a_group_give_zero(batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariants 2 and 4: a group with one reward level has A = 0 (GRPO, Dr. GRPO, batch scale)."""
    g = batch.group.tolist()
    level = {gid: data.draw(REWARD, label=f"level {gid}") for gid in set(g)}
    flat = batch.replace(rewards=torch.tensor([level[gid] for gid in g], dtype=F64))
    zeros = torch.zeros(batch.mask.shape, dtype=F64)
    # Exactly 0, even for non-dyadic levels such as 0.15 whose plain sum / count misses by an ulp, and even
    # with eps = 0 and a batch-wide std (where an ulp of noise over a std of noise would be O(1)).
    for obj in (GRPO, GRPO_EXACT, DR_GRPO, BATCH_STD, grpo(scale="batch", eps=0.0)):
        assert torch.equal(obj.advantages(flat).advantages, zeros)


def test_flat_groups_under_a_batch_std_with_zero_eps_give_zero() -> None:
    # Every group flat, levels 0.1, 0.7 and 1.0: all centred rewards are 0, so the batch std is 0 and A = 0.
    # (With a plain sum / count mean the centred values were -1.4e-17 and 1.1e-16, their "std" ~6e-17,
    # and A came out as -0.22 and 1.79.)
    batch = make([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 1.0], [0, 0, 0, 1, 1, 1, 2, 2], torch.ones(8, 1, dtype=torch.bool))
    assert torch.equal(grpo(scale="batch", eps=0.0).advantages(batch).advantages, torch.zeros(8, 1, dtype=F64))


@settings(deadline=None, max_examples=40)
@given(grouped(), st.data())
def test_group_z_score_shift_scale_and_sign(batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 3: A(R + c_g) = A(R) with a shift per group, A(aR) = A(R) for a > 0 (exact with eps = 0), A(-R) = -A(R)."""
    g = batch.group.tolist()
    shift = {gid: data.draw(REWARD, label=f"shift {gid}") for gid in sorted(set(g))}
    shifts = torch.tensor([shift[gid] for gid in g], dtype=F64)
    a = data.draw(SCALES, label="scale")
    base = GRPO_EXACT.advantages(batch).advantages
    # Grid rewards: any two distinct rewards differ by >= 0.05, so z-scores keep ~1e-13 relative precision.
    torch.testing.assert_close(GRPO_EXACT.advantages(batch.replace(rewards=batch.rewards + shifts)).advantages, base, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(GRPO_EXACT.advantages(batch.replace(rewards=a * batch.rewards)).advantages, base, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(GRPO_EXACT.advantages(batch.replace(rewards=-batch.rewards)).advantages, -base, **TOL)
    # With eps > 0 the scale moves into eps: A_eps(aR) = a c / (a s + eps) = c / (s + eps/a) = A_{eps/a}(R).
    torch.testing.assert_close(
        GRPO.advantages(batch.replace(rewards=a * batch.rewards)).advantages, grpo(eps=1e-6 / a).advantages(batch).advantages, atol=1e-12, rtol=1e-12
    )
    torch.testing.assert_close(GRPO.advantages(batch.replace(rewards=-batch.rewards)).advantages, -GRPO.advantages(batch).advantages, **TOL)


@settings(deadline=None, max_examples=40)
@given(grouped(), st.data())
def test_dr_grpo_zero_sum_shift_invariance_and_scale_equivariance(batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 4: sum_group A = 0, A(R + c_g) = A(R), A(aR) = a A(R)."""
    g = batch.group.tolist()
    rows = per_row(DR_GRPO, batch)
    for idx in members(g).values():
        assert abs(float(rows[idx].sum())) < 1e-12
    shift = {gid: data.draw(REWARD, label=f"shift {gid}") for gid in sorted(set(g))}
    shifted = batch.replace(rewards=batch.rewards + torch.tensor([shift[gid] for gid in g], dtype=F64))
    torch.testing.assert_close(per_row(DR_GRPO, shifted), rows, atol=1e-12, rtol=0.0)
    a = data.draw(SCALES, label="scale")
    torch.testing.assert_close(per_row(DR_GRPO, batch.replace(rewards=a * batch.rewards)), a * rows, atol=1e-12, rtol=1e-12)


PERMUTABLE = {"grpo": GRPO, "dr_grpo": DR_GRPO, "batch_std": BATCH_STD, "return_to_go": RTG, "whitened": WHITENED, "whitened_baseline": WHITENED_BASELINE}


@pytest.mark.parametrize("name", sorted(PERMUTABLE))
@settings(deadline=None, max_examples=30)
@given(batch=grouped(), data=st.data())
def test_permutation_equivariance(name: str, batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 6: reordering rows reorders A; relabelling the groups (a permutation of whole groups) changes nothing."""
    obj = PERMUTABLE[name]
    est = obj.advantages(batch).advantages
    perm = torch.tensor(data.draw(st.permutations(range(batch.batch_size)), label="perm"))
    moved = make(batch.rewards[perm], batch.group[perm].tolist(), batch.mask[perm], old_logprobs=batch.old_logprobs[perm])
    torch.testing.assert_close(obj.advantages(moved).advantages, est[perm], atol=1e-12, rtol=1e-12)
    ids = sorted(set(batch.group.tolist()))
    new_ids = data.draw(st.lists(st.integers(-(10**6), 10**6), min_size=len(ids), max_size=len(ids), unique=True), label="ids")
    relabel = dict(zip(ids, new_ids))
    renamed = batch.replace(group=torch.tensor([relabel[gid] for gid in batch.group.tolist()]))
    torch.testing.assert_close(obj.advantages(renamed).advantages, est, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("scale", ["group", "none"])
@settings(deadline=None, max_examples=30)
@given(batch=grouped(), data=st.data())
def test_group_normalized_group_independence(scale: str, batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 7: changing one group's rewards leaves the other groups' advantages unchanged."""
    obj = grpo(scale=scale)
    g = batch.group.tolist()
    target = data.draw(st.sampled_from(sorted(set(g))), label="group")
    rows = [i for i, gid in enumerate(g) if gid == target]
    new = batch.rewards.clone()
    new[rows] = torch.tensor(data.draw(st.lists(REWARD, min_size=len(rows), max_size=len(rows)), label="new"), dtype=F64)
    others = torch.tensor([gid != target for gid in g])
    assert torch.equal(obj.advantages(batch.replace(rewards=new)).advantages[others], obj.advantages(batch).advantages[others])


def test_batch_scale_couples_groups() -> None:
    # scale="batch" divides by one batch-wide std, so changing group 1 rescales group 0: not invariant 7.
    mask = torch.ones(4, 1, dtype=torch.bool)
    before = BATCH_STD.advantages(make([0.0, 2.0, 0.0, 2.0], [0, 0, 1, 1], mask)).advantages[:, 0]
    after = BATCH_STD.advantages(make([0.0, 2.0, 0.0, 6.0], [0, 0, 1, 1], mask)).advantages[:, 0]
    # Before: centred (-1, 1, -1, 1), Bessel std sqrt(4/3). After: centred (-1, 1, -3, 3), std sqrt(20/3).
    assert before[0].item() == pytest.approx(-1 / (math.sqrt(4 / 3) + 1e-6), abs=1e-12)
    assert after[0].item() == pytest.approx(-1 / (math.sqrt(20 / 3) + 1e-6), abs=1e-12)


@settings(deadline=None, max_examples=30)
@given(grouped())
def test_outcome_advantages_are_broadcast(batch: proxim.Rollout) -> None:
    """Invariant 10: A is constant over each row's valid tokens and exactly 0 on masked ones."""
    for obj in (GRPO, DR_GRPO, BATCH_STD):
        adv = obj.advantages(batch).advantages
        rows = per_row(obj, batch)
        assert torch.equal(adv, torch.where(batch.mask, rows.unsqueeze(1).expand_as(adv), torch.zeros((), dtype=F64)))


# -- return_to_go and whitened (REINFORCE++) --------------------------------------------------------------------------


def test_return_to_go_by_hand() -> None:
    mask = torch.tensor([[True, True, True, False], [True, False, True, True], [False, False, False, False]])
    rew = torch.tensor([[1.0, 0.0, 2.0, NAN], [0.5, INF, 0.0, 1.0], [NAN, NAN, NAN, NAN]], dtype=F64)
    batch = make(rew, None, mask)
    # gamma 0.5. Row 0: G_2 = 2, G_1 = 0 + 0.5*2 = 1, G_0 = 1 + 0.5*1 = 1.5.
    # Row 1 (position 1 is padding, skipped): G_3 = 1, G_2 = 0 + 0.5*1 = 0.5, G_0 = 0.5 + 0.5*0.5 = 0.75.
    expected = torch.tensor([[1.5, 1.0, 2.0, 0.0], [0.75, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    est = proxim.objective(advantage="return_to_go", region="none", gamma=0.5).advantages(batch)
    torch.testing.assert_close(est.advantages, expected, **TOL)
    torch.testing.assert_close(est.returns, expected, **TOL)
    # An outcome reward with gamma = 1 gives every valid token R (placed on the last valid token).
    seq = make([2.0, -1.0, 4.0], None, mask)
    assert torch.equal(RTG.advantages(seq).advantages, tokens([2.0, -1.0, 4.0], mask))
    direct = ReturnToGo(gamma=0.5)(make(rew, None, mask), NoBaseline()(make(rew, None, mask)))
    torch.testing.assert_close(torch.where(mask, direct.advantages, torch.zeros((), dtype=F64)), expected, **TOL)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.0])
@settings(deadline=None, max_examples=25)
@given(batch=grouped(token_rewards=True, max_t=5))
def test_return_to_go_and_whitened_match_a_loop(gamma: float, batch: proxim.Rollout) -> None:
    mask, g = batch.mask, batch.group.tolist()
    rew = placed(batch)
    returns = ref_returns(rew, mask, gamma)
    seq = [sum(float(rew[i, t]) for t in range(mask.shape[1]) if mask[i, t]) for i in range(batch.batch_size)]
    groups = members(g)
    b = [sum(seq[j] for j in groups[gid]) / len(groups[gid]) for gid in g]
    rtg = proxim.objective(advantage="return_to_go", region="none", gamma=gamma)
    est = rtg.advantages(batch)
    torch.testing.assert_close(est.advantages, torch.tensor(returns, dtype=F64), atol=1e-11, rtol=0.0)
    torch.testing.assert_close(est.returns, torch.tensor(returns, dtype=F64), atol=1e-11, rtol=0.0)
    centred = [[(returns[i][t] - b[i]) if mask[i, t] else 0.0 for t in range(mask.shape[1])] for i in range(batch.batch_size)]
    with_b = proxim.objective(baseline="group_mean", advantage="return_to_go", region="none", gamma=gamma)
    torch.testing.assert_close(with_b.advantages(batch).advantages, torch.tensor(centred, dtype=F64), atol=1e-11, rtol=0.0)
    # Whitened: (x - mean) / sqrt(var + eps) with mean and Bessel var over all valid tokens of the batch.
    for obj, x in (
        (proxim.objective(advantage="whitened", region="none", gamma=gamma), returns),
        (proxim.objective(baseline="group_mean", advantage="whitened", region="none", gamma=gamma), centred),
    ):
        vals = [x[i][t] for i in range(batch.batch_size) for t in range(mask.shape[1]) if mask[i, t]]
        n = len(vals)
        mean = sum(vals) / n if n else 0.0
        var = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
        expected = [[(x[i][t] - mean) / math.sqrt(var + 1e-8) if mask[i, t] else 0.0 for t in range(mask.shape[1])] for i in range(batch.batch_size)]
        # 1e-9: when every valid token has the same value, the batch mean (a plain sum / count) may miss it by
        # an ulp (~1e-14 for |x| <= 50), and whitening divides that by sqrt(eps) = 1e-4.
        torch.testing.assert_close(obj.advantages(batch).advantages, torch.tensor(expected, dtype=F64), atol=1e-9, rtol=1e-9)


def test_return_to_go_with_a_critic_is_the_monte_carlo_advantage() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    values = torch.tensor([[0.5, 1.0, NAN], [0.0, -1.0, 2.0]], dtype=F64)
    batch = make([1.0, 3.0], None, mask, values=values)
    est = proxim.objective(baseline="critic", advantage="return_to_go", region="none").advantages(batch)
    # gamma 1: G_t = R on every valid token; A_t = R - V_t = (0.5, 0) and (3, 4, 1); returns G_t.
    assert torch.equal(est.advantages, torch.tensor([[0.5, 0.0, 0.0], [3.0, 4.0, 1.0]], dtype=F64))
    assert torch.equal(est.returns, tokens([1.0, 3.0], mask))


def test_whitened_by_hand() -> None:
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    batch = make([1.0, 4.0, 100.0], None, mask)
    # gamma 1: token returns 1, 1 (row 0), 4 (row 1); row 2 has no tokens, so its reward is dropped.
    # Token mean 2, Bessel var (1 + 1 + 4)/2 = 3: A = (-1, -1, 2)/sqrt(3 + 1e-8).
    s = math.sqrt(3 + 1e-8)
    expected = torch.tensor([[-1 / s, -1 / s], [2 / s, 0.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(WHITENED.advantages(batch).advantages, expected, **TOL)
    direct = Whitened()(make(placed(batch), None, mask), torch.zeros(3, dtype=F64))
    torch.testing.assert_close(direct.advantages, expected, **TOL)


@settings(deadline=None, max_examples=40)
@given(grouped(max_t=5, every_row_valid=True), st.sampled_from([1e-8, 1e-2, 1.0]))
def test_whitened_batch_mean_zero_std_one(batch: proxim.Rollout, eps: float) -> None:
    """Invariant 8: token-weighted mean 0 and Bessel std sqrt(v / (v + eps)) (~1) over the batch's valid tokens."""
    for baseline in ("none", "group_mean"):
        adv = proxim.objective(baseline=baseline, advantage="whitened", region="none", eps=eps).advantages(batch).advantages
        a = adv[batch.mask].tolist()
        if len(a) < 2:
            continue
        # The token values before whitening, exactly: R on every valid token, minus the group mean.
        seq = [Fraction(v) for v in batch.rewards.tolist()]
        g = batch.group.tolist()
        groups = members(g)
        b = [sum(seq[j] for j in groups[gid]) / len(groups[gid]) if baseline == "group_mean" else Fraction(0) for gid in g]
        x = [seq[i] - b[i] for i in range(len(seq)) for t in range(batch.mask.shape[1]) if batch.mask[i, t]]
        v = float(exact_var(x))
        # The code's float mean of x may miss by ~1e-15 * max|x| (exactly 0 here only for a flat batch),
        # which whitening divides by sqrt(v + eps).
        slack = 1e-14 * max(1.0, max(abs(float(xi)) for xi in x)) / math.sqrt(v + eps)
        assert abs(sum(a) / len(a)) < slack
        if v == 0:
            assert all(abs(ai) < slack for ai in a)
        else:
            assert bessel_std(a) == pytest.approx(math.sqrt(v / (v + eps)), abs=slack)


@settings(deadline=None, max_examples=40)
@given(grouped(max_t=5), st.data())
def test_whitened_is_invariant_to_a_global_affine_map(batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 8: with gamma = 1 and no KL, R -> aR + c (a > 0, whole batch) leaves A unchanged (up to eps)."""
    a = data.draw(SCALES, label="a")
    c = data.draw(REWARD, label="c")
    valid_returns = {batch.rewards[i].item() for i in range(batch.batch_size) if bool(batch.mask[i].any())}
    assume(len(valid_returns) > 1 and int(batch.mask.sum()) > 1)  # a spread to normalise (the flat case is below)
    obj = proxim.objective(advantage="whitened", region="none", eps=1e-30)  # eps ~ 0: the invariance is exact
    base = obj.advantages(batch).advantages
    moved = obj.advantages(batch.replace(rewards=a * batch.rewards + c)).advantages
    torch.testing.assert_close(moved, base, atol=1e-12, rtol=1e-12)
    # With eps > 0 the scale moves into eps: (aR + c - (a m + c)) / sqrt(a^2 v + eps) = (R - m) / sqrt(v + eps/a^2).
    default = WHITENED.advantages(batch.replace(rewards=a * batch.rewards + c)).advantages
    rescaled = proxim.objective(advantage="whitened", region="none", eps=1e-8 / a**2).advantages(batch).advantages
    torch.testing.assert_close(default, rescaled, atol=1e-12, rtol=1e-12)


def test_whitened_flat_batch_gives_zero() -> None:
    mask = torch.tensor([[True, True], [True, False]])
    # Every token has the same return 0.15: centred values are within an ulp of 0, divided by sqrt(eps = 1e-8).
    adv = WHITENED.advantages(make([0.15, 0.15], [0, 1], mask)).advantages
    torch.testing.assert_close(adv, torch.zeros(2, 2, dtype=F64), atol=1e-10, rtol=0.0)
    assert torch.equal(WHITENED.advantages(make([2.0, 2.0], [0, 1], mask)).advantages, torch.zeros(2, 2, dtype=F64))


def test_whitened_is_not_invariant_to_a_per_group_shift_but_the_baseline_variant_is() -> None:
    mask = torch.ones(4, 1, dtype=torch.bool)
    base = make([0.0, 1.0, 0.0, 1.0], [0, 0, 1, 1], mask)
    shifted = make([0.0, 1.0, 10.0, 11.0], [0, 0, 1, 1], mask)
    # REINFORCE++: before, x = (0, 1, 0, 1), mean 1/2, Bessel var 1/3 -> A_0 = -0.5/sqrt(1/3 + 1e-8).
    # After shifting group 1 by 10, x = (0, 1, 10, 11): mean 5.5, var (30.25 + 20.25 + 20.25 + 30.25)/3 = 101/3,
    # so A_0 = -5.5/sqrt(101/3 + 1e-8): the shift of group 1 changed group 0 (no invariant 7 either).
    a0 = WHITENED.advantages(base).advantages[0, 0].item()
    a1 = WHITENED.advantages(shifted).advantages[0, 0].item()
    assert a0 == pytest.approx(-0.5 / math.sqrt(1 / 3 + 1e-8), abs=1e-12)
    assert a1 == pytest.approx(-5.5 / math.sqrt(101 / 3 + 1e-8), abs=1e-12)
    # REINFORCE++-baseline: centred x = (-1/2, 1/2, -1/2, 1/2) both times, so A is unchanged.
    torch.testing.assert_close(WHITENED_BASELINE.advantages(shifted).advantages, WHITENED_BASELINE.advantages(base).advantages, **TOL)


@settings(deadline=None, max_examples=40)
@given(grouped(max_t=5, every_row_valid=True), st.data())
def test_whitened_baseline_variant_is_invariant_to_per_group_shifts(batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 8 (baseline variant): R + c_g with one shift per group leaves A unchanged."""
    g = batch.group.tolist()
    shift = {gid: data.draw(REWARD, label=f"shift {gid}") for gid in sorted(set(g))}
    # Some group must have a spread (>= 0.05 on the grid): otherwise every centred value is rounding noise
    # that whitening with eps ~ 0 would blow up to unit scale.
    r = batch.rewards.tolist()
    assume(any(len({r[j] for j in idx}) > 1 for idx in members(g).values()))
    obj = proxim.objective(baseline="group_mean", advantage="whitened", region="none", eps=1e-30)
    moved = batch.replace(rewards=batch.rewards + torch.tensor([shift[gid] for gid in g], dtype=F64))
    torch.testing.assert_close(obj.advantages(moved).advantages, obj.advantages(batch).advantages, atol=1e-12, rtol=1e-12)


def test_fully_masked_row_counts_in_its_group_for_token_level_advantages_too() -> None:
    # Group of three identical rewards 1, row 2 fully masked. Sequence level: b = 1, A = 0 on rows 0 and 1.
    # Token level (return_to_go, gamma 1): G_t = 1, and the baseline reads sequence totals, so b = 1 and A = 0
    # (were the reward placed on tokens first, the masked row would count as 0: b = 2/3, A = 1/3).
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    batch = make([1.0, 1.0, 1.0], [0, 0, 0], mask)
    assert torch.equal(DR_GRPO.advantages(batch).advantages, torch.zeros(3, 2, dtype=F64))
    token_level = proxim.objective(baseline="group_mean", advantage="return_to_go", region="none")
    torch.testing.assert_close(token_level.advantages(batch).advantages, torch.zeros(3, 2, dtype=F64), **TOL)


# -- KL in the reward (docs/parts.md, Penalties; invariant 38) --------------------------------------------------------


def k_ref(d: float, estimator: str) -> float:
    return {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[estimator]


KL_MASK = torch.tensor([[True, True, False], [True, False, True], [False, False, False]])
KL_OLD = torch.tensor([[-0.5, -1.0, NAN], [-2.0, -0.1, -0.3], [-1.0, -1.0, -1.0]], dtype=F64)
KL_REF = torch.tensor([[-0.7, -0.4, -1.0], [-1.5, NAN, -0.3], [NAN, -3.0, -1.0]], dtype=F64)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_reward_for_sequence_advantages(estimator: str) -> None:
    beta = 0.1
    batch = make([1.0, 2.0, 3.0], None, KL_MASK, old_logprobs=KL_OLD, ref_logprobs=KL_REF)
    obj = proxim.objective(advantage="diff", region="none", kl_in="reward", kl_coef=beta, kl_estimator=estimator)
    # d = old - ref on valid tokens only: row 0 (0.2, -0.6), row 1 (-0.5, 0.0); row 2 none. Padding (NaN) unused.
    sums = [k_ref(0.2, estimator) + k_ref(-0.6, estimator), k_ref(-0.5, estimator) + k_ref(0.0, estimator), 0.0]
    shaped = [r - beta * s for r, s in zip([1.0, 2.0, 3.0], sums)]
    est = obj.advantages(batch)
    torch.testing.assert_close(est.rewards, torch.tensor(shaped, dtype=F64), **TOL)
    torch.testing.assert_close(est.advantages, tokens(shaped, KL_MASK), **TOL)
    assert est.metrics["reward/kl_penalty"].item() == pytest.approx(beta * sum(sums) / 3, abs=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_reward_for_token_advantages(estimator: str) -> None:
    beta = 0.25
    batch = make([1.0, 2.0, 3.0], None, KL_MASK, old_logprobs=KL_OLD, ref_logprobs=KL_REF)
    obj = proxim.objective(advantage="return_to_go", region="none", kl_in="reward", kl_coef=beta, kl_estimator=estimator)

    def k(d: float) -> float:
        return beta * k_ref(d, estimator)

    # Per-token rewards: -beta k(t) on every valid token, plus R on the last valid one.
    rew = [[-k(0.2), 1.0 - k(-0.6), 0.0], [-k(-0.5), 0.0, 2.0 - k(0.0)], [0.0, 0.0, 0.0]]
    # gamma 1 returns: row 0 (rew00 + rew01, rew01); row 1 (rew10 + rew12, padding, rew12).
    returns = [[rew[0][0] + rew[0][1], rew[0][1], 0.0], [rew[1][0] + rew[1][2], 0.0, rew[1][2]], [0.0, 0.0, 0.0]]
    est = obj.advantages(batch)
    torch.testing.assert_close(est.rewards, torch.tensor(rew, dtype=F64), **TOL)
    torch.testing.assert_close(est.advantages, torch.tensor(returns, dtype=F64), **TOL)
    assert est.metrics["reward/kl_penalty"].item() == pytest.approx(-(rew[0][0] + rew[0][1] - 1 + rew[1][0] + rew[1][2] - 2) / 3, abs=1e-12)


@pytest.mark.parametrize("advantage", ["diff", "group_normalized", "return_to_go", "whitened", "pairwise"])
def test_kl_coefficient_zero_reproduces_the_penalty_free_advantages(advantage: str) -> None:
    """Invariant 38 (reward placement): beta = 0 gives exactly the advantages without any KL."""
    batch = make([1.0, 2.0, 3.0], [0, 0, 1], KL_MASK, old_logprobs=KL_OLD, ref_logprobs=KL_REF)
    plain = proxim.objective(advantage=advantage, region="none").advantages(batch)
    for estimator in ("k1", "k2", "k3"):
        zero = proxim.objective(advantage=advantage, region="none", kl_in="reward", kl_coef=0.0, kl_estimator=estimator).advantages(batch)
        assert torch.equal(zero.advantages, plain.advantages) and torch.equal(zero.rewards, plain.rewards)
        assert "reward/kl_penalty" not in zero.metrics


def test_kl_in_reward_needs_reference_logprobs() -> None:
    batch = make([1.0, 2.0], None, torch.ones(2, 2, dtype=torch.bool))
    obj = proxim.objective(advantage="diff", region="none", kl_in="reward", kl_coef=0.05)
    with pytest.raises(proxim.BatchError, match=r"Rollout\.ref_logprobs \(needed by kl_coef=0\.05\), but the batch has None there"):
        obj.advantages(batch)


# -- metrics -----------------------------------------------------------------------------------------------------


def test_stage_one_metrics_by_hand() -> None:
    group = [3, 3, 7, 7, 7, 9]
    rewards = [1.0, 0.0, 0.1, 0.1, 0.1, 5.0]
    lengths = [2, 1, 3, 0, 1, 2]
    mask = torch.tensor([[t < n for t in range(3)] for n in lengths])
    est = DR_GRPO.advantages(make(rewards, group, mask))
    # Dr. GRPO: group 3 (mean 0.5) -> A = 0.5, -0.5; group 7 (three times 0.1) -> 0; group 9 (alone) -> 0.
    # Valid tokens (9): 0.5, 0.5, -0.5 and six zeros. Mean 0.5/9 = 1/18.
    # Bessel std: sum (a - 1/18)^2 = sum a^2 - 9/18^2 = 0.75 - 1/36 = 13/18, over 8: 13/144 -> sqrt(13)/12.
    assert est.metrics["advantage/mean"].item() == pytest.approx(1 / 18, abs=1e-12)
    assert est.metrics["advantage/std"].item() == pytest.approx(math.sqrt(13) / 12, abs=1e-12)
    # Zero-std groups: group 7 (identical rewards) and group 9 (one response: no spread, no signal) -> 2.
    assert est.metrics["advantage/zero_std_groups"].item() == 2.0
    assert est.metrics["reward/mean"].item() == pytest.approx((1.0 + 0.0 + 0.3 + 5.0) / 6, abs=1e-12)
    assert all(not v.requires_grad and v.dim() == 0 for v in est.metrics.values())


def test_zero_std_groups_is_an_exact_count() -> None:
    # Groups of 3, 6 and 7 identical rewards and one group with a spread: exactly 3 zero-std groups.
    group = [0] * 3 + [1] * 6 + [2] * 7 + [3] * 2
    rewards = [1.0] * 3 + [0.3] * 6 + [-2.7] * 7 + [0.0, 1.0]
    est = GRPO.advantages(make(rewards, group, torch.ones(len(group), 1, dtype=torch.bool)))
    assert est.metrics["advantage/zero_std_groups"].item() == 3.0


def test_metrics_without_groups_and_of_a_single_token() -> None:
    est = RTG.advantages(make([2.0, 5.0], None, torch.tensor([[False, True], [False, False]])))
    # One valid token (A = 2): mean 2, std 0 (fewer than two tokens); no group metric without group ids.
    assert est.metrics["advantage/mean"].item() == 2.0 and est.metrics["advantage/std"].item() == 0.0
    assert "advantage/zero_std_groups" not in est.metrics


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_rewards_are_rejected(bad: float) -> None:
    with pytest.raises(proxim.BatchError, match=r"Rollout\.rewards holds NaN or inf \(first bad positions \[1\]\); score those responses"):
        make([1.0, bad, 0.0], [0, 0, 0], torch.ones(3, 2, dtype=torch.bool))
    # Token rewards: only valid positions must be finite.
    with pytest.raises(proxim.BatchError, match=r"Rollout\.rewards holds NaN or inf"):
        make([[1.0, bad], [0.0, 0.0]], [0, 0], torch.ones(2, 2, dtype=torch.bool))


def test_float_group_ids_are_rejected() -> None:
    with pytest.raises(proxim.BatchError, match=r"Rollout\.group must hold integer prompt ids, got dtype torch\.float64; convert with \.long\(\)"):
        proxim.Rollout(
            old_logprobs=-torch.ones(2, 2, dtype=F64),
            mask=torch.ones(2, 2, dtype=torch.bool),
            rewards=torch.ones(2, dtype=F64),
            group=torch.tensor([0.0, 1.0], dtype=F64),
        )


def test_group_normalized_needs_group_ids() -> None:
    batch = make([1.0, 2.0], None, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(
        proxim.BatchError, match=r"needs Rollout\.group \(needed by baseline 'group_mean', advantage 'group_normalized'\), but the batch has None there"
    ):
        GRPO.advantages(batch)
    with pytest.raises(proxim.BatchError, match=r"Rollout\.group \(needed by advantage 'group_normalized'\)"):
        grpo(baseline="none").advantages(batch)


ALL_STAGE_ONE = [GRPO, GRPO_EXACT, DR_GRPO, BATCH_STD, RTG, WHITENED, WHITENED_BASELINE, proxim.objective(advantage="pairwise", region="none")]


@pytest.mark.parametrize("obj", ALL_STAGE_ONE, ids=lambda o: f"{o.baseline.name}-{o.advantage.describe()}")
def test_fully_masked_rows_and_batches_are_finite_zeros(obj: proxim.Objective) -> None:
    mask = torch.tensor([[True, True], [False, False], [True, False], [False, False]])
    est = obj.advantages(make([1.0, 9.0, 0.0, 2.0], [0, 0, 0, 1], mask))
    assert bool(torch.isfinite(est.advantages).all())
    assert torch.equal(est.advantages[1], torch.zeros(2, dtype=F64)) and torch.equal(est.advantages[3], torch.zeros(2, dtype=F64))
    empty = obj.advantages(make([1.0, 9.0, 0.0, 2.0], [0, 0, 0, 1], torch.zeros(4, 2, dtype=torch.bool)))
    assert torch.equal(empty.advantages, torch.zeros(4, 2, dtype=F64))
    assert all(math.isfinite(v.item()) for v in empty.metrics.values())
    assert empty.metrics["advantage/mean"].item() == 0.0 and empty.metrics["advantage/std"].item() == 0.0
