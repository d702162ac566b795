"""proxim-hello's tests: the conformance kit, a hand-computed gradient, and discovery by name."""

import torch
from proxim_hello import TruncatedIS

import proxim
from proxim.testing import parametrize_with_checks

pytest_plugins = ["proxim.testing"]


@parametrize_with_checks([TruncatedIS, TruncatedIS(cap=1.5)])
def test_conformance(part, check):
    check(part)


def test_gradient_is_the_capped_ratio_times_the_advantage():
    # Ratios 2 and 8 with C = 5: g = min(r, 5) A = 2 * 1.5 = 3 and 5 * -0.5 = -2.5; loss = -g.
    anchor = torch.log(torch.tensor([[0.1, 0.1]], dtype=torch.float64))
    logprobs = (anchor + torch.log(torch.tensor([[2.0, 8.0]], dtype=torch.float64))).requires_grad_(True)
    advantages = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    out = TruncatedIS()(logprobs, anchor, advantages, torch.ones(1, 2, dtype=torch.bool))
    out.loss.sum().backward()
    torch.testing.assert_close(-logprobs.grad, torch.tensor([[3.0, -2.5]], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([[-3.0, 2.5]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert out.metrics["truncated_fraction"].tolist() == [[False, True]]


def test_found_by_name_through_its_entry_point(proxim_registry):
    assert proxim_registry.available()["region"]["truncated_is"].distribution == "proxim-hello"
    obj = proxim.objective("grpo", region="truncated_is", cap=2.0, kl_coef=0.0, registry=proxim_registry)
    batch = proxim.Rollout(
        old_logprobs=torch.full((2, 3), -1.0),
        mask=torch.ones(2, 3, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0]),
        group=torch.tensor([0, 0]),
    )
    logprobs = batch.old_logprobs.clone().requires_grad_(True)
    out = obj.loss(logprobs, batch, obj.advantages(batch))
    out.loss.backward()
    # At the anchor g = A: GRPO's z-scores +-1/sqrt(2), spread over 3 tokens of each sequence, 2 sequences.
    expected = torch.tensor([[1.0], [-1.0]]).expand(2, 3) / (2**0.5 + 1e-6) / 6
    torch.testing.assert_close(-logprobs.grad, expected, rtol=1e-6, atol=1e-7)
