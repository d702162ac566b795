"""Stage 2 against verl 0.9.x: policy losses, KL estimators, aggregation, value loss (docs/parity.md).

Each test builds the same float64 tensors for both libraries, runs proxim through its public API and
verl through ``core_algos``, and compares values and gradients with respect to the current log-probs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import proxim
from proxim import aggregation

from ._helpers import VERL_AGG, assert_close, grad, make_batch, proxim_loss

AGGREGATIONS = tuple(VERL_AGG)
SEEDS = (0, 1, 2)


def verl_policy(
    core_algos: Any, mode: str, batch: Any, leaf: torch.Tensor, agg: str, config: Any, adv: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    fn = core_algos.get_policy_loss_fn(mode)
    return fn(
        old_log_prob=batch.old,
        log_prob=leaf,
        advantages=batch.adv if adv is None else adv,
        response_mask=batch.mask.to(batch.old.dtype),
        loss_agg_mode=VERL_AGG[agg],
        config=config,
    )


# -- PPO clip ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_clip_with_dual_clip_equals_verl_vanilla(core_algos: Any, actor_config: Any, agg: str, seed: int) -> None:
    batch = make_batch(seed, spread=1.2)
    ratio = (batch.logp - batch.old).exp()
    assert bool((batch.mask & (batch.adv < 0) & (ratio > 3.0)).any()), "fixture must reach the dual clip"
    cfg = actor_config("vanilla", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=VERL_AGG[agg])
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "clip", eps_low=0.2, eps_high=0.28, dual_clip=3.0, aggregation=agg)
    theirs, metrics = verl_policy(core_algos, "vanilla", batch, theirs_leaf, agg, cfg)
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")
    # verl's pg_clipfrac counts the clips that bind in the advantage's direction: our low + high.
    clipped = ours.metrics["region/clip_fraction_low"] + ours.metrics["region/clip_fraction_high"]
    assert clipped.item() == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    assert ours.metrics["region/dual_clip_fraction"].item() == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-6)


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_clip_without_dual_clip_equals_verl_with_dual_clip_out_of_reach(core_algos: Any, actor_config: Any, agg: str, seed: int) -> None:
    batch = make_batch(seed, spread=1.2)
    cfg = actor_config("vanilla", clip_ratio=0.2, clip_ratio_c=1e12, loss_agg_mode=VERL_AGG[agg])
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "clip", eps_low=0.2, aggregation=agg)
    theirs, _ = verl_policy(core_algos, "vanilla", batch, theirs_leaf, agg, cfg)
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")


def test_pinned_verl_vanilla_always_dual_clips(core_algos: Any, actor_config: Any) -> None:
    """Intentional difference: proxim's clip has no dual clip unless asked; verl's vanilla always applies c = 3."""
    batch = make_batch(0, spread=1.2)
    ratio = (batch.logp - batch.old).exp()
    hit = batch.mask & (batch.adv < 0) & (ratio > 3.0)
    verl_default = actor_config("vanilla")  # clip_ratio_c defaults to 3.0
    assert verl_default.clip_ratio_c == 3.0
    theirs_leaf, plain_leaf = batch.leaf(), batch.leaf()
    theirs, _ = verl_policy(core_algos, "vanilla", batch, theirs_leaf, "token_mean", verl_default)
    plain = proxim_loss(batch, plain_leaf, "clip", eps_low=0.2).loss
    # The two differ exactly on the tokens with A < 0 and r > 3: there verl's loss is -3A (no gradient),
    # ours -r A; elsewhere they agree.
    per_token_gap = torch.where(hit, -batch.adv * (ratio - 3.0), torch.zeros_like(ratio))
    assert_close(plain - theirs, per_token_gap.sum() / batch.mask.sum(), "loss gap")
    g_theirs, g_plain = grad(theirs, theirs_leaf), grad(plain, plain_leaf)
    assert bool((g_theirs[hit] == 0).all()) and bool((g_plain[hit] != 0).all())
    assert_close(g_plain[~hit], g_theirs[~hit], "gradient off the dual-clipped tokens")
    # ... and setting dual_clip=3.0 removes the difference.
    matched = proxim_loss(batch, batch.leaf(), "clip", eps_low=0.2, dual_clip=3.0).loss
    assert_close(matched, theirs, "dual_clip=3.0")


# -- DPPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence,deltas", [("tv", (0.15, 0.15)), ("tv", (0.1, 0.2)), ("kl", (0.05, 0.05)), ("kl", (0.02, 0.08))])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_dppo_masks_and_gradient_equal_verl(core_algos: Any, actor_config: Any, divergence: str, deltas: tuple[float, float], agg: str, seed: int) -> None:
    batch = make_batch(seed, spread=0.6)
    low, high = deltas
    cap = 3.0
    cfg = actor_config(f"dppo_{divergence}", clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=cap, loss_agg_mode=VERL_AGG[agg])
    obj = proxim.objective(
        advantage="group_normalized", region="divergence_mask", divergence=divergence, delta_low=low, delta_high=high, is_cap=cap, aggregation=agg, kl_coef=0.0
    )
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = obj.loss(ours_leaf, batch.rollout(), proxim.Estimate(advantages=batch.adv))
    theirs, metrics = verl_policy(core_algos, f"dppo_{divergence}", batch, theirs_leaf, agg, cfg)
    # Both sides of the mask are exercised.
    masked = ours.metrics["region/clip_fraction_low"].item() + ours.metrics["region/clip_fraction_high"].item()
    assert ours.metrics["region/clip_fraction_low"] > 0 and ours.metrics["region/clip_fraction_high"] > 0
    # verl's pg_clipfrac is the masked fraction over all valid tokens (A = 0 never masks in either).
    assert masked == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    # Gradients are equal: both are -M min(r, C) A per token, then aggregated.
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")
    # Values differ by design (docs/parity.md): ours is ratio-valued, verl's carries a log-prob factor.
    region = obj.region(batch.logp, batch.old, batch.adv, batch.mask)
    pinned = core_algos.agg_loss(region.loss * batch.logp, batch.mask.to(batch.old.dtype), VERL_AGG[agg])
    assert_close(theirs.detach(), pinned, "verl value = agg(proxim per-token loss * logp)")


def test_pinned_dppo_truncation(core_algos: Any, actor_config: Any) -> None:
    """verl always truncates the IS weight at clip_ratio_c (3.0 from ActorConfig's default, 20 without it);
    proxim's ``is_cap`` is None by default (the paper's stability study). A huge cap makes verl match."""
    batch = make_batch(1, spread=0.9)
    ratio = (batch.logp - batch.old).exp()
    assert bool((batch.mask & (ratio > 3.0)).any())
    obj = proxim.objective("dppo", kl_coef=0.0)
    assert obj.region.is_cap is None and actor_config("dppo_tv").clip_ratio_c == 3.0
    ours_leaf, theirs_leaf, default_leaf = batch.leaf(), batch.leaf(), batch.leaf()
    ours = obj.loss(ours_leaf, batch.rollout(), proxim.Estimate(advantages=batch.adv)).loss
    uncapped, _ = verl_policy(core_algos, "dppo_tv", batch, theirs_leaf, "token_mean", actor_config("dppo_tv", clip_ratio=0.15, clip_ratio_c=1e12))
    default, _ = verl_policy(core_algos, "dppo_tv", batch, default_leaf, "token_mean", actor_config("dppo_tv", clip_ratio=0.15))
    g_ours = grad(ours, ours_leaf)
    assert_close(g_ours, grad(uncapped, theirs_leaf), "uncapped gradient")
    assert not torch.allclose(g_ours, grad(default, default_leaf))


# -- GSPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.08)])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_token_equals_verl_gspo(core_algos: Any, actor_config: Any, eps: tuple[float, float], agg: str, seed: int) -> None:
    """verl's ``gspo`` is GSPO-token (sg(s_i) p / sg(p)); proxim's ``sequence_clip(token_level=True)``, any advantages."""
    batch = make_batch(seed, spread=0.1)
    cfg = actor_config("gspo", clip_ratio=eps[0], clip_ratio_low=eps[0], clip_ratio_high=eps[1], loss_agg_mode=VERL_AGG[agg])
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "sequence_clip", eps_low=eps[0], eps_high=eps[1], token_level=True, aggregation=agg)
    theirs, _ = verl_policy(core_algos, "gspo", batch, theirs_leaf, agg, cfg)
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_sequence_equals_verl_gspo_for_sequence_advantages(core_algos: Any, actor_config: Any, agg: str, seed: int) -> None:
    """With one advantage per sequence (GRPO-style), plain GSPO equals GSPO-token in value and gradient."""
    batch = make_batch(seed, spread=0.1, token_advantages=False)
    cfg = actor_config("gspo", clip_ratio=0.05, clip_ratio_low=0.05, clip_ratio_high=0.08, loss_agg_mode=VERL_AGG[agg])
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "sequence_clip", eps_low=0.05, eps_high=0.08, aggregation=agg)
    theirs, _ = verl_policy(core_algos, "gspo", batch, theirs_leaf, agg, cfg)
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")


# -- CISPO -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [(1.0, 0.28), (0.2, 0.28), (0.1, 5.0)])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_cispo_gradient_equals_verl(core_algos: Any, actor_config: Any, eps: tuple[float, float], agg: str, seed: int) -> None:
    batch = make_batch(seed, spread=0.6)
    low, high = eps
    cfg = actor_config("cispo", clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high, loss_agg_mode=VERL_AGG[agg])
    obj = proxim.objective(advantage="group_normalized", region="cispo", eps_low=low, eps_high=high, aggregation=agg, kl_coef=0.0)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = obj.loss(ours_leaf, batch.rollout(), proxim.Estimate(advantages=batch.adv))
    theirs, _ = verl_policy(core_algos, "cispo", batch, theirs_leaf, agg, cfg)
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")
    # Values: proxim -clip(r) A; verl -sg(clip(r)) A logp (docs/parity.md).
    region = obj.region(batch.logp, batch.old, batch.adv, batch.mask)
    ratio = (batch.logp - batch.old).exp()
    assert_close(region.loss, -ratio.clamp(max(1 - low, 0.0), 1 + high) * batch.adv, "per-token value")
    pinned = core_algos.agg_loss(region.loss * batch.logp, batch.mask.to(batch.old.dtype), VERL_AGG[agg])
    assert_close(theirs.detach(), pinned, "verl value = agg(proxim per-token loss * logp)")


# -- KL estimators -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ours,theirs", [("k1", "k1"), ("k1", "kl"), ("k2", "k2"), ("k2", "mse"), ("k3", "k3"), ("k3", "low_var_kl")])
@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimators_equal_verl_kl_penalty(core_algos: Any, ours: str, theirs: str, seed: int) -> None:
    batch = make_batch(seed, spread=0.5)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    mine = proxim.ops.kl_estimate(ours_leaf, batch.ref, ours)
    peer = core_algos.kl_penalty(theirs_leaf, batch.ref, theirs)
    assert_close(mine, peer, "per-token value")
    weights = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert_close(grad((mine * weights).sum(), ours_leaf), grad((peer * weights).sum(), theirs_leaf), "gradient")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_grpo_objective_with_kl_in_loss_equals_verl_actor_composition(core_algos: Any, actor_config: Any, estimator: str, agg: str) -> None:
    """proxim's total = verl's ``ppo_loss`` composition: pg_loss + kl_loss_coef * agg(kl_penalty(logp, ref))."""
    batch = make_batch(3, spread=0.5)
    beta = 0.04
    cfg = actor_config("vanilla", clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=VERL_AGG[agg])
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, "clip", eps_low=0.2, eps_high=0.28, dual_clip=3.0, aggregation=agg, kl_coef=beta, kl_estimator=estimator)
    pg, _ = verl_policy(core_algos, "vanilla", batch, theirs_leaf, agg, cfg)
    kl = core_algos.agg_loss(core_algos.kl_penalty(theirs_leaf, batch.ref, estimator), batch.mask.to(batch.old.dtype), VERL_AGG[agg])
    theirs = pg + beta * kl
    assert_close(ours.loss, theirs, "loss")
    assert_close(ours.metrics["loss/kl"], kl.detach(), "kl metric")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")


def test_pinned_verl_clamps_k3_at_10(core_algos: Any) -> None:
    """verl clamps the k3 value to [-10, 10] (zero gradient beyond); proxim clamps only the log-ratio at +-20."""
    ref = torch.tensor([[-0.1, -0.1, -0.1, -0.1]], dtype=torch.float64)
    lp = torch.tensor([[-0.5, -2.0, -2.5, -6.0]], dtype=torch.float64, requires_grad=True)
    mine = proxim.ops.kl_estimate(lp, ref, "k3")
    peer = core_algos.kl_penalty(lp, ref, "k3")
    d = (lp - ref).detach()
    assert_close(mine.detach(), torch.expm1(-d) + d, "proxim k3")
    big = mine.detach() > 10
    assert big.tolist() == [[False, False, False, True]]
    assert_close(peer.detach()[~big], mine.detach()[~big], "below the clamp")
    assert bool((peer.detach()[big] == 10).all())
    g_peer = grad(peer.sum(), lp)
    g_mine = grad(proxim.ops.kl_estimate(lp, ref, "k3").sum(), lp)
    assert bool((g_peer[big] == 0).all()) and bool((g_mine[big] != 0).all())


def test_pinned_verl_k1_is_not_clamped(core_algos: Any) -> None:
    """proxim clamps every log-ratio to +-20 (also for k1/k2); verl's k1 and k2 are unclamped."""
    ref = torch.tensor([[-30.0, -1.0]], dtype=torch.float64)
    lp = torch.tensor([[-0.5, -0.5]], dtype=torch.float64)
    assert proxim.ops.kl_estimate(lp, ref, "k1").tolist() == [[20.0, 0.5]]
    assert core_algos.kl_penalty(lp, ref, "k1").tolist() == [[29.5, 0.5]]


