"""Masking on the stage-2 hot path: `ops.Padding` / `ops.zero_padding` equal ``torch.where``, padding never
reaches the loss or its gradient (NaN and inf included), ``loss(metrics=False)`` changes nothing but the
metrics, and the constants a Rollout derives once stay correct.

The reference everywhere is ``torch.where(mask, x, 0)`` or the same batch with clean (zero) padding, so
an expected value never comes from the code under test.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch

import proxim
from proxim import ops

NAN, INF = float("nan"), float("inf")
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Presets whose stage 2 runs without a critic; ppo and reinforce_pp train one (values are padded too below).
PRESETS = ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "dppo", "drpo", "lampo")


def dirty(x: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`x` with its masked positions set to NaN, +inf, -inf and large finite numbers in turn."""
    junk = torch.tensor([NAN, INF, -INF, 3e4, -7.0], dtype=x.dtype)
    fill = junk[(torch.arange(x.numel()) + seed) % junk.numel()].reshape(x.shape)
    return torch.where(mask, x, fill)


def reference(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("padding", ["nan_inf", "finite"])
def test_zero_padding_equals_where_with_and_without_grad(dtype: torch.dtype, padding: str) -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 7, generator=g) < 0.6
    x = torch.randn(5, 7, generator=g).to(dtype)
    x = dirty(x, mask) if padding == "nan_inf" else torch.where(mask, x, torch.full((), -11.0, dtype=dtype))
    # No gradient: equal to `where` in value (a masked 0 may be -0.0 where it multiplies) and bit for bit
    # at valid positions.
    for out in (ops.zero_padding(x, mask), ops.Padding.of(mask, dtype).zero(x)):
        assert torch.equal(out, reference(x, mask))
        assert torch.equal(out[mask].view(torch.uint8), x[mask].view(torch.uint8))
    # With a gradient: equal in value (a masked 0 may be -0.0), and the gradient is the mask, even when the
    # incoming gradient is NaN at masked positions.
    for zero in (lambda t: ops.zero_padding(t, mask), ops.Padding.of(mask, dtype).zero):
        leaf = x.clone().requires_grad_(True)
        out = zero(leaf)
        assert torch.equal(out.detach(), reference(x, mask))
        upstream = torch.where(mask, torch.full_like(x, 2.0), torch.full_like(x, NAN))
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        assert torch.equal(grad, torch.where(mask, torch.full_like(x, 2.0), torch.zeros_like(x)))


def test_masked_sums_ignore_non_finite_padding_with_grad() -> None:
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, -INF]], dtype=torch.float64, requires_grad=True)
    total = ops.masked_sum(x, mask)  # 1 + 2 + 4
    (grad,) = torch.autograd.grad(total, x)
    assert total.item() == 7.0
    assert torch.equal(grad, mask.to(torch.float64))


@attrs.frozen
class Spy(proxim.TrustRegion):
    """Records the `metrics=` flag it was called with; loss_t = -r_t A_t, one per-token metric."""

    name: ClassVar[str] = "spy"
    calls: list = attrs.field(factory=list)  # type: ignore[type-arg]

    def __call__(self, logprobs, anchor, advantages, mask, metrics=True):  # type: ignore[no-untyped-def]
        self.calls.append(metrics)
        loss = -(logprobs - anchor).exp() * advantages
        return proxim.RegionOutput(loss=loss, metrics={"seen": advantages > 0} if metrics else {})


@attrs.frozen
class Plain(proxim.TrustRegion):
    """A region written without the `metrics=` keyword: it still works, its metrics are dropped when off."""

    name: ClassVar[str] = "plain"

    def __call__(self, logprobs, anchor, advantages, mask):  # type: ignore[no-untyped-def]
        return proxim.RegionOutput(loss=-(logprobs - anchor).exp() * advantages, metrics={"seen": advantages > 0})


