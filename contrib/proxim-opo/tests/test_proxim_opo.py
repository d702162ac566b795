"""proxim-opo's tests: the conformance kit, hand-computed baselines, a per-group reference, an objective."""

import pytest
import torch
from proxim_opo import LengthWeightedMean

import proxim
from proxim.testing import parametrize_with_checks

pytest_plugins = ["proxim.testing"]


@parametrize_with_checks([LengthWeightedMean])
def test_conformance(part, check):
    check(part)


def _batch(lengths, rewards, group, tokens=6):
    mask = torch.arange(tokens).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return proxim.Rollout(
        old_logprobs=torch.where(mask, -1.0, 0.0).to(torch.float64),
        mask=mask,
        rewards=torch.tensor(rewards, dtype=torch.float64),
        group=torch.tensor(group),
    )


def test_hand_computed_baselines():
    batch = _batch(lengths=[2, 4, 6, 3, 0, 0, 5, 0], rewards=[1.0, 0.0, 1.0, 3.0, 1.0, 2.0, 4.0, -4.0], group=[0, 0, 0, 1, 2, 2, 3, 3])
    # group 0: (2*1 + 4*0 + 6*1) / (2 + 4 + 6) = 8/12;  group 1 (a single response): its own reward 3;
    # group 2 (no valid token anywhere): the plain mean 1.5;  group 3: the empty response weighs 0, so 4.
    expected = [8 / 12, 8 / 12, 8 / 12, 3.0, 1.5, 1.5, 4.0, 4.0]
    assert LengthWeightedMean()(batch).tolist() == pytest.approx(expected, rel=1e-15)


def test_matches_a_per_group_python_loop():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 7, (12,), generator=gen).tolist()
    rewards = torch.randn(12, generator=gen, dtype=torch.float64).tolist()
    group = [5, 1, 5, 9, 1, 5, 9, 9, 1, 2, 5, 2]
    got = LengthWeightedMean()(_batch(lengths, rewards, group)).tolist()
    for i, g in enumerate(group):
        members = [j for j in range(12) if group[j] == g]
        want = sum(lengths[j] * rewards[j] for j in members) / sum(lengths[j] for j in members)
        assert got[i] == pytest.approx(want, rel=1e-12)


def test_with_diff_through_discovery(proxim_registry):
    assert proxim_registry.available()["baseline"]["length_weighted_mean"].distribution == "proxim-opo"
    obj = proxim.objective(baseline="length_weighted_mean", advantage="diff", region="clip", registry=proxim_registry)
    est = obj.advantages(_batch(lengths=[2, 6], rewards=[1.0, 0.0], group=[0, 0]))
    # b = (2*1 + 6*0) / 8 = 0.25, so A = 0.75 on the short response's 2 tokens and -0.25 on the long one's 6.
    assert est.advantages[0, :2].tolist() == [0.75, 0.75] and est.advantages[1].tolist() == [-0.25] * 6
