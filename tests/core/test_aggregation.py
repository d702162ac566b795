"""Aggregation (docs/invariants.md, invariants 31-35): hand values, a loop reference, padding, micro-batch and
permutation invariance, length weighting, and fully masked rows and batches through `Objective.loss`.

Gradients are taken on float64 leaf log-probs (docs/invariants.md, conventions).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import proxim
from proxim.aggregation import MODES, aggregate, default_normalizer

F64 = torch.float64
ATOL = 1e-12
NAN, INF = float("nan"), float("inf")
#: The presets this distribution ships (third-party plugins installed beside it are not under test here).
PRESETS = sorted(name for name, info in proxim.available()["preset"].items() if info.distribution == "proxim")
REGIONS = ("clip", "none", "cispo", "divergence_mask", "quadratic", "sequence_clip")


def ref_aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, max_length: int | None = None) -> float:
    """Plain-Python loops over rows and tokens; rows with no valid token are not counted (docs/parts.md, Aggregation)."""
    rows = []
    for i in range(loss.shape[0]):
        vals = [loss[i, t].item() for t in range(loss.shape[1]) if mask[i, t]]
        if vals:
            rows.append(vals)
    if not rows:
        return 0.0
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq_mean_token_sum":
        return sum(sum(r) for r in rows) / len(rows)
    horizon = loss.shape[1] if max_length is None else max_length
    return sum(sum(r) for r in rows) / (len(rows) * horizon)


def test_each_mode_by_hand() -> None:
    # loss [[1, 2, NaN], [3, inf, -inf], [NaN, NaN, NaN]], mask [[1, 1, 0], [1, 0, 0], [0, 0, 0]]:
    #   token_mean               (1 + 2 + 3) / 3                  = 2
    #   seq_mean_token_mean      ((1 + 2)/2 + 3/1) / 2            = 2.25   (the empty row is not counted)
    #   seq_mean_token_sum       (3 + 3) / 2                      = 3
    #   seq_mean_token_sum_norm  6 / (2 * L_max), L_max = T = 3   = 1;  with max_length 8: 6/16 = 0.375
    loss = torch.tensor([[1.0, 2.0, NAN], [3.0, INF, -INF], [NAN, NAN, NAN]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    expected = {"token_mean": 2.0, "seq_mean_token_mean": 2.25, "seq_mean_token_sum": 3.0, "seq_mean_token_sum_norm": 1.0}
    for mode, value in expected.items():
        assert aggregate(loss, mask, mode).item() == value, mode
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", max_length=8).item() == 0.375
    assert default_normalizer(mask, "token_mean").item() == 3
    assert all(default_normalizer(mask, mode).item() == 2 for mode in MODES if mode != "token_mean")


def test_objective_normalizer_and_max_length_option() -> None:
    # Objective.normalizer is the aggregation's own denominator; max_length is the L_max of sum_norm.
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert proxim.objective("dapo").normalizer(mask).item() == 2
    assert proxim.objective("grpo").normalizer(mask).item() == 1
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=F64)
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.zeros(2, dtype=F64), group=torch.tensor([0, 0]))
    adv = proxim.Estimate(advantages=torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64))
    # region none at the anchor: per-token loss -A = -1 on 2 tokens of 1 non-empty row: sum -2 over (1 * L_max).
    obj = proxim.objective("dr_grpo", region="none")
    assert obj.loss(old, batch, adv).loss.item() == -2 / 3
    assert obj.override(max_length=10).loss(old, batch, adv).loss.item() == -2 / 10


@st.composite
def masked_losses(draw, allow_empty_rows: bool = True):  # type: ignore[no-untyped-def]
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.2, 1.0))
    if not allow_empty_rows:
        mask[:, 0] = True
    loss = torch.randn(b, t, generator=g, dtype=F64) * 3
    garbage = torch.tensor([NAN, INF, -INF, 1e300], dtype=F64)[torch.randint(0, 4, (b, t), generator=g)]
    return torch.where(mask, loss, garbage), mask


@pytest.mark.parametrize("mode", MODES)
@settings(deadline=None, max_examples=40)
@given(masked_losses(), st.none() | st.integers(1, 50))
def test_matches_the_loop_reference_whatever_is_masked(mode: str, data, max_length) -> None:  # type: ignore[no-untyped-def]
    loss, mask = data
    got = aggregate(loss, mask, mode, max_length=max_length)
    assert math.isfinite(got.item())
    assert abs(got.item() - ref_aggregate(loss, mask, mode, max_length)) <= ATOL


@settings(deadline=None, max_examples=40)
@given(masked_losses(), st.floats(-5.0, 5.0), st.integers(1, 50))
def test_constant_loss(data, c: float, max_length: int) -> None:  # type: ignore[no-untyped-def]
    # Invariant 31: a constant per-token loss c gives token_mean == seq_mean_token_mean == c,
    # seq_mean_token_sum == c mean(n_i), sum_norm == c mean(n_i) / L_max (means over non-empty rows).
    _, mask = data
    assume(bool(mask.any()))
    loss = torch.where(mask, torch.full(mask.shape, c, dtype=F64), torch.full(mask.shape, NAN, dtype=F64))
    lengths = [n for n in mask.sum(dim=1).tolist() if n > 0]
    mean_n = sum(lengths) / len(lengths)
    tol = ATOL * max(1.0, abs(c) * mean_n)
    assert abs(aggregate(loss, mask, "token_mean").item() - c) <= tol
    assert abs(aggregate(loss, mask, "seq_mean_token_mean").item() - c) <= tol
    assert abs(aggregate(loss, mask, "seq_mean_token_sum").item() - c * mean_n) <= tol
    assert abs(aggregate(loss, mask, "seq_mean_token_sum_norm", max_length=max_length).item() - c * mean_n / max_length) <= tol


@pytest.mark.parametrize("mode", MODES)
@settings(deadline=None, max_examples=30)
@given(masked_losses(allow_empty_rows=False))
def test_length_weighting(mode: str, data) -> None:  # type: ignore[no-untyped-def]
    # Invariant 34: with region none at the anchor, g = A, so -dL/dlp is the aggregation weight of each token
    # when A = 1: token_mean 1/N, seq_mean_token_mean 1/(B n_i), seq_mean_token_sum 1/B, sum_norm 1/(B L_max).
    _, mask = data
    b, t = mask.shape
    old = torch.full((b, t), -1.0, dtype=F64)
    batch = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.zeros(b, dtype=F64))
    obj = proxim.objective(advantage="diff", region="none", aggregation=mode, max_length=64)
    leaf = old.clone().requires_grad_(True)
    obj.loss(leaf, batch, proxim.Estimate(advantages=mask.to(F64))).loss.backward()
    n = mask.sum(dim=1, keepdim=True).to(F64).expand(b, t)
    weight = {
        "token_mean": torch.full((b, t), 1.0 / mask.sum().item(), dtype=F64),
        "seq_mean_token_mean": 1.0 / (b * n),
        "seq_mean_token_sum": torch.full((b, t), 1.0 / b, dtype=F64),
        "seq_mean_token_sum_norm": torch.full((b, t), 1.0 / (b * 64), dtype=F64),
    }[mode]
    assert leaf.grad is not None
    torch.testing.assert_close(-leaf.grad, torch.where(mask, weight, torch.zeros((), dtype=F64)), rtol=0, atol=ATOL)


# -- through Objective.loss with every preset --------------------------------------------------------------


def make_batch(seed: int, b: int = 6, t: int = 5, garbage: bool = True, empty_rows: tuple[int, ...] = ()):  # type: ignore[no-untyped-def]
    """A batch with every optional field (groups of 2), current log-probs, critic values and entropies.

    With `garbage`, every masked position of every per-token tensor holds NaN, inf or -inf.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[:, 0] = True
    for row in empty_rows:
        mask[row] = False

    def near(x: torch.Tensor, scale: float) -> torch.Tensor:
        return -(x + scale * torch.randn(b, t, generator=g, dtype=F64)).abs()

    junk = torch.tensor([NAN, INF, -INF], dtype=F64)[torch.randint(0, 3, (b, t), generator=g)]

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, junk) if garbage else x

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
    values = pad(torch.randn(b, t, generator=g, dtype=F64))
    entropy = pad(torch.rand(b, t, generator=g, dtype=F64) * 2)
    return batch, lp, values, entropy


