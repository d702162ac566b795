"""The truncated importance-sampling correction (``rollout_correction="tis"``): weights, loss, gradient, errors.

Each token's policy loss is weighted by ``min(pi_old / mu, C)`` with ``pi_old = exp(old_logprobs)`` (the
trainer's numbers) and ``mu = exp(rollout_logprobs)`` (the inference engine's). The expected values here
are written from that formula alone: probabilities chosen so that the ratios are round numbers, and a
brute-force PPO-clip loss written out in the test.
"""

from __future__ import annotations

import math

import pytest
import torch

import proxim
from proxim.composed import rollout_correction_weights

# Probabilities of the sampled tokens under the trainer (pi_old) and the engine (mu). Row 0: ratios 1.5,
# 0.8, 3 (truncated to 2), row 1: 1, 10 (truncated), and a masked token whose ratio of 1000 must not count.
P_OLD = torch.tensor([[0.6, 0.4, 0.9], [0.3, 0.5, 0.5]], dtype=torch.float64)
P_MU = torch.tensor([[0.4, 0.5, 0.3], [0.3, 0.05, 0.0005]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, False]])
WEIGHTS = torch.tensor([[1.5, 0.8, 2.0], [1.0, 2.0, 2.0]], dtype=torch.float64)  # min(ratio, 2); the masked one is never used
TRUNCATED = torch.tensor([[False, False, True], [False, True, True]])
ADVANTAGES = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 7.0]], dtype=torch.float64)


def rollout(**fields: torch.Tensor | None) -> proxim.Rollout:
    values: dict[str, torch.Tensor | None] = {
        "old_logprobs": P_OLD.log(),
        "mask": MASK,
        "rewards": torch.tensor([1.0, 0.0], dtype=torch.float64),
        "group": torch.tensor([0, 0]),
        "rollout_logprobs": P_MU.log(),
    }
    values.update(fields)
    return proxim.Rollout(**values)  # type: ignore[arg-type]


def estimate() -> proxim.Estimate:
    return proxim.Estimate(advantages=ADVANTAGES.clone(), returns=None, rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), metrics={})


def clip_objective(**options: object) -> proxim.Objective:
    return proxim.objective("grpo", region="clip", kl_coef=0.0, aggregation="token_mean", **options)


def current_logprobs() -> torch.Tensor:
    """The policy after an update: ratios to pi_old of 1.1, 0.7, 1.3 / 0.95, 1.05 (both sides of the clip at 0.2)."""
    ratio = torch.tensor([[1.1, 0.7, 1.3], [0.95, 1.05, 1.0]], dtype=torch.float64)
    return (P_OLD * ratio).log().requires_grad_(True)


def test_weights_are_the_truncated_ratio_of_trainer_to_engine() -> None:
    weights, truncated = rollout_correction_weights(P_OLD.log(), P_MU.log(), cap=2.0)
    torch.testing.assert_close(weights, WEIGHTS, rtol=1e-12, atol=0)
    assert torch.equal(truncated, TRUNCATED)
    assert not weights.requires_grad


def test_weights_carry_no_gradient_even_from_tensors_with_one() -> None:
    old = P_OLD.log().requires_grad_(True)
    weights, _ = rollout_correction_weights(old, P_MU.log(), cap=2.0)
    assert not weights.requires_grad


def test_the_metrics_count_valid_tokens_only() -> None:
    obj = clip_objective(rollout_correction="tis")
    out = obj.loss(current_logprobs(), rollout(), estimate())
    # Valid weights 1.5, 0.8, 2, 1, 2: mean 7.3 / 5; truncated 2 of 5 (the masked 1000 is not counted).
    assert out.metrics["rollout_correction/weight_mean"].item() == pytest.approx(7.3 / 5, rel=1e-12)
    assert out.metrics["rollout_correction/truncated"].item() == pytest.approx(2 / 5, rel=1e-12)


def test_no_metrics_when_the_objective_is_told_to_skip_them_and_none_without_the_correction() -> None:
    quiet = clip_objective(rollout_correction="tis").loss(current_logprobs(), rollout(), estimate(), metrics=False)
    assert not any(k.startswith("rollout_correction/") for k in quiet.metrics)
    plain = clip_objective().loss(current_logprobs(), rollout(), estimate())
    assert not any(k.startswith("rollout_correction/") for k in plain.metrics)


