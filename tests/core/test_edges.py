"""Faults stay contained (the objective's half): numerics at the edges and the messages of docs/errors.md.

Half precision (float16, bfloat16) is computed in float32 in both stages; empty batches (B = 0, T = 0)
give empty advantages, loss 0 and metrics of 0; options, normalizers and part hyperparameters are
checked with messages that name what is wrong and the fix; a part's metrics never overwrite the
objective's own.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import pytest
import torch

import proxim
from proxim import aggregation
from proxim_plugins.grpo import GroupNormalized
from proxim_plugins.ppo import Clip

#: The presets this distribution ships (third-party plugins installed beside it are not under test here).
PRESETS = sorted(name for name, info in proxim.available()["preset"].items() if info.distribution == "proxim")
HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# -- low precision -------------------------------------------------------------------------------


def extreme_batch(dtype: torch.dtype) -> tuple[proxim.Rollout, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 groups of 3, T = 5, ragged; on a few valid tokens the current log-prob is 12 above (+12) or below
    (-12) the old one (anchor, reference and engine alike), the rest near it. Returns the batch, the current
    log-probs, current values and entropies, all in `dtype`."""
    g = torch.Generator().manual_seed(0)
    b, t = 6, 5
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    mask[4, 1:] = False
    old = -(torch.rand(b, t, generator=g) * 2 + 0.2)
    lp = old + 0.05 * torch.randn(b, t, generator=g)
    for row, col in ((0, 1), (2, 0), (3, 2), (5, 4)):  # +12: unlikely when sampled, likely now
        old[row, col], lp[row, col] = -12.5, -0.5
    for row, col in ((1, 0), (3, 4), (5, 1)):  # -12: the other way
        old[row, col], lp[row, col] = -0.5, -12.5
    lp = lp.clamp(max=0.0)
    batch = proxim.Rollout(
        old_logprobs=old.to(dtype),
        mask=mask,
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.25]),
        group=torch.tensor([0, 0, 0, 1, 1, 1]),
        ref_logprobs=old.to(dtype),
        values=(0.1 * torch.randn(b, t, generator=g)).to(dtype),
        rollout_logprobs=old.to(dtype),
    )
    values = (batch.values.float() + 0.1).to(dtype)
    entropy = torch.rand(b, t, generator=g).to(dtype)
    return batch, lp.to(dtype), values, entropy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("overrides", [{}, {"anchor": "rollout", "entropy_coef": 0.01}], ids=["preset", "rollout_anchor+entropy"])
