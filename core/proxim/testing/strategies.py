"""Hypothesis strategies for valid inputs of each kind of part.

Structure is drawn by hypothesis, so that a failing example shrinks to a small readable one: the
number of rows and tokens, the mask (right-padded or with holes, at least one valid token per row
unless asked otherwise), ragged prompt groups with arbitrary integer ids in shuffled order
(singletons included), groups whose rewards are all equal, the dtype (float32 or float64), and the
scales (log-ratios from exactly 0 to far beyond the +-20 clamp). Values are then filled from a
seeded ``torch.Generator``, so drawing stays cheap and every example is reproducible.

Public strategies: `rollouts` (a `proxim.Rollout` holding the fields a part ``requires``) and
`region_inputs` (the four tensors a trust region is called with). The checks use the richer
`stage_one_cases` and `region_cases`, which also carry the group layout and a seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import torch
from hypothesis import strategies as st
from torch import Tensor

from proxim.rollout import OPTIONAL_FIELDS, Rollout

DTYPES = (torch.float32, torch.float64)
MAX_GROUPS = 4
"""Most rows in a drawn batch; groups are 1 to 4 prompts of 1 to 3 responses (more with min_group_size)."""
MAX_TOKENS = 6


@attrs.frozen(repr=False, eq=False)
class StageOneCase:
    """Inputs of a baseline or an advantage, as the objective passes them in stage 1.

    batch:    the Rollout (rewards [B] for sequence parts, [B, T] with zeros on padding for token-level ones).
    slots:    [B] int64 dense group index 0..K-1 of each row (set even when ``batch.group`` is None).
    baseline: the baseline handed to an advantage ([B], or [B, T] state values), or None.
    seed:     the generator seed the values were drawn with.
    """

    batch: Rollout
    slots: Tensor
    baseline: Tensor | None
    seed: int

    @property
    def groups(self) -> int:
        return int(self.slots.max()) + 1

    def __repr__(self) -> str:
        return _case_repr(self, ("batch", "slots", "baseline", "seed"))


@attrs.frozen(repr=False, eq=False)
class RegionInputs:
    """The four [B, T] inputs of a trust region: masked positions hold 0 in every float input."""

    logprobs: Tensor
    anchor: Tensor
    advantages: Tensor
    mask: Tensor

    def __repr__(self) -> str:
        return _case_repr(self, ("logprobs", "anchor", "advantages", "mask"))


@attrs.frozen(repr=False, eq=False)
class RegionCase(RegionInputs):
    """`RegionInputs` and the generator seed they were drawn with."""

    seed: int = 0

    def __repr__(self) -> str:
        return _case_repr(self, ("logprobs", "anchor", "advantages", "mask", "seed"))


def _case_repr(obj: object, names: Iterable[str]) -> str:
    parts = []
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, Rollout):
            fields = {f: getattr(value, f) for f in ("old_logprobs", "mask", "rewards", *OPTIONAL_FIELDS)}
            value = "Rollout(" + ", ".join(f"{k}={_tensor(v)}" for k, v in fields.items() if v is not None) + ")"
        elif isinstance(value, Tensor):
            value = _tensor(value)
        parts.append(f"{name}={value}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def _tensor(t: Tensor) -> str:
    return f"tensor({t.tolist()}, dtype={t.dtype})"


# -- structure -------------------------------------------------------------------------------------


@st.composite
def masks(draw: st.DrawFn, rows: int, tokens: int, *, min_tokens: int = 1, empty_row: bool = False) -> Tensor:
    """[rows, tokens] bool: right-padded or with holes; `min_tokens` valid tokens per row; one empty row on request."""
    if draw(st.booleans()):
        lengths = [draw(st.integers(min_tokens, tokens)) for _ in range(rows)]
        mask = torch.arange(tokens).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    else:
        mask = torch.tensor([draw(st.lists(st.booleans(), min_size=tokens, max_size=tokens)) for _ in range(rows)], dtype=torch.bool)
        for row in range(rows):
            while int(mask[row].sum()) < min_tokens:
                mask[row, draw(st.integers(0, tokens - 1))] = True
    if empty_row:
        mask[draw(st.integers(0, rows - 1))] = False
    return mask.reshape(rows, tokens)


@st.composite
def group_layouts(draw: st.DrawFn, *, min_group_size: int = 1, min_groups: int = 1) -> tuple[Tensor, Tensor]:
    """(slots [B] dense group index, ids [B] arbitrary distinct int64 ids): ragged groups, shuffled rows."""
    k = draw(st.integers(min_groups, MAX_GROUPS))
    top = max(3, min_group_size)
    sizes = [draw(st.integers(min_group_size, top)) for _ in range(k)]
    slots = [g for g, size in enumerate(sizes) for _ in range(size)]
    order = draw(st.permutations(range(len(slots))))
    slots_t = torch.tensor([slots[i] for i in order], dtype=torch.long)
    ids = draw(st.lists(st.integers(-(10**6), 10**6), min_size=k, max_size=k, unique=True))
    return slots_t, torch.tensor(ids, dtype=torch.long)[slots_t]


def _logprobs(gen: torch.Generator, shape: tuple[int, ...], scale: float) -> Tensor:
    """Log-probs <= 0: -Exp(1) * scale."""
    return -torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=gen) * scale


def _randn(gen: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=gen)


# -- stage 1 ---------------------------------------------------------------------------------------


@st.composite
def stage_one_cases(
    draw: st.DrawFn,
    requires: Iterable[str] = (),
    *,
    token_rewards: bool | None = None,
    dtype: torch.dtype | None = None,
    min_tokens: int = 1,
    empty_row: bool = False,
    min_group_size: int = 1,
    min_groups: int = 1,
    degenerate: bool = False,
    exact_rewards: bool = False,
    baseline: str | None = None,
) -> StageOneCase:
    """A `StageOneCase` for a part that `requires` those optional Rollout fields.

    token_rewards: [B, T] rewards (zero on padding; an outcome on the last valid token, or dense), [B]
                   when False, either when None.
    empty_row:     force at least one row with no valid token (min_tokens is then 0 for it).
    degenerate:    force at least one group whose sequence rewards are all equal.
    exact_rewards: rewards on the grid k/8 (exact in float64 sums), so that invariances hold to rounding.
    baseline:      None (no baseline input), "sequence" ([B]), "state" ([B, T]) or "either".
    """
    requires = frozenset(requires)
    dtype = dtype or draw(st.sampled_from(DTYPES))
    slots, ids = draw(group_layouts(min_group_size=min_group_size, min_groups=min_groups))
    rows = int(slots.numel())
    tokens = draw(st.integers(1, MAX_TOKENS))
    mask = draw(masks(rows, tokens, min_tokens=min_tokens, empty_row=empty_row))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    style = "grid" if exact_rewards else draw(st.sampled_from(("binary", "grid", "normal")))
    if style == "binary":
        rewards = torch.randint(0, 2, (rows,), generator=gen).to(torch.float64)
    elif style == "grid":
        rewards = torch.randint(-16, 17, (rows,), generator=gen).to(torch.float64) / 8
    else:
        rewards = _randn(gen, (rows,)) * draw(st.sampled_from((1e-3, 1.0, 1e3)))
    equal = set(draw(st.sets(st.integers(0, int(slots.max())))))
    if degenerate and not equal:
        equal.add(draw(st.integers(0, int(slots.max()))))
    for g in equal:
        members = slots == g
        rewards[members] = rewards[members][0]

    if token_rewards is None:
        token_rewards = draw(st.booleans())
    if token_rewards:
        dense = not exact_rewards and draw(st.booleans())
        if dense:
            rewards = _randn(gen, (rows, tokens))
        else:
            last = mask & (torch.arange(tokens) == torch.where(mask, torch.arange(tokens), -1).amax(dim=1, keepdim=True))
            rewards = torch.where(last, rewards.unsqueeze(1).expand(rows, tokens), 0.0)
        rewards = torch.where(mask, rewards, 0.0)

    zero = torch.zeros((), dtype=torch.float64)
    scale = draw(st.sampled_from((1e-3, 1.0, 10.0)))

    def logprobs() -> Tensor:
        return torch.where(mask, _logprobs(gen, (rows, tokens), scale), zero).to(dtype)

    batch = Rollout(
        old_logprobs=logprobs(),
        mask=mask,
        rewards=rewards.to(dtype),
        group=ids if "group" in requires else None,
        ref_logprobs=logprobs() if "ref_logprobs" in requires else None,
        values=torch.where(mask, _randn(gen, (rows, tokens)), zero).to(dtype) if "values" in requires else None,
        rollout_logprobs=logprobs() if "rollout_logprobs" in requires else None,
    )
    base = None
    if baseline is not None:
        kind = draw(st.sampled_from(("sequence", "state"))) if baseline == "either" else baseline
        base = _randn(gen, (rows,)) if kind == "sequence" else torch.where(mask, _randn(gen, (rows, tokens)), zero)
        base = base.to(dtype)
    return StageOneCase(batch=batch, slots=slots, baseline=base, seed=seed)


def rollouts(requires: Iterable[str] = (), **options: Any) -> st.SearchStrategy[Rollout]:
    """Valid `proxim.Rollout` batches holding the optional fields in `requires` (others None).

    Options as `stage_one_cases`: ``token_rewards``, ``dtype``, ``min_tokens``, ``empty_row``,
    ``min_group_size``, ``min_groups``, ``degenerate``, ``exact_rewards``.
    """
    return stage_one_cases(requires, **options).map(lambda case: case.batch)


# -- stage 2 ---------------------------------------------------------------------------------------


@st.composite
def region_cases(
    draw: st.DrawFn,
    *,
    dtype: torch.dtype | None = None,
    min_tokens: int = 1,
    empty_row: bool = False,
    min_rows: int = 1,
    at_anchor: bool = False,
    outcome: bool | None = None,
) -> RegionCase:
    """A `RegionCase`: anchor log-probs from near 0 to -40, log-ratios from exactly 0 to far beyond +-20
    (current log-probs kept <= 0), advantages per token or per row, of scale 1 or 1e3, some exactly 0.
    `at_anchor` makes logprobs equal the anchor; `outcome` forces per-row (True) or per-token (False) advantages.
    """
    dtype = dtype or draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(min_rows, max(min_rows, 6)))
    tokens = draw(st.integers(1, MAX_TOKENS))
    mask = draw(masks(rows, tokens, min_tokens=min_tokens, empty_row=empty_row))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    anchor = _logprobs(gen, (rows, tokens), draw(st.sampled_from((0.01, 1.0, 5.0, 40.0))))
    if at_anchor:
        logprobs = anchor.clone()
    else:
        shift = _randn(gen, (rows, tokens)) * draw(st.sampled_from((0.0, 1e-3, 0.2, 2.0, 40.0)))
        logprobs = (anchor + shift).clamp(max=0.0)
    if outcome is None:
        outcome = draw(st.booleans())
    advantages = _randn(gen, (rows, 1) if outcome else (rows, tokens)).expand(rows, tokens)
    advantages = advantages * draw(st.sampled_from((1.0, 1e3)))
    if draw(st.booleans()):
        zero_rows = torch.rand((rows, 1) if outcome else (rows, tokens), generator=gen, dtype=torch.float64) < 0.3
        advantages = torch.where(zero_rows, 0.0, advantages)
    zero = torch.zeros((), dtype=torch.float64)
    return RegionCase(
        logprobs=torch.where(mask, logprobs, zero).to(dtype),
        anchor=torch.where(mask, anchor, zero).to(dtype),
        advantages=torch.where(mask, advantages, zero).to(dtype).contiguous(),
        mask=mask,
        seed=seed,
    )


def region_inputs(**options: Any) -> st.SearchStrategy[RegionInputs]:
    """Valid inputs of a trust region (`RegionInputs`); options as `region_cases`."""
    return region_cases(**options).map(lambda c: RegionInputs(logprobs=c.logprobs, anchor=c.anchor, advantages=c.advantages, mask=c.mask))


@attrs.frozen(repr=False, eq=False)
class PreferenceCase:
    """Inputs of a preference loss: the implicit rewards' log-ratios of the chosen and rejected responses, [B] each."""

    chosen: Tensor
    rejected: Tensor
    seed: int

    def __repr__(self) -> str:
        return _case_repr(self, ("chosen", "rejected", "seed"))


@st.composite
def preference_cases(draw: st.DrawFn, *, dtype: torch.dtype | None = None, min_pairs: int = 1) -> PreferenceCase:
    """A `PreferenceCase`: 1 to 8 pairs, log-ratios of scale 0 (chosen == rejected), 0.1, 1, 10 or 1000."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    pairs = draw(st.integers(min_pairs, max(min_pairs, 8)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    chosen = _randn(gen, (pairs,)) * draw(st.sampled_from((0.1, 1.0, 10.0, 1e3)))
    rejected = chosen.clone() if draw(st.booleans()) else _randn(gen, (pairs,)) * draw(st.sampled_from((0.1, 1.0, 10.0, 1e3)))
    return PreferenceCase(chosen=chosen.to(dtype), rejected=rejected.to(dtype), seed=seed)
