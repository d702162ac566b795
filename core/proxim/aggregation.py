"""Loss aggregation: how a per-token loss [B, T] becomes a scalar (docs/invariants.md, invariants 31-35).

With `n_i` valid tokens in row i and `S` the number of rows with at least one valid token:

  token_mean               sum_{i,t} m*l / sum_{i,t} m                       (DAPO, CISPO, verl default)
  seq_mean_token_mean      (1/S) sum_i (sum_t m*l) / n_i                     (GRPO paper, GSPO)
  seq_mean_token_sum       (1/S) sum_i sum_t m*l
  seq_mean_token_sum_norm  (1/(S*L_max)) sum_i sum_t m*l                     (Dr. GRPO, DRPO recipe)

The denominator (token count for ``token_mean``, sequence count otherwise) can be passed as a global
`normalizer` counted over the whole optimisation step; then micro-batch losses add up to exactly the
full-batch loss and gradient. Fully masked rows contribute 0 and are not counted. A normalizer must be a
positive, finite number (`check_normalizer`); without one, the batch's own count is used, at least 1.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from proxim.errors import BatchError
from proxim.ops import Padding, count

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def default_normalizer(mask: Tensor, mode: str) -> Tensor:
    """The denominator `mode` uses for this mask: valid tokens for token_mean, non-empty rows otherwise."""
    if mode == "token_mean":
        return count(mask)
    return (count(mask, dim=1) > 0).sum()


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    normalizer: Tensor | int | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Reduce a per-token `loss` [B, T] to a 0-d tensor; `max_length` defaults to T."""
    check_normalizer(normalizer)
    return reduce(loss, Padding.of(mask, loss.dtype), mode, normalizer, max_length)


def reduce(loss: Tensor, padding: Padding, mode: str, normalizer: Tensor | int | None = None, max_length: int | None = None) -> Tensor:
    """`aggregate` with the mask's masking operands and counts already at hand (`proxim.ops.Padding`);
    `normalizer` already checked (`check_normalizer`)."""
    if mode == "token_mean":
        denom = padding.tokens if normalizer is None else _denominator(normalizer, loss)
        return padding.sum(loss) / denom
    denom = padding.sequences if normalizer is None else _denominator(normalizer, loss)
    row_sums = padding.sum(loss, dim=1)
    if mode == "seq_mean_token_mean":
        return (row_sums / padding.lengths).sum() / denom
    if mode == "seq_mean_token_sum":
        return row_sums.sum() / denom
    if mode == "seq_mean_token_sum_norm":
        horizon = max(padding.mask.shape[1], 1) if max_length is None else max_length  # T = 0: nothing to divide
        return row_sums.sum() / (denom * horizon)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(MODES)}.")


def _denominator(normalizer: Tensor | int | float, like: Tensor) -> Tensor:
    denom = torch.as_tensor(normalizer, dtype=like.dtype, device=like.device).reshape(())
    if torch.compiler.is_compiling() and isinstance(normalizer, Tensor):
        # Not read while tracing (that would break the graph): a bad value makes the loss NaN instead.
        denom = torch.where((denom > 0) & (denom < math.inf), denom, math.nan)
    return denom


def check_normalizer(normalizer: object) -> None:
    """Raise `BatchError` unless `normalizer` is None or one positive, finite number (a Python number, or a
    one-element tensor). A tensor is read once (on an accelerator, one synchronisation per normalizer
    tensor: the same tensor passed to every micro-batch of a step is read at the first); while
    ``torch.compile`` traces it is not read, and a bad value there makes the loss NaN."""
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise BatchError(
                f"normalizer must be one number (a 0-d tensor or an int), got a tensor of shape {tuple(normalizer.shape)} and dtype "
                f"{normalizer.dtype}; pass the step's count, Objective.normalizer(full_mask)."
            )
        if torch.compiler.is_compiling():
            return
        value = _read_once(normalizer)
        given = f"tensor({value!r})"
    elif isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool):
        value, given = float(normalizer), repr(normalizer)
    else:
        raise BatchError(f"normalizer must be a number or a 0-d tensor, got {normalizer!r} ({type(normalizer).__name__}).")
    if not (math.isfinite(value) and value > 0):
        raise BatchError(
            f"normalizer={given}: the aggregation's denominator must be a positive, finite count (tokens for token_mean, "
            f"non-empty sequences otherwise), counted over the whole step with Objective.normalizer(full_mask) and summed over "
            f"ranks. A step with nothing to count has no loss to normalise: skip it, or pass normalizer=None (its loss is then 0)."
        )


_last_read: dict[str, tuple[Tensor, int, float]] = {}
"""The last tensor normalizer read by `check_normalizer`, its version counter then, and its value."""


def _read_once(normalizer: Tensor) -> float:
    try:
        version = normalizer._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter: read it every time
        return float(normalizer.reshape(()).item())
    hit = _last_read.get("normalizer")
    if hit is not None and hit[0] is normalizer and hit[1] == version:
        return hit[2]
    value = float(normalizer.detach().reshape(()).item())
    _last_read["normalizer"] = (normalizer, version, value)
    return value
