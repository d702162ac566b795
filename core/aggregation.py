"""Loss aggregation: how a per-token loss [B, T] becomes a scalar (ALGORITHMS.md section 5).

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

from proxim.ops import masked_sum

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def default_normalizer(mask: Tensor, mode: str) -> Tensor:
    """The denominator `mode` uses for this mask: valid tokens for token_mean, non-empty rows otherwise."""
    if mode == "token_mean":
        return mask.sum()
    return (mask.sum(dim=1) > 0).sum()


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    normalizer: Tensor | int | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Reduce a per-token `loss` [B, T] to a 0-d tensor; `max_length` defaults to T."""
    if mode == "token_mean":
        denom = mask.sum() if normalizer is None else normalizer
        return masked_sum(loss, mask) / torch.as_tensor(denom, dtype=loss.dtype, device=loss.device).clamp(min=1)
    # Per-row token counts, counted once: the default denominator and seq_mean_token_mean both use them.
    counts = mask.sum(dim=1) if normalizer is None or mode == "seq_mean_token_mean" else None
    if normalizer is None:
        assert counts is not None
        normalizer = (counts > 0).sum()
    denom = torch.as_tensor(normalizer, dtype=loss.dtype, device=loss.device).clamp(min=1)
    row_sums = masked_sum(loss, mask, dim=1)
    if mode == "seq_mean_token_mean":
        assert counts is not None
        row_sums = row_sums / counts.clamp(min=1).to(loss.dtype)
        return row_sums.sum() / denom
    if mode == "seq_mean_token_sum":
        return row_sums.sum() / denom
    if mode == "seq_mean_token_sum_norm":
        horizon = mask.shape[1] if max_length is None else max_length
        return row_sums.sum() / (denom * horizon)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {', '.join(MODES)}.")

