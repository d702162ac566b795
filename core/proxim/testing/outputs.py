"""Universal checks on what a part returns: its type, shape, dtype and device, finiteness (a fully
masked row included), and indifference to whatever padded positions hold."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from hypothesis import strategies as st
from torch import Tensor

from proxim.parts import Baseline, Part, Preference, TrustRegion
from proxim.rollout import Estimate
from proxim.testing import strategies as strat
from proxim.testing.calling import Result, StageOne, check_region_output, describe, invoke, preference_result, region_result
from proxim.testing.check import CheckFailure, Context, Runner
from proxim.testing.comparing import compare
from proxim.testing.devices import current_device, to_device


def shape_dtype_device(part: Part, ctx: Context) -> None:
    device = current_device()
    if isinstance(part, Preference):

        def preference_test(case: strat.PreferenceCase) -> None:
            preference_result(part, case.chosen, case.rejected)  # the shape
            chosen, rejected = case.chosen.to(device), case.rejected.to(device)
            loss = invoke(part, lambda: part(chosen, rejected))
            _same_dtype_device("the loss", loss, chosen)

        ctx.given(strat.preference_cases(), preference_test)
        return
    if isinstance(part, TrustRegion):

        def region_test(case: strat.RegionCase) -> None:
            lp, anchor, adv, mask = (t.to(device) for t in (case.logprobs, case.anchor, case.advantages, case.mask))
            out = invoke(part, lambda: part(lp.clone().requires_grad_(True), anchor, adv, mask))
            loss = check_region_output(out, case.mask)
            _same_dtype_device("loss", loss, lp)
            for key, value in out.metrics.items():
                if value.dtype != torch.bool and not value.is_floating_point():
                    raise CheckFailure(f"its metric {key!r} has dtype {value.dtype}; per-token metrics are bool or floating point.")
                if value.device != lp.device:
                    raise CheckFailure(f"its metric {key!r} is on {value.device}, the inputs on {lp.device}.")

        ctx.given(strat.region_cases(), region_test)
        return

    subject = StageOne.of(part, ctx, composed=False)

    def stage_one_test(case: strat.StageOneCase) -> None:
        raw = subject.call(case.batch, case.baseline)  # on `device`
        subject.result(case.batch, case.baseline, raw)  # the shapes
        like = to_device(case.batch.old_logprobs, device)
        if isinstance(part, Baseline):
            assert isinstance(raw, Tensor)  # subject.result checked it
            if part.provides_state_values and raw.dim() != 2:
                raise CheckFailure(f"it provides state values (provides_state_values=True) but returned shape {tuple(raw.shape)}, not [B, T].")
            _same_dtype_device("the baseline", raw, like)
            return
        assert isinstance(raw, Estimate)
        _same_dtype_device("Estimate.advantages", raw.advantages, like)
        if raw.returns is not None:
            _same_dtype_device("Estimate.returns", raw.returns, like)
        if not isinstance(raw.metrics, Mapping):
            raise CheckFailure(f"its Estimate.metrics is {describe(raw.metrics)}, not a dict of name -> 0-d tensor.")
        for key, value in raw.metrics.items():
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise CheckFailure(f"its metric {key!r} is {describe(value)}; stage-1 metrics are 0-d tensors.")
            if value.device != like.device:
                raise CheckFailure(f"its metric {key!r} is on {value.device}, the inputs on {like.device}.")

    ctx.given(subject.cases(), stage_one_test)


def _same_dtype_device(name: str, t: Tensor, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise CheckFailure(f"{name} is {describe(t)}, not a tensor.")
    if t.dtype != like.dtype:
        raise CheckFailure(f"{name} has dtype {t.dtype} for {like.dtype} inputs; keep the input dtype.")
    if t.device != like.device:
        raise CheckFailure(f"{name} is on {t.device} for inputs on {like.device}; keep the input device.")


def _all_finite(result: Result, context: str) -> None:
    for name, (value, _) in result.items.items():
        if not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            pos = [int(i) for i in torch.nonzero(bad)[0]] if value.dim() else []
            at = f" at {pos}" if pos else ""
            raise CheckFailure(f"{name}{at} is {value[tuple(pos)].item()!r} {context}.")


def finite(empty_row: bool) -> Runner:
    """The check that outputs are finite: for finite inputs, or (`empty_row`) with a fully masked row."""
    context = "for a batch with a fully masked row (all inputs finite)" if empty_row else "for finite inputs"

    def run(part: Part, ctx: Context) -> None:
        min_tokens = 0 if empty_row else 1
        if isinstance(part, Preference):
            ctx.given(strat.preference_cases(), lambda c: _all_finite(preference_result(part, c.chosen, c.rejected), context))
            return
        if isinstance(part, TrustRegion):
            ctx.given(
                strat.region_cases(min_tokens=min_tokens, empty_row=empty_row),
                lambda c: _all_finite(region_result(part, c.logprobs, c.anchor, c.advantages, c.mask), context),
            )
            return
        subject = StageOne.of(part, ctx, composed=False)
        ctx.given(subject.cases(min_tokens=min_tokens, empty_row=empty_row), lambda c: _all_finite(subject.result(c.batch, c.baseline), context))

    return run


_GARBAGE = ("nan", "inf", "-inf", "large", "random")


def _garbage(like: Tensor, mask: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    values = {
        "nan": torch.full(like.shape, float("nan"), dtype=torch.float64),
        "inf": torch.full(like.shape, float("inf"), dtype=torch.float64),
        "-inf": torch.full(like.shape, float("-inf"), dtype=torch.float64),
        "large": torch.where(torch.rand(like.shape, generator=gen, dtype=torch.float64) < 0.5, 30.0, -30.0),
        "random": torch.randn(like.shape, generator=gen, dtype=torch.float64) * 10,
    }[kind]
    return torch.where(mask, like, values.to(like.dtype))


def masked_positions_ignored(part: Part, ctx: Context) -> None:
    if isinstance(part, TrustRegion):

        def region_test(example: tuple[strat.RegionCase, str]) -> None:
            case, kind = example
            gen = torch.Generator().manual_seed(case.seed + 1)
            clean = region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
            lp, anchor, adv = (_garbage(t, case.mask, kind, gen) for t in (case.logprobs, case.anchor, case.advantages))
            dirty = region_result(part, lp, anchor, adv, case.mask)
            compare(clean, dirty, f"with padded (masked) inputs set to {kind} values instead of 0, the output at valid tokens changed")

        ctx.given(st.tuples(strat.region_cases(), st.sampled_from(("large", "random"))), region_test)
        return

    subject = StageOne.of(part, ctx, composed=False)

    def stage_one_test(example: tuple[strat.StageOneCase, str]) -> None:
        case, kind = example
        batch, mask = case.batch, case.batch.mask
        gen = torch.Generator().manual_seed(case.seed + 1)
        changes = {
            name: _garbage(getattr(batch, name), mask, kind, gen)
            for name in ("old_logprobs", "ref_logprobs", "values", "rollout_logprobs")
            if getattr(batch, name) is not None
        }
        dirty_batch = batch.replace(**changes)
        base = case.baseline
        dirty_base = _garbage(base, mask, kind, gen) if base is not None and base.dim() == 2 else base
        clean = subject.result(batch, base)
        dirty = subject.result(dirty_batch, dirty_base)
        fields = ", ".join(sorted(changes) + (["the baseline"] if dirty_base is not base else []))
        compare(clean, dirty, f"with padded (masked) positions of {fields} set to {kind}, the output at valid positions changed")

    ctx.given(st.tuples(subject.cases(), st.sampled_from(_GARBAGE)), stage_one_test)
