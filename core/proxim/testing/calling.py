"""Calling parts the way `proxim.Objective` calls them, and collecting what they return as a `Result`.

Stage-1 parts run under ``torch.no_grad()`` with a validated `Rollout`; trust regions with ``logprobs``
carrying the gradient; preference losses on fresh leaves. Whatever a part raises, or returns in the
wrong form, is a `CheckFailure` naming what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import torch
from hypothesis import strategies as st
from torch import Tensor

from proxim import ops
from proxim.parts import Advantage, Baseline, Part, Preference, RegionOutput, TrustRegion
from proxim.rollout import Estimate, Rollout
from proxim.testing import strategies as strat
from proxim.testing.check import CheckFailure, Context
from proxim.testing.devices import CPU, current_device, to_device

_T = TypeVar("_T")


def invoke(part: Part, call: Callable[[], _T]) -> _T:
    """`call()`; whatever it raises (but a `CheckFailure`) is the part's failure to keep the contract."""
    try:
        return call()
    except CheckFailure:
        raise
    except Exception as exc:
        raise CheckFailure(f"it raised {type(exc).__name__}: {exc}") from exc


@attrs.frozen
class Result:
    """Named output tensors of one call, each with the positions that count ([B, T] bool, or None: all)."""

    items: dict[str, tuple[Tensor, Tensor | None]]

    def permuted(self, perm: Tensor) -> Result:
        return Result({k: (v[perm], None if w is None else w[perm]) for k, (v, w) in self.items.items() if v.dim() > 0})


@attrs.frozen
class StageOne:
    """A stage-1 subject: a baseline, an advantage fed the case's random baseline, or an advantage composed
    with its default baseline (`composed`)."""

    part: Part
    base: Baseline | None = None

    @classmethod
    def of(cls, part: Part, ctx: Context, composed: bool) -> StageOne:
        if composed and isinstance(part, Advantage):
            try:
                base_cls = ctx.registry.get("baseline", part.default_baseline)
            except LookupError as exc:
                raise CheckFailure(f"its default_baseline {part.default_baseline!r} is not a registered baseline ({exc}).") from None
            return cls(part, base_cls())
        return cls(part)

    @property
    def requires(self) -> frozenset[str]:
        return self.part.requires | (self.base.requires if self.base is not None else frozenset())

    def cases(self, **options: Any) -> st.SearchStrategy[strat.StageOneCase]:
        part = self.part
        min_group = max(part.min_group_size, self.base.min_group_size if self.base is not None else 1)
        baseline = None
        if isinstance(part, Advantage) and self.base is None:
            baseline = "state" if part.needs_state_values else ("either" if part.accepts_state_values else "sequence")
        options.setdefault("token_rewards", part.token_level if isinstance(part, Advantage) else False)
        return strat.stage_one_cases(self.requires, min_group_size=min_group, baseline=baseline, **options)

    def call(self, batch: Rollout, baseline: Tensor | None) -> object:
        """The raw output (on the check's device), computed under no_grad as the objective does."""
        part = self.part
        batch, baseline = to_device(batch, current_device()), to_device(baseline, current_device())
        with torch.no_grad():
            if isinstance(part, Baseline):
                return invoke(part, lambda: part(batch))
            if self.base is not None:
                base = self.base
                # The baseline sees each sequence's total reward [B], whatever the advantage consumes.
                totals = batch if batch.rewards.dim() == 1 else batch.replace(rewards=ops.masked_sum(batch.rewards, batch.mask, dim=1))
                baseline = invoke(base, lambda: base(totals))
            assert isinstance(part, Advantage) and baseline is not None
            given = baseline
            return invoke(part, lambda: part(batch, given))

    def result(self, batch: Rollout, baseline: Tensor | None, raw: object = None) -> Result:
        raw = to_device(self.call(batch, baseline) if raw is None else raw, CPU)
        batch = to_device(batch, CPU)
        mask = batch.mask
        rows, tokens = mask.shape
        if isinstance(self.part, Baseline):
            if not isinstance(raw, Tensor) or raw.shape not in ((rows,), (rows, tokens)):
                raise CheckFailure(f"it returned {describe(raw)}, not a [B] = ({rows},) or [B, T] = ({rows}, {tokens}) tensor.")
            return Result({"baseline": (raw, mask if raw.dim() == 2 else None)})
        if not isinstance(raw, Estimate):
            raise CheckFailure(f"it returned {describe(raw)}, not a proxim.Estimate.")
        items: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name in ("advantages", "returns"):
            value = getattr(raw, name)
            if value is None and name == "returns":
                continue
            if not isinstance(value, Tensor) or value.shape != (rows, tokens):
                raise CheckFailure(f"its Estimate.{name} is {describe(value)}, not a [B, T] = ({rows}, {tokens}) tensor.")
            items[name] = (value, mask)
        for key, value in (raw.metrics or {}).items():
            if isinstance(value, Tensor) and value.dim() == 0:
                items[f"metrics[{key!r}]"] = (value, None)
        return Result(items)


