"""Tensor helpers shared by parts: masked statistics, group statistics, reward placement, KL estimators.

Everything here is a pure function of tensors, safe with fully masked rows, and free of device syncs
(``.item()`` only on CPU, where `Padding` checks a sum).
Public, so that plugin authors build on the same definitions as the built-ins.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to this range before exponentiating (verl, OpenRLHF and DRPO's reference do
the same): exp(20) ~ 4.9e8 keeps ratios, their squares and their products finite in float32.
"""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype proxim computes in for inputs of `dtype`: float32 at least (float16 and bfloat16 are
    upcast, float64 stays). exp(12) already overflows float16, and rewards of 1e5 do not fit in it."""
    return torch.promote_types(dtype, torch.float32)


class Padding(NamedTuple):
    """A mask with what masking many [B, T] tensors of one dtype needs, derived once: `zero` and `sum`
    replace ``torch.where(mask, x, 0)`` (and its sum) on the loss's hot path.

    Why not ``torch.where``: on CPU, ``where`` and ``masked_fill`` are not vectorized (about 20 additions'
    worth each, measured), and masking sits on every path of the loss, forward and backward. So in eager
    mode on CPU, `x` is multiplied by `weights` (1.0 where the mask is True, 0.0 elsewhere), whose backward
    is one multiplication too. Multiplying would turn NaN or inf padding into NaN (0 * inf), so the
    product's sum is checked (one scalar read; no device sync on CPU) and ``where`` is used when it is not
    finite; `zero` treats the gradient flowing back the same way (a tensor hook), so that it is exactly 0
    at masked positions whatever arrives there. Under ``torch.compile`` and off CPU, both are ``torch.where``
    (fused, or cheap, there) and `weights` is None.

    mask [B, T] bool; dtype, the float dtype masked. The counts the aggregations divide by, in `dtype` and
    at least 1: lengths [B], each row's valid tokens; tokens, all valid tokens; sequences, the rows with
    at least one valid token.
    """

    mask: Tensor
    dtype: torch.dtype
    weights: Tensor | None
    lengths: Tensor
    tokens: Tensor
    sequences: Tensor

    @classmethod
    def of(cls, mask: Tensor, dtype: torch.dtype) -> Padding:
        weights = float_mask(mask, dtype) if _multiplies(mask.device) else None
        rows = count(mask, dim=1)
        at_least_one = [t.clamp(min=1).to(dtype) for t in (rows, rows.sum(), (rows > 0).sum())]
        return cls(mask, dtype, weights, *at_least_one)

    def zero(self, x: Tensor) -> Tensor:
        """`x` where the mask is True and 0 elsewhere, whatever the padding holds (NaN and inf included), with
        a gradient of exactly 0 there. Equal in value to ``torch.where(mask, x, 0)`` (a masked position may
        hold -0.0 where ``where`` gives +0.0)."""
        if self.weights is None or not self._fits(x):
            return _where(x, self.mask)
        return _zero(x, self.mask, self.weights)

    def sum(self, x: Tensor, dim: int | None = None) -> Tensor:
        """The sum of `x` over valid positions (all, or along `dim`): ``masked_sum``. Its gradient is 0 at
        masked positions whenever the incoming one (a broadcast of the sum's) is finite, so it needs no hook."""
        if self.weights is None or not self._fits(x):
            return _sum(_where(x, self.mask), dim)
        return _masked_sum(x, self.mask, self.weights, dim)

    def _fits(self, x: Tensor) -> bool:
        return x.dtype == self.dtype and x.shape == self.mask.shape and not torch.compiler.is_compiling()


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """`x` where `mask` is True and 0 elsewhere, whatever the padding holds (NaN and inf included), with a
    gradient of 0 there: ``torch.where(mask, x, 0)`` in value, faster on CPU (see `Padding`, which lets
    several calls with one mask share the work)."""
    if x.shape != mask.shape or not x.is_floating_point() or not _multiplies(x.device):
        return _where(x, mask)
    return _zero(x, mask, float_mask(mask, x.dtype))


def _multiplies(device: torch.device) -> bool:
    """Whether `Padding` masks by multiplying here (eager, CPU) rather than with ``torch.where``."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _where(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _zero(x: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """`Padding.zero` on its multiplying path: `_masked`, and the same for the gradient flowing back."""
    masked = _masked(x, mask, weights)
    if x.requires_grad and torch.is_grad_enabled():
        masked.register_hook(lambda grad: _masked(grad, mask, weights))  # type: ignore[no-untyped-call]
    return masked


def _masked(x: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """`x` times the 1/0 `weights`, or ``where`` when that lets NaN or inf padding through (0 * inf is NaN:
    the product's sum is then not finite). Reads one scalar; CPU only, so no device sync."""
    masked = x * weights
    return masked if math.isfinite(masked.sum().item()) else _where(x, mask)


def _masked_sum(x: Tensor, mask: Tensor, weights: Tensor, dim: int | None) -> Tensor:
    """`Padding.sum` on its multiplying path: the sum itself tells whether NaN or inf got through."""
    total = _sum(x * weights, dim)
    if math.isfinite((total if dim is None else total.sum()).item()):
        return total
    return _sum(_where(x, mask), dim)


def _sum(x: Tensor, dim: int | None) -> Tensor:
    return x.sum() if dim is None else x.sum(dim)


def float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``mask.to(dtype)``: 1 where True, 0 elsewhere. Through a uint8 view on CPU, where converting bool
    directly is about 8x slower (not vectorized)."""
    if mask.device.type != "cpu" or torch.compiler.is_compiling():
        return mask.to(dtype)
    return mask.view(torch.uint8).to(dtype)


def count(mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """The number of True entries of `mask` (in all, or along `dim`), as int64.

    Summed in int32, which is about 3x faster on CPU than bool's default int64 sum (exact below 2^31).
    """
    total = mask.sum(dtype=torch.int32) if dim is None else mask.sum(dim, keepdim=keepdim, dtype=torch.int32)
    return total.long()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is True; masked entries may hold NaN or inf."""
    if x.shape == mask.shape and x.is_floating_point() and _multiplies(x.device):
        return _masked_sum(x, mask, float_mask(mask, x.dtype), dim)
    return _sum(_where(x, mask), dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over `mask`; 0 where nothing is selected (never NaN)."""
    return masked_sum(x, mask, dim) / count(mask, dim).clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the selected entries of `x` (Bessel-corrected when `unbiased`); 0 for fewer than 2."""
    mean = masked_mean(x, mask)
    n = count(mask).to(x.dtype)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    return sq / denom


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the selected entries (verl's ``masked_whiten``); 0 elsewhere."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    return zero_padding(out, mask)


def group_index(group: Tensor) -> tuple[Tensor, int]:
    """Dense ids 0..K-1 for arbitrary integer group ids, and K."""
    _, inverse = torch.unique(group, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if inverse.numel() else 0


def group_sum(x: Tensor, group: Tensor) -> Tensor:
    """[B] -> [B]: the sum of `x` over each element's group."""
    return _sum_by(x, *group_index(group))


def group_count(group: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """[B]: the size of each element's group."""
    return _sum_by(torch.ones(group.shape, dtype=dtype, device=group.device), *group_index(group))


def group_mean(x: Tensor, group: Tensor) -> Tensor:
    """[B] -> [B]: the mean of `x` over each element's group.

    Taken about each group's largest value, so a group of equal values has exactly that value as its mean
    (a plain sum / count can miss by an ulp, e.g. three 0.1s, and a z-score then divides that ulp by ~0).
    """
    index, k = group_index(group)
    return _mean_by(x, index, k, _sum_by(torch.ones(group.shape, dtype=x.dtype, device=group.device), index, k))


def group_std(x: Tensor, group: Tensor, singleton: float = 1.0) -> Tensor:
    """[B] -> [B]: the Bessel-corrected std of `x` within each group; `singleton` for groups of one."""
    index, k = group_index(group)
    count = _sum_by(torch.ones(group.shape, dtype=x.dtype, device=group.device), index, k)
    centered = x - _mean_by(x, index, k, count)
    var = _sum_by(centered**2, index, k) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, singleton))


# The group helpers above share one `group_index` (a sort of the ids) per call through these two.


def _sum_by(x: Tensor, index: Tensor, k: int) -> Tensor:
    return torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, index, x)[index]


def _mean_by(x: Tensor, index: Tensor, k: int, count: Tensor) -> Tensor:
    top = torch.full((k,), -torch.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, index, x, "amax")[index]
    return top + _sum_by(x - top, index, k) / count


def last_token(mask: Tensor) -> Tensor:
    """[B, T] bool -> [B, T] bool marking each row's last True position (none for an empty row)."""
    if mask.shape[1] == 0:  # no positions (amax over none is an error)
        return mask.clone()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
    return mask & (positions == last)


def broadcast_to_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """[B] or [B, T] -> [B, T], zero where `mask` is False."""
    full = x.unsqueeze(1).expand(mask.shape) if x.dim() == 1 else x
    return zero_padding(full, mask)


def sequence_to_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B] outcome rewards -> [B, T], each placed on its sequence's last valid token."""
    return torch.where(last_token(mask), rewards.unsqueeze(1).expand(mask.shape), torch.zeros((), dtype=rewards.dtype, device=rewards.device))


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{u >= t, u valid} gamma^(#valid tokens between) rew_u, over valid tokens only; 0 when masked.

    Masked positions neither add reward nor count as a discount step, so padding inside a row is skipped.
    """
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        valid = mask[:, t]
        running = torch.where(valid, token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid, running, torch.zeros_like(running))
    return returns


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1, k2, k3).

    With d = logprobs - ref_logprobs (clamped to +-LOG_RATIO_CLAMP): k1 = d, k2 = d^2 / 2,
    k3 = exp(-d) - 1 + d. Derivatives in logprobs: 1, d, 1 - exp(-d).
    """
    d = (logprobs - ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1', 'k2' or 'k3'.")


def log_ratio(logprobs: Tensor, anchor: Tensor) -> Tensor:
    """``logprobs - anchor``, clamped to +-LOG_RATIO_CLAMP."""
    return (logprobs - anchor).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B] rewards as given, or the per-sequence sum of [B, T] token rewards over valid tokens."""
    return rewards if rewards.dim() == 1 else masked_sum(rewards, mask, dim=1)


def to_groups(group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layout for per-group dense work: (gather [K, G_max] row indices, valid [K, G_max], rows [B] -> flat slot).

    ``x[gather]`` gives a padded [K, G_max] block per group (padded slots repeat row 0 and are marked
    invalid); ``block.flatten()[rows]`` maps a per-slot result back to [B].
    """
    index, k = group_index(group)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    sorted_index = index[order]
    position = torch.arange(group.numel(), device=group.device) - starts[sorted_index]
    width = int(counts.max()) if k else 0
    gather = torch.zeros(k, width, dtype=torch.long, device=group.device)
    valid = torch.zeros(k, width, dtype=torch.bool, device=group.device)
    gather[sorted_index, position] = order
    valid[sorted_index, position] = True
    rows = torch.empty_like(order)
    rows[order] = sorted_index * width + position
    return gather, valid, rows
