"""Trust regions `clip` (asymmetric, dual clip), `none` and `cispo`; invariants shared by every built-in region;
region metrics; bad input to stage 2.

Convention (docs/invariants.md, conventions): log-probs are a float64 leaf tensor and `g = -d loss / d lp` is each
token's effective coefficient. A region's loss is per token [B, T], so autograd of its sum gives g per
token. Expected values come from plain-Python references written from the formulas, never from the code
under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from stage_two import coefficients

import proxim
from proxim_plugins.cispo import CISPO
from proxim_plugins.dppo import DivergenceMask
from proxim_plugins.drpo import Quadratic
from proxim_plugins.gspo import SequenceClip
from proxim_plugins.ppo import Clip, NoRegion

F64 = torch.float64
ATOL = 1e-12
#: The presets this distribution ships (third-party plugins installed beside it are not under test here).
PRESETS = sorted(name for name, info in proxim.available()["preset"].items() if info.distribution == "proxim")


def tokens(log_ratio=(-1.5, 1.5), adv=(-3.0, 3.0), size=(1, 12)):  # type: ignore[no-untyped-def]
    """Lists of (anchor log-prob, log-ratio, advantage) for one row of tokens."""
    advantage = st.floats(*adv).map(lambda a: a if abs(a) > 1e-6 else 0.0)  # no subnormal products
    token = st.tuples(st.floats(-6.0, -0.01), st.floats(*log_ratio), advantage)
    return st.lists(token, min_size=size[0], max_size=size[1])


def row(toks):  # type: ignore[no-untyped-def]
    """[1, n] tensors (lp, anchor, adv) from `tokens()` draws; lp = anchor + log-ratio in float64."""
    anchor = torch.tensor([[a for a, _, _ in toks]], dtype=F64)
    lp = anchor + torch.tensor([[x for _, x, _ in toks]], dtype=F64)
    adv = torch.tensor([[a for _, _, a in toks]], dtype=F64)
    return lp, anchor, adv


def ratios(lp, anchor):  # type: ignore[no-untyped-def]
    """Plain-Python r = exp(lp - anchor) from the same float64 values the region sees."""
    return [math.exp(a - b) for a, b in zip(lp.flatten().tolist(), anchor.flatten().tolist())]


def far_from(values, bounds, gap=1e-9):  # type: ignore[no-untyped-def]
    return all(abs(v - b) > gap for v in values for b in bounds)


# -- PPO clip: independent reference (docs/parts.md, clip) ----------------------------------------------


def ref_clip(r: float, a: float, eps_low: float, eps_high: float, c: float | None = None) -> tuple[float, float]:
    """(j, g) of the clipped surrogate by cases.

    j = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), and with dual clip c, for A < 0: max(j, c A).
    g: the unclipped branch r A is the min (so g = A r) unless the ratio already moved past the bound in
    the direction A pushes: A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low, where the min is the
    constant clipped branch (g = 0). Dual clip: A < 0 and r > c makes j the constant c A (g = 0).
    """
    low, high = 1.0 - eps_low, 1.0 + eps_high
    j = min(r * a, min(max(r, low), high) * a)
    if a > 0:
        g = a * r if r < high else 0.0
    elif a < 0:
        g = a * r if r > low else 0.0
    else:
        g = 0.0
    if c is not None and a < 0:
        j = max(j, c * a)
        if r > c:
            g = 0.0
    return j, g


def test_clip_by_hand() -> None:
    # eps 0.2; ratios 1.5, 0.5, 0.5, 1.1 with advantages +1, +1, -1, -2:
    #   r=1.5, A=+1: min(1.5, 1.2) = 1.2 (clipped, g = 0)
    #   r=0.5, A=+1: min(0.5, 0.8) = 0.5 (not clipped: moving against A; g = A r = 0.5)
    #   r=0.5, A=-1: min(-0.5, -0.8) = -0.8 (clipped, g = 0)
    #   r=1.1, A=-2: min(-2.2, -2.2) = -2.2 (inside; g = A r = -2.2)
    anchor = torch.full((1, 4), -1.0, dtype=F64)
    lp = anchor + torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1)]], dtype=F64)
    loss, g = coefficients(Clip(), lp, anchor, [[1.0, 1.0, -1.0, -2.0]])
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 0.8, 2.2]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.5, 0.0, -2.2]], dtype=F64), rtol=0, atol=ATOL)


def test_dual_clip_by_hand() -> None:
    # c = 3, A = -1: r = 4 > c gives j = c A = -3 (g = 0); r = 2 < c gives j = min(-2, -1.2) = -2 (g = -2);
    # A = +1, r = 4: plain PPO clip, j = 1.2, g = 0.
    anchor = torch.full((1, 3), -2.0, dtype=F64)
    lp = anchor + torch.tensor([[math.log(4.0), math.log(2.0), math.log(4.0)]], dtype=F64)
    loss, g = coefficients(Clip(dual_clip=3.0), lp, anchor, [[-1.0, -1.0, 1.0]])
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0, -1.2]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g, torch.tensor([[0.0, -2.0, 0.0]], dtype=F64), rtol=0, atol=ATOL)


@settings(deadline=None, max_examples=60)
@given(tokens(), st.floats(0.05, 0.5), st.floats(0.05, 0.5))
def test_clip_matches_reference_and_zero_gradient_region(toks, eps_low: float, eps_high: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 14: g == 0 exactly when (A > 0 and r > 1 + eps_high) or (A < 0 and r < 1 - eps_low), else A r.
    lp, anchor, adv = row(toks)
    r = ratios(lp, anchor)
    assume(far_from(r, (1 - eps_low, 1 + eps_high)))
    loss, g = coefficients(Clip(eps_low=eps_low, eps_high=eps_high), lp, anchor, adv)
    expected = [ref_clip(ri, a, eps_low, eps_high) for ri, a in zip(r, adv.flatten().tolist())]
    torch.testing.assert_close(loss.flatten(), torch.tensor([-j for j, _ in expected], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g.flatten(), torch.tensor([gg for _, gg in expected], dtype=F64), rtol=0, atol=ATOL)
    zero = [(a > 0 and ri > 1 + eps_high) or (a < 0 and ri < 1 - eps_low) or a == 0 for ri, a in zip(r, adv.flatten().tolist())]
    assert (g.flatten() == 0).tolist() == zero


@settings(deadline=None, max_examples=40)
@given(tokens(), st.floats(0.05, 0.5), st.floats(0.05, 0.5))
def test_clip_is_pessimistic_and_symmetric_eps_is_the_asymmetric_special_case(toks, eps_low: float, eps_high: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 15: j_clip <= r A pointwise; eps_high=None equals eps_high=eps_low exactly.
    lp, anchor, adv = row(toks)
    loss, _ = coefficients(Clip(eps_low=eps_low, eps_high=eps_high), lp, anchor, adv)
    r_times_a = torch.tensor(ratios(lp, anchor), dtype=F64) * adv.flatten()
    assert bool((-loss.flatten() <= r_times_a + ATOL).all())
    sym_loss, sym_g = coefficients(Clip(eps_low=eps_low), lp, anchor, adv)
    asym_loss, asym_g = coefficients(Clip(eps_low=eps_low, eps_high=eps_low), lp, anchor, adv)
    assert torch.equal(sym_loss, asym_loss) and torch.equal(sym_g, asym_g)


@pytest.mark.parametrize("a", [-1.5, 0.7])
@pytest.mark.parametrize("bound", [0.8, 1.28])
def test_clip_objective_is_continuous_at_the_bounds(a: float, bound: float) -> None:
    # Invariant 15: j is continuous in r; across a bound it moves by at most |A| * (change in r).
    h = 1e-7
    anchor = torch.full((1, 2), -1.0, dtype=F64)
    lp = anchor + torch.tensor([[math.log(bound - h), math.log(bound + h)]], dtype=F64)
    loss, _ = coefficients(Clip(eps_low=0.2, eps_high=0.28), lp, anchor, [[a, a]])
    assert abs(float(loss[0, 0] - loss[0, 1])) <= abs(a) * 2 * h * (1 + 1e-6)


@settings(deadline=None, max_examples=60)
@given(tokens(log_ratio=(-1.5, 2.0)), st.floats(0.05, 0.5), st.floats(0.05, 0.5), st.floats(1.5, 4.0))
def test_dual_clip_matches_reference(toks, eps_low: float, eps_high: float, c: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 16: for A < 0 and r > c, j == c A and g == 0; positive advantages are PPO-clip's exactly.
    lp, anchor, adv = row(toks)
    r = ratios(lp, anchor)
    assume(far_from(r, (1 - eps_low, 1 + eps_high, c)))
    loss, g = coefficients(Clip(eps_low=eps_low, eps_high=eps_high, dual_clip=c), lp, anchor, adv)
    expected = [ref_clip(ri, a, eps_low, eps_high, c) for ri, a in zip(r, adv.flatten().tolist())]
    torch.testing.assert_close(loss.flatten(), torch.tensor([-j for j, _ in expected], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g.flatten(), torch.tensor([gg for _, gg in expected], dtype=F64), rtol=0, atol=ATOL)
    plain_loss, plain_g = coefficients(Clip(eps_low=eps_low, eps_high=eps_high), lp, anchor, adv)
    keep = adv >= 0
    assert torch.equal(loss[keep], plain_loss[keep]) and torch.equal(g[keep], plain_g[keep])


@settings(deadline=None, max_examples=40)
@given(tokens(), st.floats(0.05, 0.5), st.floats(0.05, 0.5))
def test_clip_equals_its_mask_form(toks, eps_low: float, eps_high: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 17: grad of M sg(r) A lp, with M = 0 iff (A > 0, r > 1 + eps_high) or (A < 0, r < 1 - eps_low),
    # equals the min/clip form's gradient off the boundaries. The mask form is written here, in torch.
    lp, anchor, adv = row(toks)
    assume(far_from(ratios(lp, anchor), (1 - eps_low, 1 + eps_high)))
    _, g = coefficients(Clip(eps_low=eps_low, eps_high=eps_high), lp, anchor, adv)
    leaf = lp.clone().requires_grad_(True)
    r = (leaf - anchor).exp().detach()
    keep = ~(((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low)))
    (mask_grad,) = torch.autograd.grad((keep.to(F64) * r * adv * leaf).sum(), leaf)
    torch.testing.assert_close(g, mask_grad, rtol=1e-13, atol=ATOL)


# -- none (PG-IS) and CISPO ----------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(tokens())
def test_none_is_importance_weighted_policy_gradient(toks) -> None:  # type: ignore[no-untyped-def]
    # j = r A, g = A r (PG-IS, the importance-weighted policy gradient).
    lp, anchor, adv = row(toks)
    r = ratios(lp, anchor)
    loss, g = coefficients(NoRegion(), lp, anchor, adv)
    expected = torch.tensor([ri * a for ri, a in zip(r, adv.flatten().tolist())], dtype=F64)
    torch.testing.assert_close(loss.flatten(), -expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(g.flatten(), expected, rtol=0, atol=ATOL)


def test_cispo_by_hand() -> None:
    # eps_low 0.2, eps_high 0.28: r = 1.5 -> weight clip(1.5) = 1.28, r = 0.5 -> 0.8, r = 1.1 -> 1.1.
    # g = clip(r) A; the loss is ratio-valued: -clip(r) A (the sg-log form -clip(r) A lp has the same g).
    anchor = torch.full((1, 3), -0.5, dtype=F64)
    lp = anchor + torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]], dtype=F64)
    adv = [[2.0, -1.0, 3.0]]
    loss, g = coefficients(CISPO(eps_low=0.2, eps_high=0.28), lp, anchor, adv)
    torch.testing.assert_close(g, torch.tensor([[2.56, -0.8, 3.3]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(loss, torch.tensor([[-2.56, 0.8, -3.3]], dtype=F64), rtol=0, atol=ATOL)


def test_cispo_default_has_no_lower_bound() -> None:
    # eps_low 1.0 (the default, as the paper sets it large) means a lower bound of 0: r = 0.001 keeps its own
    # weight, g = A r = -0.002; r = 2 is capped at 1.28, g = 1.28 A = 2.56.
    anchor = torch.full((1, 2), -0.5, dtype=F64)
    lp = anchor + torch.tensor([[math.log(0.001), math.log(2.0)]], dtype=F64)
    _, g = coefficients(CISPO(), lp, anchor, [[-2.0, 2.0]])
    torch.testing.assert_close(g, torch.tensor([[-0.002, 2.56]], dtype=F64), rtol=0, atol=ATOL)


@settings(deadline=None, max_examples=60)
@given(tokens(log_ratio=(-6.0, 3.0)), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_cispo_weight_is_the_clipped_ratio_and_never_drops_a_token(toks, eps_low: float, eps_high: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 27: g == A clip(r, 1 - eps_low, 1 + eps_high) (lower bound 0 at most); never 0 when A != 0
    # (as long as the lower bound is > 0 or r > 0); |g| <= (1 + eps_high) |A|.
    lp, anchor, adv = row(toks)
    r = ratios(lp, anchor)
    low, high = max(1.0 - eps_low, 0.0), 1.0 + eps_high
    _, g = coefficients(CISPO(eps_low=eps_low, eps_high=eps_high), lp, anchor, adv)
    a_list = adv.flatten().tolist()
    expected = torch.tensor([a * min(max(ri, low), high) for ri, a in zip(r, a_list)], dtype=F64)
    torch.testing.assert_close(g.flatten(), expected, rtol=1e-14, atol=ATOL)
    nonzero = torch.tensor([a != 0 and min(max(ri, low), high) * abs(a) > 0 for ri, a in zip(r, a_list)])
    assert bool((g.flatten()[nonzero] != 0).all())
    assert bool((g.abs() <= (1 + eps_high) * adv.abs() * (1 + 1e-15)).all())


# -- invariants every built-in region satisfies ---------------------------------------------------------

REGIONS = {
    "clip": Clip(),
    "clip_asymmetric": Clip(eps_low=0.2, eps_high=0.28),
    "clip_zero_eps": Clip(eps_low=0.0, eps_high=0.0),
    "dual_clip": Clip(dual_clip=3.0),
    "none": NoRegion(),
    "divergence_mask_tv": DivergenceMask(),
    "divergence_mask_kl": DivergenceMask(divergence="kl"),
    "divergence_mask_tis": DivergenceMask(is_cap=1.0),
    "quadratic": Quadratic(delta=0.1),
    "spo": Quadratic(delta=0.2, mu_weighted=False),
    "sequence_clip": SequenceClip(),
    "sequence_clip_token": SequenceClip(token_level=True),
    "cispo": CISPO(),
    "cispo_zero_eps": CISPO(eps_low=0.0, eps_high=0.0),
}


def test_every_registered_region_is_covered_here() -> None:
    covered = {region.name for region in REGIONS.values()}
    builtin = {name for name, info in proxim.available()["region"].items() if info.distribution == "proxim"}
    assert builtin <= covered


@st.composite
def region_batches(draw):  # type: ignore[no-untyped-def]
    """(lp, anchor, adv, mask): [B, T] with ragged masks; advantages constant over each row's valid tokens
    half the time (what sequence_clip's per-token convention needs to equal A)."""
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    anchor = -(torch.rand(b, t, generator=g, dtype=F64) * 4 + 0.01)
    lp = anchor + torch.empty(b, t, dtype=F64).uniform_(-1.0, 1.0, generator=g)
    adv = torch.randn(b, t, generator=g, dtype=F64) * 2
    if draw(st.booleans()):
        adv = adv[:, :1].expand(b, t).clone()
    adv[torch.rand(b, t, generator=g) < 0.1] = 0.0
    zero = torch.zeros((), dtype=F64)
    return torch.where(mask, lp, zero), torch.where(mask, anchor, zero), torch.where(mask, adv, zero), mask


def _row_constant(adv: torch.Tensor, mask: torch.Tensor) -> bool:
    first = adv[:, :1].expand_as(adv)
    return bool(((adv == first) | ~mask).all())


@pytest.mark.parametrize("key", sorted(REGIONS))
@settings(deadline=None, max_examples=30)
@given(region_batches())
def test_at_the_anchor_g_is_the_advantage_and_the_loss_is_minus_it(key: str, data) -> None:  # type: ignore[no-untyped-def]
    # Invariant 13: at lp = anchor (r = 1 exactly) every shape has g == A; every proxim region is written
    # ratio-valued, so the per-token loss is exactly -A (CISPO's and DPPO's sg-log forms -A lp have the same g).
    # sequence_clip (GSPO) spreads a sequence's gradient over its tokens: summing its n_i per-token copies gives
    # g_t = mean of A over the row, = A when A is constant within the row.
    region = REGIONS[key]
    _, anchor, adv, mask = data
    if key == "sequence_clip" and not _row_constant(adv, mask):
        adv = torch.where(mask, adv[:, :1].expand_as(adv), torch.zeros((), dtype=F64))
    loss, g = coefficients(region, anchor, anchor, adv, mask)
    torch.testing.assert_close(g[mask], adv[mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(loss[mask], -adv[mask], rtol=0, atol=0)
    # Invariant 29 at r = 1: flipping A flips g.
    _, g_flipped = coefficients(region, anchor, anchor, -adv, mask)
    torch.testing.assert_close(g_flipped[mask], -g[mask], rtol=0, atol=ATOL)


@pytest.mark.parametrize("key", sorted(REGIONS))
@settings(deadline=None, max_examples=30)
@given(region_batches(), st.floats(0.01, 100.0))
def test_positively_homogeneous_in_the_advantage(key: str, data, a: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 30: j(a A) == a j(A) and g(a A) == a g(A) for a > 0 (masks and weights depend on sign(A) only).
    region = REGIONS[key]
    lp, anchor, adv, mask = data
    loss, g = coefficients(region, lp, anchor, adv, mask)
    loss_a, g_a = coefficients(region, lp, anchor, a * adv, mask)
    torch.testing.assert_close(loss_a[mask], a * loss[mask], rtol=1e-12, atol=ATOL)
    torch.testing.assert_close(g_a[mask], a * g[mask], rtol=1e-12, atol=ATOL)


@pytest.mark.parametrize("key", ["none", "cispo", "cispo_zero_eps"])
@settings(deadline=None, max_examples=30)
@given(region_batches())
def test_pg_is_and_cispo_are_odd_in_the_advantage(key: str, data) -> None:  # type: ignore[no-untyped-def]
    # Invariant 30: PG-IS and CISPO are linear in A: j(-A) == -j(A), g(-A) == -g(A).
    region = REGIONS[key]
    lp, anchor, adv, mask = data
    loss, g = coefficients(region, lp, anchor, adv, mask)
    loss_neg, g_neg = coefficients(region, lp, anchor, -adv, mask)
    torch.testing.assert_close(loss_neg, -loss, rtol=0, atol=ATOL)
    torch.testing.assert_close(g_neg, -g, rtol=0, atol=ATOL)


@pytest.mark.parametrize("key", ["clip", "divergence_mask_tv", "quadratic"])
def test_clip_dppo_and_drpo_are_not_odd_in_the_advantage(key: str) -> None:
    # Invariant 30 (contrast): r = 1.5, mu = 0.5 (p = 0.75): with A = +1 the token moved the way A pushes and
    # is clipped, masked, or down-weighted; with A = -1 it moved against A and is not, so g(-A) != -g(A).
    region = REGIONS[key]
    anchor = torch.tensor([[math.log(0.5)]], dtype=F64)
    lp = torch.tensor([[math.log(0.75)]], dtype=F64)
    _, g_pos = coefficients(region, lp, anchor, [[1.0]])
    _, g_neg = coefficients(region, lp, anchor, [[-1.0]])
    assert abs(float(g_pos + g_neg)) > 0.1


@pytest.mark.parametrize("key", ["clip", "clip_asymmetric", "dual_clip", "divergence_mask_tv", "divergence_mask_kl", "sequence_clip_token"])
@settings(deadline=None, max_examples=30)
@given(region_batches())
def test_gradients_are_dropped_only_where_the_ratio_moved_the_way_the_advantage_pushes(key: str, data) -> None:  # type: ignore[no-untyped-def]
    # Invariant 29: a zeroed coefficient with A != 0 has sign(r - 1) == sign(A) (A > 0 clips r > 1, A < 0
    # clips r < 1), except dual clip's r > c with A < 0. Flipping A swaps the clipped side. For GSPO-token the
    # ratio that is clipped is the sequence's s_i = exp(mean log-ratio).
    region = REGIONS[key]
    lp, anchor, adv, mask = data
    _, g = coefficients(region, lp, anchor, adv, mask)
    dropped = mask & (g == 0) & (adv != 0)
    moved = torch.sign(lp - anchor)
    if key == "sequence_clip_token":
        mean = (lp - anchor).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
        moved = torch.sign(mean).expand_as(lp)
    ok = moved == torch.sign(adv)
    if key == "dual_clip":
        ok |= (adv < 0) & ((lp - anchor).exp() > 3.0)
    assert bool(ok[dropped].all())


# -- metrics --------------------------------------------------------------------------------------------


def hand_batch() -> tuple[proxim.Rollout, torch.Tensor, torch.Tensor]:
    """2 x 2 batch, mask [[1, 1], [1, 0]]; ratios 1.5, 0.5, 0.5 on the valid tokens, NaN where masked."""
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.zeros(2, dtype=F64))
    lp = old + torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(0.5), 0.0]], dtype=F64)
    lp[1, 1] = float("nan")
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0]], dtype=F64)
    return batch, lp, adv


