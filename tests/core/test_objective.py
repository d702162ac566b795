"""Building objectives: presets, free composition, override routing, compatibility errors, requires, fingerprint."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch

import proxim

PRESETS = ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "dppo", "drpo", "lampo")


@attrs.frozen
class HalfRegion(proxim.TrustRegion):
    """A user's own region, never registered: loss_t = -tau * r_t * A_t."""

    name: ClassVar[str] = "half"
    tau: float = 0.5

    def __call__(self, logprobs, anchor, advantages, mask):  # type: ignore[no-untyped-def]
        return proxim.RegionOutput(loss=-self.tau * (logprobs - anchor).exp() * advantages)


@attrs.frozen
class EpsBaseline(proxim.Baseline):
    """A baseline with a field named like group_normalized's `eps`, to make an override ambiguous."""

    name: ClassVar[str] = "eps_baseline"
    eps: float = 0.0

    def __call__(self, batch):  # type: ignore[no-untyped-def]
        return torch.zeros_like(batch.rewards) + self.eps


def batch(**extra: torch.Tensor) -> proxim.Rollout:
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0], [-1.5, -0.2, -0.1], [-0.9, -1.1, -1.3]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    return proxim.Rollout(
        old_logprobs=old, mask=mask, rewards=torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64), group=torch.tensor([5, 5, 9, 9]), **extra
    )


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_and_names_its_parts(name: str) -> None:
    obj = proxim.objective(name)
    assert obj.preset == name
    record = proxim.default_registry().get("preset", name)
    assert (obj.baseline.name, obj.advantage.name, obj.region.name) == (record.baseline, record.advantage, record.region)


def test_preset_defaults_follow_the_papers() -> None:
    grpo = proxim.objective("grpo")
    assert (grpo.region.eps_low, grpo.options.kl_coef, grpo.options.kl_estimator, grpo.options.kl_in) == (0.2, 0.04, "k3", "loss")
    assert grpo.options.aggregation == "seq_mean_token_mean"
    dapo = proxim.objective("dapo")
    assert (dapo.region.eps_low, dapo.region.eps_high, dapo.options.kl_coef) == (0.2, 0.28, 0.0)
    gspo = proxim.objective("gspo")
    assert (gspo.region.eps_low, gspo.region.eps_high) == (3e-4, 4e-4)
    ppo = proxim.objective("ppo")
    assert (ppo.advantage.gamma, ppo.advantage.lam, ppo.options.value_clip, ppo.options.kl_in) == (1.0, 0.95, 0.2, "reward")
    assert proxim.objective("drpo").region.delta == 12.5
    assert proxim.objective("dr_grpo").advantage.scale == "none"


def test_overrides_are_routed_by_field_name() -> None:
    obj = proxim.objective("grpo", eps_high=0.28, kl_coef=0.0, eps=1e-4)
    assert obj.region.eps_high == 0.28
    assert obj.options.kl_coef == 0.0
    assert obj.advantage.eps == 1e-4
    qualified = proxim.objective("grpo", **{"region.eps_low": 0.1, "objective.aggregation": "token_mean"})
    assert (qualified.region.eps_low, qualified.options.aggregation) == (0.1, "token_mean")
    assert obj.override(eps_high=0.3).region.eps_high == 0.3
    assert obj.region.eps_high == 0.28, "override returns a copy"


def test_free_composition_and_default_baseline() -> None:
    obj = proxim.objective(baseline="group_mean", advantage="pairwise", region="quadratic", aggregation="token_mean")
    assert (obj.baseline.name, obj.advantage.name, obj.region.name, obj.preset) == ("group_mean", "pairwise", "quadratic", None)
    assert proxim.objective(advantage="group_normalized").baseline.name == "group_mean"
    assert proxim.objective(advantage="gae").baseline.name == "critic"
    assert proxim.objective(advantage="diff").region.name == "clip"


def test_instances_are_accepted_and_overridden() -> None:
    obj = proxim.objective(region=HalfRegion(tau=2.0), advantage="group_normalized")
    assert obj.region.tau == 2.0
    assert proxim.objective(region=HalfRegion(), advantage="diff", tau=3.0).region.tau == 3.0
    assert "HalfRegion" in obj.fingerprint, "an unregistered part is named by its class in the fingerprint"


def test_replacing_a_presets_part_drops_only_that_axis_settings() -> None:
    obj = proxim.objective("dapo", region="quadratic")
    assert obj.region.delta == 12.5, "dapo's region.eps_* settings do not apply to another region"
    assert obj.options.aggregation == "token_mean", "unqualified preset options still apply"


def test_unknown_override_lists_fields_and_suggests() -> None:
    with pytest.raises(
        proxim.UnknownNameError,
        match=r"override 'eps_hihg' matches no hyperparameter of this objective\. Did you mean 'eps_high'\?.*region 'clip': eps_low, eps_high, dual_clip",
    ):
        proxim.objective("grpo", eps_hihg=0.3)
    with pytest.raises(proxim.UnknownNameError, match=r"region 'clip' has no hyperparameter 'delta'"):
        proxim.objective("grpo", **{"region.delta": 0.1})


