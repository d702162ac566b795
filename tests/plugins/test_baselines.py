"""Baselines (stage 1): none, batch_mean, critic, group_mean, leave_one_out, seen through the `diff` advantage.

With ``advantage="diff"`` the advantage is A_i = R_i - b_i broadcast over the response's valid tokens
(or R_i - V(s_t) with the critic), so every baseline value can be read off the advantages. Expected values
come from hand computations (comments) or plain-Python loops written here; docs/parts.md (Baselines) and
docs/invariants.md, invariants 5, 6, 7 and 10.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stage_one import REWARD, draw_groups, draw_mask, make, per_row, tokens

import proxim
from proxim_plugins.grpo import GroupMeanBaseline
from proxim_plugins.ppo import BatchMeanBaseline, CriticBaseline, NoBaseline
from proxim_plugins.rloo import LeaveOneOutBaseline

F64 = torch.float64
TOL: dict[str, Any] = {"atol": 1e-12, "rtol": 0.0}
NAN = float("nan")

DIFF = {name: proxim.objective(baseline=name, advantage="diff", region="none") for name in ("none", "batch_mean", "group_mean", "leave_one_out")}
CRITIC_DIFF = proxim.objective(baseline="critic", advantage="diff", region="none")
DR_GRPO = proxim.objective(baseline="group_mean", advantage="group_normalized", region="none", scale="none")


def members(group: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for row, gid in enumerate(group):
        out.setdefault(gid, []).append(row)
    return out


@st.composite
def grouped(draw: st.DrawFn, min_group: int = 1, max_group: int = 6, max_groups: int = 4, max_t: int = 4) -> proxim.Rollout:
    """Ragged groups with sparse, unsorted ids (rows shuffled), random padding including fully masked rows."""
    group = draw_groups(draw, min_group, max_group, max_groups)
    b, t = len(group), draw(st.integers(1, max_t))
    rewards = draw(st.lists(REWARD, min_size=b, max_size=b))
    mask = draw_mask(draw, b, t)
    return make(rewards, group, mask)


# -- values by hand ------------------------------------------------------------------------------------


MASK4 = torch.tensor([[True, True, False], [True, False, False], [False, False, False], [True, True, True]])


def test_none_baseline_gives_the_reward_on_every_valid_token() -> None:
    batch = make([1.0, 2.0, 6.0, -1.0], None, MASK4)
    est = DIFF["none"].advantages(batch)
    # b = 0: A = R on valid tokens; the fully masked row 2 is all zeros.
    assert torch.equal(est.advantages, tokens([1.0, 2.0, 6.0, -1.0], MASK4))
    assert est.returns is None


def test_batch_mean_baseline_by_hand() -> None:
    batch = make([1.0, 2.0, 6.0, -1.0], None, MASK4)
    # b = (1 + 2 + 6 - 1) / 4 = 2 for every row: the baseline reads every row's reward, masking only
    # zeroes a row's own advantages. A = (-1, 0, 4, -3), row 2 fully masked -> 0.
    assert torch.equal(DIFF["batch_mean"].advantages(batch).advantages, tokens([-1.0, 0.0, 0.0, -3.0], MASK4))
    assert torch.equal(BatchMeanBaseline()(batch), torch.full((4,), 2.0, dtype=F64))
    assert torch.equal(NoBaseline()(batch), torch.zeros(4, dtype=F64))


def test_group_mean_baseline_by_hand_with_ragged_unsorted_groups() -> None:
    group = [9, 5, 9, 2, 5, 9]
    rewards = [1.0, 4.0, 0.5, 3.0, -2.0, 3.0]
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True], [True, True], [False, True]])
    batch = make(rewards, group, mask)
    # Group 9 (rows 0, 2, 5): mean (1 + 0.5 + 3) / 3 = 1.5. Group 5 (rows 1, 4): mean 1. Group 2 (row 3): its
    # own reward 3 (a group of one is its own baseline).
    expected_b = [1.5, 1.0, 1.5, 3.0, 1.0, 1.5]
    torch.testing.assert_close(GroupMeanBaseline()(batch), torch.tensor(expected_b, dtype=F64), **TOL)
    # A = R - b = (-0.5, 3, -1, 0, -3, 1.5); row 2 is fully masked.
    torch.testing.assert_close(DIFF["group_mean"].advantages(batch).advantages, tokens([-0.5, 3.0, -1.0, 0.0, -3.0, 1.5], mask), **TOL)


def test_leave_one_out_baseline_by_hand() -> None:
    group = [9, 5, 9, 5, 9]
    rewards = [1.0, 4.0, 0.5, -2.0, 3.0]
    mask = torch.tensor([[True, True], [True, False], [True, True], [False, False], [False, True]])
    batch = make(rewards, group, mask)
    # Group 9 (rows 0, 2, 4; rewards 1, 0.5, 3): b_0 = (0.5 + 3)/2 = 1.75, b_2 = (1 + 3)/2 = 2, b_4 = (1 + 0.5)/2 = 0.75.
    # Group 5 (rows 1, 3; rewards 4, -2): b_1 = -2, b_3 = 4.
    expected_b = [1.75, -2.0, 2.0, 4.0, 0.75]
    torch.testing.assert_close(LeaveOneOutBaseline()(batch), torch.tensor(expected_b, dtype=F64), **TOL)
    # A = R - b = (-0.75, 6, -1.5, -6, 2.25); also = G/(G-1) (R - mean): group 9 mean 1.5, 3/2 * (-0.5) = -0.75.
    torch.testing.assert_close(DIFF["leave_one_out"].advantages(batch).advantages, tokens([-0.75, 6.0, -1.5, 0.0, 2.25], mask), **TOL)


def test_critic_baseline_with_diff_by_hand() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    values = torch.tensor([[0.5, 1.0, NAN], [2.0, -1.0, 0.0], [float("inf"), NAN, 3.0]], dtype=F64)
    batch = make([1.0, 3.0, 5.0], None, mask, values=values)
    torch.testing.assert_close(CriticBaseline()(batch), values, atol=0.0, rtol=0.0, equal_nan=True)  # V(s_t) as given
    est = CRITIC_DIFF.advantages(batch)
    # A_t = R - V(s_t) on valid tokens: row 0 (1 - 0.5, 1 - 1), row 1 (3 - 2, 3 + 1, 3 - 0); padding (even
    # NaN or inf values) gives exactly 0. The critic's target is R itself.
    expected = torch.tensor([[0.5, 0.0, 0.0], [1.0, 4.0, 3.0], [0.0, 0.0, 0.0]], dtype=F64)
    assert torch.equal(est.advantages, expected)
    assert torch.equal(est.returns, tokens([1.0, 3.0, 5.0], mask))


def test_token_rewards_are_summed_per_sequence_for_sequence_baselines() -> None:
    mask = torch.tensor([[True, True, False], [True, False, True], [True, True, True], [False, True, False]])
    token_rewards = torch.tensor([[1.0, 2.0, NAN], [0.5, 100.0, 0.5], [0.0, 0.0, -3.0], [float("inf"), 4.0, 7.0]], dtype=F64)
    batch = make(token_rewards, [0, 0, 1, 1], mask)
    # Sequence rewards over valid tokens only: 3, 1, -3, 4. Group means 2 and 0.5: A = (1, -1, -3.5, 3.5).
    torch.testing.assert_close(DIFF["group_mean"].advantages(batch).advantages, tokens([1.0, -1.0, -3.5, 3.5], mask), **TOL)
    # Leave-one-out: b = (1, 3, 4, -3) -> A = (2, -2, -7, 7).
    torch.testing.assert_close(DIFF["leave_one_out"].advantages(batch).advantages, tokens([2.0, -2.0, -7.0, 7.0], mask), **TOL)


# -- loop references ------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(grouped())
def test_group_mean_and_batch_mean_match_a_loop(batch: proxim.Rollout) -> None:
    r, g = batch.rewards.tolist(), batch.group.tolist()
    groups = members(g)
    group_mean = [sum(r[j] for j in groups[gid]) / len(groups[gid]) for gid in g]
    batch_mean = sum(r) / len(r)
    torch.testing.assert_close(DIFF["group_mean"].advantages(batch).advantages, tokens([ri - b for ri, b in zip(r, group_mean)], batch.mask), **TOL)
    torch.testing.assert_close(DIFF["batch_mean"].advantages(batch).advantages, tokens([ri - batch_mean for ri in r], batch.mask), **TOL)
    assert torch.equal(DIFF["none"].advantages(batch).advantages, tokens(r, batch.mask))


@settings(deadline=None, max_examples=40)
@given(grouped(min_group=2))
def test_leave_one_out_matches_a_loop_and_the_rloo_identities(batch: proxim.Rollout) -> None:
    """Invariant 5: A_i = R_i - mean_{j != i} R_j = G/(G-1) * A_DrGRPO, and sum_group A = 0."""
    r, g = batch.rewards.tolist(), batch.group.tolist()
    groups = members(g)
    loo = []
    for i, gid in enumerate(g):
        others = [r[j] for j in groups[gid] if j != i]
        loo.append(r[i] - sum(others) / len(others))
    est = DIFF["leave_one_out"].advantages(batch)
    torch.testing.assert_close(est.advantages, tokens(loo, batch.mask), **TOL)
    rows = per_row(DIFF["leave_one_out"], batch)
    torch.testing.assert_close(rows, torch.tensor(loo, dtype=F64), **TOL)
    sizes = torch.tensor([len(groups[gid]) for gid in g], dtype=F64)
    torch.testing.assert_close(rows, sizes / (sizes - 1) * per_row(DR_GRPO, batch), **TOL)
    for rows_of_group in groups.values():
        assert abs(sum(loo[j] for j in rows_of_group)) < 1e-12
        assert abs(float(rows[rows_of_group].sum())) < 1e-12


# -- invariants (docs/invariants.md) ----------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(grouped(min_group=2), st.data())
def test_leave_one_out_shift_invariant_per_group_and_scale_equivariant(batch: proxim.Rollout, data: st.DataObject) -> None:
    g = batch.group.tolist()
    shifts = {gid: data.draw(REWARD, label=f"shift {gid}") for gid in set(g)}
    a = data.draw(st.sampled_from([0.05, 0.5, 2.0, 3.0, 7.5]), label="scale")
    obj = DIFF["leave_one_out"]
    base = per_row(obj, batch)
    shifted = batch.replace(rewards=batch.rewards + torch.tensor([shifts[gid] for gid in g], dtype=F64))
    # Shifting a group's rewards by c moves R_i and its leave-one-out mean by c alike.
    torch.testing.assert_close(per_row(obj, shifted), base, atol=1e-12, rtol=0.0)
    torch.testing.assert_close(per_row(obj, batch.replace(rewards=a * batch.rewards)), a * base, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(per_row(obj, batch.replace(rewards=-batch.rewards)), -base, **TOL)


@settings(deadline=None, max_examples=30)
@given(grouped(min_group=2), st.data())
def test_identical_rewards_in_a_group_give_zero_leave_one_out_advantage(batch: proxim.Rollout, data: st.DataObject) -> None:
    g = batch.group.tolist()
    level = {gid: data.draw(REWARD, label=f"level {gid}") for gid in set(g)}
    flat = batch.replace(rewards=torch.tensor([level[gid] for gid in g], dtype=F64))
    # Each group's reward is constant: R_i - mean of the others = 0. The group mean of equal values is
    # exact; the leave-one-out mean (sum of the group minus R_i, over G - 1) may round by an ulp of |R| <= 10.
    assert torch.equal(per_row(DIFF["group_mean"], flat), torch.zeros(len(g), dtype=F64))
    torch.testing.assert_close(per_row(DIFF["leave_one_out"], flat), torch.zeros(len(g), dtype=F64), atol=1e-14, rtol=0.0)


@pytest.mark.parametrize("name", ["group_mean", "leave_one_out", "batch_mean", "none"])
@settings(deadline=None, max_examples=30)
@given(batch=grouped(min_group=2), data=st.data())
def test_permutation_equivariance(name: str, batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 6: reordering rows (within groups and whole groups) reorders A; relabelling group ids changes nothing."""
    obj = DIFF[name]
    est = obj.advantages(batch).advantages
    perm = torch.tensor(data.draw(st.permutations(range(batch.batch_size)), label="perm"))
    moved = make(batch.rewards[perm], batch.group[perm].tolist(), batch.mask[perm], old_logprobs=batch.old_logprobs[perm])
    torch.testing.assert_close(obj.advantages(moved).advantages, est[perm], **TOL)
    ids = sorted(set(batch.group.tolist()))
    new_ids = data.draw(st.lists(st.integers(-(10**6), 10**6), min_size=len(ids), max_size=len(ids), unique=True), label="ids")
    relabel = dict(zip(ids, new_ids))
    renamed = batch.replace(group=torch.tensor([relabel[gid] for gid in batch.group.tolist()]))
    torch.testing.assert_close(obj.advantages(renamed).advantages, est, **TOL)


