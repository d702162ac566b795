"""Stage 2 compiles: `torch.compile(obj.loss, fullgraph=True)` traces every preset without a graph break and gives
the eager loss, gradients and metrics (float64, tight tolerances).

One compile per case (~3 s each on CPU); dynamo's caches are reset between cases.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import proxim

F64 = torch.float64

#: The presets this distribution ships (third-party plugins installed beside it are not under test here).
PRESETS = sorted(name for name, info in proxim.available()["preset"].items() if info.distribution == "proxim")
CASES = [(name, {}) for name in PRESETS] + [
    # every stage-2 term at once: clipped value loss, KL in the loss, entropy bonus, a global normaliser
    ("ppo", {"entropy_coef": 0.01, "kl_in": "loss", "kl_estimator": "k3"}),
]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_batch(seed: int = 0, b: int = 4, t: int = 6):  # type: ignore[no-untyped-def]
    """Every optional field (groups of 2), a ragged mask with a fully masked row, NaN where masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    mask[2] = False

    def near(x: torch.Tensor, scale: float) -> torch.Tensor:
        return -(x + scale * torch.randn(b, t, generator=g, dtype=F64)).abs()

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, torch.full((), float("nan"), dtype=F64))

    old = -(torch.rand(b, t, generator=g, dtype=F64) * 3 + 0.01)
    batch = proxim.Rollout(
        old_logprobs=pad(old),
        mask=mask,
        rewards=torch.randn(b, generator=g, dtype=F64),
        group=torch.arange(b) // 2,
        ref_logprobs=pad(near(old, 0.3)),
        values=pad(torch.randn(b, t, generator=g, dtype=F64)),
        rollout_logprobs=pad(near(old, 0.05)),
    )
    lp = pad(near(old, 0.3))
    values = pad(batch.values + 0.1 * torch.randn(b, t, generator=g, dtype=F64))
    entropy = pad(torch.rand(b, t, generator=g, dtype=F64) * 2)
    return batch, lp, values, entropy


def run(fn, obj, batch, est, lp, values, entropy, normalizer):  # type: ignore[no-untyped-def]
    lp_leaf, v_leaf = lp.clone().requires_grad_(True), values.clone().requires_grad_(True)
    out = fn(lp_leaf, batch, est, values=v_leaf, normalizer=normalizer, entropy=entropy)
    out.loss.backward()
    v_grad = torch.zeros_like(values) if v_leaf.grad is None else v_leaf.grad
    return out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()}, lp_leaf.grad, v_grad


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=[n + ("+all_terms" if o else "") for n, o in CASES])
def test_compiled_stage_two_equals_eager(name: str, overrides: dict) -> None:  # type: ignore[type-arg]
    obj = proxim.objective(name, **overrides)
    batch, lp, values, entropy = make_batch()
    est = obj.advantages(batch)
    normalizer = obj.normalizer(batch.mask) if overrides else None
    eager = run(obj.loss, obj, batch, est, lp, values, entropy, normalizer)
    compiled = run(torch.compile(obj.loss, fullgraph=True), obj, batch, est, lp, values, entropy, normalizer)
    loss, metrics, grad, v_grad = eager
    c_loss, c_metrics, c_grad, c_v_grad = compiled
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(c_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_grad, grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_v_grad, v_grad, rtol=1e-12, atol=1e-12)
    assert c_metrics.keys() == metrics.keys()
    for key in metrics:
        torch.testing.assert_close(c_metrics[key], metrics[key], rtol=1e-12, atol=1e-12, msg=key)
