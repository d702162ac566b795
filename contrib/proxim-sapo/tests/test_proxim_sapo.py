"""proxim-sapo's tests: the conformance kit, hand-computed values, a per-token reference, the preset."""

import math

import pytest
import torch
from proxim_sapo import SoftGate

import proxim
from proxim.testing import parametrize_with_checks

pytest_plugins = ["proxim.testing"]


@parametrize_with_checks([SoftGate, SoftGate(tau_pos=0.5, tau_neg=3.0)])
def test_conformance(part, check):
    check(part)


def _call(ratios, advantages, region=None):
    anchor = torch.full((1, len(ratios)), math.log(0.01), dtype=torch.float64)
    logprobs = (anchor + torch.log(torch.tensor([ratios], dtype=torch.float64))).requires_grad_(True)
    out = (region or SoftGate())(logprobs, anchor, torch.tensor([advantages], dtype=torch.float64), torch.ones(1, len(ratios), dtype=torch.bool))
    out.loss.sum().backward()
    return out.loss.detach()[0].tolist(), (-logprobs.grad)[0].tolist()


def test_hand_computed_values():
    loss, grad = _call([1.0, 1.0, 2.0, 0.5], [1.0, -1.0, 2.0, -0.5])
    # r = 1, A = 1 (tau_pos = 1):     f = 4 * sigmoid(0) = 2, loss = -2;  g = 4 * 0.5 * 0.5 * 1 * A = 1
    # r = 1, A = -1 (tau_neg = 1.05): f = (4 / 1.05) * 0.5, loss = 2 / 1.05 = 1.9047619...;  g = A = -1
    # r = 2, A = 2: f = 4 * sigmoid(1) = 4 * 0.7310585786300049, loss = -2 f = -5.848468629040039;
    #               g = 4 * s (1 - s) * r * A with s = sigmoid(1): 4 * 0.19661193324148185 * 2 * 2 = 3.1457909318637096
    # r = 0.5, A = -0.5: s = sigmoid(1.05 * -0.5) = 0.37168...; loss = (4 / 1.05) * s * 0.5 = 0.7079691651516833;
    #               g = 4 * s (1 - s) * 0.5 * -0.5 = -0.23353495582134814
    assert loss == pytest.approx([-2.0, 1.9047619047619047, -5.848468629040039, 0.7079691651516833], rel=1e-12)
    assert grad == pytest.approx([1.0, -1.0, 3.1457909318637096, -0.23353495582134814], rel=1e-12)


def test_matches_a_per_token_reference_written_from_the_paper():
    def reference(r, a, tau_pos=1.0, tau_neg=1.05):
        tau = tau_pos if a > 0 else tau_neg
        s = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
        return -(4.0 / tau) * s * a, 4.0 * s * (1.0 - s) * r * a

    gen = torch.Generator().manual_seed(0)
    ratios = torch.exp(torch.randn(40, generator=gen, dtype=torch.float64)).tolist()
    advantages = torch.randn(40, generator=gen, dtype=torch.float64).tolist()
    advantages[0] = 0.0
    loss, grad = _call(ratios, advantages)
    expected = [reference(r, a) for r, a in zip(ratios, advantages)]
    assert loss == pytest.approx([e[0] for e in expected], rel=1e-12, abs=1e-15)
    assert grad == pytest.approx([e[1] for e in expected], rel=1e-12, abs=1e-15)


def test_gradient_fades_smoothly_instead_of_clipping():
    # PPO's clip (eps 0.2) gives A > 0 no gradient at r = 1.3; SAPO still does, and fades only far away:
    # g = 4 s (1 - s) r A is 1.5729 at r = 2, 0.3533 at r = 5 (s = sigmoid(4)) and about 1e-6 at r = 20.
    _, grad = _call([1.3, 2.0, 5.0, 20.0], [1.0] * 4)
    assert grad[0] > 1.0 and grad[1] > grad[2] > grad[3] > 0.0
    assert grad[1:3] == pytest.approx([1.5728954659318548, 0.35325412426582216], rel=1e-12)
    assert grad[3] < 1e-5


def test_preset_resolves_through_discovery(proxim_registry):
    assert proxim_registry.available()["region"]["sapo"].distribution == "proxim-sapo"
    obj = proxim.objective("sapo", registry=proxim_registry)
    assert isinstance(obj.region, SoftGate) and obj.options.aggregation == "seq_mean_token_mean"
    batch = proxim.Rollout(
        old_logprobs=torch.full((2, 2), -1.0, dtype=torch.float64),
        mask=torch.ones(2, 2, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0], dtype=torch.float64),
        group=torch.tensor([7, 7]),
    )
    out = obj.loss(batch.old_logprobs.clone().requires_grad_(True), batch, obj.advantages(batch))
    # At r = 1 loss_t = -2 A / tau; A = +-0.5 / (std + eps), std = 1/sqrt(2): the mean over sequences is
    # -(1/2) * 2a (1/1 - 1/1.05) with a = 0.5 / (sqrt(0.5) + 1e-6).
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert out.loss.item() == pytest.approx(-a * (1 - 1 / 1.05), rel=1e-12)
