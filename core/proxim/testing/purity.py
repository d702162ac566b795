"""Universal checks that a part is a pure function: no gradient out of stage 1, no mutated inputs, the
same outputs for the same inputs, and no reduction over the batch where the output is per row."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from hypothesis import strategies as st
from torch import Tensor

from proxim.parts import Advantage, Baseline, Part, Preference, TrustRegion
from proxim.rollout import Estimate, Rollout
from proxim.testing import strategies as strat
from proxim.testing.calling import StageOne, check_region_output, describe, invoke, preference_result, region_result
from proxim.testing.check import CheckFailure, Context
from proxim.testing.comparing import compare
from proxim.testing.devices import current_device, to_device


def no_gradient_leak(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=False)

    def outputs(raw: object) -> dict[str, Tensor]:
        if isinstance(raw, Tensor):
            return {"the baseline": raw}
        if isinstance(raw, Estimate):
            found = {"Estimate.advantages": raw.advantages, "Estimate.returns": raw.returns}
            found.update({f"metric {k!r}": v for k, v in (raw.metrics or {}).items()})
            return {k: v for k, v in found.items() if isinstance(v, Tensor)}
        raise CheckFailure(f"it returned {describe(raw)}.")

    def test(case: strat.StageOneCase) -> None:
        device = current_device()
        batch = to_device(case.batch, device)
        tracked = {
            name: getattr(batch, name).detach().clone().requires_grad_(True)
            for name in ("old_logprobs", "rewards", "ref_logprobs", "values", "rollout_logprobs")
            if getattr(batch, name) is not None
        }
        base = None if case.baseline is None else case.baseline.detach().clone().to(device).requires_grad_(True)
        raw = subject.call(batch.replace(**tracked), base)  # under torch.no_grad(), as the objective calls it
        inputs = [*tracked.values(), base]
        for name, value in outputs(raw).items():
            passed_through = any(value is t for t in inputs)  # e.g. the critic baseline returning Rollout.values
            if value.requires_grad and not passed_through:
                raise CheckFailure(
                    f"{name} requires grad although it was computed under torch.no_grad(): the part re-enables "
                    f"gradient tracking (or uses tensors that require grad), so a gradient would flow out of stage 1."
                )
        part_ = subject.part
        with torch.enable_grad():
            if isinstance(part_, Baseline):
                raw = invoke(part_, lambda: part_(batch))
            else:
                assert isinstance(part_, Advantage) and case.baseline is not None
                given = case.baseline.to(device)
                raw = invoke(part_, lambda: part_(batch, given))
        for name, value in outputs(raw).items():
            if value.requires_grad:
                raise CheckFailure(
                    f"{name} requires grad although no input does: the part holds or creates tensors that require "
                    f"grad, so a gradient would flow out of stage 1."
                )

    ctx.given(subject.cases(), test)


def _snapshot(tensors: Mapping[str, Tensor | None]) -> dict[str, tuple[Tensor, Tensor, int]]:
    return {name: (t, t.detach().clone(), t._version) for name, t in tensors.items() if isinstance(t, Tensor)}


def _assert_unchanged(snapshot: Mapping[str, tuple[Tensor, Tensor, int]]) -> None:
    for name, (tensor, copy, version) in snapshot.items():
        now = tensor.detach()
        if now.is_floating_point():
            same = bool(((now == copy) | (torch.isnan(now) & torch.isnan(copy))).all())
        else:
            same = torch.equal(now, copy)
        if tensor._version != version or not same:
            raise CheckFailure(f"it modified its input {name} in place; parts must never mutate their inputs (copy first, or use out-of-place ops).")


def inputs_not_mutated(part: Part, ctx: Context) -> None:
    if isinstance(part, Preference):

        def preference_test(case: strat.PreferenceCase) -> None:
            leaves = [t.clone().to(current_device()).requires_grad_(True) for t in (case.chosen, case.rejected)]
            inputs = {"chosen": leaves[0] * 1, "rejected": leaves[1] * 1}
            snapshot = _snapshot(inputs)
            out = invoke(part, lambda: part(inputs["chosen"], inputs["rejected"]))
            _assert_unchanged(snapshot)
            if isinstance(out, Tensor) and out.requires_grad:
                invoke(part, lambda: torch.autograd.grad(out.sum(), leaves, allow_unused=True))
            _assert_unchanged(snapshot)

        ctx.given(strat.preference_cases(), preference_test)
        return
    if isinstance(part, TrustRegion):

        def region_test(case: strat.RegionCase) -> None:
            device = current_device()
            leaf = case.logprobs.clone().to(device).requires_grad_(True)
            inputs = {"logprobs": leaf * 1, "anchor": case.anchor.to(device), "advantages": case.advantages.to(device), "mask": case.mask.to(device)}
            snapshot = _snapshot(inputs)
            out = invoke(part, lambda: part(inputs["logprobs"], inputs["anchor"], inputs["advantages"], inputs["mask"]))
            _assert_unchanged(snapshot)
            loss = check_region_output(out, case.mask)
            if loss.requires_grad:
                total = invoke(part, lambda: torch.where(inputs["mask"], loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).sum())
                invoke(part, lambda: torch.autograd.grad(total, leaf, allow_unused=True))
            _assert_unchanged(snapshot)

        ctx.given(strat.region_cases(), region_test)
        return

    subject = StageOne.of(part, ctx, composed=False)

    def stage_one_test(case: strat.StageOneCase) -> None:
        batch, baseline = to_device(case.batch, current_device()), to_device(case.baseline, current_device())
        tensors: dict[str, Tensor | None] = {f"batch.{name}": getattr(batch, name) for name in Rollout._FIELDS}
        tensors["baseline"] = baseline
        snapshot = _snapshot(tensors)
        subject.call(batch, baseline)
        _assert_unchanged(snapshot)

    ctx.given(subject.cases(), stage_one_test)


def deterministic(part: Part, ctx: Context) -> None:
    what = "called twice on the same inputs, it returned different values (a part holds no state and draws no random numbers)"
    if isinstance(part, Preference):
        ctx.given(
            strat.preference_cases(),
            lambda c: compare(preference_result(part, c.chosen, c.rejected), preference_result(part, c.chosen, c.rejected), what, exact=True),
        )
        return
    if isinstance(part, TrustRegion):

        def region_test(case: strat.RegionCase) -> None:
            inputs = (case.logprobs, case.anchor, case.advantages, case.mask)
            compare(region_result(part, *inputs), region_result(part, *inputs), what, exact=True)

        ctx.given(strat.region_cases(), region_test)
        return
    subject = StageOne.of(part, ctx, composed=False)
    ctx.given(
        subject.cases(),
        lambda c: compare(subject.result(c.batch, c.baseline), subject.result(c.batch, c.baseline), what, exact=True),
    )


def _fresh_row(gen: torch.Generator, tokens: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logprobs, anchor, advantages, mask) for one new row: at least one valid token, zeros on padding."""
    mask = torch.rand(tokens, generator=gen) < 0.7
    mask[int(torch.randint(0, tokens, (1,), generator=gen))] = True
    anchor = -torch.empty(tokens, dtype=torch.float64).exponential_(1.0, generator=gen)
    logprobs = (anchor + torch.randn(tokens, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    advantages = torch.randn(tokens, generator=gen, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    return (*(torch.where(mask, t, zero).to(dtype) for t in (logprobs, anchor, advantages)), mask)  # type: ignore[return-value]


def rows_independent(part: Part, ctx: Context) -> None:
    if isinstance(part, Preference):

        def preference_test(example: tuple[strat.PreferenceCase, int]) -> None:
            case, pick = example
            k = pick % case.chosen.shape[0]
            gen = torch.Generator().manual_seed(case.seed + 7)
            chosen, rejected = case.chosen.clone(), case.rejected.clone()
            chosen[k], rejected[k] = (torch.randn(2, generator=gen, dtype=torch.float64) * 3).to(chosen.dtype)
            before = preference_result(part, case.chosen, case.rejected)
            after = preference_result(part, chosen, rejected)
            others = torch.arange(chosen.shape[0]) != k
            compare(before, after, f"changing only pair {k} changed another pair's loss (a preference loss must not reduce over the batch)", rows=others)

        ctx.given(st.tuples(strat.preference_cases(min_pairs=2), st.integers(0, 63)), preference_test)
        return
    assert isinstance(part, TrustRegion)

    def test(example: tuple[strat.RegionCase, int]) -> None:
        case, pick = example
        rows, tokens = case.mask.shape
        k = pick % rows
        gen = torch.Generator().manual_seed(case.seed + 7)
        new = _fresh_row(gen, tokens, case.logprobs.dtype)
        tensors = [t.clone() for t in (case.logprobs, case.anchor, case.advantages, case.mask)]
        for t, row in zip(tensors, new):
            t[k] = row
        before = region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        after = region_result(part, *tensors)
        others = torch.arange(rows) != k
        compare(before, after, f"changing only row {k} changed another row's output (a region must not reduce over the batch)", rows=others)

    ctx.given(st.tuples(strat.region_cases(min_rows=2), st.integers(0, 63)), test)
