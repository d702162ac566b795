"""Loss aggregation: how a per-token loss [B, T] becomes a scalar (docs/invariants.md, invariants 31-35).

With `n_i` valid tokens in row i and `S` the number of rows with at least one valid token:

  token_mean               sum_{i,t} m*l / sum_{i,t} m                       (DAPO, CISPO, verl default)
  seq_mean_token_mean      (1/S) sum_i (sum_t m*l) / n_i                     (GRPO paper, GSPO)
  seq_mean_token_sum       (1/S) sum_i sum_t m*l
  seq_mean_token_sum_norm  (1/(S*L_max)) sum_i sum_t m*l                     (Dr. GRPO, DRPO recipe)

The denominator (token count for ``token_mean``, sequence count otherwise) can be passed as a global
`normalizer` counted over the whole optimisation step; then micro-batch losses add up to exactly the
full-batch loss and gradient. Fully masked rows contribute 0 and are not counted.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    return reduce(loss, Padding.of(mask, loss.dtype), mode, normalizer, max_length)


def reduce(loss: Tensor, padding: Padding, mode: str, normalizer: Tensor | int | None = None, max_length: int | None = None) -> Tensor:
    """`aggregate` with the mask's masking operands and counts already at hand (`proxim.ops.Padding`)."""
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
        horizon = padding.mask.shape[1] if max_length is None else max_length
        return row_sums.sum() / (denom * horizon)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(MODES)}.")


def _denominator(normalizer: Tensor | int, like: Tensor) -> Tensor:
    return torch.as_tensor(normalizer, dtype=like.dtype, device=like.device).clamp(min=1)
