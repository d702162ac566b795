"""Penalties (docs/parts.md; docs/invariants.md, invariants 36-40): KL estimators, KL in the loss and in the reward, the
adaptive KL controller, the entropy bonus, the clipped value loss, and their stage-2 errors.

Expected values are computed by hand (derivation in a comment) or by plain-Python / independent torch
references written from the formulas; gradients on float64 leaves.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxim
from proxim.ops import LOG_RATIO_CLAMP, kl_estimate

F64 = torch.float64
ATOL = 1e-12
NAN = float("nan")


# -- KL estimators ---------------------------------------------------------------------------------------


def ref_k(d: float, estimator: str) -> tuple[float, float]:
    """(value, d value / d lp) of Schulman's estimators at d = lp - lp_ref (docs/invariants.md, invariant 36)."""
    if estimator == "k1":
        return d, 1.0
    if estimator == "k2":
        return 0.5 * d * d, d
    return math.exp(-d) - 1 + d, 1 - math.exp(-d)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@settings(deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.floats(-8.0, -0.01), st.floats(-5.0, 5.0)), min_size=1, max_size=10))
def test_estimator_values_and_derivatives(estimator: str, pairs) -> None:  # type: ignore[no-untyped-def]
    # Invariant 36: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d; derivatives 1, d, 1 - exp(-d); k2, k3 >= 0.
    ref = torch.tensor([r for r, _ in pairs], dtype=F64)
    lp = (ref + torch.tensor([d for _, d in pairs], dtype=F64)).requires_grad_(True)
    k = kl_estimate(lp, ref, estimator)
    (dk,) = torch.autograd.grad(k.sum(), lp)
    ds = [a - b for a, b in zip(lp.tolist(), ref.tolist())]
    expected = [ref_k(d, estimator) for d in ds]
    torch.testing.assert_close(k.detach(), torch.tensor([v for v, _ in expected], dtype=F64), rtol=1e-14, atol=ATOL)
    torch.testing.assert_close(dk, torch.tensor([g for _, g in expected], dtype=F64), rtol=1e-14, atol=ATOL)
    if estimator != "k1":
        assert bool((k >= 0).all())


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_vanish_at_the_reference(estimator: str) -> None:
    # Invariant 36: lp == lp_ref gives k == 0 and, for k2 and k3, a zero derivative (k1's is 1).
    lp = torch.tensor([-0.3, -2.0, -7.5], dtype=F64, requires_grad=True)
    k = kl_estimate(lp, lp.detach(), estimator)
    (dk,) = torch.autograd.grad(k.sum(), lp)
    assert bool((k == 0).all())
    assert bool((dk == (1.0 if estimator == "k1" else 0.0)).all())


