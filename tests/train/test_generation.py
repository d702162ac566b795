"""The hf generator: masks end at the first EOS, and its log-probs are the sampling distribution's."""

from __future__ import annotations

import pytest
import torch

from proxim.train.generation import response_mask
from proxim.train.hf_generator import HFGenerator
from proxim.train.models import EOS, build_tiny_model, byte_tokenizer, tiny_config

EOS_ID = 258


def test_response_mask_ends_at_the_first_eos() -> None:
    ids = torch.tensor([[5, 258, 7, 258], [5, 6, 7, 8], [258, 1, 1, 1]])
    mask, truncated = response_mask(ids, [EOS_ID])
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert truncated.tolist() == [False, True, False]
    mask, truncated = response_mask(ids, [EOS_ID], lengths=torch.tensor([1, 2, 4]))
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False], [True, False, False, False]]


@pytest.fixture(scope="module")
def lm_and_tokenizer():
    tok = byte_tokenizer()
    lm = build_tiny_model(tiny_config(hidden_size=32, layers=1, heads=2), seed=3)
    return lm, tok


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_sampling_log_probs(lm_and_tokenizer, temperature: float, top_p: float) -> None:
    lm, tok = lm_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in ("12+3=", "7+88=")]
    gen = HFGenerator(lm, tok, [EOS_ID])
    torch.manual_seed(0)
    out = gen.generate(prompts, n=3, temperature=temperature, top_p=top_p, max_new_tokens=6)
    assert out.response_ids.shape == (6, 6) and out.prompt_ids.shape == (6, 6)
    assert out.rollout_logprobs is not None
    for i in range(6):
        n = int(out.response_mask[i].sum())
        tokens = out.response_ids[i, :n].tolist()
        assert (EOS_ID in tokens) == (not bool(out.truncated[i]))
        assert EOS_ID not in tokens[:-1]
        assert out.completions[i] == tok.decode(tokens, skip_special_tokens=True)
        prompt = prompts[i // 3]
        # an independent forward of the unpadded sequence: softmax(logits / temperature)
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([prompt + tokens])).logits[0].double() / temperature
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + n].gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)
        got = out.rollout_logprobs[i, :n].double()
        if top_p < 1.0:  # renormalised over the nucleus: the fewest most-probable tokens holding top_p of the mass
            probs = torch.softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n], -1)
            desc = probs.sort(-1, descending=True).values
            before = desc.cumsum(-1) - desc  # the mass of the tokens ranked above each one
            nucleus_mass = torch.where(before < top_p, desc, torch.zeros_like(desc)).sum(-1)
            logp = logp - nucleus_mass.log()
        torch.testing.assert_close(got, logp, rtol=0, atol=1e-5)
        assert bool((out.rollout_logprobs[i, n:] == 0).all())


def test_greedy_is_deterministic(lm_and_tokenizer) -> None:
    lm, tok = lm_and_tokenizer
    gen = HFGenerator(lm, tok, [EOS_ID], batch_size=1)  # one prompt per generate call: padding must not matter
    prompts = [tok(p)["input_ids"] for p in ("1+1=", "45+67=")]
    a = gen.generate(prompts, 1, 1.0, 1.0, 5, greedy=True)
    b = HFGenerator(lm, tok, [EOS_ID]).generate(prompts, 1, 1.0, 1.0, 5, greedy=True)
    assert a.completions == b.completions
    assert a.rollout_logprobs is None
    assert tok.decode([EOS_ID]) == EOS
