"""The ``hf`` generator: transformers ``generate`` on the policy itself, recording sampled-token log-probs.

On a sharded (FSDP2) policy every process must run the same forward passes, each layer's being an
all-gather: its FSDP root's parameters are gathered for the call (`proxim.train.sharding.full_parameters`),
``generate`` runs with ``synced_gpus=True`` (a process whose responses have all ended keeps stepping until
every process's have), and every process must make as many ``generate`` calls (checked, with an error
naming the counts, before any is made).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from proxim.train import sharding
from proxim.train.generation import Generation, GeneratorContext, concat, finish, left_pad, response_mask


class HFGenerator:
    """Samples with transformers ``generate`` on the policy itself; `sync` has nothing to do.

    Only the sampling settings given here apply (a fresh GenerationConfig, top_k off): the model's
    own generation_config (repetition penalties, top_k, ...) is ignored, so that the sampling
    distribution is exactly softmax(logits / temperature) restricted to the top-p nucleus.
    """

    name = "hf"
    forward_logprobs = True  # the policy itself decodes: its records match a full forward within 1e-5 in float32
    split_parameters = True  # generate runs on the sharded policy, its parameters gathered (sharding.full_parameters)

    def __init__(self, lm: Any, tokenizer: Any, eos_ids: Sequence[int], batch_size: int | None = None):
        self.lm: Any = lm
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.pad_id = int(tokenizer.pad_token_id)
        self.batch_size = batch_size

    @classmethod
    def start(cls, context: GeneratorContext) -> HFGenerator:
        return cls(context.lm, context.tokenizer, context.eos_ids, context.batch_size)

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
        starts = range(0, len(repeated), step)
        synced = sharding.root_of(self.lm) is not None
        if synced:
            sharding.check_same_count(len(starts), next(self.lm.parameters()).device, "generate calls (prompts x responses / generation_batch_size)")
        with sharding.full_parameters(self.lm):
            parts = [self._generate(repeated[i : i + step], temperature, top_p, max_new_tokens, greedy, synced) for i in starts]
        return concat(parts, self.pad_id, self.tokenizer)

    def _generate(self, prompts: list[Sequence[int]], temperature: float, top_p: float, max_new_tokens: int, greedy: bool, synced: bool) -> Generation:
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
            out = self.lm.generate(
                input_ids=ids, attention_mask=mask.long(), generation_config=config, logits_processor=processors or None, synced_gpus=synced or None
            )
        finally:
            self.lm.train(was_training)
        resp = out.sequences[:, ids.shape[1] :]
        resp_mask, truncated = response_mask(resp, self.eos_ids)
        rollout = None
        if recorder is not None:
            rollout = recorder.finish(resp)
            rollout = torch.where(resp_mask, rollout, torch.zeros_like(rollout))
        return finish(ids, mask, resp, resp_mask, truncated, rollout, max_new_tokens, self.pad_id, self.tokenizer)


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
