"""Preference pairs: from a JSONL file (``--data``), or built from a task's reward and cached.

The built-in set (no ``--data``): the initial policy answers each of `preference_prompts` training
prompts twice (sampled at the run's temperature and top-p), the task's reward scores both answers,
the better one is "chosen" and the other "rejected"; pairs whose rewards tie are dropped. The held-out
pairs are made the same way from the task's held-out prompts (the first `eval_size`), which never
appear in training, except that each held-out prompt is answered `HELD_OUT_SAMPLES` (8) times and the
answers are paired two by two (first with second, ...): the 200 held-out prompts of a task give a few
hundred pairs, enough to tell a 70% from a 90% reward model. They are sampled first, so they do not
depend on `preference_prompts`. Each pair record also keeps the prompt's ``answer`` and both rewards.

The set depends only on the policy's weights, the task and the sampling settings. It is saved as JSON
under ``CACHE/preferences/<task>-<hash>.json`` (the warm start's cache root) and reused by every later
run with the same key: ``proxim train --preset dpo`` and ``proxim reward-model`` then train on the
same pairs. With ``--data``, the first `eval_size` records (default 10%, at most 200) are held out.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from proxim.errors import ConfigurationError
from proxim.tasks import Example, Task
from proxim.train.config import PreferenceConfig, RewardModelConfig
from proxim.train.hf_generator import HFGenerator
from proxim.train.prompts import RowSource, encode_prompts
from proxim.train.records import PAIR_FIELDS, Record, read_records, render_prompts
from proxim.train.warmstart import cache_root

PairSettings = PreferenceConfig | RewardModelConfig
"""The configurations whose recipes train on preference pairs."""

RECIPE_VERSION = 2
"""Bump when the way pairs are built changes, so old cache entries are not reused."""
HELD_OUT_SAMPLES = 8
"""Answers sampled per held-out prompt, paired two by two (first with second, third with fourth, ...):
a task's 200 held-out prompts then give a few hundred held-out pairs instead of about 80.
"""


@attrs.frozen
class PreferenceSet:
    """Training and held-out pair records (``prompt`` a string, ``chosen``, ``rejected``), and where they came from."""

    train: list[Record]
    held_out: list[Record]
    origin: str

    def source(self, seed: int) -> RowSource:
        """The training pairs as a `RowSource`: each step's pairs, reshuffled on every pass."""
        return RowSource(self.train, seed, self.held_out, origin=self.origin)


def load_pairs(path: str, tokenizer: Any, eval_size: int | None, system_prompt: str | None = None) -> PreferenceSet:
    """The pairs of a JSONL file, chat messages rendered (`system_prompt` first in each chat prompt; chosen and
    rejected after the same prompt text); the first `eval_size` (default 10%, at most 200) held out."""
    records = render_prompts(read_records(path, PAIR_FIELDS), tokenizer, path, system_prompt)
    k = eval_size if eval_size is not None else min(200, len(records) // 10)
    if k >= len(records):
        raise ConfigurationError(f"{path}: {len(records)} pairs leave none to train on after holding out {k}; add pairs or lower --eval-size.")
    return PreferenceSet(records[k:], records[:k], path)


def preference_set(config: PairSettings, task: Task | None, lm: Any, tokenizer: Any, eos_ids: Sequence[int], accelerator: Any) -> PreferenceSet:
    """The run's pairs: `config.data`, or else the built-in set of `task` for the policy `lm` (cached; see the module docstring).

    In a multi-process run the main process builds a missing set while the others wait, then all read it.
    """
    if config.data is not None:
        return load_pairs(config.data, tokenizer, config.eval_size, config.system_prompt)
    if task is None:
        raise ConfigurationError("preference pairs need --data pairs.jsonl, or a task to build them from.")
    if config.system_prompt is not None:
        raise ConfigurationError(
            f"system_prompt is put first in chat prompts, but the pairs are built from the task {task.name!r}, whose prompts are strings; "
            "give chat pairs with --data, or drop system_prompt."
        )
    entry = cache_root(config.cache_dir) / "preferences" / f"{task.name}-{_cache_key(config, task, lm)}.json"
    if not entry.is_file() and accelerator.is_main_process:
        data = make_pairs(lm, tokenizer, eos_ids, task, config)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, entry)
    accelerator.wait_for_everyone()
    data = json.loads(entry.read_text())
    return PreferenceSet(data["train"], data["held_out"], str(entry))


def make_pairs(lm: Any, tokenizer: Any, eos_ids: Sequence[int], task: Task, config: PairSettings) -> dict[str, list[Record]]:
    """The built-in set, made now: ``{"train": [...], "held_out": [...]}`` pair records (see the module docstring)."""
    generator = HFGenerator(lm, tokenizer, eos_ids, config.generation_batch_size)
    max_new_tokens = config.max_new_tokens_for(task)

    def pairs(examples: Sequence[Example], samples: int) -> list[Record]:
        prompts = [e.prompt for e in examples]
        gen = generator.generate(encode_prompts(tokenizer, prompts), samples, config.temperature, config.top_p, max_new_tokens)
        rewards = task.reward([p for p in prompts for _ in range(samples)], gen.completions, answer=[e.answer for e in examples for _ in range(samples)])
        out = []
        for i, e in enumerate(examples):
            for j in range(samples * i, samples * (i + 1), 2):
                (first, r_first), (second, r_second) = ((gen.completions[j + k], float(rewards[j + k])) for k in range(2))
                if r_first == r_second:
                    continue
                (chosen, r_chosen), (rejected, r_rejected) = sorted([(first, r_first), (second, r_second)], key=lambda x: -x[1])
                out.append(
                    {"prompt": e.prompt, "chosen": chosen, "rejected": rejected, "answer": e.answer, "chosen_reward": r_chosen, "rejected_reward": r_rejected}
                )
        return out

    held_out = task.eval_set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # the held-out pairs first: they do not depend on the number of training prompts
        held_out_pairs = pairs(held_out[: config.eval_size] if config.eval_size else held_out, HELD_OUT_SAMPLES)
        train_pairs = pairs(task.train_examples(random.Random(f"proxim-preferences-{task.name}-{config.seed}"), config.preference_prompts), 2)
        return {"train": train_pairs, "held_out": held_out_pairs}


def _cache_key(config: PairSettings, task: Task, lm: Any) -> str:
    weights = hashlib.sha256()
    for name, tensor in sorted(lm.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    blob = json.dumps(
        {
            "recipe": RECIPE_VERSION,
            "task": task.name,
            "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
            "weights": weights.hexdigest(),
            "prompts": config.preference_prompts,
            "eval_size": config.eval_size,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens_for(task),
            "seed": config.seed,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
