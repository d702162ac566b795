"""The diagnostics an objective reports beside its results: stage 1's advantage and reward statistics,
stage 2's trust-region metrics and ratio statistics. All are detached 0-d tensors; none enters a loss.
Each is finite on an empty batch (B = 0 or T = 0): 0, like a fully masked one.

A part's own metrics are published under its axis (``advantage/<key>``, ``region/<key>``); the keys the
objective publishes there itself are reserved, and a part that returns one is an error, not overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from proxim.errors import BatchError, ConfigurationError
from proxim.ops import LOG_RATIO_CLAMP, Padding, compute_dtype, group_index, masked_mean, masked_sum, sequence_rewards
from proxim.parts import Part, TrustRegion
from proxim.rollout import Rollout

RESERVED_METRICS: dict[str, frozenset[str]] = {
    "advantage": frozenset({"mean", "std", "zero_std_groups"}),
    "region": frozenset({"approx_kl", "ratio_mean", "ratio_max"}),
}
"""Per axis, the keys the objective publishes under ``<axis>/`` itself, which a part's metrics may not use."""


def check_declared_metrics(kind: str, part: Part) -> None:
    """`ConfigurationError` when `part` declares (``metric_names``) a key the objective reserves under its axis."""
    clash = sorted(RESERVED_METRICS.get(kind, frozenset()) & part.metric_names)
    if clash:
        raise ConfigurationError(f"{kind} {part.name!r} declares the metric {clash[0]!r}, {_reserved(kind, clash[0])}")


def check_metric_keys(kind: str, part: Part, keys: Iterable[str]) -> None:
    """`BatchError` when `part` returned a metric under a key the objective reserves under its axis."""
    reserved = RESERVED_METRICS[kind]
    for key in keys:
        if key in reserved:
            raise BatchError(f"{kind} {part.name!r} returned the metric {key!r}, {_reserved(kind, key)}")


def _reserved(kind: str, key: str) -> str:
    return f"but the objective publishes {kind}/{key} itself (reserved under {kind}/: {', '.join(sorted(RESERVED_METRICS[kind]))}). Rename the part's metric."


def mean_or_zero(x: Tensor) -> Tensor:
    """``x.mean()``, or 0 when `x` is empty (where ``mean`` is NaN)."""
    return x.mean() if x.numel() else x.new_zeros(())


def stage_one_metrics(batch: Rollout, adv: Tensor) -> dict[str, Tensor]:
    """``advantage/mean``, ``advantage/std`` and ``reward/mean``, and with group ids ``advantage/zero_std_groups``."""
    mask = batch.mask
    mean = masked_mean(adv, mask)
    count = mask.sum().clamp(min=2).to(adv.dtype)
    std = (masked_sum((adv - mean) ** 2, mask) / (count - 1)).sqrt()
    seq_rewards = sequence_rewards(batch.rewards.to(adv.dtype), mask)
    metrics = {"advantage/mean": mean, "advantage/std": std, "reward/mean": mean_or_zero(seq_rewards)}
    if batch.group is not None:
        # A group has zero spread when its largest and smallest rewards are equal: exact, unlike a std
        # taken around a rounded mean (three rewards of 0.1 have std ~1e-17). Groups of one count.
        index, k = group_index(batch.group)
        fill = torch.full((k,), torch.inf, dtype=seq_rewards.dtype, device=seq_rewards.device)
        high = (-fill).scatter_reduce(0, index, seq_rewards, "amax")
        low = fill.scatter_reduce(0, index, seq_rewards, "amin")
        metrics["advantage/zero_std_groups"] = (high == low).sum().to(adv.dtype)
    return metrics


def region_metrics(per_token: Mapping[str, Tensor], lp: Tensor, anchor: Tensor, padding: Padding) -> dict[str, Tensor]:
    """Masked means of the region's per-token metrics, and ratio statistics. `lp` and `anchor` are 0 where
    the mask is False (as `Objective.loss` passes them), so the log-ratio there is exactly 0.

    Written for the eager hot path, where it would otherwise cost as much as the loss on CPU: the
    `Padding`'s token count, boolean metrics counted in int32 (no float copy) through one scratch buffer,
    one ``expm1`` for both the ratio and the approximate KL (the ratio is taken as ``expm1(lr) + 1``,
    within one rounding of ``exp(lr)``), and in-place arithmetic on its own temporaries (on CPU a fresh
    [B, T] buffer costs more in page faults than the arithmetic written into it).
    """
    mask = padding.mask
    count = padding.tokens
    out: dict[str, Tensor] = {}
    scratch: Tensor | None = None  # one buffer for every boolean metric's `& mask`
    for key, value in per_token.items():
        value = value.detach()
        if value.dtype == torch.bool and value.shape == mask.shape:
            scratch = torch.logical_and(value, mask, out=torch.empty_like(mask) if scratch is None else scratch)
            out[f"region/{key}"] = scratch.sum(dtype=torch.int32).to(lp.dtype) / count
        elif value.dtype == torch.bool:
            out[f"region/{key}"] = (value & mask).sum(dtype=torch.int32).to(lp.dtype) / count
        else:
            out[f"region/{key}"] = padding.sum(value.to(lp.dtype)) / count
    lr = (lp - anchor).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # ops.log_ratio, in place
    excess = torch.expm1(lr)
    out["region/approx_kl"] = lr.neg_().add_(excess).sum() / count  # expm1(lr) - lr; 0 where masked (lr = 0)
    ratio = excess.add_(1.0)  # exactly 1 where masked (lr = 0 there), so masking by multiplication is exact
    ratio = padding.zero(ratio) if padding.weights is None else ratio.mul_(padding.weights)
    out["region/ratio_mean"] = ratio.sum() / count
    out["region/ratio_max"] = ratio.amax() if ratio.numel() else ratio.new_zeros(())  # amax of nothing is an error
    return out


