"""Supervised learning of responses: ``prompt -> target <eos>``, the loss on the target tokens only.

The warm start and ``proxim sft`` both train with `SupervisedStep`: one batch per step, split into
micro-batches whose losses are each normalised by the whole batch's target-token count (so that they
sum to the batch's mean negative log-likelihood), and one update through `proxim.train.optimization`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from proxim.train.prompts import encode_prompts
from proxim.train.records import response_tokens

if TYPE_CHECKING:
    from proxim.tasks import Task
    from proxim.train.optimization import Optimization
    from proxim.train.prompts import PromptSource

#: Examples per forward pass when evaluating.
EVAL_BATCH = 64

SupervisedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""input_ids, attention_mask, labels [n, L] (labels -100 except on the target and EOS)."""
Batches = Callable[[int], SupervisedBatch]
"""One supervised batch per step: ``batches(step)``, a pure function of the step (so a resumed run sees the same)."""


def encode_supervised(tokenizer: Any, pairs: Sequence[tuple[str, str]], eos_id: int, device: torch.device | str) -> SupervisedBatch:
    """`SupervisedBatch` of ``prompt + target + EOS`` per (prompt, target) pair, right-padded.

    The prompt is encoded as every prompt is (`proxim.train.prompts.encode_prompts`: a rendered chat template
    keeps its one BOS), the target as a response is (`proxim.train.records.response_tokens`: EOS once)."""
    seqs, starts = [], []
    prompts = encode_prompts(tokenizer, [p for p, _ in pairs])
    for prompt, (_, target_text) in zip(prompts, pairs):
        target = response_tokens(tokenizer, target_text, eos_id)
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


def task_batches(task: Task, tokenizer: Any, seed: int, batch_size: int, device: torch.device | str) -> Batches:
    """Batches of `batch_size` of the task's training examples, ``prompt -> task.completion(example) <eos>``."""
    eos = int(tokenizer.eos_token_id)

    def batch(step: int) -> SupervisedBatch:
        examples = task.train_examples(random.Random(f"proxim-warmstart-{seed}-{step}"), batch_size)
        return encode_supervised(tokenizer, [(e.prompt, task.completion(e)) for e in examples], eos, device)

    return batch


def record_batches(source: PromptSource, tokenizer: Any, batch_size: int, rank: int, world: int, device: torch.device | str) -> Batches:
    """Batches of ``{"prompt", "response"}`` records from `source`, `batch_size` over all processes."""
    eos = int(tokenizer.eos_token_id)

    def batch(step: int) -> SupervisedBatch:
        rows = source.batch(step, rank, world, batch_size // world)
        return encode_supervised(tokenizer, [(r["prompt"], r["response"]) for r in rows], eos, device)

    return batch


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens the loss counts: the labels after transformers' shift by one that are not -100."""
    return (labels[:, 1:] != -100).sum()


class SupervisedStep:
    """``step(k) -> metrics``: the batch of step k, micro-batches of `micro_batch_size`, one optimiser update."""

    def __init__(self, lm: Any, batches: Batches, optimization: Optimization, micro_batch_size: int | None = None):
        self.lm, self.batches, self.optimization, self.micro_batch_size = lm, batches, optimization, micro_batch_size

    def __call__(self, step: int) -> dict[str, float]:
        ids, mask, labels = self.batches(step)
        count = target_tokens(labels)
        size = self.micro_batch_size or len(ids)
        micro = [slice(i, i + size) for i in range(0, len(ids), size)]

        def loss_of(part: slice) -> torch.Tensor:
            loss: torch.Tensor = self.lm(input_ids=ids[part], attention_mask=mask[part], labels=labels[part], num_items_in_batch=count).loss
            return loss

        self.lm.train()
        update = self.optimization.update(micro, loss_of)
        return {
            "loss/supervised": float(update.loss),
            "optim/grad_norm": float("nan") if update.grad_norm is None else update.grad_norm,
            "optim/lr": self.optimization.lr,
            "optim/skipped": float(update.skipped),
            "optim/skipped_total": float(self.optimization.nonfinite_total),
        }


@torch.no_grad()
def supervised_loss(lm: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> float:
    """Mean negative log-likelihood per target token (response and EOS) of (prompt, response) `pairs` under `lm`."""
    device = next(lm.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(pairs), EVAL_BATCH):
        ids, mask, labels = encode_supervised(tokenizer, pairs[i : i + EVAL_BATCH], int(tokenizer.eos_token_id), device)
        n = int(target_tokens(labels))
        total += float(lm(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        tokens += n
    return total / max(tokens, 1)
