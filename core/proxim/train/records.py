"""Training records for the offline commands, read from JSONL, and the log-prob of a response given its prompt.

One JSON object per line:

  preference pair  ``{"prompt": ..., "chosen": "...", "rejected": "..."}``   (``proxim train --preset dpo``,
                   ``proxim reward-model``)
  supervised       ``{"prompt": ..., "response": "..."}``                      (``proxim sft``)

A prompt is a string, used as is (like the online trainer's prompts), or a list of chat messages
``[{"role": "user", "content": "..."}]``, rendered to a string by the tokenizer's chat template with
the generation prompt appended. Other fields are kept and ignored. A response is scored and trained
on as its tokens followed by the end-of-sequence token, as the trainer's sampled responses end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from proxim.errors import ConfigurationError
from proxim.ops import masked_sum
from proxim.train.generation import left_pad

Record = dict[str, Any]

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SUPERVISED_FIELDS = ("prompt", "response")


def read_records(path: str | os.PathLike[str], fields: Sequence[str]) -> list[Record]:
    """The records of a JSONL file, each checked to hold `fields` (the first, "prompt", a string or chat messages;
    the others strings). Errors name the file, the line and the field."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"{where}: not JSON: {exc}") from exc
            records.append(check_record(record, fields, where))
    if not records:
        raise ConfigurationError(f"{path}: no records; write one JSON object per line with the fields {', '.join(fields)}.")
    return records


def check_record(record: Any, fields: Sequence[str], where: str) -> Record:
    """`record` unchanged if it holds `fields` of the right types; else a ConfigurationError naming `where` and the field."""
    expected = ", ".join(repr(f) for f in fields)
    if not isinstance(record, dict):
        raise ConfigurationError(f"{where}: expected a JSON object with the fields {expected}, got {type(record).__name__}.")
    for field in fields:
        if field not in record:
            raise ConfigurationError(f"{where}: the field {field!r} is missing (every record needs {expected}).")
        value = record[field]
        if field == "prompt":
            _check_prompt(value, where)
        elif not isinstance(value, str):
            raise ConfigurationError(f"{where}: the field {field!r} must be a string, got {type(value).__name__}.")
    return record


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        return
    messages_ok = (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
    )
    if not messages_ok:
        raise ConfigurationError(
            f'{where}: the field \'prompt\' must be a string or a list of chat messages [{{"role": ..., "content": ...}}], got {json.dumps(prompt)[:80]}.'
        )


def render_prompts(records: Sequence[Record], tokenizer: Any, origin: str) -> list[Record]:
    """Copies of `records` whose chat-message prompts are rendered to strings by the tokenizer's chat template."""
    out = []
    for record in records:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            if getattr(tokenizer, "chat_template", None) is None:
                raise ConfigurationError(
                    f"{origin}: a prompt is a list of chat messages, but the tokenizer has no chat template to render it; "
                    "write the prompts as strings, or use a model whose tokenizer has one."
                )
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        out.append({**record, "prompt": prompt})
    return out


def encode_responses(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], eos_id: int, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The layout the trainer scores: prompts left-padded to P, responses (and EOS) right-padded to T.

    Returns input_ids [B, P + T], attention_mask [B, P + T] (long), response ids [B, T] and response mask [B, T] (bool).
    """
    pad = int(tokenizer.pad_token_id)
    prompt_ids, prompt_mask = left_pad(tokenizer(list(prompts))["input_ids"], pad, device)
    targets = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos_id] for r in responses]
    width = max(len(t) for t in targets)
    response_ids = torch.full((len(targets), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(targets), width), dtype=torch.bool)
    for i, t in enumerate(targets):
        response_ids[i, : len(t)] = torch.tensor(t)
        response_mask[i, : len(t)] = True
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    return input_ids, attention_mask, response_ids, response_mask


def sequence_logprobs(scorer: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], eos_id: int) -> Tensor:
    """log pi(response + EOS | prompt) [B]: the sum over the response's tokens of their log-probs.

    `scorer` is a `proxim.train.logprobs.PolicyScorer` (or its DDP wrapper): the output head is applied in
    chunks, so no [B, T, V] log-softmax is materialised. Gradients flow when enabled.
    """
    device = next(scorer.parameters()).device
    input_ids, attention_mask, targets, mask = encode_responses(tokenizer, prompts, responses, eos_id, device)
    logprobs, _ = scorer(input_ids, attention_mask, targets)
    return masked_sum(logprobs, mask, dim=-1)
