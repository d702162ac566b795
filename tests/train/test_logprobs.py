"""Chunked log-prob gathering equals the naive full log-softmax, in value and in gradient."""

from __future__ import annotations

import pytest
import torch

from proxim.train.logprobs import (
    PolicyScorer,
    gather_logprobs,
    logprobs_from_logits,
    position_ids,
)


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole [B, T, V] log-softmax at once: what chunking must reproduce."""
    logp = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 20, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive(chunk_size: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 5, 6, 11
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    lp, ent = gather_logprobs(hidden, lambda h: h @ weight.T, targets, temperature, chunk_size, entropy=True)
    want_lp, want_ent = naive(hidden, weight, targets, temperature)
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-12)
    assert ent is not None
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-12)


def test_chunked_gradient_equals_naive() -> None:
    """Checkpointed chunks give the same gradient as differentiating the full log-softmax."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 4, 5, 9
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    coef = torch.randn(B, T, generator=g, dtype=torch.float64)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = gather_logprobs(h1, lambda h: h @ w1.T, targets, 0.9, chunk_size=5, entropy=True)
    assert ent is not None
    ((lp * coef).sum() + ent.sum()).backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_lp, want_ent = naive(h2, w2, targets, 0.9)
    ((want_lp * coef).sum() + want_ent.sum()).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-12)


def test_never_more_than_chunk_rows_of_logits() -> None:
    """The head only ever sees `chunk_size` positions at once, forward and backward."""
    seen: list[int] = []
    weight = torch.randn(13, 4, requires_grad=True)

    def head(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0])
        return h @ weight.T

    hidden = torch.randn(6, 5, 4, requires_grad=True)
    lp, _ = gather_logprobs(hidden, head, torch.randint(0, 13, (6, 5)), chunk_size=4)
    lp.sum().backward()
    assert max(seen) == 4
    assert len(seen) == 2 * 8  # 30 positions in 8 chunks, each recomputed once in the backward pass


def test_logprobs_from_logits_equals_log_softmax() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 17, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 17, (3, 7), generator=g)
    lp, _ = logprobs_from_logits(logits, targets, temperature=1.3, chunk_size=4)
    want = torch.log_softmax(logits / 1.3, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, want, rtol=0, atol=1e-12)


def test_position_ids_skip_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def _tiny_lm(seed: int = 0):
    from proxim.train.models import build_tiny_model, tiny_config

    return build_tiny_model(tiny_config(hidden_size=32, layers=2, heads=2), seed).double()


@pytest.mark.parametrize("split", [True, False])
def test_policy_scorer_matches_unpadded_forward(split: bool) -> None:
    """Left-padded prompts, right-padded responses: each row's log-probs equal a forward of that row alone.

    The reference runs the causal LM on the unpadded sequence (positions 0..L-1, nothing masked) and
    takes log_softmax(logits / temperature) at the response positions: independent of the padding,
    position-id and chunking logic under test. `split=False` forces the path that takes the model's logits.
    """
    lm = _tiny_lm()
    scorer = PolicyScorer(lm, chunk_size=3)
    assert scorer.split  # a Llama is a decoder plus an output head
    scorer.split = split
    prompts = [[257, 49, 50, 43], [257, 55, 43, 56, 57, 61]]
    responses = [[52, 53, 258], [54, 258, 256]]  # the second response ends early: its last slot is padding
    resp_len = [3, 2]
    P, T = max(map(len, prompts)), 3
    ids = torch.full((2, P + T), 256)
    mask = torch.zeros((2, P + T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + T] = torch.tensor(r)
        mask[i, P - len(p) : P + resp_len[i]] = 1
    targets = ids[:, P:]
    with torch.no_grad():
        lp, _ = scorer(ids, mask, targets, temperature=0.8)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            seq = torch.tensor([p + r[: resp_len[i]]])
            logits = lm(input_ids=seq).logits[0].double()
            logp = torch.log_softmax(logits / 0.8, -1)
            for t in range(resp_len[i]):
                want = logp[len(p) - 1 + t, r[t]]
                assert abs(float(lp[i, t]) - float(want)) < 1e-10


def _naive_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = h @ weight.T + (bias if bias is not None else 0.0)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("grads", ["logprobs", "entropy", "both"])
def test_linear_head_path_equals_naive_in_value_and_gradient(chunk_size: int, with_bias: bool, temperature: float, grads: str) -> None:
    """An `nn.Linear` head takes the fused path (its own backward): hidden, weight and bias gradients match
    differentiating the full log-softmax, whichever outputs the loss uses."""
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 3, 5, 6, 13
    head = torch.nn.Linear(H, V, bias=with_bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
        if with_bias:
            head.bias.copy_(torch.randn(V, generator=g, dtype=torch.float64))
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    coef = torch.randn(B, T, generator=g, dtype=torch.float64)
    coef_ent = torch.randn(B, T, generator=g, dtype=torch.float64)

    def loss(lp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        terms = {"logprobs": (lp * coef).sum(), "entropy": (ent * coef_ent).sum()}
        return terms["logprobs"] + terms["entropy"] if grads == "both" else terms[grads]

    h1 = hidden.clone().requires_grad_()
    lp, ent = gather_logprobs(h1, head, targets, temperature, chunk_size, entropy=True)
    assert ent is not None
    loss(lp, ent).backward()
    got = (h1.grad, head.weight.grad.clone(), head.bias.grad.clone() if with_bias else None)

    h2 = hidden.clone().requires_grad_()
    w2 = head.weight.detach().clone().requires_grad_()
    b2 = head.bias.detach().clone().requires_grad_() if with_bias else None
    want_lp, want_ent = _naive_linear(h2, w2, b2, targets, temperature)
    loss(want_lp, want_ent).backward()
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0], h2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], w2.grad, rtol=0, atol=1e-12)
    if with_bias:
        assert b2 is not None
        torch.testing.assert_close(got[2], b2.grad, rtol=0, atol=1e-12)


def test_given_logits_path_gradient_equals_naive() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 9, (2, 4), generator=g)
    coef = torch.randn(2, 4, generator=g, dtype=torch.float64)
    z1 = logits.clone().requires_grad_()
    lp, _ = logprobs_from_logits(z1, targets, 1.3, chunk_size=3)
    (lp * coef).sum().backward()
    z2 = logits.clone().requires_grad_()
    want = torch.log_softmax(z2 / 1.3, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (want * coef).sum().backward()
    torch.testing.assert_close(lp, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=1e-12)


def test_linear_head_path_under_float32_matches_float64_reference() -> None:
    """The trainer's dtype: float32 values and gradients within float32 rounding of a float64 naive reference."""
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 4, 8, 16, 300
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    hidden = torch.randn(B, T, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    h1 = hidden.clone().requires_grad_()
    lp, _ = gather_logprobs(h1, head, targets, 1.0, chunk_size=5)
    lp.sum().backward()
    h2 = hidden.double().requires_grad_()
    w2 = head.weight.detach().double().requires_grad_()
    want, _ = _naive_linear(h2, w2, None, targets, 1.0)
    want.sum().backward()
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), w2.grad, rtol=1e-4, atol=1e-5)
