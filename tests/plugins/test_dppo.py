"""DPPO's `divergence_mask` region (arXiv 2602.04879): Binary-TV and Binary-KL masks, truncated IS, metrics.

g = -d loss / d lp per token on a float64 leaf (docs/invariants.md, conventions). The region writes the surrogate
ratio-valued, j = M sg(min(r, C)/r) r A, so g = M min(r, C) A: the gradient of the paper's and verl's
sg-log form -A sg(min(r, C)) M lp. Expected values come from plain-Python references.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from stage_two import coefficients

import proxim
from proxim_plugins.dppo import DivergenceMask, binary_kl
from proxim_plugins.ppo import Clip

F64 = torch.float64
ATOL = 1e-12


def ref_binary_kl(mu: float, p: float, guard: float = 1e-8) -> float:
    """KL({mu, 1-mu} || {p, 1-p}), with verl's 1e-8 inside the second log (the documented choice)."""
    return mu * math.log(mu / p) + (1 - mu) * math.log((1 - mu + guard) / (1 - p + guard))


def ref_mask(p: float, mu: float, a: float, divergence: str, delta_low: float, delta_high: float) -> float:
    """M = 0 iff the token moved in the direction A pushes by more than delta (docs/parts.md, divergence_mask)."""
    if divergence == "tv":
        up, down = p - mu > delta_high, mu - p > delta_low
    else:
        d = ref_binary_kl(mu, p)
        up, down = p > mu and d > delta_high, p < mu and d > delta_low
    return 0.0 if (a > 0 and up) or (a < 0 and down) else 1.0


probability = st.floats(0.01, 0.99)
advantage = st.floats(-3.0, 3.0).map(lambda a: a if abs(a) > 1e-6 else 0.0)
token = st.tuples(probability, probability, advantage)  # (p, mu, A)


def tensors(toks):  # type: ignore[no-untyped-def]
    lp = torch.tensor([[math.log(p) for p, _, _ in toks]], dtype=F64)
    anchor = torch.tensor([[math.log(mu) for _, mu, _ in toks]], dtype=F64)
    adv = torch.tensor([[a for _, _, a in toks]], dtype=F64)
    return lp, anchor, adv


def floats_of(lp, anchor):  # type: ignore[no-untyped-def]
    """(p, mu, r) as the region sees them: exp of the float64 log-probs."""
    lps, anchors = lp.flatten().tolist(), anchor.flatten().tolist()
    return [(math.exp(x), math.exp(y), math.exp(x - y)) for x, y in zip(lps, anchors)]