def brute_force_clip(lp: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """PPO-clip with token_mean, written out: mean over valid tokens of -w * min(r A, clip(r, 0.8, 1.2) A), r = pi / pi_old."""
    total = lp.new_zeros(())
    count = 0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not MASK[b, t]:
                continue
            r = torch.exp(lp[b, t] - math.log(P_OLD[b, t].item()))
            a = ADVANTAGES[b, t].item()
            term = -torch.minimum(r * a, r.clamp(0.8, 1.2) * a)
            total = total + (term if weights is None else weights[b, t].item() * term)
            count += 1
    return total / count


def test_loss_and_gradient_equal_a_brute_force_corrected_clip_loss() -> None:
    lp = current_logprobs()
    out = clip_objective(rollout_correction="tis").loss(lp, rollout(), estimate())
    (grad,) = torch.autograd.grad(out.loss, lp)
    ref_lp = current_logprobs()
    want = brute_force_clip(ref_lp, WEIGHTS)
    (want_grad,) = torch.autograd.grad(want, ref_lp)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.metrics["loss/policy"], want.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert grad[1, 2] == 0  # the masked token


def test_gradient_is_the_uncorrected_one_times_the_clipped_weight() -> None:
    lp_plain, lp_tis = current_logprobs(), current_logprobs()
    plain = clip_objective().loss(lp_plain, rollout(), estimate())
    tis = clip_objective(rollout_correction="tis").loss(lp_tis, rollout(), estimate())
    (g_plain,) = torch.autograd.grad(plain.loss, lp_plain)
    (g_tis,) = torch.autograd.grad(tis.loss, lp_tis)
    torch.testing.assert_close(g_tis, g_plain * torch.where(MASK, WEIGHTS, 0.0), rtol=1e-12, atol=1e-15)
    # the brute force without weights is the uncorrected loss: the weights are the only difference
    torch.testing.assert_close(plain.loss, brute_force_clip(current_logprobs(), None), rtol=1e-12, atol=1e-15)
    assert (g_plain.abs() > 0).sum() > 0 and not torch.equal(g_plain, g_tis)


def test_a_larger_cap_keeps_larger_weights() -> None:
    lp = current_logprobs()
    out = clip_objective(rollout_correction="tis", rollout_correction_cap=5.0).loss(lp, rollout(), estimate())
    # ratios 1.5, 0.8, 3, 1, 10 -> 1.5, 0.8, 3, 1, 5
    assert out.metrics["rollout_correction/weight_mean"].item() == pytest.approx((1.5 + 0.8 + 3 + 1 + 5) / 5, rel=1e-12)
    assert out.metrics["rollout_correction/truncated"].item() == pytest.approx(1 / 5, rel=1e-12)


@pytest.mark.parametrize("region", sorted(proxim.available()["region"]))
def test_the_correction_composes_with_every_region(region: str) -> None:
    """For every registered region: the corrected loss is the aggregation of weight x the region's own
    per-token loss, and where the region's tokens are independent each token's gradient is the
    uncorrected one times its weight."""
    plain = proxim.objective("grpo", region=region, kl_coef=0.0, aggregation="token_mean")
    tis = plain.override(rollout_correction="tis")
    lp = current_logprobs()
    out = tis.loss(lp, rollout(), estimate())
    anchor = torch.where(MASK, P_OLD.log(), 0.0)
    lp_ref = current_logprobs()
    per_token = plain.region(torch.where(MASK, lp_ref, 0.0), anchor, torch.where(MASK, ADVANTAGES, 0.0), MASK).loss
    want = (torch.where(MASK, WEIGHTS * per_token, 0.0)).sum() / MASK.sum()
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, lp)
    (want_grad,) = torch.autograd.grad(want, lp_ref)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    if "tokens_independent" in plain.region.properties:
        lp_plain = current_logprobs()
        (g_plain,) = torch.autograd.grad(plain.loss(lp_plain, rollout(), estimate()).loss, lp_plain)
        torch.testing.assert_close(grad, g_plain * torch.where(MASK, WEIGHTS, 0.0), rtol=1e-10, atol=1e-12)


def test_engine_and_trainer_agreeing_change_nothing() -> None:
    same = rollout(rollout_logprobs=P_OLD.log())
    lp_a, lp_b = current_logprobs(), current_logprobs()
    a = clip_objective().loss(lp_a, same, estimate())
    b = clip_objective(rollout_correction="tis").loss(lp_b, same, estimate())
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    assert b.metrics["rollout_correction/weight_mean"].item() == 1.0 and b.metrics["rollout_correction/truncated"].item() == 0.0


def test_a_batch_without_engine_log_probs_is_refused_in_both_stages() -> None:
    obj = clip_objective(rollout_correction="tis")
    assert "rollout_logprobs" in obj.requires
    message = r"Rollout\.rollout_logprobs \(needed by rollout_correction='tis'\).*or set rollout_correction='none'"
    with pytest.raises(proxim.BatchError, match=message):
        obj.advantages(rollout(rollout_logprobs=None))
    with pytest.raises(proxim.BatchError, match=message):
        obj.loss(current_logprobs(), rollout(rollout_logprobs=None), estimate())
    assert "rollout_logprobs" not in clip_objective().requires


def test_the_correction_is_refused_on_the_rollout_anchor() -> None:
    with pytest.raises(proxim.ConfigurationError, match=r"anchor='rollout' already takes the ratio against the engine's log-probs mu.*corrected twice"):
        proxim.objective("grpo", rollout_correction="tis", anchor="rollout")
    with pytest.raises(proxim.ConfigurationError, match="corrected twice"):
        proxim.objective("grpo", anchor="rollout").override(rollout_correction="tis")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout_correction": "is"}, r"'rollout_correction' must be in \('none', 'tis'\)"),
        ({"rollout_correction_cap": 0.5}, r"'rollout_correction_cap' must be a finite number >= 1 .*got 0\.5 \(float\)"),
        ({"rollout_correction_cap": math.inf}, r"'rollout_correction_cap' must be a finite number >= 1 .*got inf"),
        ({"rollout_correction_cap": math.nan}, r"'rollout_correction_cap' must be a finite number >= 1 .*got nan"),
        ({"rollout_correction_cap": True}, r"'rollout_correction_cap' must be .*got True \(bool\)"),
    ],
)
def test_bad_values_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(proxim.ConfigurationError, match=message):
        proxim.objective("grpo", **overrides)


def test_routed_like_every_option_and_part_of_the_fingerprint() -> None:
    qualified = proxim.objective("grpo", **{"objective.rollout_correction": "tis", "objective.rollout_correction_cap": 3.0})
    assert (qualified.options.rollout_correction, qualified.options.rollout_correction_cap) == ("tis", 3.0)
    assert "rollout_correction='tis'" in qualified.fingerprint and "rollout_correction_cap=3.0" in qualified.fingerprint
    assert qualified.fingerprint != proxim.objective("grpo").fingerprint
