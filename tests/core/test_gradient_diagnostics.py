"""`proxim.diagnostics.gradient_diagnostics`: the zero-gradient, reversed and weight statistics every region shares,
against values worked out by hand from each region's formula (docs/parts.md)."""

from __future__ import annotations

import math

import pytest
import torch

import proxim
from proxim.diagnostics import GRADIENT_METRICS, combine_gradient_diagnostics, gradient_diagnostics

REGISTRY = proxim.default_registry()
# Four tokens of one sequence, anchored at mu = 0.5, moved to ratios r (p = r mu), with advantages +1, +1, -1, -1.
RATIOS = torch.tensor([[1.5, 1.1, 0.5, 0.9]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
MU = math.log(0.5)


def _run(region: proxim.TrustRegion, ratios: torch.Tensor = RATIOS, adv: torch.Tensor = ADV, mask: torch.Tensor | None = None) -> dict[str, float]:
    anchor = torch.full_like(ratios, MU)
    mask = torch.ones_like(ratios, dtype=torch.bool) if mask is None else mask
    out = gradient_diagnostics(region, anchor + ratios.log(), anchor, adv, mask)
    assert tuple(out.metrics) == GRADIENT_METRICS
    return {k: float(v) for k, v in out.metrics.items()}


def test_the_hard_clip_sends_no_gradient_past_its_boundary() -> None:
    # clip 0.2: r = 1.5 with A > 0 and r = 0.5 with A < 0 are past the boundary (g = 0); the others keep g = A r.
    out = _run(REGISTRY.get("region", "clip")())
    assert out["gradient/zero_fraction"] == pytest.approx(0.5)
    assert out["gradient/zero_fraction_pos"] == pytest.approx(0.5) and out["gradient/zero_fraction_neg"] == pytest.approx(0.5)
    assert out["gradient/reversed_fraction_pos"] == 0.0 and out["gradient/reversed_fraction_neg"] == 0.0
    assert out["gradient/weight_mean"] == pytest.approx((0 + 1.1 + 0 + 0.9) / 4)
    # ratios 1.5, 1.1, 0.5, 0.9: mean 1, squared deviations 0.25 + 0.01 + 0.25 + 0.01, n - 1 = 3
    assert out["gradient/ratio_std"] == pytest.approx(math.sqrt(0.52 / 3))


def test_drpo_reverses_the_gradient_beyond_its_boundary_instead_of_zeroing_it() -> None:
    # delta 0.1: w = 1 - sign(A) (p - mu) / delta; the token's weight is r w. p = 0.75, 0.55, 0.25, 0.45.
    out = _run(REGISTRY.get("region", "quadratic")(delta=0.1))
    weights = [1.5 * (1 - 2.5), 1.1 * (1 - 0.5), 0.5 * (1 - 2.5), 0.9 * (1 - 0.5)]
    assert out["gradient/zero_fraction"] == 0.0
    assert out["gradient/reversed_fraction_pos"] == pytest.approx(0.5) and out["gradient/reversed_fraction_neg"] == pytest.approx(0.5)
    assert out["gradient/weight_mean"] == pytest.approx(sum(weights) / 4)


def test_dppo_masks_by_the_probability_moved() -> None:
    # Binary TV, delta 0.15 (the default): masked when A > 0 and p - mu > 0.15 (0.25: yes; 0.05: no), or A < 0 and
    # mu - p > 0.15 (0.25: yes; 0.05: no); a kept token has g = A r.
    out = _run(REGISTRY.get("region", "divergence_mask")())
    assert out["gradient/zero_fraction_pos"] == pytest.approx(0.5) and out["gradient/zero_fraction_neg"] == pytest.approx(0.5)
    assert out["gradient/weight_mean"] == pytest.approx((1.1 + 0.9) / 4)


def test_on_policy_every_region_has_weight_one_and_no_zero_gradient() -> None:
    # One token per sequence, so that sequence_clip's ratio (shared by a sequence's tokens) is the token's own.
    ones = torch.ones_like(RATIOS).T
    for name in ("clip", "none", "cispo", "divergence_mask", "quadratic", "sequence_clip"):
        out = _run(REGISTRY.get("region", name)(), ratios=ones, adv=ADV.T)
        assert out["gradient/weight_mean"] == pytest.approx(1.0), name
        assert out["gradient/zero_fraction"] == 0.0 and out["gradient/ratio_std"] == 0.0, name


def test_padding_and_zero_advantages_are_left_out() -> None:
    # The last two tokens are padding (their ratio 100 would count as clipped), and the second has A = 0.
    ratios = torch.tensor([[1.5, 1.0, 100.0, 100.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 0.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False]])
    out = _run(REGISTRY.get("region", "clip")(), ratios=ratios, adv=adv, mask=mask)
    assert out["gradient/zero_fraction"] == 1.0 and out["gradient/zero_fraction_neg"] == 0.0  # no valid A < 0 token: 0, not NaN
    assert out["gradient/ratio_std"] == pytest.approx(math.sqrt(0.125))  # ratios 1.5 and 1.0: (0.0625 * 2) / 1


def test_an_empty_batch_gives_zeros() -> None:
    empty = torch.zeros((0, 3), dtype=torch.float64)
    out = gradient_diagnostics(REGISTRY.get("region", "clip")(), empty, empty, empty, torch.zeros((0, 3), dtype=torch.bool))
    assert all(float(v) == 0.0 for v in out.metrics.values()) and all(float(n) == 0.0 for n in out.counts.values())
    assert combine_gradient_diagnostics([out]) == {}  # a mean over no token is left out, not reported as 0


def test_batches_combine_weighted_by_the_tokens_each_mean_is_over() -> None:
    # Batch 1: the clip test's four tokens (two A > 0, one of them clipped). Batch 2: one A > 0 token, unclipped (r = 1),
    # and one padding token. Over both: 1 of 3 A > 0 tokens has zero gradient; the weight mean is (0 + 1.1 + 0 + 0.9 + 1) / 5.
    clip = REGISTRY.get("region", "clip")()
    anchor = torch.full((1, 4), MU, dtype=torch.float64)
    first = gradient_diagnostics(clip, anchor + RATIOS.log(), anchor, ADV, torch.ones(1, 4, dtype=torch.bool))
    second = gradient_diagnostics(clip, anchor[:, :2], anchor[:, :2], torch.ones(1, 2, dtype=torch.float64), torch.tensor([[True, False]]))
    both = combine_gradient_diagnostics([first, second])
    assert both["gradient/zero_fraction_pos"] == pytest.approx(1 / 3)
    assert both["gradient/zero_fraction_neg"] == pytest.approx(0.5)  # batch 2 has no A < 0 token: it does not dilute this
    assert both["gradient/weight_mean"] == pytest.approx((0 + 1.1 + 0 + 0.9 + 1) / 5)
