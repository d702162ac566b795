"""Offline preference losses (DPO, IPO, hinge): docs/parts.md and invariants 41-42 of docs/invariants.md."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import proxim

F64 = torch.float64
ATOL = 1e-12
finite = st.floats(-30.0, 30.0, allow_nan=False)


def pairs(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def loss_and_grads(obj, w, l, ref_w, ref_l):  # type: ignore[no-untyped-def]
    w = pairs(w).requires_grad_(True)
    l = pairs(l).requires_grad_(True)
    out = obj.loss(w, l, pairs(ref_w), pairs(ref_l))
    gw, gl = torch.autograd.grad(out.loss, (w, l))
    return out, gw, gl


def test_dpo_at_the_reference_is_log_two_with_half_beta_gradient() -> None:
    # Inv. 41: pi = pi_ref gives z = 0, L = log 2, dL/dlog pi(y_w) = -beta/2 (per pair, then / B).
    obj = proxim.objective("dpo", beta=0.3)
    out, gw, gl = loss_and_grads(obj, [-3.0, -7.0], [-2.0, -1.0], [-3.0, -7.0], [-2.0, -1.0])
    assert out.loss.item() == pytest.approx(math.log(2.0), abs=ATOL)
    torch.testing.assert_close(gw, pairs([-0.15 / 2, -0.15 / 2]), rtol=0, atol=ATOL)
    torch.testing.assert_close(gl, pairs([0.15 / 2, 0.15 / 2]), rtol=0, atol=ATOL)


def test_dpo_value_and_metrics_by_hand() -> None:
    # h_w = -1 - (-2) = 1, h_l = -3 - (-1) = -2; z = 0.5 * 3 = 1.5; L = softplus(-1.5) = log(1 + e^-1.5).
    obj = proxim.objective("dpo", beta=0.5)
    out, gw, _ = loss_and_grads(obj, [-1.0], [-3.0], [-2.0], [-1.0])
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=ATOL)
    # dL/dh_w = -beta * sigmoid(-z) = -0.5 / (1 + e^1.5)
    assert gw.item() == pytest.approx(-0.5 / (1 + math.exp(1.5)), abs=ATOL)
    m = out.metrics
    assert (m["preference/chosen_reward"].item(), m["preference/rejected_reward"].item()) == (0.5, -1.0)
    assert m["preference/margin"].item() == 1.5 and m["preference/accuracy"].item() == 1.0


@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=6), finite, st.floats(0.01, 2.0))
def test_dpo_depends_only_on_z(rows: list[tuple[float, float, float, float]], shift: float, beta: float) -> None:
    # Inv. 42: adding one constant to both policy log-probs (or both reference ones) changes nothing.
    obj = proxim.objective("dpo", beta=beta)
    w, l, rw, rl = (pairs(list(c)) for c in zip(*rows))
    base = obj.loss(w, l, rw, rl).loss
    torch.testing.assert_close(obj.loss(w + shift, l + shift, rw, rl).loss, base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(obj.loss(w, l, rw + shift, rl + shift).loss, base, rtol=1e-12, atol=1e-12)


@given(finite, finite, st.floats(0.01, 2.0))
def test_dpo_swap_identity_and_monotonicity(hw: float, hl: float, beta: float) -> None:
    # Inv. 42: L(w, l) - L(l, w) = softplus(-z) - softplus(z) = -z; L strictly decreases in z.
    obj = proxim.objective("dpo", beta=beta)
    zero = pairs([0.0])
    forward = obj.loss(pairs([hw]), pairs([hl]), zero, zero).loss.item()
    swapped = obj.loss(pairs([hl]), pairs([hw]), zero, zero).loss.item()
    z = beta * (hw - hl)
    assert forward - swapped == pytest.approx(-z, abs=1e-9)
    higher = obj.loss(pairs([hw + 0.5]), pairs([hl]), zero, zero).loss.item()
    assert higher < forward or forward < 1e-12


def test_label_smoothing_mixes_both_directions() -> None:
    # s = 0.1, z = 0.1 * 2 = 0.2: L = 0.9 softplus(-0.2) + 0.1 softplus(0.2).
    obj = proxim.objective("dpo", label_smoothing=0.1)
    out, _, _ = loss_and_grads(obj, [0.0], [-2.0], [0.0], [0.0])
    expected = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert out.loss.item() == pytest.approx(expected, abs=ATOL)


def test_ipo_and_hinge_by_hand() -> None:
    # h_w - h_l = 3. IPO, beta 0.25: (3 - 1/(2*0.25))^2 = (3 - 2)^2 = 1. Hinge, beta 0.25: max(0, 1 - 0.75) = 0.25.
    ipo = proxim.objective("ipo", beta=0.25)
    hinge = proxim.objective("hinge", beta=0.25)
    args = ([0.0], [-3.0], [0.0], [0.0])
    assert loss_and_grads(ipo, *args)[0].loss.item() == pytest.approx(1.0, abs=ATOL)
    assert loss_and_grads(hinge, *args)[0].loss.item() == pytest.approx(0.25, abs=ATOL)
    # Past the margin (beta * 3 >= 1 with beta 0.5) the hinge is flat: zero loss and gradient.
    out, gw, gl = loss_and_grads(proxim.objective("hinge", beta=0.5), *args)
    assert out.loss.item() == 0.0 and gw.item() == 0.0 and gl.item() == 0.0


def test_micro_batches_sum_to_the_full_batch_with_a_global_normalizer() -> None:
    obj = proxim.objective("dpo")
    w, l = pairs([-1.0, -2.0, -0.5, -4.0]), pairs([-2.0, -1.5, -3.0, -0.1])
    rw, rl = pairs([-1.2, -2.0, -0.4, -3.0]), pairs([-2.0, -1.0, -2.5, -0.3])
    full = obj.loss(w, l, rw, rl).loss
    halves = sum(obj.loss(w[s], l[s], rw[s], rl[s], normalizer=4).loss for s in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(halves, full, rtol=0, atol=ATOL)


def test_reference_log_probs_carry_no_gradient() -> None:
    obj = proxim.objective("dpo")
    ref = pairs([-1.0]).requires_grad_(True)
    out = obj.loss(pairs([-0.5]).requires_grad_(True), pairs([-2.0]), ref, pairs([-1.0]))
    out.loss.backward()
    assert ref.grad is None


def test_bad_inputs_and_names() -> None:
    obj = proxim.objective("dpo")
    with pytest.raises(proxim.BatchError, match=r"rejected_logprobs has shape \(3,\) but chosen_logprobs has \(2,\)"):
        obj.loss(pairs([0.0, 1.0]), pairs([0.0, 1.0, 2.0]), pairs([0.0, 1.0]), pairs([0.0, 1.0]))
    with pytest.raises(proxim.BatchError, match=r"chosen_logprobs must be a \[B\] tensor of sequence log-probs"):
        obj.loss(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(proxim.UnknownNameError, match=r"preference loss 'dpo' has no hyperparameter 'betta'\. Did you mean 'beta'\?"):
        proxim.objective("dpo", betta=0.1)
    with pytest.raises(proxim.ConfigurationError, match=r"'beta' must be > 0"):
        proxim.objective("ipo", beta=0.0)
    with pytest.raises(proxim.ConfigurationError, match=r"'dpo' is an offline preference loss"):
        proxim.objective("dpo", region="clip")
    with pytest.raises(proxim.UnknownNameError, match=r"no preset named 'dpoo'\. Did you mean 'dpo'\?.*Preference losses: dpo, hinge, ipo"):
        proxim.objective("dpoo")


def test_preference_losses_are_listed_with_their_plugin() -> None:
    table = proxim.available()["preference"]
    builtin = {name: info.plugin for name, info in table.items() if info.distribution == "proxim"}
    assert builtin == {"dpo": "dpo", "ipo": "dpo", "hinge": "dpo"}
    assert proxim.objective("dpo").fingerprint == "preference=dpo(beta=0.1, label_smoothing=0.0)@proxim==0.1.0"
