"""The warm start: a short supervised phase on the task's answers, run once and cached.

RL needs signal: a policy that never samples a correct answer gets identical rewards in every group
and learns nothing. A randomly initialised tiny model is such a policy, so ``proxim train`` first
trains it on ``prompt -> task.completion(example) <eos>`` pairs for `steps` steps (AdamW, linear warm-up
over 100 steps), deliberately too few to solve the task: the held-out accuracy RL starts from is low
but not zero, and RL has to do the rest.

The result depends only on the task, the model (its config, or its directory), the tokenizer and the
supervised settings; it is saved under ``CACHE/warmstart/<task>-<hash>/`` (a few MB) and reused by
every later run with the same key, so only the first run pays for it (about 15 s on two CPU cores for
the default). In a multi-process run the main process trains and the others wait and load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from proxim.tasks import Task

RECIPE_VERSION = 1
"""Bump when the supervised recipe changes, so old cache entries are not reused."""


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("PROXIM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "proxim"


def cache_key(task: Task, model_identity: dict[str, Any], steps: int, lr: float, batch_size: int, seed: int) -> str:
    blob = json.dumps(
        {
            "recipe": RECIPE_VERSION,
            "task": task.name,
            "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
            "model": model_identity,
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""One supervised batch per step: ``batches(step) -> (input_ids, attention_mask, labels)``, each [n, L]."""


def supervised_batch(task: Task, tokenizer: Any, eos_id: int, rng: random.Random, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` of the task's training examples as `encode_supervised` tensors: ``prompt -> task.completion(example) <eos>``."""
    examples = task.train_examples(rng, n)
    return encode_supervised(tokenizer, [(e.prompt, task.completion(e)) for e in examples], eos_id, device)


def encode_supervised(tokenizer: Any, pairs: Sequence[tuple[str, str]], eos_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels [n, L] of ``prompt + target + EOS`` per (prompt, target) pair, right-padded;
    labels are -100 except on the target and EOS."""
    seqs, starts = [], []
    for prompt_text, target_text in pairs:
        prompt = tokenizer(prompt_text)["input_ids"]
        target = tokenizer(target_text, add_special_tokens=False)["input_ids"] + [eos_id]
        seqs.append(prompt + target)
        starts.append(len(prompt))
    n = len(seqs)
    width = max(len(s) for s in seqs)
    ids = torch.full((n, width), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (s, k) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, k : len(s)] = torch.tensor(s[k:])
    return ids.to(device), mask.to(device), labels.to(device)


def train_supervised(lm: torch.nn.Module, batches: Batches, steps: int, lr: float, seed: int, progress: bool, desc: str) -> list[float]:
    """Fine-tune `lm` in place on `batches(step)` for `steps` steps (AdamW, linear warm-up over 100 steps); returns the loss of every step."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / 100))
    losses = []
    lm.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for step in bar:
            ids, mask, labels = batches(step)
            loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    return losses


def warm_start(
    lm: Any,
    tokenizer: Any,
    task: Task,
    *,
    model_identity: dict[str, Any],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    cache_dir: str | None,
    accelerator: Any,
    progress: bool,
) -> tuple[Path, bool]:
    """Load the cached warm start of `lm` or make it; returns (cache entry, whether it was cached)."""
    from proxim.train.checkpoint import load_policy_weights

    key = cache_key(task, model_identity, steps, lr, batch_size, seed)
    entry = cache_root(cache_dir) / "warmstart" / f"{task.name}-{key}"
    hit = (entry / "done").is_file()
    if not hit and accelerator.is_main_process:
        eos_id, device = int(tokenizer.eos_token_id), next(lm.parameters()).device

        def batches(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return supervised_batch(task, tokenizer, eos_id, random.Random(f"proxim-warmstart-{seed}-{step}"), batch_size, device)

        losses = train_supervised(lm, batches, steps, lr, seed, progress, f"warm start ({task.name})")
        tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lm.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "warmstart.json").write_text(json.dumps({"task": task.name, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "final_loss": losses[-1] if losses else None, "model": model_identity}, indent=2, default=str))
        (tmp / "done").write_text("ok\n")
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:  # another run finished first: use its (identical) result
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    load_policy_weights(lm, entry)
    return entry, hit