def test_log_ratios_of_12_give_finite_losses_and_gradients_in_every_precision(name: str, dtype: torch.dtype, overrides: dict[str, object]) -> None:
    obj = proxim.objective(name, **overrides)
    batch, lp, values, entropy = extreme_batch(dtype)
    est = obj.advantages(batch)
    assert est.advantages.dtype == torch.float32  # float32 at least, never half
    lp_leaf, v_leaf = lp.clone().requires_grad_(True), values.clone().requires_grad_(True)
    out = obj.loss(lp_leaf, batch, est, values=v_leaf if obj.has_critic else None, entropy=entropy)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss), out.loss
    assert all(bool(torch.isfinite(v)) for v in out.metrics.values()), out.metrics
    assert lp_leaf.grad is not None and lp_leaf.grad.dtype == dtype  # the gradient reaches the half log-probs
    assert bool(torch.isfinite(lp_leaf.grad).all()) and bool((lp_leaf.grad != 0).any())
    assert bool((lp_leaf.grad[~batch.mask] == 0).all())
    if obj.has_critic:
        assert v_leaf.grad is not None and v_leaf.grad.dtype == dtype and bool(torch.isfinite(v_leaf.grad).all())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_stage_two_equals_the_same_numbers_in_float32(dtype: torch.dtype) -> None:
    # Upcasting is all that happens: half inputs give the float32 loss of the same (rounded) numbers.
    obj = proxim.objective("grpo")
    batch, lp, _, _ = extreme_batch(dtype)
    wide = proxim.Rollout(
        old_logprobs=batch.old_logprobs.float(), mask=batch.mask, rewards=batch.rewards, group=batch.group, ref_logprobs=batch.ref_logprobs.float()
    )
    est = obj.advantages(batch)
    half_leaf, wide_leaf = lp.clone().requires_grad_(True), lp.float().requires_grad_(True)
    half_out, wide_out = obj.loss(half_leaf, batch, est), obj.loss(wide_leaf, wide, obj.advantages(wide))
    half_out.loss.backward()
    wide_out.loss.backward()
    torch.testing.assert_close(half_out.loss, wide_out.loss, rtol=1e-6, atol=0)
    assert half_leaf.grad is not None and wide_leaf.grad is not None
    torch.testing.assert_close(half_leaf.grad, wide_leaf.grad.to(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_stage_one_keeps_large_rewards_in_float32_with_half_log_probs(dtype: torch.dtype) -> None:
    rewards = [1e5, 3e5, 0.0, 1e5, 2e5]
    group = [0, 0, 1, 1, 1]
    batch = proxim.Rollout(
        old_logprobs=torch.full((5, 2), -0.5, dtype=dtype), mask=torch.ones(5, 2, dtype=torch.bool), rewards=torch.tensor(rewards), group=torch.tensor(group)
    )
    est = proxim.objective("grpo", kl_coef=0.0).advantages(batch)
    # By hand: group 0 has mean 2e5 and Bessel std sqrt(2) * 1e5; group 1 mean 1e5, std 1e5; eps 1e-6.
    s0, s1 = math.sqrt(2.0) * 1e5, 1e5
    expected = torch.tensor([-1e5 / (s0 + 1e-6), 1e5 / (s0 + 1e-6), -1e5 / (s1 + 1e-6), 0.0, 1e5 / (s1 + 1e-6)])
    assert est.advantages.dtype == torch.float32
    torch.testing.assert_close(est.advantages[:, 0], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(est.advantages[:, 1], expected, rtol=1e-6, atol=1e-7)
    assert est.rewards is not None and est.rewards.dtype == torch.float32
    assert est.metrics["reward/mean"].item() == pytest.approx(sum(rewards) / 5)


def test_stage_one_keeps_a_wider_dtype() -> None:
    batch = proxim.Rollout(
        old_logprobs=torch.full((2, 2), -0.5, dtype=torch.float64), mask=torch.ones(2, 2, dtype=torch.bool), rewards=torch.tensor([0.0, 1.0])
    )
    assert proxim.objective(advantage="diff").advantages(batch).advantages.dtype == torch.float64


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_preference_loss_in_half_precision_is_float32(dtype: torch.dtype) -> None:
    obj = proxim.objective("dpo")
    w = torch.tensor([-120.0, -80.0], dtype=dtype, requires_grad=True)
    lo = torch.tensor([-100.0, -90.0], dtype=dtype)
    out = obj.loss(w, lo, torch.tensor([-110.0, -85.0], dtype=dtype), torch.tensor([-100.0, -95.0], dtype=dtype))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert w.grad is not None and w.grad.dtype == dtype and bool(torch.isfinite(w.grad).all())


# -- empty batches -------------------------------------------------------------------------------


def empty_batch(b: int, t: int) -> proxim.Rollout:
    def zeros() -> torch.Tensor:
        return torch.zeros(b, t)

    return proxim.Rollout(
        old_logprobs=zeros(),
        mask=torch.zeros(b, t, dtype=torch.bool),
        rewards=torch.arange(b, dtype=torch.float32),
        group=torch.arange(b) // 2,
        ref_logprobs=zeros(),
        values=zeros(),
        rollout_logprobs=zeros(),
    )


@pytest.mark.parametrize(("b", "t"), [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("metrics", [True, False])
def test_an_empty_batch_gives_empty_advantages_and_a_zero_loss(name: str, b: int, t: int, metrics: bool) -> None:
    obj = proxim.objective(name)
    batch = empty_batch(b, t)
    est = obj.advantages(batch)
    assert est.advantages.shape == (b, t)
    assert (est.returns is not None) == obj.has_critic
    assert all(bool(torch.isfinite(v)) for v in est.metrics.values()), est.metrics
    assert est.metrics["advantage/mean"].item() == 0.0 and est.metrics["advantage/std"].item() == 0.0
    assert est.metrics["reward/mean"].item() == (sum(range(b)) / b if b else 0.0)
    lp = torch.zeros(b, t, requires_grad=True)
    values = torch.zeros(b, t, requires_grad=True)
    out = obj.loss(lp, batch, est, values=values if obj.has_critic else None, entropy=torch.zeros(b, t), metrics=metrics)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(v.item() == 0.0 for v in out.metrics.values()), out.metrics
    assert lp.grad is not None and lp.grad.shape == (b, t)
    # ... and an empty minibatch of a real step, with the step's normalizer.
    sliced = obj.loss(lp[:0], batch[:0], est[:0], values=values[:0] if obj.has_critic else None, entropy=torch.zeros(0, t), normalizer=7)
    assert sliced.loss.item() == 0.0


def test_an_empty_batch_in_each_aggregation_and_the_preference_loss() -> None:
    for b, t in ((0, 3), (3, 0)):
        for mode in aggregation.MODES:
            assert aggregation.aggregate(torch.zeros(b, t), torch.zeros(b, t, dtype=torch.bool), mode).item() == 0.0
    empty = torch.zeros(0, requires_grad=True)
    out = proxim.objective("dpo").loss(empty, torch.zeros(0), torch.zeros(0), torch.zeros(0))
    out.loss.backward()
    assert out.loss.item() == 0.0 and all(v.item() == 0.0 for v in out.metrics.values())


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_coef": math.inf}, r"objective option: 'kl_coef' must be a finite number >= 0, got inf \(float\)"),
        ({"kl_coef": math.nan}, r"'kl_coef' must be a finite number >= 0, got nan"),
        ({"kl_coef": -0.1}, r"'kl_coef' must be a finite number >= 0, got -0\.1"),
        ({"kl_coef": "0.1"}, r"'kl_coef' must be a finite number >= 0, got '0\.1' \(str\)"),
        ({"entropy_coef": math.inf}, r"'entropy_coef' must be a finite number >= 0, got inf"),
        ({"value_coef": math.nan}, r"'value_coef' must be a finite number >= 0, got nan"),
        ({"value_clip": math.inf}, r"'value_clip' must be None or a finite number > 0, got inf"),
        ({"value_clip": 0.0}, r"'value_clip' must be None or a finite number > 0, got 0\.0"),
        ({"max_length": 2.5}, r"'max_length' must be None or an int >= 1 \(a length in tokens, e\.g\. the generation limit\), got 2\.5 \(float\)"),
        ({"max_length": 0}, r"'max_length' must be None or an int >= 1.*got 0 \(int\)"),
        ({"max_length": True}, r"'max_length' must be None or an int >= 1.*got True \(bool\)"),
    ],
)
def test_options_must_be_finite_numbers_and_whole_lengths(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(proxim.ConfigurationError, match=message):
        proxim.objective("grpo", **overrides)
    with pytest.raises(ValueError, match=message.removeprefix("objective option: ")):
        proxim.Options(**overrides)  # type: ignore[arg-type]


def test_valid_options_still_build() -> None:
    obj = proxim.objective("dr_grpo", max_length=512, kl_coef=0, value_clip=0.2, entropy_coef=1)
    assert (obj.options.max_length, obj.options.kl_coef, obj.options.value_clip) == (512, 0, 0.2)


# -- normalizers ---------------------------------------------------------------------------------


def small_batch() -> tuple[proxim.Objective, proxim.Rollout, proxim.Estimate]:
    obj = proxim.objective("dapo")
    batch = proxim.Rollout(
        old_logprobs=torch.full((4, 3), -1.0),
        mask=torch.ones(4, 3, dtype=torch.bool),
        rewards=torch.tensor([0.0, 1.0, 0.0, 2.0]),
        group=torch.tensor([0, 0, 1, 1]),
    )
    return obj, batch, obj.advantages(batch)


@pytest.mark.parametrize(
    ("normalizer", "shown"),
    [(0, "0"), (-5, "-5"), (math.nan, "nan"), (math.inf, "inf"), (torch.tensor(0.0), r"tensor\(0\.0\)"), (torch.tensor(math.nan), r"tensor\(nan\)")],
    ids=["zero", "negative", "nan", "inf", "tensor_zero", "tensor_nan"],
)
def test_a_normalizer_must_be_a_positive_finite_count(normalizer: object, shown: str) -> None:
    obj, batch, est = small_batch()
    message = rf"normalizer={shown}: the aggregation's denominator must be a positive, finite count .*Objective\.normalizer\(full_mask\).*skip it, or pass normalizer=None"
    with pytest.raises(proxim.BatchError, match=message):
        obj.loss(batch.old_logprobs.clone(), batch, est, normalizer=normalizer)  # type: ignore[arg-type]
    with pytest.raises(proxim.BatchError, match=message):
        aggregation.aggregate(torch.zeros(4, 3), batch.mask, "token_mean", normalizer=normalizer)  # type: ignore[arg-type]
    with pytest.raises(proxim.BatchError, match=message):
        proxim.objective("dpo").loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), normalizer=normalizer)  # type: ignore[arg-type]


def test_a_normalizer_of_the_wrong_kind_is_named() -> None:
    obj, batch, est = small_batch()
    with pytest.raises(proxim.BatchError, match=r"normalizer must be one number \(a 0-d tensor or an int\), got a tensor of shape \(2,\)"):
        obj.loss(batch.old_logprobs.clone(), batch, est, normalizer=torch.tensor([3.0, 4.0]))
    with pytest.raises(proxim.BatchError, match=r"normalizer must be a number or a 0-d tensor, got '12' \(str\)"):
        obj.loss(batch.old_logprobs.clone(), batch, est, normalizer="12")  # type: ignore[arg-type]


def test_a_tensor_normalizer_is_read_again_after_an_in_place_change() -> None:
    obj, batch, est = small_batch()
    n = torch.tensor(12.0)
    lp = batch.old_logprobs.clone().requires_grad_(True)
    assert torch.equal(obj.loss(lp, batch, est, normalizer=n).loss, obj.loss(lp, batch, est).loss)
    n.fill_(0.0)
    with pytest.raises(proxim.BatchError, match=r"normalizer=tensor\(0\.0\)"):
        obj.loss(lp, batch, est, normalizer=n)


def test_a_positive_normalizer_below_one_is_used_as_given() -> None:
    # No clamp at 1 any more: a data-parallel share (global count / world size) may be fractional.
    obj, batch, est = small_batch()
    lp = batch.old_logprobs - 0.1
    total = obj.loss(lp, batch, est, normalizer=1).loss
    torch.testing.assert_close(obj.loss(lp, batch, est, normalizer=0.5).loss, 2 * total)


def test_compiled_stage_two_makes_a_bad_tensor_normalizer_nan_without_a_graph_break() -> None:
    torch._dynamo.reset()
    try:
        obj, batch, est = small_batch()
        compiled = torch.compile(obj.loss, fullgraph=True)
        lp = batch.old_logprobs - 0.1
        torch.testing.assert_close(compiled(lp, batch, est, normalizer=torch.tensor(12.0)).loss, obj.loss(lp, batch, est, normalizer=12).loss)
        assert torch.isnan(compiled(lp, batch, est, normalizer=torch.tensor(0.0)).loss)
    finally:
        torch._dynamo.reset()


# -- overrides -----------------------------------------------------------------------------------


def test_plain_and_qualified_spellings_of_one_field_are_refused() -> None:
    with pytest.raises(
        proxim.ConfigurationError, match=r"override 'eps_low'=0\.1 and 'region\.eps_low'=0\.3 both set 'eps_low' of region 'clip'; pass only one of them\."
    ):
        proxim.objective("grpo", eps_low=0.1, **{"region.eps_low": 0.3})
    with pytest.raises(proxim.ConfigurationError, match=r"'kl_coef'=0\.1 and 'objective\.kl_coef'=0\.2 both set 'kl_coef' of the objective's options"):
        proxim.objective("grpo", kl_coef=0.1, **{"objective.kl_coef": 0.2})
    with pytest.raises(proxim.ConfigurationError, match=r"both set 'eps_low' of region 'clip'"):
        proxim.objective("grpo").override(**{"region.eps_low": 0.3, "eps_low": 0.3})
    with pytest.raises(proxim.ConfigurationError, match=r"'beta'=0\.1 and 'preference\.beta'=0\.2 both set 'beta' of preference 'dpo'"):
        proxim.objective("dpo", beta=0.1, **{"preference.beta": 0.2})
    # A preset's setting and an override of the same field are two sources, not two spellings: the override wins.
    assert proxim.objective("grpo", eps_low=0.1).region.eps_low == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"eps_low": "0.1"},
            r"region 'clip' \(override\): 'eps_low' must be a float \(a number\), got '0\.1' \(str\)\. Write eps_low=0\.1, a number, not a string\.",
        ),
        ({"eps_high": "high"}, r"region 'clip' \(override\): 'eps_high' must be a float \(a number\) or None, got 'high' \(str\)\.$"),
        ({"eps_low": True}, r"'eps_low' must be a float \(a number\), got True \(bool\)"),
        ({"eps": [1e-6]}, r"advantage 'group_normalized' \(override\): 'eps' must be a float \(a number\), got \[1e-06\] \(list\)"),
        ({"scale": 1}, r"advantage 'group_normalized' \(override\): 'scale' must be a string, got 1 \(int\)"),
    ],
)
def test_a_hyperparameter_of_the_wrong_type_names_part_field_type_and_value(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(proxim.ConfigurationError, match=message):
        proxim.objective("grpo", **overrides)


def test_wrong_types_in_other_parts_and_in_the_preference_loss() -> None:
    with pytest.raises(proxim.ConfigurationError, match=r"advantage 'gae' \(override\): 'whiten' must be True or False, got 'yes' \(str\)"):
        proxim.objective("ppo", whiten="yes")
    with pytest.raises(proxim.ConfigurationError, match=r"preference 'dpo' \(override\): 'beta' must be a float \(a number\), got 'x' \(str\)"):
        proxim.objective("dpo", beta="x")


def test_ints_pass_for_floats_and_unresolvable_annotations_fall_back_to_validators() -> None:
    assert proxim.objective("grpo", eps_low=0, eps_high=1).region.eps_high == 1

    def local() -> type[proxim.TrustRegion]:
        class Threshold(float):
            pass

        @attrs.frozen
        class Local(proxim.TrustRegion):
            name: ClassVar[str] = "local"
            cap: Threshold = attrs.field(default=Threshold(1.0), validator=attrs.validators.gt(0.0))

            def __call__(self, logprobs, anchor, advantages, mask):  # type: ignore[no-untyped-def]
                return proxim.RegionOutput(loss=-advantages * logprobs)

        return Local

    region = local()()
    with pytest.raises(proxim.ConfigurationError, match=r"region 'local' \(override\): cap='x' \(str\) refused: '>' not supported.*Pass values of the types"):
        proxim.objective(advantage="diff", region=region, cap="x")


# -- parts given the wrong way -------------------------------------------------------------------


def test_a_part_class_instead_of_an_instance() -> None:
    with pytest.raises(
        proxim.ConfigurationError, match=r"region=Clip is a class, but region= takes an instance: pass region=Clip\(\) or its registered name, region='clip'\."
    ):
        proxim.objective("grpo", region=Clip)  # type: ignore[arg-type]

    @attrs.frozen
    class Mine(GroupNormalized):
        name: ClassVar[str] = "mine"

    with pytest.raises(proxim.ConfigurationError, match=r"advantage=.*Mine is a class, but advantage= takes an instance: pass advantage=.*Mine\(\)\.$"):
        proxim.objective(advantage=Mine)  # type: ignore[arg-type]
    with pytest.raises(
        proxim.ConfigurationError,
        match=r"advantage=Clip is a region class, not an advantage; pass a proxim\.Advantage instance or a registered advantage name \(diff, ",
    ):
        proxim.objective(advantage=Clip)  # type: ignore[arg-type]
    with pytest.raises(proxim.ConfigurationError, match=r"advantage=clip\(eps_low=0\.2.*\) is a region, not an advantage; pass a proxim\.Advantage instance"):
        proxim.objective(advantage=Clip())  # type: ignore[arg-type]
    with pytest.raises(
        proxim.ConfigurationError, match=r"region= takes a registered region name \(.*clip.*\) or a proxim\.TrustRegion instance, got 3 \(int\)\."
    ):
        proxim.objective("grpo", region=3)  # type: ignore[arg-type]


def test_a_region_alone_names_the_region_and_asks_for_a_preset_or_an_advantage() -> None:
    head = r"region='X' alone does not make an objective: name a preset or an advantage, e\.g\. objective\('grpo', region='X'\) or objective\(advantage='group_normalized', region='X'\)\."
    with pytest.raises(
        proxim.UnknownNameError, match=head + r" Presets: .*grpo.*\. Advantages: .*diff.*\. And no region is registered as 'X'\. Registered regions: .*clip"
    ):
        proxim.objective(region="X")
    with pytest.raises(proxim.UnknownNameError, match=r"no region is registered as 'clpi'\. Did you mean 'clip'\?"):
        proxim.objective(region="clpi")
    with pytest.raises(proxim.ConfigurationError, match=r"region='clip' alone does not make an objective.*\('clip' is a registered region\.\)$"):
        proxim.objective(region="clip")
    with pytest.raises(proxim.ConfigurationError, match=r"baseline='group_mean', region=clip\(.*\) alone does not make an objective"):
        proxim.objective(baseline="group_mean", region=Clip())
    with pytest.raises(
        proxim.ConfigurationError, match=r"^name a preset or an advantage: objective\('grpo'\) or objective\(advantage='group_normalized', \.\.\.\)\. Presets: "
    ):
        proxim.objective()


def test_preference_override_is_checked_like_objective_override() -> None:
    dpo = proxim.objective("dpo", beta=0.2)
    with pytest.raises(
        proxim.UnknownNameError,
        match=r"override 'betaa': preference loss 'dpo' has no hyperparameter 'betaa'\. Did you mean 'beta'\? Its hyperparameters: beta",
    ):
        dpo.override(betaa=0.1)
    with pytest.raises(proxim.ConfigurationError, match=r"preference 'dpo' \(override\): 'beta' must be > 0"):
        dpo.override(beta=-1.0)
    with pytest.raises(proxim.ConfigurationError, match=r"preference 'dpo' \(override\): 'beta' must be a float \(a number\), got 'x' \(str\)"):
        dpo.override(beta="x")
    assert dpo.override(**{"preference.beta": 0.3}).preference.beta == 0.3  # type: ignore[attr-defined]
    assert dpo.preference.beta == 0.2  # type: ignore[attr-defined]


# -- metrics -------------------------------------------------------------------------------------


@attrs.frozen
class SpreadAdvantage(proxim.Advantage):
    """diff, with one metric of its own under a configurable key."""

    name: ClassVar[str] = "spread"
    key: str = "spread"

    def __call__(self, batch: proxim.Rollout, baseline: torch.Tensor) -> proxim.Estimate:
        centred = batch.rewards - baseline
        return proxim.Estimate(advantages=proxim.ops.broadcast_to_tokens(centred, batch.mask), metrics={self.key: centred.abs().max()})


@attrs.frozen
class DeclaredAdvantage(SpreadAdvantage):
    name: ClassVar[str] = "declared"
    metric_names: ClassVar[frozenset[str]] = frozenset({"spread", "std"})


@attrs.frozen
class KlRegion(Clip):
    """clip, with an extra metric under a configurable key."""

    name: ClassVar[str] = "kl_region"
    key: str = "mine"

    def __call__(self, logprobs, anchor, advantages, mask, metrics=True):  # type: ignore[no-untyped-def]
        out = super().__call__(logprobs, anchor, advantages, mask, metrics=metrics)
        return proxim.RegionOutput(loss=out.loss, metrics={**out.metrics, self.key: torch.ones_like(mask)})


@attrs.frozen
class DeclaredRegion(KlRegion):
    name: ClassVar[str] = "declared_region"
    metric_names: ClassVar[frozenset[str]] = frozenset({"approx_kl"})


def test_advantage_metrics_are_published_under_advantage() -> None:
    _, batch, _ = small_batch()
    est = proxim.objective(advantage=SpreadAdvantage()).advantages(batch)
    assert est.metrics["advantage/spread"].item() == 2.0
    assert "spread" not in est.metrics
    assert {"advantage/mean", "advantage/std", "reward/mean"} <= set(est.metrics)


def test_a_part_metric_on_a_reserved_key_is_an_error_not_an_overwrite() -> None:
    _, batch, est = small_batch()
    with pytest.raises(
        proxim.BatchError,
        match=r"advantage 'spread' returned the metric 'mean', but the objective publishes advantage/mean itself \(reserved under advantage/: mean, std, zero_std_groups\)\. Rename the part's metric\.",
    ):
        proxim.objective(advantage=SpreadAdvantage(key="mean")).advantages(batch)
    region = proxim.objective(advantage="group_normalized", region=KlRegion(key="ratio_max"))
    with pytest.raises(proxim.BatchError, match=r"region 'kl_region' returned the metric 'ratio_max', but the objective publishes region/ratio_max itself"):
        region.loss(batch.old_logprobs.clone(), batch, est)
    assert region.loss(batch.old_logprobs.clone(), batch, est, metrics=False).loss.item() == 0.0  # no metrics asked, none checked
    own = proxim.objective(advantage="group_normalized", region=KlRegion()).loss(batch.old_logprobs.clone(), batch, est)
    assert own.metrics["region/mine"].item() == 1.0


def test_declared_metric_names_are_checked_when_the_objective_is_built() -> None:
    with pytest.raises(proxim.ConfigurationError, match=r"advantage 'declared' declares the metric 'std', but the objective publishes advantage/std itself"):
        proxim.objective(advantage=DeclaredAdvantage())
    with pytest.raises(
        proxim.ConfigurationError, match=r"region 'declared_region' declares the metric 'approx_kl', but the objective publishes region/approx_kl itself"
    ):
        proxim.objective("grpo", region=DeclaredRegion())
    assert proxim.Part.metric_names == frozenset()