# -- aggregation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("empty_row", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_every_aggregation_equals_verl_agg_loss(core_algos: Any, mode: str, empty_row: bool, seed: int) -> None:
    batch = make_batch(seed, empty_row=empty_row)
    loss = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10)).requires_grad_(True)
    fmask = batch.mask.to(torch.float64)
    mine = aggregation.aggregate(loss, batch.mask, mode)
    peer = core_algos.agg_loss(loss, fmask, VERL_AGG[mode])
    assert_close(mine, peer, "value")
    assert_close(grad(mine, loss), grad(peer, loss), "gradient")


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_global_normalizers_equal_verl_global_batch_arguments(core_algos: Any, mode: str) -> None:
    """proxim's `normalizer` = verl's batch_num_tokens (token-mean) or global_batch_size (seq-mean-*);
    proxim's `max_length` = verl's loss_scale_factor."""
    batch = make_batch(4)
    loss = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    fmask = batch.mask.to(torch.float64)
    normalizer = 123 if mode == "token_mean" else 37
    kwargs = {"batch_num_tokens": normalizer} if mode == "token_mean" else {"global_batch_size": normalizer}
    mine = aggregation.aggregate(loss, batch.mask, mode, normalizer=normalizer, max_length=64)
    peer = core_algos.agg_loss(loss, fmask, VERL_AGG[mode], loss_scale_factor=64, **kwargs)
    assert_close(mine, peer, "value")
    assert_close(grad(mine, loss), grad(peer, loss), "gradient")