def test_ambiguous_override_names_the_candidates() -> None:
    with pytest.raises(
        proxim.ConfigurationError, match=r"override 'eps' is ambiguous: baseline and advantage all have it; write one of 'baseline\.eps', 'advantage\.eps'"
    ):
        proxim.objective(baseline=EpsBaseline(), advantage="group_normalized", eps=0.1)
    obj = proxim.objective(baseline=EpsBaseline(), advantage="group_normalized", **{"advantage.eps": 0.1})
    assert (obj.baseline.eps, obj.advantage.eps) == (0.0, 0.1)


def test_out_of_range_values_name_the_part() -> None:
    with pytest.raises(proxim.ConfigurationError, match=r"region 'clip' \(override\): 'eps_low' must be >= 0"):
        proxim.objective("grpo", eps_low=-0.1)
    with pytest.raises(proxim.ConfigurationError, match=r"objective option: 'kl_estimator' must be in"):
        proxim.objective("grpo", kl_estimator="k4")
    with pytest.raises(proxim.ConfigurationError, match=r"'dual_clip' must be > 1"):
        proxim.objective("ppo", dual_clip=0.5)


def test_impossible_combinations_fail_at_build() -> None:
    with pytest.raises(
        proxim.ConfigurationError,
        match=r"advantage 'gae' bootstraps from state values V\(s_t\), which baseline 'group_mean' does not provide; use baseline='critic'",
    ):
        proxim.objective(baseline="group_mean", advantage="gae")
    with pytest.raises(
        proxim.ConfigurationError, match=r"advantage 'group_normalized' compares sequence rewards.*baseline 'critic' gives per-token state values"
    ):
        proxim.objective(baseline="critic", advantage="group_normalized")
    with pytest.raises(proxim.ConfigurationError, match=r"name a preset or an advantage"):
        proxim.objective(region="clip")


def test_requires_collects_parts_and_options() -> None:
    assert proxim.objective("grpo").requires == {"group", "ref_logprobs"}
    assert proxim.objective("dapo").requires == {"group"}
    assert proxim.objective("ppo").requires == {"values", "ref_logprobs"}
    assert proxim.objective("reinforce_pp", kl_coef=0.0).requires == frozenset()
    assert proxim.objective("dppo", anchor="rollout").requires == {"group", "rollout_logprobs"}


def test_missing_batch_field_says_who_needs_it() -> None:
    with pytest.raises(proxim.BatchError, match=r"needs Rollout\.ref_logprobs \(needed by kl_coef=0\.04\), but the batch has None"):
        proxim.objective("grpo").advantages(batch())
    no_group = proxim.Rollout(old_logprobs=-torch.ones(2, 2), mask=torch.ones(2, 2, dtype=torch.bool), rewards=torch.zeros(2))
    with pytest.raises(proxim.BatchError, match=r"Rollout\.group \(needed by baseline 'group_mean', advantage 'group_normalized'\)"):
        proxim.objective("dapo").advantages(no_group)


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = proxim.objective("grpo"), proxim.objective("grpo")
    assert a.fingerprint == b.fingerprint
    assert "region=clip(eps_low=0.2, eps_high=None, dual_clip=None)@proxim==0.1.0" in a.fingerprint
    assert proxim.objective("grpo", eps_high=0.21).fingerprint != a.fingerprint
    assert proxim.objective("grpo", kl_coef=0.05).fingerprint != a.fingerprint


def test_leave_one_out_rejects_groups_of_one_with_the_group_named() -> None:
    rollout = proxim.Rollout(
        old_logprobs=-torch.ones(3, 2), mask=torch.ones(3, 2, dtype=torch.bool), rewards=torch.tensor([1.0, 2.0, 3.0]), group=torch.tensor([4, 4, 7])
    )
    with pytest.raises(proxim.BatchError, match=r"baseline 'leave_one_out' needs at least 2 responses per group, but group id 7 \(row 2\) has 1"):
        proxim.objective("rloo", kl_coef=0.0).advantages(rollout)


def test_anchor_rollout_uses_the_engines_logprobs() -> None:
    base = batch()
    engine = base.old_logprobs - 0.1
    rollout = batch(rollout_logprobs=engine)
    obj = proxim.objective("dppo", anchor="rollout", aggregation="token_mean")
    est = obj.advantages(rollout)
    lp = base.old_logprobs.clone().requires_grad_(True)
    out = obj.loss(lp, rollout, est)
    # Against the engine's log-probs every ratio is exp(0.1) on valid tokens.
    assert out.metrics["region/ratio_mean"].item() == pytest.approx(torch.exp(torch.tensor(0.1, dtype=torch.float64)).item(), abs=1e-12)
    with pytest.raises(proxim.BatchError, match=r"Rollout\.rollout_logprobs \(needed by anchor='rollout'\)"):
        obj.advantages(base)


def test_minibatch_slices_match_rows() -> None:
    rollout = batch()
    obj = proxim.objective("dapo")
    est = obj.advantages(rollout)
    idx = torch.tensor([3, 0])
    sub = rollout[idx]
    assert torch.equal(sub.old_logprobs, rollout.old_logprobs[idx]) and torch.equal(sub.group, torch.tensor([9, 5]))
    assert torch.equal(est[idx].advantages, est.advantages[idx])
    assert torch.equal(rollout[1:3].mask, rollout.mask[1:3])