def test_estimators_clamp_the_log_ratio() -> None:
    # Documented: d is clamped to +-20 first. d = +30: k1 = 20, k2 = 200, k3 = e^-20 - 1 + 20; d = -30:
    # k3 = e^20 - 21, finite; no gradient past the clamp.
    ref = torch.tensor([-40.0, -1.0], dtype=F64)
    lp = torch.tensor([-10.0, -31.0], dtype=F64, requires_grad=True)
    assert LOG_RATIO_CLAMP == 20.0
    torch.testing.assert_close(kl_estimate(lp, ref, "k1").detach(), torch.tensor([20.0, -20.0], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2").detach(), torch.tensor([200.0, 200.0], dtype=F64), rtol=0, atol=0)
    k3 = kl_estimate(lp, ref, "k3")
    torch.testing.assert_close(k3.detach(), torch.tensor([math.exp(-20) + 19, math.exp(20) - 21], dtype=F64), rtol=1e-15, atol=0)
    (dk,) = torch.autograd.grad(k3.sum(), lp)
    assert torch.equal(dk, torch.zeros_like(dk))


@settings(deadline=None, max_examples=40)
@given(st.integers(2, 6).flatmap(lambda v: st.tuples(*[st.tuples(st.floats(-2.0, 2.0), st.floats(-2.0, 2.0))] * v)))
def test_exact_enumeration_unbiasedness_and_expected_gradients(pairs) -> None:  # type: ignore[no-untyped-def]
    # Invariant 37 on a small categorical p = softmax(theta), q = softmax(phi), enumerating every outcome x:
    #   sum_x p k1 == sum_x p k3 == KL(p || q)
    #   sum_x p dk1 grad log p == 0;  sum_x p dk2 grad log p == grad KL(p || q);  sum_x p dk3 grad log p == grad KL(q || p)
    # dk = d k / d lp from proxim; grad log p(x) = e_x - p (log-softmax Jacobian); the KL gradients by autograd of
    # the KL written out here.
    theta = torch.tensor([a for a, _ in pairs], dtype=F64, requires_grad=True)
    logq = torch.log_softmax(torch.tensor([b for _, b in pairs], dtype=F64), 0)
    logp = torch.log_softmax(theta, 0)
    p, q = logp.exp(), logq.exp()
    kl_pq = (p * (logp - logq)).sum()
    kl_qp = (q * (logq - logp)).sum()
    (grad_pq,) = torch.autograd.grad(kl_pq, theta, retain_graph=True)
    (grad_qp,) = torch.autograd.grad(kl_qp, theta)
    p, logp = p.detach(), logp.detach()
    jac = torch.eye(len(pairs), dtype=F64) - p.unsqueeze(0)  # row x: grad_theta log p(x)
    expected_grad = {"k1": torch.zeros_like(grad_pq), "k2": grad_pq, "k3": grad_qp}
    for estimator in ("k1", "k2", "k3"):
        leaf = logp.clone().requires_grad_(True)
        k = kl_estimate(leaf, logq, estimator)
        (dk,) = torch.autograd.grad(k.sum(), leaf)
        if estimator != "k2":
            assert abs(float((p * k.detach()).sum()) - float(kl_pq.detach())) <= 1e-12
        torch.testing.assert_close((p * dk) @ jac, expected_grad[estimator], rtol=1e-10, atol=1e-12, msg=estimator)


# -- KL in the loss and in the reward --------------------------------------------------------------------


def tiny_batch(ref_shift: tuple[float, float] = (0.5, -0.2)) -> proxim.Rollout:
    """One row of 2 valid tokens and a padded one (NaN there), log-probs old = (-1, -2), ref = old - shift."""
    old = torch.tensor([[-1.0, -2.0, NAN]], dtype=F64)
    ref = torch.tensor([[-1.0 - ref_shift[0], -2.0 - ref_shift[1], NAN]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    return proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.tensor([1.0], dtype=F64), ref_logprobs=ref)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_by_hand(estimator: str) -> None:
    # Region none at the anchor (lp = old), A = (1, -2), token mean over 2 tokens, beta 0.1, d = lp - ref = (0.5, -0.2):
    #   policy = mean(-A) = 0.5;  loss/kl = mean(k(d));  total = policy + 0.1 * loss/kl.
    #   g = -d total / d lp = A/2 - 0.1 * k'(d)/2.
    batch = tiny_batch()
    obj = proxim.objective(advantage="diff", region="none", kl_coef=0.1, kl_estimator=estimator, kl_in="loss")
    lp = batch.old_logprobs.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 0.0]], dtype=F64)
    out = obj.loss(lp, batch, proxim.Estimate(advantages=adv))
    out.loss.backward()
    (k_a, dk_a), (k_b, dk_b) = ref_k(0.5, estimator), ref_k(-0.2, estimator)
    kl = (k_a + k_b) / 2
    torch.testing.assert_close(out.metrics["loss/policy"], torch.tensor(0.5, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(out.metrics["loss/kl"], torch.tensor(kl, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, torch.tensor(0.5 + 0.1 * kl, dtype=F64), rtol=0, atol=ATOL)
    expected_g = torch.tensor([[1.0 / 2 - 0.1 * dk_a / 2, -2.0 / 2 - 0.1 * dk_b / 2, 0.0]], dtype=F64)
    assert lp.grad is not None
    torch.testing.assert_close(-lp.grad, expected_g, rtol=0, atol=ATOL)


def test_kl_in_the_reward_by_hand() -> None:
    # diff advantage, no baseline, k1 in the reward, beta 0.1: R' = R - beta * sum_t (old - ref) = 1 - 0.1 * (0.5 - 0.2)
    # = 0.97, broadcast to the valid tokens; reward/kl_penalty = the mean over rows of beta * sum_t k1 = 0.03.
    # The loss gets no KL term (it is in the advantage already).
    batch = tiny_batch()
    obj = proxim.objective(advantage="diff", region="none", kl_coef=0.1, kl_estimator="k1", kl_in="reward")
    est = obj.advantages(batch)
    torch.testing.assert_close(est.rewards, torch.tensor([0.97], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(est.advantages, torch.tensor([[0.97, 0.97, 0.0]], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(est.metrics["reward/kl_penalty"], torch.tensor(0.03, dtype=F64), rtol=0, atol=ATOL)
    out = obj.loss(batch.old_logprobs.clone().requires_grad_(True), batch, est)
    assert "loss/kl" not in out.metrics
    torch.testing.assert_close(out.loss, torch.tensor(-0.97, dtype=F64), rtol=0, atol=ATOL)


def batch_with_everything(seed: int, b: int = 4, t: int = 5):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    old = -(torch.rand(b, t, generator=g, dtype=F64) * 3 + 0.01)
    ref = -(old + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).abs()
    batch = proxim.Rollout(
        old_logprobs=old,
        mask=mask,
        rewards=torch.randn(b, generator=g, dtype=F64),
        group=torch.arange(b) // 2,
        ref_logprobs=ref,
        values=torch.randn(b, t, generator=g, dtype=F64),
    )
    lp = -(old + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).abs()
    return batch, lp


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("preset", ["grpo", "dapo", "gspo", "drpo", "dppo", "cispo", "rloo"])
@settings(deadline=None, max_examples=10)
@given(st.integers(0, 2**31 - 1))
def test_zero_kl_coef_reproduces_the_penalty_free_loss_exactly(preset: str, estimator: str, seed: int) -> None:
    # Invariant 38: beta = 0 gives exactly the loss, gradient and advantages of the objective with no KL option,
    # for KL in the loss and in the reward.
    batch, lp = batch_with_everything(seed)
    free = proxim.objective(preset, kl_coef=0.0)
    base_est = free.advantages(batch)
    leaf = lp.clone().requires_grad_(True)
    base = free.loss(leaf, batch, base_est)
    base.loss.backward()
    for kl_in in ("loss", "reward"):
        obj = proxim.objective(preset, kl_coef=0.0, kl_estimator=estimator, kl_in=kl_in)
        est = obj.advantages(batch)
        assert torch.equal(est.advantages, base_est.advantages)
        other = lp.clone().requires_grad_(True)
        out = obj.loss(other, batch, est)
        out.loss.backward()
        assert out.loss.item() == base.loss.item()
        assert torch.equal(other.grad, leaf.grad)
        assert "loss/kl" not in out.metrics


# -- adaptive KL controller ----------------------------------------------------------------------------


def test_adaptive_controller_by_hand() -> None:
    # init 0.2, target 6, horizon 10000 (StackLLaMA). kl = 9: e = clip(9/6 - 1, -0.2, 0.2) = 0.2, 1000 steps:
    # 0.2 * (1 + 0.2 * 0.1) = 0.204. Then kl = 5.4: e = -0.1, 5000 steps: 0.204 * (1 - 0.1 * 0.5) = 0.1938.
    ctl = proxim.AdaptiveKLController()
    assert (ctl.value, ctl.target, ctl.horizon) == (0.2, 6.0, 10000)
    assert abs(ctl.update(9.0, 1000) - 0.204) <= ATOL
    assert abs(ctl.update(5.4, 5000) - 0.1938) <= ATOL
    assert abs(ctl.value - 0.1938) <= ATOL


@settings(deadline=None, max_examples=60)
@given(st.floats(0.01, 10.0), st.floats(0.1, 20.0), st.floats(0.0, 100.0), st.integers(1, 1000), st.integers(0, 1000))
def test_adaptive_controller_moves_toward_the_target(value: float, target: float, kl: float, horizon: int, n_steps: int) -> None:
    # Invariant 39: kl == target leaves beta unchanged; kl > target raises it, kl < target lowers it (when
    # n_steps > 0); one update changes beta by a factor within 1 +- 0.2 n_steps / horizon.
    n_steps = min(n_steps, horizon)
    ctl = proxim.AdaptiveKLController(value=value, target=target, horizon=horizon)
    new = ctl.update(kl, n_steps)
    assert new == ctl.value
    bound = 0.2 * n_steps / horizon
    assert value * (1 - bound) * (1 - 1e-15) <= new <= value * (1 + bound) * (1 + 1e-15)
    if n_steps == 0 or kl == target:
        assert new == value
    elif kl > target:
        assert new > value
    elif kl < target:
        assert new < value
    same = proxim.AdaptiveKLController(value=value, target=target, horizon=horizon)
    assert same.update(target, n_steps) == value


def test_fixed_controller_and_validation() -> None:
    fixed = proxim.FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05 and fixed.update(0.0, 10) == 0.05
    for bad in ({"value": 0.0}, {"target": -1.0}, {"horizon": 0}):
        with pytest.raises(ValueError, match=r"must be > 0"):
            proxim.AdaptiveKLController(**bad)


# -- entropy bonus --------------------------------------------------------------------------------------


def test_entropy_bonus_by_hand() -> None:
    # Region none at the anchor, A = (1, -2), entropies (0.5, 1.5) and NaN where padded, coef 0.1, token mean:
    # policy = 0.5, loss/entropy = 1.0, total = 0.5 - 0.1 * 1.0 = 0.4; d total / d entropy = -0.1/2 per valid token.
    batch = tiny_batch()
    obj = proxim.objective(advantage="diff", region="none", entropy_coef=0.1)
    entropy = torch.tensor([[0.5, 1.5, NAN]], dtype=F64, requires_grad=True)
    adv = proxim.Estimate(advantages=torch.tensor([[1.0, -2.0, 0.0]], dtype=F64))
    out = obj.loss(batch.old_logprobs.clone().requires_grad_(True), batch, adv, entropy=entropy)
    out.loss.backward()
    torch.testing.assert_close(out.metrics["loss/entropy"], torch.tensor(1.0, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, torch.tensor(0.4, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.05, -0.05, 0.0]], dtype=F64), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", proxim.AGGREGATIONS)
@settings(deadline=None, max_examples=15)
@given(st.integers(0, 2**31 - 1), st.floats(0.001, 1.0))
def test_entropy_bonus_is_aggregated_like_the_policy_loss(mode: str, seed: int, coef: float) -> None:
    # L(coef) == L(0) - coef * aggregate(entropy) in every aggregation mode, with the same mask and normaliser.
    batch, lp = batch_with_everything(seed)
    entropy = torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    without = proxim.objective("grpo", aggregation=mode).loss(lp, batch, proxim.objective("grpo").advantages(batch))
    obj = proxim.objective("grpo", aggregation=mode, entropy_coef=coef)
    out = obj.loss(lp, batch, obj.advantages(batch), entropy=entropy)
    expected = proxim.aggregation.aggregate(entropy, batch.mask, mode)
    torch.testing.assert_close(out.metrics["loss/entropy"], expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, without.loss - coef * expected, rtol=1e-14, atol=ATOL)


def test_entropy_coef_without_entropies_is_an_error() -> None:
    batch = tiny_batch()
    obj = proxim.objective(advantage="diff", region="none", entropy_coef=0.01)
    adv = proxim.Estimate(advantages=torch.zeros(1, 3, dtype=F64))
    with pytest.raises(proxim.BatchError, match=r"entropy_coef=0.01 needs loss\(\.\.\., entropy=\[B, T\] per-token entropies\)"):
        obj.loss(batch.old_logprobs, batch, adv)
    with pytest.raises(proxim.BatchError, match=r"entropy must be a \[B, T\] tensor of shape \(1, 3\) like the batch's mask, got \(3,\)"):
        obj.loss(batch.old_logprobs, batch, adv, entropy=torch.zeros(3, dtype=F64))
    with pytest.raises(proxim.BatchError, match=r"entropy must be floating point, got dtype torch.int64"):
        obj.loss(batch.old_logprobs, batch, adv, entropy=torch.zeros(1, 3, dtype=torch.long))


# -- value loss -----------------------------------------------------------------------------------------


def test_value_loss_by_hand() -> None:
    # 0.5 * max((V - Ret)^2, (clip(V, V_old - 0.2, V_old + 0.2) - Ret)^2):
    #   V = 1.5, V_old = 1.0, Ret = 2.0: unclipped 0.25, clipped (1.2 - 2)^2 = 0.64 -> 0.32; the max is the clipped,
    #     constant branch, so d/dV = 0.
    #   V = 2.5, V_old = 2.0, Ret = 2.1: unclipped 0.16, clipped (2.2 - 2.1)^2 = 0.01 -> 0.08; d/dV = V - Ret = 0.4.
    #   V = 0.1, V_old = 0.0, Ret = -1.0: inside the clip range, both 1.21 -> 0.605; d/dV = 1.1 (split tie, both 1.1).
    values = torch.tensor([1.5, 2.5, 0.1], dtype=F64, requires_grad=True)
    old, ret = torch.tensor([1.0, 2.0, 0.0], dtype=F64), torch.tensor([2.0, 2.1, -1.0], dtype=F64)
    loss = proxim.value_loss(values, old, ret, 0.2)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([0.32, 0.08, 0.605], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 0.4, 1.1], dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(proxim.value_loss(values, old, ret, None).detach(), torch.tensor([0.125, 0.08, 0.605], dtype=F64), rtol=0, atol=ATOL)


@settings(deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.floats(-5, 5)), min_size=1, max_size=10), st.floats(0.01, 2.0))
def test_value_loss_matches_the_reference_and_is_pessimistic(triples, clip: float) -> None:  # type: ignore[no-untyped-def]
    v, old, ret = (torch.tensor(col, dtype=F64) for col in zip(*triples))
    loss = proxim.value_loss(v, old, ret, clip)
    expected = [0.5 * max((a - r) ** 2, (b + min(max(a - b, -clip), clip) - r) ** 2) for a, b, r in triples]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=ATOL)
    assert bool((loss >= 0.5 * (v - ret) ** 2).all())


def test_value_term_in_the_objective_by_hand() -> None:
    # PPO preset without KL, token mean over 2 valid tokens; region at the anchor with A = (1, -1): policy = 0.
    # Values V = (1.5, 2.5), V_old = (1.0, 2.0), returns (2.0, 2.1), clip 0.2: per-token (0.32, 0.08) -> loss/value 0.2,
    # total = 0 + value_coef 0.1 * 0.2 = 0.02; d total / d V = 0.1 * (0, 0.4)/2 = (0, 0.02).
    old = torch.tensor([[-1.0, -2.0, -1.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.tensor([1.0], dtype=F64), values=torch.tensor([[1.0, 2.0, NAN]], dtype=F64))
    obj = proxim.objective("ppo", kl_coef=0.0)
    assert (obj.options.value_coef, obj.options.value_clip) == (0.1, 0.2)
    est = proxim.Estimate(advantages=torch.tensor([[1.0, -1.0, 0.0]], dtype=F64), returns=torch.tensor([[2.0, 2.1, 0.0]], dtype=F64))
    values = torch.tensor([[1.5, 2.5, NAN]], dtype=F64, requires_grad=True)
    out = obj.loss(old.clone().requires_grad_(True), batch, est, values=values)
    out.loss.backward()
    torch.testing.assert_close(out.metrics["loss/value"], torch.tensor(0.2, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(out.metrics["loss/policy"], torch.tensor(0.0, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, torch.tensor(0.02, dtype=F64), rtol=0, atol=ATOL)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.02, 0.0]], dtype=F64), rtol=0, atol=ATOL)


def test_critic_objective_without_values_is_an_error() -> None:
    batch, lp = batch_with_everything(0)
    obj = proxim.objective("ppo")
    est = obj.advantages(batch)
    with pytest.raises(
        proxim.BatchError,
        match=r"baseline 'critic' trains a critic \(value_coef=0.1\): pass loss\(\.\.\., values=\[B, T\] current critic values\), or set value_coef=0\.",
    ):
        obj.loss(lp, batch, est)
    with pytest.raises(proxim.BatchError, match=r"values must be a \[B, T\] tensor of shape \(4, 5\) like the batch's mask, got \(4,\)"):
        obj.loss(lp, batch, est, values=torch.zeros(4, dtype=F64))
    with pytest.raises(proxim.BatchError, match=r"advantage 'gae' produced no returns to regress the critic on"):
        obj.loss(lp, batch, proxim.Estimate(advantages=est.advantages), values=batch.values)
    # value_coef = 0: no critic term, so no values are needed.
    out = proxim.objective("ppo", value_coef=0.0).loss(lp, batch, est)
    assert "loss/value" not in out.metrics
