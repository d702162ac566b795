"""Training records for the offline commands, read from JSONL, and the log-prob of a response given its prompt.

One JSON object per line:

  preference pair  ``{"prompt": ..., "chosen": "...", "rejected": "..."}``   (``proxim train --preset dpo``,
                   ``proxim reward-model``)
  supervised       ``{"prompt": ..., "response": "..."}``                      (``proxim sft``)

A prompt is a string, used as is (like the online trainer's prompts), or a list of chat messages
``[{"role": "user", "content": "..."}]`` (`proxim.train.prompts.check_messages`), rendered to a string
by the tokenizer's chat template with the generation prompt appended (`render_prompts`; the
``system_prompt`` setting first when it has no system message). A response (``response``, ``chosen``,
``rejected``) is a string, the text the model writes after the prompt, or, after a chat prompt, a list
of one assistant message ``[{"role": "assistant", "content": "..."}]``, rendered by the template as the
assistant's turn: the text the template adds after the generation prompt, up to and including the
tokenizer's end-of-sequence token when the template writes one. Other fields are kept and ignored. A
response is scored and trained on as its tokens followed by the end-of-sequence token (once: not when
its tokens already end with it), as the trainer's sampled responses end.
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
from proxim.train.prompts import check_messages, encode_prompts, render_chat, with_system

Record = dict[str, Any]

PAIR_FIELDS = ("prompt", "chosen", "rejected")
SUPERVISED_FIELDS = ("prompt", "response")


def read_records(path: str | os.PathLike[str], fields: Sequence[str]) -> list[Record]:
    """The records of a JSONL file, each checked to hold `fields` (`check_record`: the first, "prompt", a string
    or chat messages; the others strings or, after a chat prompt, one assistant message). Errors name the file,
    the line and the field."""
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
    """`record` unchanged if it holds `fields` of the right types (see the module docstring); else a
    ConfigurationError naming `where`, the field and the fix."""
    expected = ", ".join(repr(f) for f in fields)
    if not isinstance(record, dict):
        raise ConfigurationError(f"{where}: expected a JSON object with the fields {expected}, got {type(record).__name__}.")
    for field in fields:
        if field not in record:
            raise ConfigurationError(f"{where}: the field {field!r} is missing (every record needs {expected}).")
        value = record[field]
        if isinstance(value, str):
            continue
        if field == "prompt":
            check_messages(value, where)
        elif not isinstance(value, list):
            raise ConfigurationError(f"{where}: the field {field!r} must be a string, got {type(value).__name__}.")
        elif not isinstance(record["prompt"], list):
            raise ConfigurationError(
                f"{where}: the field {field!r} is a list of chat messages but the prompt is a string; write the prompt as chat messages too, "
                f"or give {field!r} as a string."
            )
        else:
            check_messages(value, where, field, roles=("assistant",))
            if len(value) != 1:
                raise ConfigurationError(
                    f'{where}: the field {field!r} must hold one assistant message [{{"role": "assistant", "content": "..."}}], got {len(value)} messages.'
                )
    return record


def render_prompts(records: Sequence[Record], tokenizer: Any, origin: str, system_prompt: str | None = None) -> list[Record]:
    """Copies of `records` with their chat messages rendered to text by the tokenizer's chat template (see the
    module docstring): the prompt with the generation prompt appended and `system_prompt` first, and each
    response given as an assistant message as the turn the template writes for it."""
    out = []
    for n, record in enumerate(records, 1):
        prompt, where = record["prompt"], f"{origin}: record {n}"
        if isinstance(prompt, str):
            if system_prompt is not None:
                raise ConfigurationError(
                    f"{where}: system_prompt is put first in chat prompts, but this prompt is a string (used as is); write the prompts as chat "
                    'messages ([{"role": "user", "content": ...}]), or drop system_prompt.'
                )
            out.append(dict(record))
            continue
        messages = with_system(prompt, system_prompt)
        text = render_chat(tokenizer, messages, where)
        rendered = {**record, "prompt": text}
        for field, value in record.items():
            if field != "prompt" and field in (*PAIR_FIELDS, *SUPERVISED_FIELDS) and isinstance(value, list):
                rendered[field] = _assistant_turn(tokenizer, messages, value, text, where, field)
        out.append(rendered)
    return out


def _assistant_turn(tokenizer: Any, messages: list[dict[str, Any]], reply: list[dict[str, Any]], prompt_text: str, where: str, field: str) -> str:
    """The text the chat template adds for `reply` after `prompt_text` (the prompt and its generation prompt),
    cut after the tokenizer's end-of-sequence token when the template writes one (what sampling would stop at)."""
    full = render_chat(tokenizer, [*messages, *reply], where, generation_prompt=False)
    if not full.startswith(prompt_text):
        raise ConfigurationError(
            f"{where}: the chat template writes the conversation with its {field!r} differently from the prompt with its generation "
            f"prompt, so the tokens of {field!r} cannot be told apart; give {field!r} as a string (the text the model writes after the prompt)."
        )
    turn = full[len(prompt_text) :]
    eos = tokenizer.eos_token
    return turn[: turn.index(eos) + len(eos)] if eos and eos in turn else turn


def response_tokens(tokenizer: Any, response: str, eos_id: int) -> list[int]:
    """The tokens a response is trained on and scored as: its own (no special tokens added), then `eos_id` unless they end with it."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


def encode_responses(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], eos_id: int, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The layout the trainer scores: prompts left-padded to P, responses (and EOS) right-padded to T.

    Returns input_ids [B, P + T], attention_mask [B, P + T] (long), response ids [B, T] and response mask [B, T] (bool).
    """
    pad = int(tokenizer.pad_token_id)
    prompt_ids, prompt_mask = left_pad(encode_prompts(tokenizer, prompts), pad, device)
    targets = [response_tokens(tokenizer, r, eos_id) for r in responses]
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
