"""Stage 2 against TRL 1.16.x's ``GRPOTrainer._compute_loss`` for loss_type grpo, dapo and dr_grpo (docs/parity.md).

TRL's loss adds ``beta * k3`` per token before aggregation; proxim aggregates the KL separately, which is
the same number because aggregation is linear. TRL takes (B,) advantages and broadcasts them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import proxim
from proxim import aggregation, ops

from ._helpers import assert_close, grad, make_batch, proxim_loss

SEEDS = (0, 1, 2)
#: TRL loss_type -> proxim aggregation (for a batch whose T equals max_completion_length).
LOSS_TYPES = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}


def sequence_advantages(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) advantages for TRL and the same broadcast to [B, T] (zero on padding) for proxim."""
    seq = torch.randn(batch.mask.shape[0], generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    return seq, ops.broadcast_to_tokens(seq, batch.mask)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("seed", SEEDS)
def test_loss_types_equal_trl(trl_loss: Any, loss_type: str, beta: float, eps_high: float | None, seed: int) -> None:
    batch = make_batch(seed, spread=0.5)
    seq_adv, token_adv = sequence_advantages(batch)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(
        batch, ours_leaf, "clip", adv=token_adv, eps_low=0.2, eps_high=eps_high, aggregation=LOSS_TYPES[loss_type], kl_coef=beta, kl_estimator="k3"
    )
    theirs = trl_loss(
        loss_type, theirs_leaf, batch.old, seq_adv, batch.mask, ref=batch.ref, beta=beta, epsilon=0.2, epsilon_high=eps_high, use_bias_correction_kl=False
    )
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")


@pytest.mark.parametrize("seed", SEEDS)
def test_per_token_advantages_equal_trl(trl_loss: Any, seed: int) -> None:
    """TRL also accepts (B, T) advantages."""
    batch = make_batch(seed, spread=0.5)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "clip", eps_low=0.2, eps_high=0.28, aggregation="seq_mean_token_mean", kl_coef=0.04)
    theirs = trl_loss("grpo", theirs_leaf, batch.old, batch.adv, batch.mask, ref=batch.ref, beta=0.04, epsilon_high=0.28)
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")


def test_dapo_global_token_count_is_proxim_normalizer(trl_loss: Any) -> None:
    """TRL's dapo divides by num_items_in_batch (the generation batch's token count): proxim's `normalizer`."""
    batch = make_batch(4, spread=0.5)
    seq_adv, token_adv = sequence_advantages(batch)
    total = torch.tensor(3 * int(batch.mask.sum()))
    obj = proxim.objective(advantage="group_normalized", region="clip", eps_high=0.28, aggregation="token_mean", kl_coef=0.0)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = obj.loss(ours_leaf, batch.rollout(), proxim.Estimate(advantages=token_adv), normalizer=total).loss
    theirs = trl_loss("dapo", theirs_leaf, batch.old, seq_adv, batch.mask, epsilon_high=0.28, num_items_in_batch=total)
    assert_close(ours, theirs, "loss")
    assert_close(grad(ours, ours_leaf), grad(theirs, theirs_leaf), "gradient")


def test_dr_grpo_max_completion_length_is_proxim_max_length(trl_loss: Any) -> None:
    """TRL's dr_grpo divides by B * max_completion_length: proxim's seq_mean_token_sum_norm with max_length."""
    batch = make_batch(5, spread=0.5)
    seq_adv, token_adv = sequence_advantages(batch)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "clip", adv=token_adv, aggregation="seq_mean_token_sum_norm", max_length=64).loss
    theirs = trl_loss("dr_grpo", theirs_leaf, batch.old, seq_adv, batch.mask, max_completion_length=64)
    assert_close(ours, theirs, "loss")
    assert_close(grad(ours, ours_leaf), grad(theirs, theirs_leaf), "gradient")


def test_trl_delta_equals_proxim_dual_clip(trl_loss: Any) -> None:
    """TRL's ``delta`` (upper bound on the ratio) equals dual clip with c = delta when delta > 1 + eps_high."""
    batch = make_batch(0, spread=1.2)
    ratio = (batch.logp - batch.old).exp()
    assert bool((batch.mask & (batch.adv < 0) & (ratio > 3.0)).any())
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "clip", eps_high=0.28, dual_clip=3.0, aggregation="seq_mean_token_mean").loss
    theirs = trl_loss("grpo", theirs_leaf, batch.old, batch.adv, batch.mask, epsilon_high=0.28, delta=3.0)
    assert_close(ours, theirs, "loss")
    assert_close(grad(ours, ours_leaf), grad(theirs, theirs_leaf), "gradient")