def make(seed: int = 0, b: int = 6, t: int = 9, dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    """A ragged batch with a fully masked row, every optional field, and clean (zero) padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    mask[2] = False

    def clean(x: torch.Tensor) -> torch.Tensor:
        return reference(x.to(dtype), mask)

    old = -(torch.rand(b, t, generator=g, dtype=torch.float64) * 3 + 0.01)

    def near(scale: float) -> torch.Tensor:
        return -(old + scale * torch.randn(b, t, generator=g, dtype=torch.float64)).abs()

    fields = {
        "old_logprobs": clean(old),
        "ref_logprobs": clean(near(0.3)),
        "rollout_logprobs": clean(near(0.05)),
        "values": clean(torch.randn(b, t, generator=g, dtype=torch.float64)),
    }
    batch = proxim.Rollout(mask=mask, rewards=torch.randn(b, generator=g, dtype=torch.float64).to(dtype), group=torch.arange(b) // 2, **fields)
    lp = clean(near(0.3))
    values = clean(torch.randn(b, t, generator=g, dtype=torch.float64))
    entropy = clean(torch.rand(b, t, generator=g, dtype=torch.float64) * 2)
    return batch, lp, values, entropy


def run(obj: proxim.Objective, batch: proxim.Rollout, lp: torch.Tensor, values: torch.Tensor, entropy: torch.Tensor, **kw):  # type: ignore[no-untyped-def]
    est = obj.advantages(batch)
    leaf, v_leaf = lp.clone().requires_grad_(True), values.clone().requires_grad_(True)
    out = obj.loss(leaf, batch, est, values=v_leaf, entropy=entropy, **kw)
    grads = torch.autograd.grad(out.loss, [leaf, v_leaf], allow_unused=True)
    return out, [torch.zeros_like(lp) if g is None else g for g in grads]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", PRESETS)
def test_non_finite_padding_never_reaches_loss_gradient_or_metrics(name: str, dtype: torch.dtype) -> None:
    # Every stage-2 term at once (KL in the loss, entropy, the critic where there is one), anchored on the
    # rollout log-probs so that all three log-prob fields are read.
    obj = proxim.objective(name, kl_in="loss", kl_coef=0.05, entropy_coef=0.01, anchor="rollout")
    batch, lp, values, entropy = make(dtype=dtype)
    mask = batch.mask
    clean_out, clean_grads = run(obj, batch, lp, values, entropy)
    noisy = batch.replace(**{f: dirty(getattr(batch, f), mask, k) for k, f in enumerate(("old_logprobs", "ref_logprobs", "rollout_logprobs", "values"))})
    out, grads = run(obj, noisy, dirty(lp, mask, 1), dirty(values, mask, 2), dirty(entropy, mask, 3))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, clean_out.loss, rtol=0, atol=0)
    for grad, clean_grad in zip(grads, clean_grads):
        assert bool(torch.isfinite(grad).all())
        assert torch.equal(grad, clean_grad)
        assert bool((grad[~mask] == 0).all())
    assert out.metrics.keys() == clean_out.metrics.keys()
    for key, value in out.metrics.items():
        assert torch.equal(value, clean_out.metrics[key]), key


@pytest.mark.parametrize("name", ["ppo", "grpo", "dppo", "drpo", "gspo", "cispo", "dapo"])
def test_metrics_off_keeps_loss_and_gradient_and_drops_only_diagnostics(name: str) -> None:
    obj = proxim.objective(name)
    batch, lp, values, entropy = make(dtype=torch.float32)
    lp = dirty(lp, batch.mask)
    on, on_grads = run(obj, batch, lp, values, entropy)
    off, off_grads = run(obj, batch, lp, values, entropy, metrics=False)
    assert torch.equal(off.loss, on.loss)
    for a, b in zip(off_grads, on_grads):
        assert torch.equal(a, b)
    assert {k for k in on.metrics if k.startswith("loss/")} == set(off.metrics)
    assert any(k.startswith("region/") for k in on.metrics)
    for key, value in off.metrics.items():
        assert torch.equal(value, on.metrics[key]), key


def test_regions_are_told_when_metrics_are_off_and_regions_without_the_flag_still_work() -> None:
    spy = Spy()
    obj = proxim.objective(advantage="group_normalized", region=spy)
    batch, lp, values, entropy = make()
    run(obj, batch, lp, values, entropy)
    run(obj, batch, lp, values, entropy, metrics=False)
    assert spy.calls == [True, False]
    plain = proxim.objective(advantage="group_normalized", region=Plain())
    on, on_grads = run(plain, batch, lp, values, entropy)
    off, off_grads = run(plain, batch, lp, values, entropy, metrics=False)
    assert "region/seen" in on.metrics and "region/seen" not in off.metrics
    assert torch.equal(on.loss, off.loss) and torch.equal(on_grads[0], off_grads[0])


def test_derived_constants_follow_in_place_changes_and_are_not_shared_by_slices() -> None:
    obj = proxim.objective("grpo")
    batch, lp, _, _ = make(dtype=torch.float32)
    est = obj.advantages(batch)
    first = obj.loss(lp, batch, est).loss
    assert torch.equal(obj.loss(lp, batch, est).loss, first)  # second call: derived constants reused
    rows = torch.tensor([0, 1, 3])
    assert batch[rows]._memo == {}
    # Changing the mask (or a log-prob field) in place must not leave stale constants behind.
    changed = batch.mask.clone()
    changed[0, 1:] = False
    with torch.no_grad():
        batch.mask.copy_(changed)
        batch.old_logprobs.mul_(1.5)
    fresh = proxim.Rollout(
        old_logprobs=batch.old_logprobs.clone(),
        mask=changed,
        rewards=batch.rewards,
        group=batch.group,
        ref_logprobs=batch.ref_logprobs,
        values=batch.values,
        rollout_logprobs=batch.rollout_logprobs,
    )
    assert torch.equal(obj.loss(lp, batch, est).loss, obj.loss(lp, fresh, est).loss)
