"""Prompt sources: where each step's prompts and the held-out prompts come from (a task, rows, a JSONL file).

A row is a dict with a ``"prompt"`` and any other columns (``"answer"`` for the built-in tasks); every
column except the prompt reaches the reward functions as a keyword argument, one value per completion.
Draws are a pure function of (seed, step, process), so a resumed run sees the same prompts.

A prompt is a string, used as is, or a list of chat messages (TRL's "conversational" format)::

    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}], "answer": "4"}

rendered once, when the source is built, by the tokenizer's chat template with the generation prompt
appended (the assistant's turn opened): from then on the row holds that text, which is what the model
sees and what the reward functions receive. A system prompt (the ``system_prompt`` setting) is put first
in every chat prompt that has no system message of its own. `encode_prompts` turns prompt texts into
token ids without doubling a BOS token the template already wrote.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from proxim.errors import ConfigurationError
from proxim.tasks import Task

Row = dict[str, Any]
Message = dict[str, Any]

ROLES = ("system", "user", "assistant", "tool")
"""The roles a chat message may have."""
EXAMPLE_MESSAGES = '[{"role": "user", "content": "2+2="}]'


class PromptSource(Protocol):
    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        """The `n` prompts process `rank` (of `world`) trains on at `step`."""
        ...

    def eval_rows(self) -> list[Row]:
        """The fixed held-out prompts."""
        ...


class TaskSource:
    """Prompts drawn from a task; the held-out set is the task's and never appears in training."""

    def __init__(self, task: Task, seed: int, eval_size: int | None = None):
        self.task, self.seed, self.eval_size = task, seed, eval_size

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        rng = random.Random(f"proxim-train-{self.task.name}-{self.seed}-{step}-{rank}")
        return [{"prompt": e.prompt, "answer": e.answer} for e in self.task.train_examples(rng, n)]

    def eval_rows(self) -> list[Row]:
        rows = [{"prompt": e.prompt, "answer": e.answer} for e in self.task.eval_set()]
        return rows[: self.eval_size] if self.eval_size else rows


class TaskWithHeldOut:
    """A task's training prompts, with held-out rows given separately."""

    def __init__(self, task: Task, seed: int, held_out: Sequence[Mapping[str, Any]]):
        self.inner, self.held_out = TaskSource(task, seed), [dict(r) for r in held_out]

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        return self.inner.batch(step, rank, world, n)

    def eval_rows(self) -> list[Row]:
        return [dict(r) for r in self.held_out]


class NoPrompts:
    """No prompts at all (an offline run without a task: only its pairs are evaluated)."""

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        return []

    def eval_rows(self) -> list[Row]:
        return []