def describe(obj: object) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return f"{type(obj).__name__} {obj!r}"[:200]


def region_result(part: TrustRegion, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> Result:
    """Call the region (on the check's device) with ``logprobs`` as a fresh leaf; return loss, the gradient
    of the masked loss sum, and metrics, on the CPU."""
    device = current_device()
    leaf = logprobs.detach().clone().to(device).requires_grad_(True)
    anchor, advantages, mask_d = anchor.to(device), advantages.to(device), mask.to(device)
    out = invoke(part, lambda: part(leaf * 1, anchor, advantages, mask_d))
    loss = check_region_output(out, mask)
    if loss.requires_grad:
        total = invoke(part, lambda: torch.where(mask_d, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).sum())
        (grad,) = invoke(part, lambda: torch.autograd.grad(total, leaf, allow_unused=True))
    else:
        grad = None
    if grad is None:
        grad = torch.zeros_like(leaf)
    items: dict[str, tuple[Tensor, Tensor | None]] = {"loss": (loss.detach().cpu(), mask), "gradient": (grad.cpu(), mask)}
    for key, value in out.metrics.items():
        items[f"metrics[{key!r}]"] = (value.detach().cpu(), mask)
    return Result(items)


def preference_result(part: Preference, chosen: Tensor, rejected: Tensor) -> Result:
    """Call the preference loss on fresh leaves; return the per-pair loss and the gradients of its sum."""
    leaves = [t.detach().clone().to(current_device()).requires_grad_(True) for t in (chosen, rejected)]
    out = invoke(part, lambda: part(leaves[0] * 1, leaves[1] * 1))
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(chosen.shape):
        raise CheckFailure(f"it returned {describe(out)}, not a per-pair [B] = {tuple(chosen.shape)} tensor (a preference loss must not reduce).")
    items: dict[str, tuple[Tensor, Tensor | None]] = {"loss": (out.detach().cpu(), None)}
    grads: tuple[Tensor | None, ...]  # None for an input the loss does not depend on (allow_unused)
    if out.requires_grad:
        grads = invoke(part, lambda: torch.autograd.grad(out.sum(), leaves, allow_unused=True))
    else:
        grads = (None, None)
    for name, leaf, grad in zip(("chosen", "rejected"), leaves, grads):
        items[f"gradient[{name}]"] = ((torch.zeros_like(leaf) if grad is None else grad).cpu(), None)
    return Result(items)


def check_region_output(out: object, mask: Tensor) -> Tensor:
    shape = tuple(mask.shape)
    if not isinstance(out, RegionOutput):
        raise CheckFailure(f"it returned {describe(out)}, not a proxim.RegionOutput(loss=..., metrics=...).")
    if not isinstance(out.loss, Tensor) or tuple(out.loss.shape) != shape:
        raise CheckFailure(f"its loss is {describe(out.loss)}, not a per-token [B, T] = {shape} tensor (a region must not reduce).")
    if not isinstance(out.metrics, Mapping):
        raise CheckFailure(f"its metrics are {describe(out.metrics)}, not a mapping of name -> [B, T] tensor.")
    for key, value in out.metrics.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            raise CheckFailure(f"its metric {key!r} is {describe(value)}, not a per-token [B, T] = {shape} tensor.")
    return out.loss
