"""Helpers shared by the trust-region tests."""

from __future__ import annotations

import torch

import proxim

F64 = torch.float64


def coefficients(region: proxim.TrustRegion, lp, anchor, adv, mask=None):  # type: ignore[no-untyped-def]
    """(per-token loss, g = -d(sum of valid per-token losses)/d lp), float64; every token valid by default."""
    lp = torch.as_tensor(lp, dtype=F64).clone().requires_grad_(True)
    anchor = torch.as_tensor(anchor, dtype=F64)
    adv = torch.as_tensor(adv, dtype=F64)
    mask = torch.ones(lp.shape, dtype=torch.bool) if mask is None else mask
    out = region(lp, anchor, adv, mask)
    (grad,) = torch.autograd.grad(torch.where(mask, out.loss, torch.zeros((), dtype=F64)).sum(), lp)
    return out.loss.detach(), -grad