def test_binary_tv_by_hand() -> None:
    # delta 0.15, mu = 0.5 for all tokens:
    #   p = 0.7, A = +1: p - mu = 0.2 > 0.15 in A's direction -> M = 0: loss 0, g = 0.
    #   p = 0.7, A = -1: moved against A (toward where A does not push) -> M = 1: loss -r A = 1.4, g = A r = -1.4.
    #   p = 0.6, A = +1: 0.1 < 0.15 -> M = 1: loss -1.2, g = 1.2.
    #   p = 0.3, A = -2: mu - p = 0.2 > 0.15 -> M = 0.
    anchor = torch.full((1, 4), math.log(0.5), dtype=F64)
    lp = torch.tensor([[math.log(0.7), math.log(0.7), math.log(0.6), math.log(0.3)]], dtype=F64)
    loss, g = coefficients(DivergenceMask(), lp, anchor, [[1.0, -1.0, 1.0, -2.0]])
    torch.testing.assert_close(loss, torch.tensor([[0.0, 1.4, -1.2, 0.0]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g, torch.tensor([[0.0, -1.4, 1.2, 0.0]], dtype=F64), rtol=0, atol=ATOL)


def test_binary_kl_by_hand() -> None:
    # mu = 0.5, delta 0.05:
    #   p = 0.7: D = 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3) = 0.5 ln(25/21) = 0.0872 > 0.05 -> masked for A > 0.
    #   p = 0.55: D = 0.5 ln(0.5/0.55) + 0.5 ln(0.5/0.45) = 0.5 ln(0.25/0.2475) = 0.00503 -> kept, g = A r = 1.1.
    #   p = 0.3 with A = -1: D = 0.5 ln(0.5/0.3) + 0.5 ln(0.5/0.7) = 0.0872 -> masked.
    anchor = torch.full((1, 3), math.log(0.5), dtype=F64)
    lp = torch.tensor([[math.log(0.7), math.log(0.55), math.log(0.3)]], dtype=F64)
    d = binary_kl(anchor.exp(), lp, anchor)  # atol 1e-8: the hand values omit verl's 1e-8 guard (effect < 7e-9 here)
    torch.testing.assert_close(d[0, 0], torch.tensor(0.5 * math.log(25 / 21), dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(d[0, 1], torch.tensor(0.5 * math.log(0.25 / 0.2475), dtype=F64), rtol=0, atol=1e-8)
    _, g = coefficients(DivergenceMask(divergence="kl"), lp, anchor, [[1.0, 1.0, -1.0]])
    torch.testing.assert_close(g, torch.tensor([[0.0, 1.1, 0.0]], dtype=F64), rtol=0, atol=ATOL)


def test_truncated_importance_sampling_by_hand() -> None:
    # is_cap C = 1.5, delta 0.15, mu = 0.2: p = 0.34 (r = 1.7, A = -1, moved against A): g = min(1.7, 1.5) A = -1.5,
    # loss -min(r, C) A = 1.5. p = 0.25 (r = 1.25 < C, A = +1, p - mu = 0.05): g = 1.25.
    anchor = torch.full((1, 2), math.log(0.2), dtype=F64)
    lp = torch.tensor([[math.log(0.34), math.log(0.25)]], dtype=F64)
    loss, g = coefficients(DivergenceMask(is_cap=1.5), lp, anchor, [[-1.0, 1.0]])
    torch.testing.assert_close(g, torch.tensor([[-1.5, 1.25]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(loss, torch.tensor([[1.5, -1.25]], dtype=F64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("divergence", ["tv", "kl"])
@settings(deadline=None, max_examples=60)
@given(st.lists(token, min_size=1, max_size=10), st.floats(0.02, 0.3), st.floats(0.02, 0.3), st.none() | st.floats(0.5, 5.0))
def test_matches_the_reference_mask_and_gradient(divergence: str, toks, delta_low: float, delta_high: float, cap) -> None:  # type: ignore[no-untyped-def]
    # g == M min(r, C) A and loss == -M min(r, C) A, with M from the reference rule; no gradient flows through M.
    lp, anchor, adv = tensors(toks)
    values = floats_of(lp, anchor)
    if divergence == "tv":
        assume(all(abs(abs(p - mu) - d) > 1e-9 for p, mu, _ in values for d in (delta_low, delta_high)))
    else:
        assume(all(abs(ref_binary_kl(mu, p) - d) > 1e-9 for p, mu, _ in values for d in (delta_low, delta_high)))
    region = DivergenceMask(divergence=divergence, delta_low=delta_low, delta_high=delta_high, is_cap=cap)
    loss, g = coefficients(region, lp, anchor, adv)
    expected = []
    for (p, mu, r), a in zip(values, adv.flatten().tolist()):
        weight = r if cap is None else min(r, cap)
        expected.append(ref_mask(p, mu, a, divergence, delta_low, delta_high) * weight * a)
    expected_t = torch.tensor(expected, dtype=F64)
    torch.testing.assert_close(g.flatten(), expected_t, rtol=1e-14, atol=ATOL)
    torch.testing.assert_close(loss.flatten(), -expected_t, rtol=1e-14, atol=ATOL)


@settings(deadline=None, max_examples=60)
@given(st.lists(token, min_size=1, max_size=10), st.floats(0.02, 0.3))
def test_tv_keeps_every_move_toward_mu(toks, delta: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 18: M == 1 whenever the move is toward mu (A > 0 and p <= mu, or A < 0 and p >= mu), whatever its size:
    # g == A r there.
    lp, anchor, adv = tensors(toks)
    _, g = coefficients(DivergenceMask(delta_low=delta, delta_high=delta), lp, anchor, adv)
    for (p, mu, r), a, gi in zip(floats_of(lp, anchor), adv.flatten().tolist(), g.flatten().tolist()):
        if (a > 0 and p <= mu) or (a < 0 and p >= mu):
            assert abs(gi - a * r) <= ATOL


@settings(deadline=None, max_examples=60)
@given(st.floats(-0.3, 0.3), st.floats(0.31, 0.69), st.floats(0.31, 0.69), advantage, st.floats(0.02, 0.3))
def test_tv_mask_depends_only_on_the_probability_shift(shift: float, mu1: float, mu2: float, a: float, delta: float) -> None:
    # Invariant 18: two tokens with equal p - mu but different mu (so different ratios) get the same M.
    assume(abs(abs(shift) - delta) > 1e-6)
    anchor = torch.tensor([[math.log(mu1), math.log(mu2)]], dtype=F64)
    lp = torch.tensor([[math.log(mu1 + shift), math.log(mu2 + shift)]], dtype=F64)
    _, g = coefficients(DivergenceMask(delta_low=delta, delta_high=delta), lp, anchor, [[a, a]])
    if a == 0:
        assert torch.equal(g, torch.zeros_like(g))
        return
    m = g / (a * (lp - anchor).exp())  # M, up to rounding
    assert bool(((m - m.round()).abs() <= 1e-12).all())
    assert float(m[0, 0].round()) == float(m[0, 1].round())


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(st.floats(-0.6, 0.6), advantage), min_size=1, max_size=10), st.floats(0.05, 0.5), st.floats(0.05, 0.95))
def test_tv_with_delta_eps_times_mu_is_the_ppo_clip_mask(toks, eps: float, mu: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 18: replacing D by |r - 1| reproduces PPO's mask. With one mu for every token, p - mu > eps mu
    # <=> r > 1 + eps, so DPPO-TV with delta = eps * mu and PPO clip eps have the same g (= M A r) off the bounds.
    anchor = torch.full((1, len(toks)), math.log(mu), dtype=F64)
    lp = anchor + torch.tensor([[x for x, _ in toks]], dtype=F64)
    adv = [[a for _, a in toks]]
    r = (lp - anchor).exp().flatten().tolist()
    assume(all(abs(ri - b) > 1e-7 for ri in r for b in (1 - eps, 1 + eps)))
    _, g_dppo = coefficients(DivergenceMask(delta_low=eps * mu, delta_high=eps * mu), lp, anchor, adv)
    _, g_clip = coefficients(Clip(eps_low=eps), lp, anchor, adv)
    torch.testing.assert_close(g_dppo, g_clip, rtol=1e-14, atol=ATOL)


@settings(deadline=None, max_examples=60)
@given(st.floats(0.02, 0.98), st.floats(-1.0, 1.0), advantage, st.floats(0.02, 0.3))
def test_tv_is_mirror_symmetric_in_the_probability_shift(mu: float, u: float, a: float, delta: float) -> None:
    # Invariant 29: with symmetric thresholds, g(p - mu, A) / r == -g(-(p - mu), -A) / r', i.e. A M == -(-A) M'.
    shift = u * min(mu, 1 - mu) * 0.99
    assume(abs(abs(shift) - delta) > 1e-9)
    anchor = torch.full((1, 2), math.log(mu), dtype=F64)
    lp = torch.tensor([[math.log(mu + shift), math.log(mu - shift)]], dtype=F64)
    _, g = coefficients(DivergenceMask(delta_low=delta, delta_high=delta), lp, anchor, [[a, -a]])
    r = (lp - anchor).exp()
    per_r = g / r
    torch.testing.assert_close(per_r[0, 0], -per_r[0, 1], rtol=0, atol=ATOL)


@settings(deadline=None, max_examples=60)
@given(probability, probability)
def test_binary_kl_is_a_divergence_and_matches_the_reference(p: float, mu: float) -> None:
    # Invariant 19: D >= 0 and D == 0 iff p == mu. verl's 1e-8 guard moves the minimum off p = mu by O(1e-8),
    # so D may dip to about -1e-16 there; with |p - mu| >= 1e-3, D >= 2 (p - mu)^2 (Pinsker) dominates the guard.
    mu_t, lp = torch.tensor(mu, dtype=F64), torch.tensor(math.log(p), dtype=F64)
    d = float(binary_kl(mu_t, lp, mu_t.log()))
    assert abs(d - ref_binary_kl(mu, math.exp(math.log(p)))) <= 1e-12
    assert d >= -1e-15
    if abs(p - mu) >= 1e-3:
        assert d > 0
    # At p == mu the first term is exactly 0; the second is log of (1 - mu + 1e-8) / (1 - exp(log mu) + 1e-8),
    # where exp(log mu) may differ from mu by one rounding: |D| is then a few 1e-16 (seen: -1.1e-16 at mu 0.487).
    same = float(binary_kl(mu_t, mu_t.log(), mu_t.log()))
    assert abs(same) <= 1e-15


@settings(deadline=None, max_examples=40)
@given(st.lists(st.floats(-3.0, 3.0), min_size=2, max_size=8), st.lists(st.floats(-3.0, 3.0), min_size=8, max_size=8))
def test_binary_divergences_lower_bound_the_full_ones(mu_logits, pi_logits) -> None:  # type: ignore[no-untyped-def]
    # Invariant 19: collapsing the vocabulary to {y, rest} is a coarse-graining, so for every token y
    # binary KL(mu || pi) <= KL(mu || pi) and |p_y - mu_y| <= TV(mu, pi) (data-processing inequality).
    v = len(mu_logits)
    mu = torch.softmax(torch.tensor(mu_logits, dtype=F64), 0)
    pi = torch.softmax(torch.tensor(pi_logits[:v], dtype=F64), 0)
    full_kl = sum(m * math.log(m / q) for m, q in zip(mu.tolist(), pi.tolist()))
    full_tv = 0.5 * sum(abs(m - q) for m, q in zip(mu.tolist(), pi.tolist()))
    binary = binary_kl(mu, pi.log(), mu.log())
    assert bool((binary <= full_kl + 1e-7).all())  # 1e-7: the 1e-8 guard, scaled by 1/(1 - p) <= ~1e3 here
    assert bool(((pi - mu).abs() <= full_tv + 1e-15).all())


def test_region_metrics_count_masked_tokens_per_side() -> None:
    # TV delta 0.15, mu = 0.5 on 4 valid tokens: p = 0.7 (A=+1, masked high), 0.3 (A=-1, masked low),
    # 0.6 (A=+1, kept), 0.3 (A=+1, moved against A, kept); one padded token with NaN log-probs.
    # clip_fraction_high = clip_fraction_low = 1/4; loss/policy = -(0 + 0 + 1.2*1 + 0.6*1)/4 = -0.45.
    old = torch.full((1, 5), math.log(0.5), dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.zeros(1, dtype=F64))
    lp = torch.tensor([[math.log(0.7), math.log(0.3), math.log(0.6), math.log(0.3), float("nan")]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0]], dtype=F64)
    obj = proxim.objective(advantage="diff", region="divergence_mask", aggregation="token_mean")
    m = obj.loss(lp.requires_grad_(True), batch, proxim.Estimate(advantages=adv)).metrics
    for key, value in {"region/clip_fraction_high": 0.25, "region/clip_fraction_low": 0.25, "loss/policy": -0.45}.items():
        torch.testing.assert_close(m[key], torch.tensor(value, dtype=F64), rtol=0, atol=ATOL, msg=key)


def test_defaults_follow_the_paper() -> None:
    # TV 0.15 (stability study), KL 0.05; no truncation unless asked.
    # The thresholds default to None and resolve per divergence when called, so that switching the
    # divergence by override (attrs.evolve) picks up the right default.
    tv, kl = DivergenceMask(), DivergenceMask(divergence="kl")
    assert (tv.delta_low, tv.delta_high, tv.is_cap) == (None, None, None)
    assert (kl.delta_low, kl.delta_high) == (None, None)
    assert proxim.objective("dppo", divergence="kl").region.delta_high is None


def test_switching_divergence_by_override_uses_that_divergences_default() -> None:
    # mu = 0.9, p = 0.97, A = +1: the TV shift 0.07 is inside TV's 0.15, but the binary KL
    # 0.9 ln(0.9/0.97) + 0.1 ln(0.1/0.03) = -0.06741 + 0.12040 = 0.05299 exceeds KL's 0.05: masked.
    old = torch.tensor([[math.log(0.9)]], dtype=torch.float64)
    batch = proxim.Rollout(old_logprobs=old, mask=torch.ones(1, 1, dtype=torch.bool), rewards=torch.zeros(1, dtype=torch.float64))
    est = proxim.Estimate(advantages=torch.ones(1, 1, dtype=torch.float64))
    grads = {}
    for divergence in ("tv", "kl"):
        lp = torch.tensor([[math.log(0.97)]], dtype=torch.float64, requires_grad=True)
        obj = proxim.objective("dppo", divergence=divergence, aggregation="token_mean")
        (grad,) = torch.autograd.grad(obj.loss(lp, batch, est).loss, lp)
        grads[divergence] = -grad.item()
    assert grads["tv"] == pytest.approx(0.97 / 0.9, abs=1e-12)  # g = A r, unmasked
    assert grads["kl"] == 0.0


def test_default_thresholds_follow_the_paper() -> None:
    # TV 0.15 (the paper's stability study), KL 0.05; no truncation unless asked. mu = 0.5, A = +1:
    #   TV: p - mu = 0.149 is kept (g = A r = 1.298), 0.151 is masked.
    #   KL: p = 0.65 gives D = 0.5 ln(0.5/0.65) + 0.5 ln(0.5/0.35) = 0.0472 < 0.05 (kept, g = 1.3);
    #       p = 0.66 gives D = 0.5 ln(0.5/0.66) + 0.5 ln(0.5/0.34) = 0.0540 > 0.05 (masked).
    anchor = torch.full((1, 2), math.log(0.5), dtype=F64)
    _, g = coefficients(DivergenceMask(), torch.tensor([[math.log(0.649), math.log(0.651)]], dtype=F64), anchor, [[1.0, 1.0]])
    torch.testing.assert_close(g, torch.tensor([[1.298, 0.0]], dtype=F64), rtol=0, atol=ATOL)
    _, g = coefficients(DivergenceMask(divergence="kl"), torch.tensor([[math.log(0.65), math.log(0.66)]], dtype=F64), anchor, [[1.0, 1.0]])
    torch.testing.assert_close(g, torch.tensor([[1.3, 0.0]], dtype=F64), rtol=0, atol=ATOL)
    assert DivergenceMask().is_cap is None