def test_region_metrics_by_hand() -> None:
    # PPO clip 0.2, token mean over the 3 valid tokens:
    #   (r=1.5, A=+1): clipped high, j = 1.2;  (r=0.5, A=+1): j = 0.5;  (r=0.5, A=-1): clipped low, j = -0.8.
    # loss/policy = -(1.2 + 0.5 - 0.8)/3 = -0.3; clip fractions 1/3 each; ratio_mean = 2.5/3; ratio_max = 1.5;
    # approx_kl = mean(r - 1 - log r) (k3 of KL(anchor || pi) from anchor samples).
    batch, lp, adv = hand_batch()
    obj = proxim.objective(advantage="diff", region="clip", aggregation="token_mean")
    leaf = lp.clone().requires_grad_(True)
    out = obj.loss(leaf, batch, proxim.Estimate(advantages=adv))
    m = out.metrics
    kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5)) / 3
    expected = {
        "loss/policy": -0.3,
        "loss/total": -0.3,
        "region/clip_fraction_low": 1 / 3,
        "region/clip_fraction_high": 1 / 3,
        "region/ratio_mean": 2.5 / 3,
        "region/ratio_max": 1.5,
        "region/approx_kl": kl,
    }
    for key, value in expected.items():
        torch.testing.assert_close(m[key], torch.tensor(value, dtype=F64), rtol=0, atol=ATOL, msg=key)
    torch.testing.assert_close(out.loss, torch.tensor(-0.3, dtype=F64), rtol=0, atol=ATOL)
    # g / token count: only the unclipped (r=0.5, A=+1) token carries a gradient, A r / 3 = 0.5 / 3.
    out.loss.backward()
    assert leaf.grad is not None
    torch.testing.assert_close(-leaf.grad, torch.tensor([[0.0, 0.5 / 3], [0.0, 0.0]], dtype=F64), rtol=0, atol=ATOL)