def test_verl_token_sum_is_token_mean_with_normalizer_one(core_algos: Any) -> None:
    """verl's extra mode ``token-sum`` has no proxim name; it is ``token_mean`` with ``normalizer=1``."""
    batch = make_batch(5, empty_row=True)
    loss = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert set(aggregation.MODES) == set(VERL_AGG)
    assert_close(aggregation.aggregate(loss, batch.mask, "token_mean", normalizer=1), core_algos.agg_loss(loss, batch.mask.double(), "token-sum"))


# -- value loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.2, 0.5, None])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_clipped_value_loss_equals_verl(core_algos: Any, clip: float | None, agg: str, seed: int) -> None:
    batch = make_batch(seed)
    g = torch.Generator().manual_seed(seed + 20)
    old_values = batch.values
    returns = torch.where(batch.mask, old_values + torch.randn(batch.mask.shape, generator=g, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    current = old_values + 0.4 * torch.randn(batch.mask.shape, generator=g, dtype=torch.float64)
    value_coef = 0.1
    obj = proxim.objective("ppo", kl_coef=0.0, value_clip=clip, value_coef=value_coef, aggregation=agg)
    ours_values, theirs_values = current.clone().requires_grad_(True), current.clone().requires_grad_(True)
    out = obj.loss(batch.logp, batch.rollout(values=old_values), proxim.Estimate(advantages=batch.adv, returns=returns), values=ours_values)
    peer, _ = core_algos.compute_value_loss(
        vpreds=theirs_values,
        returns=returns,
        values=old_values,
        response_mask=batch.mask.double(),
        cliprange_value=1e12 if clip is None else clip,
        loss_agg_mode=VERL_AGG[agg],
    )
    assert_close(out.metrics["loss/value"], peer.detach(), "value loss")
    assert_close(grad(out.loss, ours_values), value_coef * grad(peer, theirs_values), "gradient in the values")
    # The per-token function on its own, too.
    per_token = proxim.value_loss(current, old_values, returns, clip)
    assert_close(aggregation.aggregate(per_token, batch.mask, agg), peer.detach(), "proxim.value_loss + aggregate")
