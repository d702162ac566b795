"""GSPO's `sequence_clip` region (arXiv 2507.18071), sequence-level and token-level (GSPO-token).

s_i = exp(mean over row i's valid tokens of (lp - anchor)); j = min(s A, clip(s, 1 - eps_low, 1 + eps_high) A).
The region returns j's negation at every token of the row; aggregated with seq_mean_token_mean it is the
paper's (1/G) sum_i j_i. Gradients are taken on a float64 leaf (docs/invariants.md, conventions); expected values
come from plain-Python references.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import proxim
from proxim.aggregation import aggregate
from proxim_plugins.gspo import SequenceClip

F64 = torch.float64
ATOL = 1e-12
NO_CLIP = SequenceClip(eps_low=1.0, eps_high=1e9)


@st.composite
def sequences(draw, spread: float = 1.0, empty_rows: bool = False):  # type: ignore[no-untyped-def]
    """(lp, anchor, adv, mask) [B, T]: ragged rows, 0 at masked positions, one nonzero advantage per row."""
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    if empty_rows and b > 1:
        mask[torch.rand(b, generator=g) < 0.3] = False
    anchor = -(torch.rand(b, t, generator=g, dtype=F64) * 4 + 0.01)
    lp = anchor + torch.empty(b, t, dtype=F64).uniform_(-spread, spread, generator=g)
    sizes = torch.rand(b, 1, generator=g, dtype=F64) * 2 + 0.1
    signs = torch.where(torch.rand(b, 1, generator=g) < 0.5, -1.0, 1.0).to(F64)
    adv = (sizes * signs).expand(b, t)
    zero = torch.zeros((), dtype=F64)
    return torch.where(mask, lp, zero), torch.where(mask, anchor, zero), torch.where(mask, adv, zero), mask


def ref_sequence_ratios(lp: torch.Tensor, anchor: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """s_i = exp(mean_t (lp - anchor)) over valid tokens, a plain-Python loop (1.0 for an empty row)."""
    out = []
    for i in range(lp.shape[0]):
        diffs = [lp[i, t].item() - anchor[i, t].item() for t in range(lp.shape[1]) if mask[i, t]]
        out.append(math.exp(sum(diffs) / len(diffs)) if diffs else 1.0)
    return out


def aggregated(region: SequenceClip, lp, anchor, adv, mask):  # type: ignore[no-untyped-def]
    """(seq_mean_token_mean loss, g = -d loss / d lp)."""
    leaf = lp.clone().requires_grad_(True)
    loss = aggregate(region(leaf, anchor, adv, mask).loss, mask, "seq_mean_token_mean")
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), -grad


def test_by_hand() -> None:
    # One row, log-ratios 0.1 and 0.3: s = exp(0.2) = 1.2214 > 1 + 4e-4.
    #   A = +1: clipped, j = 1.0004 at each token, aggregated loss -1.0004, g = 0 on both tokens.
    #   A = -1: j = min(-s, -1.0004) = -s, loss = s; d s / d lp_t = s / 2, so g = -s/2 per token.
    anchor = torch.tensor([[-1.0, -2.0]], dtype=F64)
    lp = anchor + torch.tensor([[0.1, 0.3]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    s = math.exp(((lp[0, 0] - anchor[0, 0]).item() + (lp[0, 1] - anchor[0, 1]).item()) / 2)
    loss, g = aggregated(SequenceClip(), lp, anchor, torch.ones(1, 2, dtype=F64), mask)
    torch.testing.assert_close(loss, torch.tensor(-1.0004, dtype=F64), rtol=0, atol=ATOL)
    assert torch.equal(g, torch.zeros_like(g))
    loss, g = aggregated(SequenceClip(), lp, anchor, -torch.ones(1, 2, dtype=F64), mask)
    torch.testing.assert_close(loss, torch.tensor(s, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(g, torch.full((1, 2), -s / 2, dtype=F64), rtol=0, atol=ATOL)


def test_sequence_log_ratio_is_clamped_at_ten_from_above() -> None:
    # Documented: log s is clamped to [-20, 10] (verl's upper 10). Every token +50: s = exp(10); with A = -1
    # and no effective clip, loss = exp(10) and the gradient is 0 (past the clamp). Every token -50: s = exp(-20).
    anchor = torch.full((1, 3), -1.0, dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, g = aggregated(NO_CLIP, anchor + 50.0, anchor, -torch.ones(1, 3, dtype=F64), mask)
    torch.testing.assert_close(loss, torch.tensor(math.exp(10.0), dtype=F64), rtol=1e-15, atol=0)
    assert torch.equal(g, torch.zeros_like(g))
    loss, _ = aggregated(NO_CLIP, anchor - 50.0, anchor, -torch.ones(1, 3, dtype=F64), mask)
    torch.testing.assert_close(loss, torch.tensor(math.exp(-20.0), dtype=F64), rtol=1e-15, atol=0)


@settings(deadline=None, max_examples=50)
@given(sequences())
def test_sequence_ratio_is_the_geometric_mean_of_token_ratios(data) -> None:  # type: ignore[no-untyped-def]
    # Invariant 28: s_i == exp(mean_t (lp - lp_old)). With no effective clip and A = 1, each valid token's loss is -s_i.
    lp, anchor, _, mask = data
    ones = torch.where(mask, torch.ones((), dtype=F64), torch.zeros((), dtype=F64))
    for token_level in (False, True):
        region = SequenceClip(eps_low=1.0, eps_high=1e9, token_level=token_level)
        loss = region(lp, anchor, ones, mask).loss
        expected = torch.tensor(ref_sequence_ratios(lp, anchor, mask), dtype=F64).unsqueeze(1).expand_as(loss)
        torch.testing.assert_close(loss[mask], -expected[mask], rtol=1e-13, atol=0)


@settings(deadline=None, max_examples=50)
@given(sequences(), st.data())
def test_permuting_tokens_within_a_sequence_permutes_nothing_but_the_gradient(data, draw) -> None:  # type: ignore[no-untyped-def]
    # Invariant 28: s_i depends on the multiset of a row's log-ratios only: permuting a row's tokens (with their
    # mask) leaves the loss unchanged and permutes the gradient the same way.
    lp, anchor, adv, mask = data
    b, t = lp.shape
    perm = torch.stack([torch.tensor(draw.draw(st.permutations(range(t)))) for _ in range(b)])

    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, perm)

    for token_level in (False, True):
        region = SequenceClip(eps_low=0.05, eps_high=0.05, token_level=token_level)
        loss, g = aggregated(region, lp, anchor, adv, mask)
        loss_p, g_p = aggregated(region, take(lp), take(anchor), take(adv), take(mask))
        torch.testing.assert_close(loss_p, loss, rtol=1e-13, atol=ATOL)
        torch.testing.assert_close(g_p, take(g), rtol=1e-12, atol=ATOL)


@settings(deadline=None, max_examples=50)
@given(sequences(empty_rows=True), st.booleans())
def test_gradient_at_the_anchor_is_advantage_over_group_size_and_length(data, token_level: bool) -> None:  # type: ignore[no-untyped-def]
    # Invariant 28: at lp = lp_old, d J / d lp_{i,t} = A_i / (G |y_i|) under seq_mean_token_mean, G the number of
    # non-empty sequences; 0 on masked tokens. Through Objective.loss with the gspo preset.
    _, anchor, adv, mask = data
    assume(bool(mask.any()))
    obj = proxim.objective("gspo", token_level=token_level)
    batch = proxim.Rollout(
        old_logprobs=anchor, mask=mask, rewards=torch.zeros(anchor.shape[0], dtype=F64), group=torch.zeros(anchor.shape[0], dtype=torch.long)
    )
    leaf = anchor.clone().requires_grad_(True)
    obj.loss(leaf, batch, proxim.Estimate(advantages=adv)).loss.backward()
    lengths = mask.sum(dim=1).tolist()
    groups = sum(1 for n in lengths if n > 0)
    expected = torch.zeros_like(anchor)
    for i in range(anchor.shape[0]):
        for t in range(anchor.shape[1]):
            if mask[i, t]:
                expected[i, t] = adv[i, t].item() / (groups * lengths[i])
    assert leaf.grad is not None
    torch.testing.assert_close(-leaf.grad, expected, rtol=0, atol=ATOL)


@settings(deadline=None, max_examples=50)
@given(sequences(spread=0.15), st.floats(0.005, 0.05), st.floats(0.005, 0.05))
def test_clipping_is_all_or_nothing_per_sequence(data, eps_low: float, eps_high: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 28: a sequence's tokens are either all clipped (g == 0 on every valid token) or none is; it is
    # clipped iff (A > 0 and s > 1 + eps_high) or (A < 0 and s < 1 - eps_low).
    lp, anchor, adv, mask = data
    s = ref_sequence_ratios(lp, anchor, mask)
    assume(all(abs(si - b) > 1e-9 for si in s for b in (1 - eps_low, 1 + eps_high)))
    for token_level in (False, True):
        _, g = aggregated(SequenceClip(eps_low=eps_low, eps_high=eps_high, token_level=token_level), lp, anchor, adv, mask)
        for i, si in enumerate(s):
            a = adv[i, 0].item()
            zero = (g[i][mask[i]] == 0).tolist()
            clipped = (a > 0 and si > 1 + eps_high) or (a < 0 and si < 1 - eps_low)
            assert zero == [clipped] * len(zero)


@settings(deadline=None, max_examples=50)
@given(sequences(spread=0.15), st.floats(0.0, 0.05), st.floats(0.0, 0.05))
def test_token_level_equals_sequence_level_for_sequence_advantages(data, eps_low: float, eps_high: float) -> None:  # type: ignore[no-untyped-def]
    # Invariant 28: GSPO-token equals GSPO in value and gradient when A is constant within each sequence.
    lp, anchor, adv, mask = data
    s = ref_sequence_ratios(lp, anchor, mask)
    assume(all(abs(si - b) > 1e-9 for si in s for b in (1 - eps_low, 1 + eps_high)))
    seq_loss, seq_g = aggregated(SequenceClip(eps_low=eps_low, eps_high=eps_high), lp, anchor, adv, mask)
    tok_loss, tok_g = aggregated(SequenceClip(eps_low=eps_low, eps_high=eps_high, token_level=True), lp, anchor, adv, mask)
    torch.testing.assert_close(tok_loss, seq_loss, rtol=1e-14, atol=ATOL)
    torch.testing.assert_close(tok_g, seq_g, rtol=1e-12, atol=ATOL)


def test_token_level_keeps_per_token_advantages() -> None:
    # GSPO-token at the anchor, one row of 2 tokens, A = (2, -1): the ratio s_{i,t} = sg(s_i) p_t / sg(p_t) has
    # gradient s_i = 1 in lp_t only, so g_t = A_t / |y| = (1, -0.5); GSPO proper would give mean(A)/|y| = 0.25 each.
    anchor = torch.tensor([[-1.0, -2.0]], dtype=F64)
    adv = torch.tensor([[2.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, g = aggregated(SequenceClip(token_level=True), anchor, anchor, adv, mask)
    torch.testing.assert_close(g, torch.tensor([[1.0, -0.5]], dtype=F64), rtol=0, atol=ATOL)
    _, g = aggregated(SequenceClip(), anchor, anchor, adv, mask)
    torch.testing.assert_close(g, torch.tensor([[0.25, 0.25]], dtype=F64), rtol=0, atol=ATOL)


def test_region_metrics_use_the_sequence_ratio() -> None:
    # Three rows, eps 3e-4/4e-4: row 0 log-ratios (0.1, 0.3), A = +1 -> s = e^0.2 clipped high (both tokens);
    # row 1 log-ratios (-0.2, padded), A = -1 -> s = e^-0.2 < 1 - 3e-4, clipped low (1 token); row 2 log-ratios
    # (-0.2, padded), A = +1 -> s < 1 but moved against A: not clipped. Valid tokens 4: clip_fraction_high = 2/4,
    # clip_fraction_low = 1/4; ratio_mean is the per-token ratio mean (e^.1 + e^.3 + 2 e^-.2)/4.
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.7], [-0.5, -0.7]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.zeros(3, dtype=F64), group=torch.tensor([0, 0, 0]))
    lp = old + torch.tensor([[0.1, 0.3], [-0.2, float("nan")], [-0.2, float("nan")]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [1.0, 0.0]], dtype=F64)
    m = proxim.objective("gspo").loss(lp.requires_grad_(True), batch, proxim.Estimate(advantages=adv)).metrics
    ratio_mean = (math.exp(0.1) + math.exp(0.3) + 2 * math.exp(-0.2)) / 4
    for key, value in {"region/clip_fraction_high": 2 / 4, "region/clip_fraction_low": 1 / 4, "region/ratio_mean": ratio_mean}.items():
        torch.testing.assert_close(m[key], torch.tensor(value, dtype=F64), rtol=0, atol=ATOL, msg=key)
    # loss/policy (seq_mean_token_mean over 3 rows): row 0 j = 1.0004; row 1 j = min(-e^-.2, -(1 - 3e-4)) = -0.9997;
    # row 2 j = min(e^-.2, 0.9997) = e^-.2.
    expected = -(1.0004 - 0.9997 + math.exp(-0.2)) / 3
    torch.testing.assert_close(m["loss/policy"], torch.tensor(expected, dtype=F64), rtol=0, atol=ATOL)
