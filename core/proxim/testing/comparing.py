"""Comparing two `Result`s at the positions that count, exactly or to a dtype's tolerance."""

from __future__ import annotations

import torch
from torch import Tensor

from proxim.testing.calling import Result
from proxim.testing.check import CheckFailure


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest magnitude compared)."""
    return (1e-5, 1e-6) if dtype in (torch.float32, torch.float16, torch.bfloat16) else (1e-9, 1e-12)


def compare(
    expected: Result,
    actual: Result,
    what: str,
    *,
    rows: Tensor | None = None,
    exact: bool = False,
    skip_scalars: bool = False,
) -> None:
    """Raise `CheckFailure` unless `actual` matches `expected` at the positions that count (and in `rows`)."""
    for name, (want, where) in expected.items.items():
        if skip_scalars and want.dim() == 0:
            continue
        if name not in actual.items:
            raise CheckFailure(f"{what}: {name} disappeared from the output.")
        got = actual.items[name][0]
        if got.shape != want.shape:
            raise CheckFailure(f"{what}: {name} changed shape from {tuple(want.shape)} to {tuple(got.shape)}.")
        select = torch.ones(want.shape, dtype=torch.bool) if where is None else where.clone()
        if rows is not None and want.dim() > 0:
            select &= rows.reshape((-1,) + (1,) * (want.dim() - 1)).expand(want.shape)
        if rows is not None and want.dim() == 0:
            continue
        a, b = want.detach().cpu()[select].double(), got.detach().cpu()[select].double()
        if a.numel() == 0:
            continue
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        if not exact:
            rtol, atol = _tolerance(want.dtype if want.is_floating_point() else torch.float64)
            finite = a[torch.isfinite(a)]
            scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
            same |= (a - b).abs() <= atol * scale + rtol * a.abs()
        if not bool(same.all()):
            bad = int(torch.nonzero(~same)[0, 0])
            where_txt = tuple(int(i) for i in torch.nonzero(select)[bad]) if want.dim() > 0 else ()
            at = f" at {list(where_txt)}" if where_txt else ""
            raise CheckFailure(f"{what}: {name}{at} is {b[bad].item()!r}, expected {a[bad].item()!r}.")
