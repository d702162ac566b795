"""The property checks of baselines and advantages: group independence, permutation equivariance, shift
equivariance and invariance, zero sum per group, zero advantage for degenerate groups, outcome broadcast.

An advantage is checked composed with its ``default_baseline``, as ``proxim.objective(advantage=...)``
composes them.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import Tensor

from proxim.parts import Part
from proxim.rollout import Rollout
from proxim.testing import strategies as strat
from proxim.testing.calling import Result, StageOne
from proxim.testing.check import CheckFailure, Context
from proxim.testing.comparing import compare


def _perturb_rows(batch: Rollout, rows: Tensor, gen: torch.Generator) -> Rollout:
    """A copy of `batch` with new rewards, log-probs, values and masks (>= 1 valid token) in `rows`."""
    mask = batch.mask.clone()
    count, tokens = int(rows.sum()), mask.shape[1]
    new_mask = torch.rand(count, tokens, generator=gen) < 0.7
    new_mask[torch.arange(count), torch.randint(0, tokens, (count,), generator=gen)] = True
    mask[rows] = new_mask
    zero = torch.zeros((), dtype=torch.float64)
    changes: dict[str, Tensor | None] = {"mask": mask}
    for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs", "values", "rewards"):
        t = getattr(batch, name)
        if t is None:
            continue
        shape = (count, *t.shape[1:])
        if name.endswith("logprobs"):
            fresh = -torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=gen)
        else:
            fresh = torch.randint(-16, 17, shape, generator=gen).to(torch.float64) / 8
        if t.dim() == 2:
            fresh = torch.where(new_mask, fresh, zero)
        updated = t.clone()
        updated[rows] = fresh.to(t.dtype)
        if t.dim() == 2:
            updated = torch.where(mask, updated, torch.zeros((), dtype=t.dtype))
        changes[name] = updated
    return batch.replace(**changes)


def group_independent(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=True)

    def test(example: tuple[strat.StageOneCase, int]) -> None:
        case, pick = example
        g = pick % case.groups
        rows = case.slots == g
        changed = _perturb_rows(case.batch, rows, torch.Generator().manual_seed(case.seed + 3))
        before = subject.result(case.batch, None)
        after = subject.result(changed, None)
        compare(before, after, f"changing only group {g} (rows {torch.nonzero(rows).flatten().tolist()}) changed another group's output", rows=~rows)

    ctx.given(st.tuples(subject.cases(dtype=torch.float64, min_groups=2), st.integers(0, 63)), test)


def _permute(batch: Rollout, perm: Tensor) -> Rollout:
    return batch.replace(**{name: getattr(batch, name)[perm] for name in Rollout._FIELDS if getattr(batch, name) is not None})


def permutation_equivariant(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        perm = torch.randperm(case.batch.batch_size, generator=torch.Generator().manual_seed(case.seed + 5))
        expected = subject.result(case.batch, None).permuted(perm)
        actual = subject.result(_permute(case.batch, perm), None)
        compare(expected, actual, f"permuting the rows by {perm.tolist()} did not permute the output the same way", skip_scalars=True)

    ctx.given(subject.cases(dtype=torch.float64), test)


def _shifted(case: strat.StageOneCase) -> tuple[Rollout, Tensor]:
    """The batch with c_g (a multiple of 1/8 in [-10, 10]) added to every sequence reward of group g; c per row."""
    gen = torch.Generator().manual_seed(case.seed + 11)
    shifts = torch.randint(-80, 81, (case.groups,), generator=gen).to(torch.float64) / 8
    per_row = shifts[case.slots]
    batch = case.batch
    rewards = batch.rewards
    if rewards.dim() == 1:
        shifted = rewards + per_row.to(rewards.dtype)
    else:
        mask = batch.mask
        positions = torch.arange(mask.shape[1])
        last = mask & (positions == torch.where(mask, positions, -1).amax(dim=1, keepdim=True))
        shifted = rewards + torch.where(last, per_row.unsqueeze(1), 0.0).to(rewards.dtype)
    return batch.replace(rewards=shifted), per_row


def shift_equivariant(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        shifted, per_row = _shifted(case)
        before = subject.result(case.batch, None)
        value, where = before.items["baseline"]
        offset = per_row.to(value.dtype) if value.dim() == 1 else per_row.to(value.dtype).unsqueeze(1).expand_as(value)
        expected = Result({"baseline": (value + offset, where)})
        compare(expected, subject.result(shifted, None), f"adding {per_row.tolist()} to the rows' rewards did not shift the baseline by as much")

    ctx.given(subject.cases(dtype=torch.float64, exact_rewards=True), test)


def shift_invariant(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        shifted, per_row = _shifted(case)
        compare(
            subject.result(case.batch, None),
            subject.result(shifted, None),
            f"adding {per_row.tolist()} to the rows' rewards changed the advantages",
            skip_scalars=True,
        )

    ctx.given(subject.cases(dtype=torch.float64, exact_rewards=True), test)


def _row_advantages(result: Result, mask: Tensor) -> Tensor:
    adv = result.items["advantages"][0]
    count = mask.sum(dim=1).clamp(min=1).to(adv.dtype)
    return torch.where(mask, adv, torch.zeros((), dtype=adv.dtype)).sum(dim=1) / count


def zero_sum_per_group(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        per_row = _row_advantages(subject.result(case.batch, None), case.batch.mask)
        for g in range(case.groups):
            members = case.slots == g
            total = float(per_row[members].sum())
            scale = 1.0 + float(per_row.abs().max())
            if abs(total) > 1e-9 * scale * int(members.sum()):
                raise CheckFailure(
                    f"group {g} (rows {torch.nonzero(members).flatten().tolist()}) has advantages {per_row[members].tolist()}, summing to {total!r}, not 0."
                )

    ctx.given(subject.cases(dtype=torch.float64), test)


def degenerate_groups_zero(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        batch = case.batch
        mask = batch.mask
        rewards = batch.rewards if batch.rewards.dim() == 1 else torch.where(mask, batch.rewards, 0.0).sum(dim=1)
        adv = subject.result(batch, None).items["advantages"][0]
        for g in range(case.groups):
            members = case.slots == g
            if bool((rewards[members] == rewards[members][0]).all()):
                values = adv[members.unsqueeze(1) & mask]
                if values.numel() and float(values.abs().max()) > 1e-9 * (1.0 + float(rewards.abs().max())):
                    raise CheckFailure(
                        f"group {g} (rows {torch.nonzero(members).flatten().tolist()}) has identical rewards {rewards[members].tolist()} but advantages {values.tolist()}."
                    )

    ctx.given(subject.cases(dtype=torch.float64, degenerate=True, exact_rewards=True), test)


def outcome_broadcast(part: Part, ctx: Context) -> None:
    subject = StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        mask = case.batch.mask
        adv = subject.result(case.batch, None).items["advantages"][0]
        for i in range(mask.shape[0]):
            row = adv[i][mask[i]]
            if row.numel() and not bool((row == row[0]).all()):
                raise CheckFailure(f"row {i} has advantages {row.tolist()} on its valid tokens, not one value per sequence.")

    ctx.given(subject.cases(exact_rewards=True), test)