def test_cispo_and_drpo_metrics_by_hand() -> None:
    batch, lp, adv = hand_batch()
    # CISPO eps_low 0.2, eps_high 0.28: weights clip(1.5)=1.28 (high), clip(0.5)=0.8 (low, twice); the clip
    # fractions count clipped weights whatever the sign of A: high 1/3, low 2/3.
    # loss/policy = -(1.28*1 + 0.8*1 + 0.8*(-1))/3 = -1.28/3.
    obj = proxim.objective(advantage="diff", region="cispo", eps_low=0.2, eps_high=0.28)
    m = obj.loss(lp.clone().requires_grad_(True), batch, proxim.Estimate(advantages=adv)).metrics
    for key, value in {"region/clip_fraction_high": 1 / 3, "region/clip_fraction_low": 2 / 3, "loss/policy": -1.28 / 3}.items():
        torch.testing.assert_close(m[key], torch.tensor(value, dtype=F64), rtol=0, atol=ATOL, msg=key)


def test_metrics_are_detached_scalars_for_every_preset() -> None:
    for name in PRESETS:
        obj = proxim.objective(name, entropy_coef=0.01)
        batch, lp, values, entropy = preset_batch(seed=3)
        leaf = lp.clone().requires_grad_(True)
        out = obj.loss(leaf, batch, obj.advantages(batch), values=values, entropy=entropy)
        assert out.loss.dim() == 0 and out.loss.requires_grad
        for key, metric in out.metrics.items():
            assert isinstance(metric, torch.Tensor) and metric.dim() == 0, (name, key)
            assert not metric.requires_grad and metric.grad_fn is None, (name, key)
            assert bool(torch.isfinite(metric)), (name, key)
        required = {
            "loss/policy",
            "loss/total",
            "loss/entropy",
            "region/ratio_mean",
            "region/ratio_max",
            "region/approx_kl",
            "region/clip_fraction_low",
            "region/clip_fraction_high",
        }
        assert required <= set(out.metrics), name


