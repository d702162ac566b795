"""DRPO's `quadratic` region (arXiv 2606.09821, Eq. 8) and its SPO reduction (`mu_weighted=False`).

g = -d loss / d lp per token on a float64 leaf (docs/invariants.md, conventions). Closed forms (invariants 20, 26):
  loss = -A r + |A| mu (r - 1)^2 / (2 delta)
  g    = A r w,  w = 1 - sign(A) (p - mu) / delta        (DRPO; mu (r - 1) = p - mu)
  w    = 1 - sign(A) (r - 1) / delta                      (SPO)
Expected values come from plain-Python evaluations of these formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from stage_two import coefficients

import proxim
from proxim_plugins.dppo import DivergenceMask
from proxim_plugins.drpo import Quadratic

F64 = torch.float64
ATOL = 1e-12


def sign(x: float) -> float:
    return (x > 0) - (x < 0)


def ref_drpo(p: float, mu: float, a: float, delta: float, mu_weighted: bool = True) -> tuple[float, float, float]:
    """(loss, g, w) from the closed forms, with r = p / mu."""
    r = p / mu
    scale = mu if mu_weighted else 1.0
    loss = -a * r + abs(a) * scale * (r - 1) ** 2 / (2 * delta)
    w = 1 - sign(a) * scale * (r - 1) / delta
    return loss, a * r * w, w


def scale_of(p: float, mu: float, a: float, delta: float) -> float:
    """The size of the terms in g, for a rounding tolerance: |A| r (1 + 1/delta) (r up to 99 here)."""
    return abs(a) * (p / mu) * (1 + 1 / delta)


probability = st.floats(0.01, 0.99)
advantage = st.floats(-3.0, 3.0).map(lambda a: a if abs(a) > 1e-6 else 0.0)
delta_st = st.floats(0.05, 1.0)


def one(p: float, mu: float, a: float, region: Quadratic):  # type: ignore[no-untyped-def]
    loss, g = coefficients(region, [[math.log(p)]], [[math.log(mu)]], [[a]])
    return float(loss), float(g)


def exact(p: float) -> float:
    """The probability the region sees: exp(log p) in float64."""
    return math.exp(math.log(p))


def test_by_hand() -> None:
    # mu = 0.5, p = 0.6 (r = 1.2), A = 2, delta = 0.5:
    #   DRPO: loss = -2*1.2 + 2*0.5*0.2^2/(2*0.5) = -2.4 + 0.04 = -2.36;  w = 1 - 0.1/0.5 = 0.8,  g = 2*1.2*0.8 = 1.92.
    #   SPO:  loss = -2.4 + 2*0.2^2/(2*0.5) = -2.32;                       w = 1 - 0.2/0.5 = 0.6,  g = 1.44.
    # A = -2 at the same point: loss = 2.4 + 0.04 = 2.44, w = 1 + 0.2 = 1.2, g = -2*1.2*1.2 = -2.88.
    lp, anchor = [[math.log(0.6), math.log(0.6)]], [[math.log(0.5), math.log(0.5)]]
    loss, g = coefficients(Quadratic(delta=0.5), lp, anchor, [[2.0, -2.0]])
    torch.testing.assert_close(loss, torch.tensor([[-2.36, 2.44]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g, torch.tensor([[1.92, -2.88]], dtype=F64), rtol=0, atol=ATOL)
    loss, g = coefficients(Quadratic(delta=0.5, mu_weighted=False), lp, anchor, [[2.0, -2.0]])
    torch.testing.assert_close(loss, torch.tensor([[-2.32, 2.48]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g, torch.tensor([[1.44, -2.4 * 1.4]], dtype=F64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mu_weighted", [True, False])
@settings(deadline=None, max_examples=60)
@given(probability, probability, advantage, delta_st)
def test_loss_and_weight_formula(mu_weighted: bool, p: float, mu: float, a: float, delta: float) -> None:
    # Invariants 20 and 26: g == A r (1 - sign(A) (p - mu)/delta) (DRPO), A r (1 - sign(A)(r - 1)/delta) (SPO).
    p, mu = exact(p), exact(mu)
    loss, g = one(p, mu, a, Quadratic(delta=delta, mu_weighted=mu_weighted))
    ref_loss, ref_g, _ = ref_drpo(p, mu, a, delta, mu_weighted)
    tol = ATOL * max(1.0, scale_of(p, mu, a, delta) * (1 if mu_weighted else 1 / mu))
    assert abs(g - ref_g) <= tol
    assert abs(loss - ref_loss) <= tol


@settings(deadline=None, max_examples=60)
@given(probability, advantage.filter(lambda a: a != 0), delta_st, st.floats(1e-4, 0.5))
def test_boundary_zero_and_corrective_beyond(mu: float, a: float, delta: float, beyond: float) -> None:
    # Invariant 21: at p - mu = sign(A) delta, g == 0; beyond it sign(g) == -sign(A) (corrective); on the
    # converging side (sign(A)(p - mu) < 0), |g| > |A r| (w > 1).
    region = Quadratic(delta=delta)
    boundary = mu + sign(a) * delta
    if 0 < boundary < 1:
        _, g = one(boundary, mu, a, region)
        assert abs(g) <= ATOL * max(1.0, scale_of(boundary, mu, a, delta))
    past = mu + sign(a) * (delta + beyond)
    if 0 < past < 1:
        _, g = one(past, mu, a, region)
        assert sign(g) == -sign(a)
    back = mu - sign(a) * beyond * mu
    _, g = one(back, mu, a, region)
    assert abs(g) > abs(a) * exact(back) / exact(mu)


@settings(deadline=None, max_examples=60)
@given(probability, probability, advantage.filter(lambda a: a != 0), delta_st)
def test_weight_is_bounded_but_spo_is_not(p: float, mu: float, a: float, delta: float) -> None:
    # Invariant 22: 1 - 1/delta <= w <= 1 + 1/delta for p, mu in (0, 1); tighter for A > 0: [1 - (1-mu)/delta, 1 + mu/delta].
    _, g = one(p, mu, a, Quadratic(delta=delta))
    w = g / (a * exact(p) / exact(mu))
    slack = 1e-12 * (1 + 1 / delta)
    assert 1 - 1 / delta - slack <= w <= 1 + 1 / delta + slack
    if a > 0:
        assert 1 - (1 - mu) / delta - slack <= w <= 1 + mu / delta + slack


def test_spo_weight_is_unbounded_as_mu_goes_to_zero() -> None:
    # Invariant 22 (contrast): p = 0.5 fixed, mu = 1e-4 (r = 5000), delta = 0.5, A = 1: SPO's w = 1 - 4999/0.5 = -9997,
    # far outside DRPO's [1 - 1/delta, 1 + 1/delta] = [-1, 3]; DRPO's w = 1 - (0.5 - 1e-4)/0.5 = 2e-4.
    _, g_spo = one(0.5, 1e-4, 1.0, Quadratic(delta=0.5, mu_weighted=False))
    _, g_drpo = one(0.5, 1e-4, 1.0, Quadratic(delta=0.5))
    r = exact(0.5) / exact(1e-4)
    assert abs(g_spo / r - (1 - (r - 1) / 0.5)) <= 1e-9
    assert abs(g_drpo / r - 2e-4) <= 1e-12


@settings(deadline=None, max_examples=60)
@given(st.floats(0.05, 0.95), advantage.filter(lambda a: a != 0), delta_st, st.floats(-0.04, 0.04), st.floats(1e-3, 0.04))
def test_weight_is_affine_in_p_across_the_boundary(mu: float, a: float, delta: float, offset: float, step: float) -> None:
    # Invariant 23: w is affine in p with slope -sign(A)/delta, with no jump at the boundary (unlike DPPO's M):
    # finite differences over three points around p = mu + sign(A) delta + offset all equal the slope.
    centre = mu + sign(a) * delta + offset
    points = [centre - step, centre, centre + step]
    assume(all(0.001 < q < 0.999 for q in points))
    ws = []
    for q in points:
        _, g = one(q, mu, a, Quadratic(delta=delta))
        ws.append(g / (a * exact(q) / exact(mu)))
    for (q0, w0), (q1, w1) in zip(zip(points, ws), zip(points[1:], ws[1:])):
        assert abs((w1 - w0) / (exact(q1) - exact(q0)) + sign(a) / delta) <= 1e-8 * (1 + 1 / delta) / step


@settings(deadline=None, max_examples=40)
@given(probability, probability, delta_st, st.floats(1e-12, 1e-6))
def test_advantage_times_weight_is_continuous_at_zero(p: float, mu: float, delta: float, h: float) -> None:
    # Invariant 23: A w = A - |A| (p - mu)/delta -> 0 as A -> 0 from either side, and g == 0 at A == 0.
    region = Quadratic(delta=delta)
    r = exact(p) / exact(mu)
    for a in (h, -h):
        _, g = one(p, mu, a, region)
        assert abs(g) <= h * r * (1 + 1 / delta) * (1 + 1e-12)
    assert one(p, mu, 0.0, region)[1] == 0.0


@settings(deadline=None, max_examples=60)
@given(probability, probability, advantage.filter(lambda a: a != 0), st.floats(0.02, 0.3))
def test_agrees_with_dppo_tv_on_signs(p: float, mu: float, a: float, delta: float) -> None:
    # Invariant 24: same delta, Binary-TV, A != 0: M == 0 <=> w < 0 and M == 1 <=> w >= 0; at p == mu, w == M == 1.
    assume(abs(abs(exact(p) - exact(mu)) - delta) > 1e-9)
    _, g_drpo = one(p, mu, a, Quadratic(delta=delta))
    _, g_dppo = coefficients(DivergenceMask(delta_low=delta, delta_high=delta), [[math.log(p)]], [[math.log(mu)]], [[a]])
    w_negative = sign(g_drpo) == -sign(a)
    assert (float(g_dppo) == 0.0) == w_negative
    _, g_drpo_at = one(mu, mu, a, Quadratic(delta=delta))
    _, g_dppo_at = coefficients(DivergenceMask(delta_low=delta, delta_high=delta), [[math.log(mu)]], [[math.log(mu)]], [[a]])
    assert g_drpo_at == a and float(g_dppo_at) == a


@settings(deadline=None, max_examples=60)
@given(st.floats(0.02, 0.98), st.floats(-1.0, 1.0), advantage, delta_st)
def test_mirror_symmetric_in_the_probability_shift(mu: float, u: float, a: float, delta: float) -> None:
    # Invariant 29: g(p - mu, A)/r == -g(-(p - mu), -A)/r' (both equal A w, and w is unchanged by the mirror).
    shift = u * min(mu, 1 - mu) * 0.99
    anchor = torch.full((1, 2), math.log(mu), dtype=F64)
    lp = torch.tensor([[math.log(mu + shift), math.log(mu - shift)]], dtype=F64)
    _, g = coefficients(Quadratic(delta=delta), lp, anchor, [[a, -a]])
    per_r = g / (lp - anchor).exp()
    assert abs(float(per_r[0, 0] + per_r[0, 1])) <= ATOL * max(1.0, abs(a) * (1 + 1 / delta))


@settings(deadline=None, max_examples=60)
@given(probability, probability, advantage, delta_st)
def test_penalty_is_nonnegative_zero_only_at_mu_and_even_in_the_advantage(p: float, mu: float, a: float, delta: float) -> None:
    # Invariant 25: penalty = loss + A r >= 0; = 0 iff p == mu or A == 0; depends on |A| only.
    region = Quadratic(delta=delta)
    p, mu = exact(p), exact(mu)
    r = math.exp(math.log(p) - math.log(mu))
    loss, _ = one(p, mu, a, region)
    loss_neg, _ = one(p, mu, -a, region)
    penalty, penalty_neg = loss + a * r, loss_neg - a * r
    tol = 1e-14 * max(1.0, abs(a) * r)
    assert penalty >= -tol
    assert abs(penalty - penalty_neg) <= tol
    expected = abs(a) * mu * (r - 1) ** 2 / (2 * delta)
    assert abs(penalty - expected) <= tol
    if a == 0 or p == mu:
        assert penalty == 0.0
    elif abs(p - mu) >= 1e-3 and abs(a) >= 1e-3:
        assert penalty > tol


@settings(deadline=None, max_examples=40)
@given(st.floats(0.05, 0.95), advantage.filter(lambda a: a != 0), delta_st)
def test_per_token_objective_peaks_at_the_dppo_boundary(mu: float, a: float, delta: float) -> None:
    # Invariant 25: as a function of p alone, j(p) = A p/mu - |A| (p - mu)^2 / (2 delta mu) peaks at
    # p* = clip(mu + sign(A) delta, 0, 1). Evaluate j on a grid of p in (0, 1) and find its argmax.
    grid = torch.linspace(1e-4, 1 - 1e-4, 4001, dtype=F64).unsqueeze(0)
    anchor = torch.full_like(grid, math.log(mu))
    loss, _ = coefficients(Quadratic(delta=delta), grid.log(), anchor, torch.full_like(grid, a))
    best = float(grid[0, int(torch.argmin(loss))])
    target = min(max(mu + sign(a) * delta, 1e-4), 1 - 1e-4)
    assert abs(best - target) <= 1.5 * float(grid[0, 1] - grid[0, 0])


def test_region_metrics_by_hand() -> None:
    # delta 0.1, mu = 0.5, token mean over 4 valid tokens (one padded with NaN log-probs):
    #   p = 0.65, A = +1: r = 1.3, w = 1 - 0.5*0.3/0.1 = -0.5 (beyond, high side);  p = 0.55, A = +1: w = 0.5;
    #   p = 0.35, A = -1: r = 0.7, w = 1 + 0.5*(-0.3)/0.1 = -0.5 (beyond, low side);  p = 0.6, A = 0: w = 1 (sign 0).
    # clip_fraction_high = clip_fraction_low = 1/4; weight_mean = (-0.5 + 0.5 - 0.5 + 1)/4 = 0.125.
    # loss/policy: -A r + |A| mu (r-1)^2/(2 delta) = [-1.3 + 0.225] + [-1.1 + 0.025] + [0.7 + 0.225] + 0 = -1.225,
    # over 4 tokens: -0.30625.
    old = torch.full((1, 5), math.log(0.5), dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.zeros(1, dtype=F64))
    lp = torch.tensor([[math.log(0.65), math.log(0.55), math.log(0.35), math.log(0.6), float("nan")]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0, 0.0]], dtype=F64)
    obj = proxim.objective(advantage="diff", region="quadratic", delta=0.1, aggregation="token_mean")
    m = obj.loss(lp.requires_grad_(True), batch, proxim.Estimate(advantages=adv)).metrics
    expected = {"region/clip_fraction_high": 0.25, "region/clip_fraction_low": 0.25, "region/weight_mean": 0.125, "loss/policy": -0.30625}
    for key, value in expected.items():
        torch.testing.assert_close(m[key], torch.tensor(value, dtype=F64), rtol=0, atol=ATOL, msg=key)


def test_preset_uses_the_reference_recipe() -> None:
    # Reference recipe (docs/presets.md, drpo): delta 12.5 (literal reading), mu-weighted, token sum / L_max, no KL, no std.
    obj = proxim.objective("drpo")
    assert (obj.region.delta, obj.region.mu_weighted) == (12.5, True)
    assert (obj.options.aggregation, obj.options.kl_coef, obj.advantage.scale) == ("seq_mean_token_sum_norm", 0.0, "none")


def test_weight_mean_is_one_at_the_anchor() -> None:
    # At p = mu every token's w is 1 (A = 0 included: sign(0) = 0), so the metric reads exactly 1.
    old = torch.tensor([[-0.5, -1.0, -2.0]], dtype=F64)
    batch = proxim.Rollout(old_logprobs=old, mask=torch.ones(1, 3, dtype=torch.bool), rewards=torch.zeros(1, dtype=F64))
    obj = proxim.objective(advantage="diff", region="quadratic", delta=0.1)
    adv = torch.tensor([[1.0, 0.0, -2.0]], dtype=F64)
    m = obj.loss(old.clone().requires_grad_(True), batch, proxim.Estimate(advantages=adv)).metrics
    assert float(m["region/weight_mean"]) == 1.0
    assert float(m["region/clip_fraction_high"]) == 0.0 and float(m["region/clip_fraction_low"]) == 0.0