class RowSource:
    """Prompts from rows (a JSONL file, a list of dicts, a `datasets.Dataset`), reshuffled every pass.

    Without separate held-out rows, the first `eval_size` rows (default 10%, at most 200) are held out.
    Chat prompts are rendered by `tokenizer`'s chat template (`render_rows`), `system_prompt` first.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        seed: int,
        eval_rows: Sequence[Mapping[str, Any]] | None = None,
        eval_size: int | None = None,
        origin: str = "prompts",
        *,
        tokenizer: Any = None,
        system_prompt: str | None = None,
    ):
        rows = render_rows([_check_row(r, origin, i) for i, r in enumerate(rows)], tokenizer, origin, system_prompt)
        if eval_rows is None:
            k = eval_size if eval_size is not None else min(200, len(rows) // 10)
            eval_rows, rows = rows[:k], rows[k:]
        else:
            where = f"{origin} (held-out)"
            eval_rows = render_rows([_check_row(r, where, i) for i, r in enumerate(eval_rows)], tokenizer, where, system_prompt)
            if eval_size is not None:
                eval_rows = eval_rows[:eval_size]
        if not rows:
            raise ConfigurationError(f"{origin}: no training prompts left after holding out {len(eval_rows)} for evaluation.")
        self.rows, self.held_out, self.seed = rows, list(eval_rows), seed
        self._orders: dict[int, list[int]] = {}

    def batch(self, step: int, rank: int, world: int, n: int) -> list[Row]:
        start = (step * world + rank) * n
        return [self._at(start + i) for i in range(n)]

    def _at(self, index: int) -> Row:
        epoch, pos = divmod(index, len(self.rows))
        order = self._orders.get(epoch)
        if order is None:
            order = list(range(len(self.rows)))
            random.Random(f"proxim-rows-{self.seed}-{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return dict(self.rows[order[pos]])

    def eval_rows(self) -> list[Row]:
        return [dict(r) for r in self.held_out]


def _check_row(row: Any, origin: str, index: int, line: bool = False) -> Row:
    where = f"{origin}:{index}" if line else f"{origin}: row {index}"
    if not isinstance(row, Mapping):
        raise ConfigurationError(
            f'{where}: expected a JSON object such as {{"prompt": "2+2=", "answer": "4"}}, got {type(row).__name__} {json.dumps(row)[:60]}.'
        )
    if "prompt" not in row and "messages" in row:
        raise ConfigurationError(f"{where}: chat messages go in the 'prompt' field: {{\"prompt\": {EXAMPLE_MESSAGES}, ...}}; rename 'messages' to 'prompt'.")
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        if not isinstance(prompt, list):
            raise ConfigurationError(f"{where} has no 'prompt' field that is a string or a list of chat messages: {_shown(dict(row))}.")
        check_messages(prompt, where)
    return dict(row)


def check_messages(value: Any, where: str, field: str = "prompt", roles: Sequence[str] = ROLES) -> list[Message]:
    """`value` checked to be a non-empty list of chat messages: objects with a string ``"content"`` and a
    ``"role"`` among `roles` (other keys are kept for the template). Else a `ConfigurationError` naming
    `where`, the field, the message and the fix."""
    expected = f"the field {field!r} must be a string or a list of chat messages"
    if not isinstance(value, list) or not value:
        raise ConfigurationError(f"{where}: {expected} such as {EXAMPLE_MESSAGES}, got {_shown(value)}.")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ConfigurationError(
                f'{where}: {expected}, each an object with a string "role" and a string "content" such as {EXAMPLE_MESSAGES}; message {i} is {_shown(message)}.'
            )
        if message["role"] not in roles:
            raise ConfigurationError(f"{where}: {expected}; message {i} has the role {message['role']!r}: use {' or '.join(map(repr, roles))}.")
    return [dict(m) for m in value]


def _shown(value: Any) -> str:
    return json.dumps(value, default=repr)[:80]


def with_system(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """`messages` with a system message of `system_prompt` first, unless they begin with their own (or it is None)."""
    if system_prompt is None or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def render_chat(tokenizer: Any, messages: Sequence[Message], where: str, generation_prompt: bool = True) -> str:
    """The text of `messages` by the tokenizer's chat template; with `generation_prompt`, the assistant's turn opened
    after them (``add_generation_prompt=True``). A tokenizer without a template is a `ConfigurationError` naming the fix."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigurationError(
            f"{where}: the prompt is a list of chat messages, but the tokenizer has no chat template to render it. Use a model whose "
            "tokenizer has one, or give one with --tokenizer DIR (a tokenizer saved after setting tokenizer.chat_template), "
            "or write the prompts as strings."
        )
    text: str = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    return text


def render_rows(rows: Sequence[Row], tokenizer: Any, origin: str, system_prompt: str | None = None) -> list[Row]:
    """Copies of `rows` whose chat-message prompts are rendered to text (`render_chat`), `system_prompt` first
    (a system prompt with a row whose prompt is a string is a `ConfigurationError`: it would be lost)."""
    out = []
    for i, row in enumerate(rows):
        prompt, where = row["prompt"], f"{origin}: row {i}"
        if isinstance(prompt, str):
            if system_prompt is not None:
                raise ConfigurationError(
                    f"{where}: system_prompt is put first in chat prompts, but this prompt is a string (used as is); write the prompts as "
                    f'chat messages ({{"prompt": {EXAMPLE_MESSAGES}}}), or drop system_prompt.'
                )
            out.append(row)
            continue
        out.append({**row, "prompt": render_chat(tokenizer, with_system(prompt, system_prompt), where)})
    return out


