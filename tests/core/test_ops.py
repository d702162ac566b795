"""`proxim.ops`: masked and group statistics, reward placement, returns, KL estimators, group layout.

Every expected value comes from a hand computation (in a comment) or from a plain-Python loop written
here, never from `proxim.ops` itself. float64 throughout, explicit tolerances.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proxim import ops

F64 = torch.float64
TOL: dict[str, Any] = {"atol": 1e-12, "rtol": 0.0}
NAN, INF = float("nan"), float("inf")

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def masked_matrices(draw: st.DrawFn, max_b: int = 5, max_t: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, T] float64 matrix whose masked entries hold NaN, inf or garbage, and its bool mask."""
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    values = draw(st.lists(finite, min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    junk = draw(st.lists(st.sampled_from([NAN, INF, -INF, 1e300]), min_size=b * t, max_size=b * t))
    x = [v if m else j for v, m, j in zip(values, mask, junk)]
    return torch.tensor(x, dtype=F64).reshape(b, t), torch.tensor(mask).reshape(b, t)


@st.composite
def grouped_vectors(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] values and [B] int64 group ids: arbitrary (negative, sparse) ids in shuffled order, ragged sizes."""
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    ids = draw(st.lists(st.integers(-1000, 1000), min_size=len(sizes), max_size=len(sizes), unique=True))
    group = [gid for gid, n in zip(ids, sizes) for _ in range(n)]
    order = draw(st.permutations(range(len(group))))
    group = [group[i] for i in order]
    values = draw(st.lists(finite, min_size=len(group), max_size=len(group)))
    return torch.tensor(values, dtype=F64), torch.tensor(group, dtype=torch.long)


def selected(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


# -- masked statistics ----------------------------------------------------------------------------


def test_masked_stats_by_hand_ignore_nan_and_inf_in_padding() -> None:
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, -INF]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # Selected: 1, 2, 4. Sum 7, mean 7/3, squared deviations (16+1+25)/9 = 42/9, Bessel var 42/18 = 7/3,
    # population var 42/27 = 14/9.
    assert ops.masked_sum(x, mask).item() == 7.0
    torch.testing.assert_close(ops.masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0], dtype=F64), **TOL)
    assert ops.masked_mean(x, mask).item() == pytest.approx(7 / 3, abs=1e-15)
    torch.testing.assert_close(ops.masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0], dtype=F64), **TOL)
    assert ops.masked_var(x, mask).item() == pytest.approx(7 / 3, abs=1e-14)
    assert ops.masked_var(x, mask, unbiased=False).item() == pytest.approx(14 / 9, abs=1e-14)
    # Whiten: (x - 7/3) / sqrt(7/3 + eps) on the selected entries, exactly 0 elsewhere (never NaN).
    out = ops.masked_whiten(x, mask, eps=1e-8)
    scale = 1 / math.sqrt(7 / 3 + 1e-8)
    expected = torch.tensor([[(1 - 7 / 3) * scale, (2 - 7 / 3) * scale, 0.0], [(4 - 7 / 3) * scale, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(out, expected, **TOL)


def test_masked_stats_of_empty_and_single_selections_are_zero_not_nan() -> None:
    x = torch.tensor([[NAN, 3.0], [INF, 5.0]], dtype=F64)
    nothing = torch.zeros(2, 2, dtype=torch.bool)
    assert ops.masked_sum(x, nothing).item() == 0.0
    assert ops.masked_mean(x, nothing).item() == 0.0
    torch.testing.assert_close(ops.masked_mean(x, nothing, dim=1), torch.zeros(2, dtype=F64), **TOL)
    assert ops.masked_var(x, nothing).item() == 0.0
    assert torch.equal(ops.masked_whiten(x, nothing), torch.zeros(2, 2, dtype=F64))
    one = torch.tensor([[False, True], [False, False]])
    # A single selected value: variance 0 (fewer than 2 entries), whitened value (3 - 3) / sqrt(eps) = 0.
    assert ops.masked_var(x, one).item() == 0.0
    assert torch.equal(ops.masked_whiten(x, one), torch.zeros(2, 2, dtype=F64))


@settings(deadline=None, max_examples=40)
@given(masked_matrices())
def test_masked_stats_match_a_loop(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, mask = data
    picked = selected(x, mask)
    n = len(picked)
    total = sum(picked)
    mean = total / n if n else 0.0
    ss = sum((v - mean) ** 2 for v in picked)
    var_b = ss / (n - 1) if n >= 2 else 0.0
    var_p = ss / n if n else 0.0
    assert ops.masked_sum(x, mask).item() == pytest.approx(total, abs=1e-12)
    assert ops.masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-12)
    assert ops.masked_var(x, mask).item() == pytest.approx(var_b, abs=1e-10)
    assert ops.masked_var(x, mask, unbiased=False).item() == pytest.approx(var_p, abs=1e-10)
    rows = [sum(float(v) for v, m in zip(xr, mr) if m) for xr, mr in zip(x.tolist(), mask.tolist())]
    counts = [sum(mr) for mr in mask.tolist()]
    torch.testing.assert_close(ops.masked_sum(x, mask, dim=1), torch.tensor(rows, dtype=F64), **TOL)
    torch.testing.assert_close(ops.masked_mean(x, mask, dim=1), torch.tensor([s / c if c else 0.0 for s, c in zip(rows, counts)], dtype=F64), **TOL)
    white = ops.masked_whiten(x, mask, eps=1e-8)
    expected = [[(v - mean) / math.sqrt(var_b + 1e-8) if m else 0.0 for v, m in zip(xr, mr)] for xr, mr in zip(x.tolist(), mask.tolist())]
    torch.testing.assert_close(white, torch.tensor(expected, dtype=F64), atol=1e-9, rtol=1e-9)
    # Whitened entries: mean 0, Bessel std sqrt(var / (var + eps)). 1e-9: when all selected values are
    # equal, the float mean may miss them by an ulp (~2e-15), which whitening divides by sqrt(eps) = 1e-4.
    out = selected(white, mask)
    if n >= 2:
        assert sum(out) / n == pytest.approx(0.0, abs=1e-9)
        std = math.sqrt(sum(v * v for v in out) / (n - 1))
        assert std == pytest.approx(math.sqrt(var_b / (var_b + 1e-8)), abs=1e-9)


# -- groups -------------------------------------------------------------------------------------------


def test_group_stats_by_hand_with_sparse_unsorted_ids() -> None:
    x = torch.tensor([1.0, 10.0, 3.0, 5.0, -2.0, 7.0], dtype=F64)
    g = torch.tensor([42, -3, 42, 9, -3, 42])
    # Group 42: {1, 3, 7} sum 11, mean 11/3, deviations (-8/3, -2/3, 10/3): squares sum (64+4+100)/9 = 168/9,
    # Bessel var 168/18 = 28/3. Group -3: {10, -2} sum 8, mean 4, var (36+36)/1 = 72. Group 9: {5}, singleton.
    index, k = ops.group_index(g)
    assert k == 3
    assert torch.equal(index, torch.tensor([2, 0, 2, 1, 0, 2]))  # dense ids follow sorted order: -3 -> 0, 9 -> 1, 42 -> 2
    torch.testing.assert_close(ops.group_sum(x, g), torch.tensor([11.0, 8.0, 11.0, 5.0, 8.0, 11.0], dtype=F64), **TOL)
    assert torch.equal(ops.group_count(g), torch.tensor([3.0, 2.0, 3.0, 1.0, 2.0, 3.0], dtype=F64))
    torch.testing.assert_close(ops.group_mean(x, g), torch.tensor([11 / 3, 4.0, 11 / 3, 5.0, 4.0, 11 / 3], dtype=F64), **TOL)
    s42, s3 = math.sqrt(28 / 3), math.sqrt(72)
    torch.testing.assert_close(ops.group_std(x, g), torch.tensor([s42, s3, s42, 1.0, s3, s42], dtype=F64), **TOL)
    torch.testing.assert_close(ops.group_std(x, g, singleton=0.0), torch.tensor([s42, s3, s42, 0.0, s3, s42], dtype=F64), **TOL)


@settings(deadline=None, max_examples=40)
@given(st.lists(st.tuples(st.integers(1, 9), finite), min_size=1, max_size=4))
def test_group_mean_of_equal_values_is_exact(levels: list[tuple[int, float]]) -> None:
    # A group of n copies of v has mean exactly v and std exactly 0, for any float v (a plain
    # sum / count misses by an ulp for, e.g., three copies of 0.1: 0.30000000000000004 / 3).
    x = torch.tensor([v for n, v in levels for _ in range(n)], dtype=F64)
    g = torch.tensor([k for k, (n, _) in enumerate(levels) for _ in range(n)])
    assert torch.equal(ops.group_mean(x, g), x)
    assert torch.equal(ops.group_std(x, g, singleton=0.0), torch.zeros_like(x))


def test_group_index_of_an_empty_batch() -> None:
    index, k = ops.group_index(torch.zeros(0, dtype=torch.long))
    assert k == 0 and index.numel() == 0


@settings(deadline=None, max_examples=40)
@given(grouped_vectors())
def test_group_stats_match_a_loop(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, g = data
    members: dict[int, list[float]] = {}
    for v, gid in zip(x.tolist(), g.tolist()):
        members.setdefault(gid, []).append(v)
    sums, means, stds = [], [], []
    for gid in g.tolist():
        vals = members[gid]
        m = sum(vals) / len(vals)
        sums.append(sum(vals))
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.5)
    torch.testing.assert_close(ops.group_sum(x, g), torch.tensor(sums, dtype=F64), **TOL)
    torch.testing.assert_close(ops.group_count(g), torch.tensor([float(len(members[i])) for i in g.tolist()], dtype=F64), **TOL)
    torch.testing.assert_close(ops.group_mean(x, g), torch.tensor(means, dtype=F64), **TOL)
    torch.testing.assert_close(ops.group_std(x, g, singleton=0.5), torch.tensor(stds, dtype=F64), atol=1e-12, rtol=1e-12)
    index, k = ops.group_index(g)
    assert k == len(members)
    # Dense ids are a bijection onto 0..K-1 that preserves equality of the original ids.
    for a in range(len(g)):
        for b in range(len(g)):
            assert (index[a] == index[b]).item() == (g[a] == g[b]).item()


@settings(deadline=None, max_examples=40)
@given(grouped_vectors())
def test_to_groups_lays_out_each_group_in_row_order(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, g = data
    gather, valid, rows = ops.to_groups(g)
    ids = sorted(set(g.tolist()))
    width = max(g.tolist().count(i) for i in ids)
    assert gather.shape == valid.shape == (len(ids), width)
    for k, gid in enumerate(ids):
        members = [i for i, v in enumerate(g.tolist()) if v == gid]  # rows of this group, in batch order
        assert gather[k][valid[k]].tolist() == members
        assert valid[k].tolist() == [True] * len(members) + [False] * (width - len(members))
    # Round trip: per-slot values mapped back to [B] give each row its own value.
    assert torch.equal(x[gather].flatten()[rows], x)


# -- reward placement and returns ------------------------------------------------------------------------


def test_last_token_and_placement_by_hand() -> None:
    mask = torch.tensor([[True, True, False, False], [False, False, False, False], [True, False, True, False], [True, True, True, True]])
    # Last valid positions: 1, none, 2 (padding inside a row is skipped over), 3.
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 1] = expected[2, 2] = expected[3, 3] = True
    assert torch.equal(ops.last_token(mask), expected)
    rewards = torch.tensor([1.5, 7.0, -2.0, 0.25], dtype=F64)
    placed = torch.zeros(4, 4, dtype=F64)
    placed[0, 1], placed[2, 2], placed[3, 3] = 1.5, -2.0, 0.25  # row 1 has no valid token: its reward has nowhere to go
    assert torch.equal(ops.sequence_to_token_rewards(rewards, mask), placed)


def test_broadcast_and_sequence_rewards_by_hand() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False]])
    seq = torch.tensor([2.0, -1.0], dtype=F64)
    assert torch.equal(ops.broadcast_to_tokens(seq, mask), torch.tensor([[2.0, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64))
    tok = torch.tensor([[1.0, NAN, 3.0], [INF, 2.0, 4.0]], dtype=F64)
    assert torch.equal(ops.broadcast_to_tokens(tok, mask), torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]], dtype=F64))
    # [B] rewards come back as given; [B, T] are summed over valid tokens (1 + 3; nothing in row 1).
    assert ops.sequence_rewards(seq, mask) is seq
    assert torch.equal(ops.sequence_rewards(tok, mask), torch.tensor([4.0, 0.0], dtype=F64))


def test_discounted_returns_by_hand() -> None:
    rew = torch.tensor([[1.0, 2.0, 3.0, NAN], [1.0, 5.0, 2.0, 4.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    g = 0.5
    # Row 0: G_2 = 3, G_1 = 2 + 0.5*3 = 3.5, G_0 = 1 + 0.5*3.5 = 2.75, padding 0.
    # Row 1: position 1 is padding (skipped, not a discount step): G_3 = 4, G_2 = 2 + 0.5*4 = 4,
    #        G_0 = 1 + 0.5*4 = 3 (position 1's reward 5 is ignored).
    expected = torch.tensor([[2.75, 3.5, 3.0, 0.0], [3.0, 0.0, 4.0, 4.0]], dtype=F64)
    torch.testing.assert_close(ops.discounted_returns(rew, mask, g), expected, **TOL)


@settings(deadline=None, max_examples=40)
@given(masked_matrices(), st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_discounted_returns_match_a_loop(data: tuple[torch.Tensor, torch.Tensor], gamma: float) -> None:
    rew, mask = data
    expected = torch.zeros_like(rew)
    for i in range(rew.shape[0]):
        running = 0.0
        for t in reversed(range(rew.shape[1])):
            if mask[i, t]:
                running = float(rew[i, t]) + gamma * running
                expected[i, t] = running
    torch.testing.assert_close(ops.discounted_returns(rew, mask, gamma), expected, atol=1e-11, rtol=0.0)


# -- KL estimators and log-ratios ----------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0)), min_size=1, max_size=8))
def test_kl_estimators_match_their_formulas(pairs: list[tuple[float, float]]) -> None:
    lp = torch.tensor([[a for a, _ in pairs]], dtype=F64)
    ref = torch.tensor([[b for _, b in pairs]], dtype=F64)
    d = [min(max(a - b, -20.0), 20.0) for a, b in pairs]  # clamped log-ratio
    torch.testing.assert_close(ops.kl_estimate(lp, ref, "k1"), torch.tensor([d], dtype=F64), **TOL)
    torch.testing.assert_close(ops.kl_estimate(lp, ref, "k2"), torch.tensor([[0.5 * v * v for v in d]], dtype=F64), atol=1e-12, rtol=1e-14)
    k3 = [math.exp(-v) - 1 + v for v in d]
    torch.testing.assert_close(ops.kl_estimate(lp, ref, "k3"), torch.tensor([k3], dtype=F64), atol=1e-12, rtol=1e-13)
    assert bool((ops.kl_estimate(lp, ref, "k2") >= 0).all()) and bool((ops.kl_estimate(lp, ref, "k3") >= 0).all())
    torch.testing.assert_close(ops.log_ratio(lp, ref), torch.tensor([d], dtype=F64), **TOL)


def test_kl_estimators_vanish_at_the_reference_and_clamp_extremes() -> None:
    lp = torch.tensor([[-1.0, -3.0, -60.0, -0.1]], dtype=F64)
    ref = torch.tensor([[-1.0, -3.0, -0.1, -60.0]], dtype=F64)
    # d = 0, 0, -59.9 -> -20, 59.9 -> 20.
    assert torch.equal(ops.kl_estimate(lp, ref, "k1"), torch.tensor([[0.0, 0.0, -20.0, 20.0]], dtype=F64))
    assert torch.equal(ops.kl_estimate(lp, ref, "k2"), torch.tensor([[0.0, 0.0, 200.0, 200.0]], dtype=F64))
    k3 = ops.kl_estimate(lp, ref, "k3")
    torch.testing.assert_close(k3, torch.tensor([[0.0, 0.0, math.exp(20) - 21, math.exp(-20) + 19]], dtype=F64), atol=1e-12, rtol=1e-14)
    assert ops.LOG_RATIO_CLAMP == 20.0
    assert torch.equal(ops.log_ratio(lp, ref), torch.tensor([[0.0, 0.0, -20.0, 20.0]], dtype=F64))


def test_unknown_kl_estimator_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; choose 'k1', 'k2' or 'k3'"):
        ops.kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
