"""Every causal LM family of transformers 5 that is cheap to build: a tiny random model of each, with a
tokenizer made in code, trains for two steps of ``proxim train --model DIR`` (through its Python API,
`Trainer`, whose `run` is what the command runs), with and without LoRA, with the hf generator and, where
vLLM is installed, with the vllm generator for the families the issue names (`VLLM_FAMILIES`).

What each case checks, all of it from the run itself:

- the sampler's own log-probs (``--old-logprobs sampler``: recorded by ``generate`` or vLLM) equal
  proxim's recomputation on the padded batch: the ratio of the first update of a rollout is on-policy, so
  it is 1 (to float error) and its KL 0. This is what breaks when positions, masks, sliding windows,
  soft-capping, logit scaling or dropout differ between sampling and scoring;
- the losses are finite and the gradient is not zero;
- without LoRA every weight tensor moved; with LoRA every adapter matrix moved and no base weight did;
- ``RUN/model`` loads back (with peft for an adapter) and gives the trained model's logits.

The families differ in the tokenizers real checkpoints ship, which are imitated here: one that adds a
BOS (Llama, Gemma, Mistral, Phi-3, ...), GPT-2's (one ``<|endoftext|>`` for BOS and EOS, no pad token,
nothing added) and ChatML's (no BOS, ``<|endoftext|>`` pads, ``<|im_end|>`` ends). Some models have
more embedding rows than the tokenizer has tokens, as Qwen's and Phi-3's do.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from proxim.train import TrainConfig, Trainer

from .helpers import TINY

transformers = pytest.importorskip("transformers")

#: Token ids of the three tokenizers: bytes are 0-255, the special tokens follow.
IDS = {
    "bos": {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258},  # proxim's byte tokenizer
    "gpt2": {"pad_token_id": None, "bos_token_id": 256, "eos_token_id": 256},
    "chatml": {"pad_token_id": 256, "bos_token_id": None, "eos_token_id": 257},
}
PADDED_VOCAB = 272
"""Embedding rows of the models whose vocabulary is padded past the tokenizer's (ids nothing ever samples on purpose)."""
SIZE = {"hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
"""Head dimension 64 (what vLLM's attention kernels support), one key-value head (grouped-query attention), two layers."""
WINDOW = 4
"""The sliding window of the families that have one: shorter than prompt + response, so that it takes effect."""
EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
ROUTED = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
GROUPED_TOPK = {"first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
"""DeepSeek-style routing: one dense layer first, then the experts, in one group."""
LATENT = {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32}
DELTA_NET = {"linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 32, "linear_value_head_dim": 32}
DELTA_NET |= {"layer_types": ["linear_attention", "full_attention"]}


def _decoder(name: str, tokenizer: str, vocab: int | None = None, **extra: Any) -> tuple[str, str, Callable[[], Any]]:
    """A family whose config takes the Llama-style arguments (`extra` overrides `SIZE`)."""
    return (
        name,
        tokenizer,
        lambda: getattr(transformers, name)(vocab_size=vocab or PADDED_VOCAB, max_position_embeddings=128, **{**SIZE, **IDS[tokenizer], **extra}),
    )


FAMILIES = [
    _decoder("LlamaConfig", "bos", 259),
    _decoder("MistralConfig", "bos", 259, sliding_window=WINDOW),
    _decoder("MinistralConfig", "bos", 259, head_dim=64, sliding_window=WINDOW),
    _decoder("Qwen2Config", "chatml", tie_word_embeddings=True),
    _decoder("Qwen3Config", "chatml", head_dim=64, tie_word_embeddings=True),
    _decoder("Qwen3MoeConfig", "chatml", head_dim=64, **EXPERTS),
    _decoder("GemmaConfig", "bos", 259, head_dim=64),  # the embeddings scaled by sqrt(hidden), tied
    _decoder("Gemma2Config", "bos", 259, head_dim=64, sliding_window=WINDOW),  # and soft-capped logits, alternating windows
    _decoder("Gemma3TextConfig", "bos", 259, head_dim=64, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    _decoder("Phi3Config", "bos", PADDED_VOCAB),
    _decoder("PhiConfig", "gpt2"),
    _decoder("Olmo2Config", "chatml"),
    _decoder("OlmoConfig", "gpt2"),
    _decoder("GraniteConfig", "bos", 259, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5),
    _decoder("SmolLM3Config", "chatml"),
    _decoder("Cohere2Config", "bos", 259, sliding_window=WINDOW),  # logit_scale
    _decoder("Glm4Config", "chatml", head_dim=64),
    _decoder("StableLmConfig", "gpt2"),
    _decoder("Starcoder2Config", "gpt2", sliding_window=WINDOW),
    _decoder("GPTNeoXConfig", "gpt2"),
    _decoder("Exaone4Config", "chatml", sliding_window=WINDOW),
    _decoder("ApertusConfig", "bos", 259),
    _decoder("ArceeConfig", "bos", 259),
    _decoder("Lfm2Config", "chatml"),  # short convolutions between the attention layers
    _decoder("DiffLlamaConfig", "bos", 259, num_key_value_heads=2),  # overrides SIZE's single key-value head
    # configs with arguments of their own
    (
        "GPT2Config",
        "gpt2",
        lambda: transformers.GPT2Config(vocab_size=257, n_embd=128, n_layer=2, n_head=2, n_positions=128, **IDS["gpt2"]),  # 0.1 dropouts, tied
    ),
    (
        "FalconConfig",
        "gpt2",
        lambda: transformers.FalconConfig(vocab_size=PADDED_VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, **IDS["gpt2"]),
    ),
    # mixtures of experts
    _decoder("MixtralConfig", "bos", 259, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    _decoder("PhimoeConfig", "bos", PADDED_VOCAB, num_local_experts=4, num_experts_per_tok=2),  # its router subclasses nn.Linear
    _decoder("GptOssConfig", "chatml", head_dim=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),  # attention sinks
    _decoder("DeepseekV3Config", "bos", 259, num_key_value_heads=2, **ROUTED, **GROUPED_TOPK, **LATENT),  # multi-head latent attention
    _decoder("Qwen3NextConfig", "chatml", head_dim=64, **EXPERTS, shared_expert_intermediate_size=32, **DELTA_NET),  # gated delta-net layers
]
AVAILABLE = [f for f in FAMILIES if hasattr(transformers, f[0])]

#: Prompts of different lengths (left padding), a few held out.
ROWS = [{"prompt": "x" * n} for n in (1, 3, 7, 12, 2, 9, 5, 15)] * 2


def ascii_share(prompts: list[str], completions: list[str], **batch: Any) -> list[float]:
    """A reward with a spread even for a random model: the share of ASCII characters in the completion."""
    return [sum(ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


def make_tokenizer(kind: str) -> Any:
    """One of the three tokenizers (see the module docstring), made in code: one token per byte."""
    if kind == "bos":
        from proxim.train.models import byte_tokenizer

        return byte_tokenizer()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>"] if kind == "gpt2" else ["<|endoftext|>", "<|im_end|>"]
    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {token: 256 + i for i, token in enumerate(specials)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if kind == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One intra-op thread while these tiny models run: at hidden size 128, splitting each matmul costs more than it
    saves, and on a busy machine two threads per process wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The saved folder of a family's tiny random model and its tokenizer, made once per module."""
    made: dict[str, Path] = {}
    by_name = {name: (kind, config) for name, kind, config in AVAILABLE}

    def folder(name: str) -> Path:
        if name not in made:
            kind, config = by_name[name]
            path = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config()).save_pretrained(path)
            make_tokenizer(kind).save_pretrained(path)
            made[name] = path
        return made[name]

    return folder


VLLM_FAMILIES = ("LlamaConfig", "Qwen2Config", "Qwen3Config", "MistralConfig", "Gemma2Config", "Gemma3TextConfig", "Phi3Config", "GPT2Config")
"""The families also run with the vllm generator (where vLLM is installed): the ones the issue names."""
NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the vLLM tier runs in its own environment)")
CASES = [pytest.param(f[0], "hf", id=f"{f[0]}-hf") for f in AVAILABLE]
CASES += [pytest.param(f[0], "vllm", id=f"{f[0]}-vllm", marks=NO_VLLM) for f in AVAILABLE if f[0] in VLLM_FAMILIES]


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize(("family", "generator"), CASES)
def test_two_steps_of_every_family(family: str, generator: str, lora: int, model_dirs: Callable[[str], Path], tmp_path: Path) -> None:
    if lora:
        pytest.importorskip("peft")
    folder = model_dirs(family)
    settings = {**TINY, "model": str(folder), "task": None, "eval_size": 2, "max_new_tokens": 8, "old_logprobs": "sampler", "lr": 1e-2}
    settings |= {"generator": generator, "lora_rank": lora, "output_dir": str(tmp_path), "run_name": "run"}
    trainer = Trainer(TrainConfig(**settings), prompts=ROWS, rewards=[ascii_share])
    before = {n: p.detach().clone() for n, p in trainer.lm.named_parameters()}
    result = trainer.run()
    after = dict(trainer.lm.named_parameters())

    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    tolerance = 1e-4 if generator == "hf" else 2e-2  # vLLM's kernels are not transformers'
    for h in history:  # on-policy: every token's ratio to the sampler is 1 where sampling and scoring see the same model
        assert h["region/ratio_max"] == pytest.approx(1.0, abs=tolerance) and h["region/ratio_mean"] == pytest.approx(1.0, abs=tolerance / 10)
        assert h["region/approx_kl"] < tolerance / 10
        assert torch.isfinite(torch.tensor([h["loss/total"], h["optim/grad_norm"]])).all()
    assert max(h["optim/grad_norm"] for h in history) > 0

    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    if lora:
        adapters = {n for n in before if "lora_" in n}
        assert adapters and {n for n in adapters if "lora_B" in n} <= moved  # B starts at zero: it moved off it
        assert not moved - adapters  # no base weight moved
    else:
        assert moved == set(before), f"weights that did not move: {sorted(set(before) - moved)}"

    ids = torch.tensor([[*range(40, 52)]])
    with torch.no_grad():
        want = trainer.lm(input_ids=ids).logits
        from proxim.train.models import load_causal_lm

        loaded = load_causal_lm(result.run_dir / "model" if not lora else folder)
        if lora:
            from peft import PeftModel

            loaded = PeftModel.from_pretrained(loaded, str(result.run_dir / "model"))
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