def run(obj: proxim.Objective, batch, lp, values, entropy, est=None, normalizer=None):  # type: ignore[no-untyped-def]
    """(loss, metrics, d loss / d lp, d loss / d values) for one call of Objective.loss."""
    est = obj.advantages(batch) if est is None else est
    lp_leaf = lp.clone().requires_grad_(True)
    v_leaf = values.clone().requires_grad_(True)
    out = obj.loss(lp_leaf, batch, est, values=v_leaf, normalizer=normalizer, entropy=entropy)
    out.loss.backward()
    v_grad = torch.zeros_like(values) if v_leaf.grad is None else v_leaf.grad
    return out.loss.detach(), out.metrics, lp_leaf.grad, v_grad


def build(name: str, **overrides) -> proxim.Objective:  # type: ignore[no-untyped-def]
    """The preset with an entropy bonus, and with KL in the loss when it has a KL (so the term is exercised)."""
    base = proxim.objective(name)
    extra = {"kl_in": "loss"} if base.options.kl_coef > 0 and base.options.kl_in == "reward" else {}
    return proxim.objective(name, entropy_coef=0.01, **extra, **overrides)


@pytest.mark.parametrize("name", PRESETS)
@settings(deadline=None, max_examples=8)
@given(st.integers(0, 2**31 - 1))
def test_garbage_at_masked_positions_changes_nothing(name: str, seed: int) -> None:
    # Invariant 32 (same shape): NaN/inf at every masked position of log-probs, anchors, reference, values and
    # entropies gives the loss, metrics and gradients of the same batch with finite padding; all finite.
    obj = build(name)
    dirty = make_batch(seed, garbage=True)
    clean = make_batch(seed, garbage=False)
    loss_d, metrics_d, grad_d, vgrad_d = run(obj, *dirty)
    loss_c, metrics_c, grad_c, vgrad_c = run(obj, *clean)
    assert math.isfinite(loss_d.item())
    assert bool(torch.isfinite(grad_d).all()) and bool(torch.isfinite(vgrad_d).all())
    assert loss_d.item() == loss_c.item()
    assert torch.equal(grad_d, grad_c) and torch.equal(vgrad_d, vgrad_c)
    mask = dirty[0].mask
    assert bool((grad_d[~mask] == 0).all())
    assert metrics_d.keys() == metrics_c.keys()
    for key in metrics_d:
        assert metrics_d[key].item() == metrics_c[key].item(), key