def test_trl_sequence_importance_sampling_equals_proxim_gspo(trl_loss: Any) -> None:
    """TRL's importance_sampling_level='sequence' is GSPO proper: proxim's sequence_clip (token_level=False)."""
    batch = make_batch(2, spread=0.1)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "sequence_clip", eps_low=0.05, eps_high=0.08, aggregation="seq_mean_token_mean").loss
    theirs = trl_loss("grpo", theirs_leaf, batch.old, batch.adv, batch.mask, epsilon=0.05, epsilon_high=0.08, importance_sampling_level="sequence")
    assert_close(ours, theirs, "loss")
    assert_close(grad(ours, ours_leaf), grad(theirs, theirs_leaf), "gradient")


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_pinned_trl_bias_corrected_kl(trl_loss: Any, loss_type: str) -> None:
    """TRL 1.16 defaults to use_bias_correction_kl=True: k3 times the live ratio. proxim's KL term is plain
    k3 (= TRL with the flag off). On-policy the values agree but TRL's gradient gains beta * k3 per token
    (through the ratio's derivative, 1 at r = 1); off-policy the values differ by beta * agg(k3 (r - 1))."""
    beta, agg = 0.04, LOSS_TYPES[loss_type]
    batch = make_batch(6, spread=0.5)
    seq_adv, token_adv = sequence_advantages(batch)
    # On-policy: old = current.
    on = make_batch(6, spread=0.0)
    on.ref = batch.ref
    ours_leaf, theirs_leaf = on.leaf(), on.leaf()
    ours = proxim_loss(on, ours_leaf, "clip", adv=token_adv, aggregation=agg, kl_coef=beta).loss
    theirs = trl_loss(loss_type, theirs_leaf, on.old, seq_adv, on.mask, ref=on.ref, beta=beta, use_bias_correction_kl=True)
    assert_close(ours, theirs, "on-policy value")
    k3 = proxim.ops.kl_estimate(on.logp, on.ref, "k3")
    extra_leaf = on.leaf()
    extra = beta * aggregation.aggregate(k3 * extra_leaf, on.mask, agg)  # d/dlp of beta * agg(k3 * r) at r = 1, k3 held
    assert_close(grad(theirs, theirs_leaf), grad(ours, ours_leaf) + grad(extra, extra_leaf), "on-policy gradient")
    # Off-policy values.
    ours_off = proxim_loss(batch, batch.leaf(), "clip", adv=token_adv, aggregation=agg, kl_coef=beta).loss
    theirs_off = trl_loss(loss_type, batch.leaf(), batch.old, seq_adv, batch.mask, ref=batch.ref, beta=beta, use_bias_correction_kl=True)
    ratio = (batch.logp - batch.old).exp()
    gap = beta * aggregation.aggregate(proxim.ops.kl_estimate(batch.logp, batch.ref, "k3") * (ratio - 1), batch.mask, agg)
    assert_close(theirs_off.detach() - ours_off.detach(), gap, "off-policy value gap")


def test_pinned_trl_grpo_counts_empty_rows(trl_loss: Any) -> None:
    """A fully masked row: proxim (and verl) leave it out of the sequence count; TRL's grpo and dr_grpo
    divide by B. So TRL = proxim * S / B, S the non-empty rows."""
    batch = make_batch(7, spread=0.5, empty_row=True)
    seq_adv, token_adv = sequence_advantages(batch)
    b, s = batch.mask.shape[0], int((batch.mask.sum(1) > 0).sum())
    assert s == b - 1
    for loss_type in ("grpo", "dr_grpo"):
        ours = proxim_loss(batch, batch.leaf(), "clip", adv=token_adv, aggregation=LOSS_TYPES[loss_type]).loss
        theirs = trl_loss(loss_type, batch.leaf(), batch.old, seq_adv, batch.mask)
        assert_close(theirs.detach(), ours.detach() * s / b, loss_type)