@pytest.mark.parametrize("name", ["group_mean", "leave_one_out"])
@settings(deadline=None, max_examples=30)
@given(batch=grouped(min_group=2), data=st.data())
def test_group_independence(name: str, batch: proxim.Rollout, data: st.DataObject) -> None:
    """Invariant 7: changing one group's rewards leaves every other group's advantages unchanged."""
    obj = DIFF[name]
    g = batch.group.tolist()
    target = data.draw(st.sampled_from(sorted(set(g))), label="group")
    rows = [i for i, gid in enumerate(g) if gid == target]
    new = batch.rewards.clone()
    new[rows] = torch.tensor(data.draw(st.lists(REWARD, min_size=len(rows), max_size=len(rows)), label="new rewards"), dtype=F64)
    before = obj.advantages(batch).advantages
    after = obj.advantages(batch.replace(rewards=new)).advantages
    others = torch.tensor([gid != target for gid in g])
    assert torch.equal(after[others], before[others])


def test_batch_mean_couples_groups() -> None:
    # The batch-mean baseline is not per group: raising rows 2-3 by 4 moves the mean from 1 to 3 and
    # so changes rows 0-1 too (contrast with invariant 7 for group baselines).
    mask = torch.ones(4, 1, dtype=torch.bool)
    before = DIFF["batch_mean"].advantages(make([0.0, 2.0, 0.0, 2.0], [0, 0, 1, 1], mask)).advantages[:, 0]
    after = DIFF["batch_mean"].advantages(make([0.0, 2.0, 4.0, 6.0], [0, 0, 1, 1], mask)).advantages[:, 0]
    assert before.tolist() == [-1.0, 1.0, -1.0, 1.0] and after.tolist() == [-3.0, -1.0, 1.0, 3.0]