@pytest.mark.parametrize("name", PRESETS)
@settings(deadline=None, max_examples=8)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_appending_masked_tokens_changes_nothing(name: str, seed: int, extra: int) -> None:
    # Invariant 32: appending masked columns (holding NaN/inf) leaves loss and gradient unchanged, with a fixed
    # L_max (max_length) for sum_norm: its default L_max is the padded T, which padding does change by design.
    obj = build(name, max_length=32)
    batch, lp, values, entropy = make_batch(seed)
    b = lp.shape[0]

    def widen(x: torch.Tensor | None, fill: float) -> torch.Tensor | None:
        return None if x is None else torch.cat([x, torch.full((b, extra), fill, dtype=x.dtype)], dim=1)

    wide = proxim.Rollout(
        old_logprobs=widen(batch.old_logprobs, NAN),
        mask=torch.cat([batch.mask, torch.zeros(b, extra, dtype=torch.bool)], dim=1),
        rewards=batch.rewards,
        group=batch.group,
        ref_logprobs=widen(batch.ref_logprobs, -INF),
        values=widen(batch.values, INF),
        rollout_logprobs=widen(batch.rollout_logprobs, NAN),
    )
    loss, metrics, grad, vgrad = run(obj, batch, lp, values, entropy)
    loss_w, metrics_w, grad_w, vgrad_w = run(obj, wide, widen(lp, NAN), widen(values, -INF), widen(entropy, NAN))
    torch.testing.assert_close(loss_w, loss, rtol=1e-14, atol=ATOL)
    torch.testing.assert_close(grad_w[:, : lp.shape[1]], grad, rtol=1e-13, atol=ATOL)
    torch.testing.assert_close(vgrad_w[:, : lp.shape[1]], vgrad, rtol=1e-13, atol=ATOL)
    assert bool((grad_w[:, lp.shape[1] :] == 0).all()) and bool((vgrad_w[:, lp.shape[1] :] == 0).all())
    for key in metrics:
        torch.testing.assert_close(metrics_w[key], metrics[key], rtol=1e-13, atol=ATOL, msg=key)


@st.composite
def configurations(draw):  # type: ignore[no-untyped-def]
    """An objective over one aggregation mode: a GRPO-style one with any built-in region, KL in the loss and an
    entropy bonus, or PPO with its critic (value loss, value clip)."""
    if draw(st.booleans()):
        region = draw(st.sampled_from(REGIONS))
        return {"preset": "grpo", "region": region, "entropy_coef": 0.01, "kl_coef": draw(st.sampled_from([0.0, 0.04]))}
    return {"preset": "ppo", "entropy_coef": 0.01, "kl_in": draw(st.sampled_from(["loss", "reward"]))}


def objective_from(config: dict, mode: str) -> proxim.Objective:  # type: ignore[type-arg]
    config = dict(config)
    return proxim.objective(config.pop("preset"), aggregation=mode, **config)


