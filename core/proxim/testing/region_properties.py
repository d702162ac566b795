"""The property checks of trust regions: the policy gradient and the loss at the anchor, a zero gradient
far past the region, a bounded weight, positive homogeneity in the advantages, token independence."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor

from proxim.parts import Part, TrustRegion
from proxim.testing import strategies as strat
from proxim.testing.calling import Result, region_result
from proxim.testing.check import CheckFailure, Context
from proxim.testing.comparing import compare


def pg_at_anchor(part: Part, ctx: Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(case: strat.RegionCase) -> None:
        result = region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        expected = Result({"gradient": (-case.advantages, case.mask)})
        actual = Result({"gradient": result.items["gradient"]})
        compare(expected, actual, "at logprobs == anchor, -dloss/dlogprob is not A (the plain policy gradient)")

    ctx.given(strat.region_cases(dtype=torch.float64, at_anchor=True), test)


def value_at_anchor(part: Part, ctx: Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(case: strat.RegionCase) -> None:
        result = region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        compare(Result({"loss": (-case.advantages, case.mask)}), Result({"loss": result.items["loss"]}), "at logprobs == anchor the loss is not -A")

    ctx.given(strat.region_cases(dtype=torch.float64, at_anchor=True), test)


def zero_grad_clipped_side(part: Part, ctx: Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(case: strat.RegionCase) -> None:
        gen = torch.Generator().manual_seed(case.seed + 13)
        mask = case.mask
        rows, tokens = mask.shape
        sign = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
        advantages = sign * (0.1 + torch.rand(rows, 1, generator=gen, dtype=torch.float64)) * 2
        anchor = torch.log(0.2 + 0.3 * torch.rand(rows, tokens, generator=gen, dtype=torch.float64))
        logprobs = torch.where(sign > 0, 0.0, torch.log(torch.tensor(1e-6, dtype=torch.float64))).expand(rows, tokens)
        zero = torch.zeros((), dtype=torch.float64)
        inputs = [torch.where(mask, t.expand(rows, tokens), zero) for t in (logprobs, anchor, advantages)]
        result = region_result(part, inputs[0], inputs[1], inputs[2], mask)
        grad = result.items["gradient"][0]
        bad = mask & (grad.abs() > 1e-12 * inputs[2].abs())
        if bool(bad.any()):
            i, t = (int(v) for v in torch.nonzero(bad)[0])
            raise CheckFailure(
                f"at token [{i}, {t}] with A = {inputs[2][i, t].item():.4g}, anchor prob {inputs[1][i, t].exp().item():.4g} and "
                f"current prob {inputs[0][i, t].exp().item():.4g} (far past the trust region in A's direction) the gradient is {-grad[i, t].item()!r}, not 0."
            )

    ctx.given(strat.region_cases(dtype=torch.float64, outcome=True), test)


_MODERATE = torch.linspace(-10.0, 10.0, 81, dtype=torch.float64)
_EXTREME = torch.tensor([-19.5, -15.0, 15.0, 19.5], dtype=torch.float64)


def bounded_weight(part: Part, ctx: Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(example: tuple[float, float]) -> None:
        offset, magnitude = example
        ratios = torch.cat([_MODERATE, _EXTREME, _MODERATE, _EXTREME]).unsqueeze(1)
        n = _MODERATE.numel() + _EXTREME.numel()
        advantages = torch.cat([torch.full((n, 1), magnitude), torch.full((n, 1), -magnitude)]).to(torch.float64)
        anchor = torch.full_like(ratios, -(20.0 + offset))
        mask = torch.ones_like(ratios, dtype=torch.bool)
        result = region_result(part, anchor + ratios, anchor, advantages, mask)
        weight = (-result.items["gradient"][0] / advantages).abs().flatten()
        extreme = (ratios.abs() > 10.0).flatten()
        bound = float(weight[~extreme].max())
        worst = int(torch.argmax(torch.where(extreme, weight, -1.0)))
        if not float(weight[worst]) <= bound * (1 + 1e-6) + 1e-9:
            raise CheckFailure(
                f"the weight |g / A| is {float(weight[worst]):.6g} at log-ratio {float(ratios[worst]):g} (A = {float(advantages[worst]):g}) "
                f"but at most {bound:.6g} for |log r| <= 10: it keeps growing with the ratio, so it is not bounded."
            )

    ctx.given(st.tuples(st.floats(0.0, 5.0), st.sampled_from((1e-3, 1.0, 1e3))), test)


def positively_homogeneous(part: Part, ctx: Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(example: tuple[strat.RegionCase, float]) -> None:
        case, a = example
        base = region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        scaled = region_result(part, case.logprobs, case.anchor, a * case.advantages, case.mask)
        expected = Result({k: (a * base.items[k][0], case.mask) for k in ("loss", "gradient")})
        compare(expected, scaled, f"scaling the advantages by {a!r} did not scale the loss and gradient by {a!r}")

    ctx.given(st.tuples(strat.region_cases(dtype=torch.float64), st.floats(0.01, 100.0)), test)


def tokens_independent(part: Part, ctx: Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(example: tuple[strat.RegionCase, int]) -> None:
        case, pick = example
        valid = torch.nonzero(case.mask)
        i, t = (int(v) for v in valid[pick % valid.shape[0]])
        gen = torch.Generator().manual_seed(case.seed + 17)
        anchor_new = -torch.empty((), dtype=torch.float64).exponential_(1.0, generator=gen)
        lp_new = (anchor_new + torch.randn((), generator=gen, dtype=torch.float64)).clamp(max=0.0)
        adv_new = torch.randn((), generator=gen, dtype=torch.float64)
        tensors = [x.clone() for x in (case.logprobs, case.anchor, case.advantages)]
        for x, v in zip(tensors, (lp_new, anchor_new, adv_new)):
            x[i, t] = v
        before = region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        after = region_result(part, tensors[0], tensors[1], tensors[2], case.mask)
        keep = Result({k: (v, w & ~_one_hot(case.mask.shape, i, t)) for k, (v, w) in before.items.items() if w is not None})
        compare(keep, after, f"changing only token [{i}, {t}] changed another token's output")

    ctx.given(st.tuples(strat.region_cases(dtype=torch.float64), st.integers(0, 63)), test)


def _one_hot(shape: torch.Size, i: int, t: int) -> Tensor:
    out = torch.zeros(shape, dtype=torch.bool)
    out[i, t] = True
    return out