@settings(deadline=None, max_examples=30)
@given(grouped())
def test_sequence_advantages_are_broadcast(batch: proxim.Rollout) -> None:
    """Invariant 10: A is constant over each row's valid tokens and exactly 0 on masked ones."""
    for obj in (DIFF["none"], DIFF["batch_mean"], DIFF["group_mean"]):
        adv = obj.advantages(batch).advantages
        rows = per_row(obj, batch)
        for i in range(batch.batch_size):
            for t in range(batch.mask.shape[1]):
                assert adv[i, t].item() == (rows[i].item() if batch.mask[i, t] else 0.0)


# -- bad input ---------------------------------------------------------------------------------------------


def test_leave_one_out_rejects_a_group_of_one_naming_the_part_and_group() -> None:
    batch = make([1.0, 2.0, 3.0, 4.0], [3, 3, -8, 3], torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(proxim.BatchError, match=r"baseline 'leave_one_out' needs at least 2 responses per group, but group id -8 \(row 2\) has 1\. "):
        DIFF["leave_one_out"].advantages(batch)


def test_group_baselines_need_group_ids() -> None:
    batch = make([1.0, 2.0], None, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(proxim.BatchError, match=r"this objective needs Rollout\.group \(needed by baseline 'group_mean'\), but the batch has None there"):
        DIFF["group_mean"].advantages(batch)
    with pytest.raises(proxim.BatchError, match=r"Rollout\.group \(needed by baseline 'leave_one_out'\)"):
        DIFF["leave_one_out"].advantages(batch)


def test_critic_needs_values() -> None:
    batch = make([1.0, 2.0], None, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(proxim.BatchError, match=r"Rollout\.values \(needed by baseline 'critic'\)"):
        CRITIC_DIFF.advantages(batch)


@pytest.mark.parametrize("name", ["none", "batch_mean", "group_mean", "leave_one_out"])
def test_fully_masked_batch_gives_zeros_and_finite_metrics(name: str) -> None:
    batch = make([1.0, 2.0, 5.0, 0.0], [1, 1, 2, 2], torch.zeros(4, 3, dtype=torch.bool))
    est = DIFF[name].advantages(batch)
    assert torch.equal(est.advantages, torch.zeros(4, 3, dtype=F64))
    assert all(math.isfinite(v.item()) for v in est.metrics.values())
    assert est.metrics["advantage/mean"].item() == 0.0 and est.metrics["advantage/std"].item() == 0.0