GRADIENT_METRICS = (
    "gradient/zero_fraction",
    "gradient/zero_fraction_pos",
    "gradient/zero_fraction_neg",
    "gradient/reversed_fraction_pos",
    "gradient/reversed_fraction_neg",
    "gradient/weight_mean",
    "gradient/ratio_std",
)
"""The keys of `gradient_diagnostics`, the same for every trust region."""

#: Which token count each gradient metric is a mean over (`GradientDiagnostics.counts`).
_OVER = {
    "gradient/zero_fraction": "signed",
    "gradient/zero_fraction_pos": "pos",
    "gradient/zero_fraction_neg": "neg",
    "gradient/reversed_fraction_pos": "pos",
    "gradient/reversed_fraction_neg": "neg",
    "gradient/weight_mean": "signed",
    "gradient/ratio_std": "valid",
}


class GradientDiagnostics(NamedTuple):
    """`gradient_diagnostics`' means (0-d tensors, keys `GRADIENT_METRICS`) and the token counts they are over
    (``valid``, ``signed``: A != 0, ``pos``, ``neg``), so that batches combine (`combine_gradient_diagnostics`): exactly
    for the fractions and the mean weight; the ratio's standard deviation is averaged over batches."""

    metrics: dict[str, Tensor]
    counts: dict[str, Tensor]


def gradient_diagnostics(region: TrustRegion, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> GradientDiagnostics:
    """What the trust region does to each token's gradient, in terms every region shares (`GRADIENT_METRICS`).

    A region's own metrics differ from region to region (a clip fraction, a mask fraction, a mean weight);
    these are the same for all, so that objectives can be put side by side. Autograd on a detached copy
    gives each token's coefficient ``g_t = -d loss / d logprob_t`` of the summed per-token loss, and its
    weight ``w_t = g_t / A_t``, which is 1 on-policy for every built-in region (`r = 1`). Over the valid
    tokens with ``A != 0``: the fraction whose gradient is exactly zero (clipped or masked), overall and
    for ``A > 0`` and ``A < 0``; the fraction whose gradient points against the advantage (``w < 0``, a
    corrective weight such as DRPO's beyond its boundary), by sign; the mean weight; and the standard
    deviation of the ratio ``exp(logprob - anchor)`` over every valid token. A mean over no tokens is 0,
    with a count of 0 (which `combine_gradient_diagnostics` leaves out). Nothing here enters a loss.
    """
    dtype = compute_dtype(logprobs.dtype)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    lp = torch.where(mask, logprobs.detach().to(dtype), zero).requires_grad_(True)
    anc = torch.where(mask, anchor.detach().to(dtype), zero)
    adv = torch.where(mask, advantages.detach().to(dtype), zero)
    with torch.enable_grad():
        loss = region(lp, anc, adv, mask, metrics=False).loss
        (grad,) = torch.autograd.grad(torch.where(mask, loss, zero).sum(), lp, allow_unused=True)
    g = -grad if grad is not None else torch.zeros_like(lp)
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    signed = pos | neg
    weight = torch.where(signed, g / torch.where(signed, adv, 1.0), zero)
    counts = {name: where.sum().to(dtype) for name, where in (("valid", mask), ("signed", signed), ("pos", pos), ("neg", neg))}

    def fraction(where: Tensor, of: str) -> Tensor:
        return (where & {"signed": signed, "pos": pos, "neg": neg}[of]).sum().to(dtype) / counts[of].clamp(min=1)

    ratio = torch.exp((lp.detach() - anc).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    metrics = {
        "gradient/zero_fraction": fraction(g == 0, "signed"),
        "gradient/zero_fraction_pos": fraction(g == 0, "pos"),
        "gradient/zero_fraction_neg": fraction(g == 0, "neg"),
        "gradient/reversed_fraction_pos": fraction(weight < 0, "pos"),
        "gradient/reversed_fraction_neg": fraction(weight < 0, "neg"),
        "gradient/weight_mean": weight.sum() / counts["signed"].clamp(min=1),
        "gradient/ratio_std": _masked_std(ratio, mask),
    }
    return GradientDiagnostics(metrics, counts)


def combine_gradient_diagnostics(parts: Iterable[GradientDiagnostics]) -> dict[str, float]:
    """The means of several batches' `gradient_diagnostics` (micro-batches, updates) as one, each weighted by the
    tokens it is over; a metric over no token in any batch is left out rather than reported as 0."""
    sums: dict[str, Tensor] = {}
    totals: dict[str, Tensor] = {}
    for part in parts:
        for key, value in part.metrics.items():
            n = part.counts[_OVER[key]]
            sums[key] = sums.get(key, 0.0) + value.double() * n
            totals[key] = totals.get(key, 0.0) + n.double()
    return {key: float(sums[key] / totals[key]) for key in sums if float(totals[key]) > 0}


def _masked_std(x: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum().to(x.dtype)
    mean = masked_sum(x, mask) / n.clamp(min=1)
    return (masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)).sqrt()