@pytest.mark.parametrize("mode", MODES)
@settings(deadline=None, max_examples=25)
@given(configurations(), st.integers(0, 2**31 - 1), st.integers(2, 4), st.data())
def test_micro_batches_sum_to_the_full_batch(mode: str, config, seed: int, k: int, data) -> None:  # type: ignore[no-untyped-def]
    # Invariant 33: split the rows into k micro-batches (any rows, some empty), aggregate each with the global
    # normaliser obj.normalizer(full mask), and sum: equal to the full batch's loss and gradients.
    obj = objective_from(config, mode)
    empty = tuple(data.draw(st.sets(st.integers(0, 5), max_size=2)))
    batch, lp, values, entropy = make_batch(seed, empty_rows=empty)
    est = obj.advantages(batch)
    loss, _, grad, vgrad = run(obj, batch, lp, values, entropy, est=est)
    order = torch.tensor(data.draw(st.permutations(range(lp.shape[0]))))
    cuts = sorted(data.draw(st.sets(st.integers(1, lp.shape[0] - 1), min_size=k - 1, max_size=k - 1)))
    total = torch.zeros((), dtype=F64)
    grad_sum, vgrad_sum = torch.zeros_like(grad), torch.zeros_like(vgrad)
    normalizer = obj.normalizer(batch.mask)
    for idx in torch.tensor_split(order, cuts):
        part_loss, _, part_grad, part_vgrad = run(obj, batch[idx], lp[idx], values[idx], entropy[idx], est=est[idx], normalizer=normalizer)
        total = total + part_loss
        grad_sum[idx] += part_grad
        vgrad_sum[idx] += part_vgrad
    torch.testing.assert_close(total, loss, rtol=1e-13, atol=ATOL)
    torch.testing.assert_close(grad_sum, grad, rtol=1e-13, atol=ATOL)
    torch.testing.assert_close(vgrad_sum, vgrad, rtol=1e-13, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
@settings(deadline=None, max_examples=20)
@given(configurations(), st.integers(0, 2**31 - 1), st.data())
def test_permuting_sequences_permutes_the_gradient_only(mode: str, config, seed: int, data) -> None:  # type: ignore[no-untyped-def]
    # Invariant 35: permuting the batch's sequences leaves the loss unchanged and permutes the gradient.
    obj = objective_from(config, mode)
    batch, lp, values, entropy = make_batch(seed)
    est = obj.advantages(batch)
    perm = torch.tensor(data.draw(st.permutations(range(lp.shape[0]))))
    loss, _, grad, vgrad = run(obj, batch, lp, values, entropy, est=est)
    loss_p, _, grad_p, vgrad_p = run(obj, batch[perm], lp[perm], values[perm], entropy[perm], est=est[perm])
    torch.testing.assert_close(loss_p, loss, rtol=1e-13, atol=ATOL)
    torch.testing.assert_close(grad_p, grad[perm], rtol=1e-13, atol=ATOL)
    torch.testing.assert_close(vgrad_p, vgrad[perm], rtol=1e-13, atol=ATOL)


@pytest.mark.parametrize("name", PRESETS)
def test_fully_masked_rows_contribute_nothing(name: str) -> None:
    # Rows 1 and 4 are fully masked (NaN/inf everywhere): the loss, metrics' finiteness and the other rows'
    # gradients equal those of the batch without them, and their own gradient is 0.
    obj = build(name)
    batch, lp, values, entropy = make_batch(seed=11, empty_rows=(1, 4))
    est = obj.advantages(batch)
    loss, metrics, grad, vgrad = run(obj, batch, lp, values, entropy, est=est)
    keep = torch.tensor([0, 2, 3, 5])
    loss_k, _, grad_k, vgrad_k = run(obj, batch[keep], lp[keep], values[keep], entropy[keep], est=est[keep])
    assert math.isfinite(loss.item()) and all(math.isfinite(m.item()) for m in metrics.values())
    torch.testing.assert_close(loss, loss_k, rtol=1e-14, atol=ATOL)
    torch.testing.assert_close(grad[keep], grad_k, rtol=1e-14, atol=ATOL)
    torch.testing.assert_close(vgrad[keep], vgrad_k, rtol=1e-14, atol=ATOL)
    assert bool((grad[[1, 4]] == 0).all()) and bool((vgrad[[1, 4]] == 0).all())


@pytest.mark.parametrize("name", PRESETS)
def test_a_fully_masked_batch_gives_zero(name: str) -> None:
    # Nothing counts: the loss is exactly 0, every gradient is 0 (no NaN), every metric is finite.
    obj = build(name)
    batch, lp, values, entropy = make_batch(seed=12, empty_rows=tuple(range(6)))
    loss, metrics, grad, vgrad = run(obj, batch, lp, values, entropy)
    assert loss.item() == 0.0
    assert bool((grad == 0).all()) and bool((vgrad == 0).all())
    assert all(math.isfinite(m.item()) for m in metrics.values()), metrics