# -- bad input to stage 2 -------------------------------------------------------------------------------


def preset_batch(seed: int, b: int = 4, t: int = 5, dtype: torch.dtype = F64):  # type: ignore[no-untyped-def]
    """A batch with every optional field (groups of 2), current log-probs, critic values and entropies."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True

    def near(x: torch.Tensor, scale: float) -> torch.Tensor:
        return -(x + scale * torch.randn(b, t, generator=g, dtype=F64)).abs()

    old = -(torch.rand(b, t, generator=g, dtype=F64) * 3 + 0.01)
    batch = proxim.Rollout(
        old_logprobs=old.to(dtype),
        mask=mask,
        rewards=torch.randn(b, generator=g, dtype=F64).to(dtype),
        group=torch.arange(b) // 2,
        ref_logprobs=near(old, 0.3).to(dtype),
        values=torch.randn(b, t, generator=g, dtype=F64).to(dtype),
        rollout_logprobs=near(old, 0.05).to(dtype),
    )
    lp = near(old, 0.3).to(dtype)
    values = (batch.values + 0.1 * torch.randn(b, t, generator=g, dtype=F64).to(dtype)).requires_grad_(True)
    entropy = (torch.rand(b, t, generator=g, dtype=F64) * 2).to(dtype)
    return batch, lp, values, entropy


def test_logprobs_of_the_wrong_shape_dtype_or_device_are_rejected() -> None:
    obj = proxim.objective("grpo")
    batch, lp, _, _ = preset_batch(seed=0)
    est = obj.advantages(batch)
    with pytest.raises(proxim.BatchError, match=r"logprobs must be a \[B, T\] tensor of shape \(4, 5\) like the batch's mask, got \(4, 4\)"):
        obj.loss(lp[:, :4], batch, est)
    with pytest.raises(proxim.BatchError, match=r"logprobs must be a \[B, T\] tensor of shape \(4, 5\) like the batch's mask, got \(20,\)"):
        obj.loss(lp.flatten(), batch, est)
    with pytest.raises(proxim.BatchError, match=r"logprobs must be a \[B, T\] tensor .* got list"):
        obj.loss(lp.tolist(), batch, est)
    with pytest.raises(proxim.BatchError, match=r"logprobs must be floating point, got dtype torch.int64"):
        obj.loss(lp.long(), batch, est)
    with pytest.raises(proxim.BatchError, match=r"logprobs is on meta but the batch is on cpu"):
        obj.loss(lp.to("meta"), batch, est)
    with pytest.raises(proxim.BatchError, match=r"estimate.advantages has shape \(2, 5\) but the batch is \(4, 5\)"):
        obj.loss(lp, batch, est[:2])


def test_float32_logprobs_on_a_float64_batch_give_a_float32_loss() -> None:
    # Documented behaviour: the anchor is cast to the log-probs' dtype; the result matches float64 to float32 precision.
    obj = proxim.objective("dapo")
    batch, lp, _, _ = preset_batch(seed=1)
    est = obj.advantages(batch)
    full = obj.loss(lp, batch, est).loss
    single = obj.loss(lp.float(), batch, est).loss
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", PRESETS)
def test_extreme_log_ratios_give_a_finite_loss_and_gradient(name: str, dtype: torch.dtype) -> None:
    # Log-ratios of +-50 are clamped to +-20 (proxim.ops.LOG_RATIO_CLAMP) before exponentiating, so every
    # preset's loss and gradient stay finite, and the largest ratio reported is exp(20).
    obj = proxim.objective(name, entropy_coef=0.01, **({"kl_in": "loss"} if proxim.objective(name).options.kl_coef > 0 else {}))
    batch, _, values, entropy = preset_batch(seed=2, dtype=dtype)
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0], [-1.0, 1.0, -1.0, 1.0, -1.0]] * 2, dtype=dtype)
    lp = (batch.old_logprobs + 50.0 * signs).requires_grad_(True)
    out = obj.loss(lp, batch, obj.advantages(batch), values=values, entropy=entropy)
    out.loss.backward()
    assert bool(torch.isfinite(out.loss)), name
    assert bool(torch.isfinite(lp.grad).all()), name
    if obj.has_critic:
        assert bool(torch.isfinite(values.grad).all()), name
    assert all(bool(torch.isfinite(v)) for v in out.metrics.values()), name
    torch.testing.assert_close(out.metrics["region/ratio_max"], torch.tensor(math.exp(20.0), dtype=dtype), rtol=1e-6, atol=0)


def test_clamped_log_ratio_by_hand() -> None:
    # region none, A = 1: log-ratio +50 -> r = exp(20), loss -exp(20), and no gradient (clamp is flat there);
    # log-ratio -50 -> r = exp(-20).
    anchor = torch.full((1, 2), -1.0, dtype=F64)
    lp = anchor + torch.tensor([[50.0, -50.0]], dtype=F64)
    loss, g = coefficients(NoRegion(), lp, anchor, [[1.0, 1.0]])
    torch.testing.assert_close(loss, torch.tensor([[-math.exp(20.0), -math.exp(-20.0)]], dtype=F64), rtol=1e-15, atol=0)
    assert torch.equal(g, torch.zeros_like(g))