def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens (BOS, EOS, pad, a chat template's control tokens)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    found = {t.content for t in added.values() if t.special} | set(getattr(tokenizer, "all_special_tokens", ()))
    return tuple(sorted(t for t in found if t))


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids of prompt texts (a prompt with a completion appended, too).

    A text that begins with one of the tokenizer's special tokens (its BOS, or a chat template's opening
    token such as ``<|im_start|>``) is formatted already, most often by a chat template: it is encoded as
    is, without the special tokens the tokenizer would add, as ``apply_chat_template(tokenize=True)``
    encodes it; so a template that writes the BOS gets one BOS, not two. Any other text gets the special
    tokens the tokenizer adds by itself (the BOS of a Llama tokenizer, nothing for GPT-2 or Qwen).
    """
    specials = special_tokens(tokenizer)
    return [list(tokenizer(p, add_special_tokens=not p.startswith(specials))["input_ids"]) for p in prompts]


def read_jsonl(path: str | Path) -> list[Row]:
    """The rows of a JSONL prompts file: one JSON object per line with a "prompt" (a string or chat messages); errors name the line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigurationError(f"{path}:{n}: not JSON: {exc}") from exc
                rows.append(_check_row(row, str(path), n, line=True))
    return rows


def columns(rows: Sequence[Mapping[str, Any]], repeat: int) -> dict[str, list[Any]]:
    """Every non-prompt column, each value repeated `repeat` times (one per sampled response)."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k != "prompt" and k not in keys)
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in keys}


def as_rows(data: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Rows from any iterable of mappings (a list of dicts, a `datasets.Dataset`)."""
    return [dict(r) for r in data]


def prompt_source(
    task: Task | None,
    seed: int,
    *,
    rows: Iterable[Mapping[str, Any]] | None = None,
    prompts_file: str | None = None,
    held_out: Iterable[Mapping[str, Any]] | None = None,
    eval_prompts_file: str | None = None,
    eval_size: int | None = None,
    tokenizer: Any = None,
    system_prompt: str | None = None,
) -> PromptSource:
    """The run's prompts: `rows` given in code, else `prompts_file`, else the task's; held out: `held_out`, else
    `eval_prompts_file`, else the task's held-out set (or the first `eval_size` rows of the training rows).
    Chat prompts are rendered by `tokenizer`'s chat template, `system_prompt` first (see the module docstring)."""
    evaluation = as_rows(held_out) if held_out is not None else read_jsonl(eval_prompts_file) if eval_prompts_file else None
    if rows is not None or prompts_file:
        data, origin = (as_rows(rows), "prompts") if rows is not None else (read_jsonl(str(prompts_file)), str(prompts_file))
        return RowSource(data, seed, evaluation, eval_size, origin, tokenizer=tokenizer, system_prompt=system_prompt)
    if system_prompt is not None and task is not None:
        raise ConfigurationError(
            f"system_prompt is put first in chat prompts, but the prompts are the task {task.name!r}'s strings; give chat prompts "
            f'({{"prompt": {EXAMPLE_MESSAGES}}}) in a prompts file, or drop system_prompt.'
        )
    if task is None:
        return NoPrompts()
    if evaluation is not None:
        where = eval_prompts_file or "held-out prompts"
        evaluation = render_rows([_check_row(r, where, i) for i, r in enumerate(evaluation)], tokenizer, where)
        return TaskWithHeldOut(task, seed, evaluation[:eval_size] if eval_size else evaluation)
    return TaskSource(task, seed, eval_size)
