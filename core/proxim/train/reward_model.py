"""Reward-model training: ``proxim reward-model [--data pairs.jsonl] [--init SFT_DIR]``.

A transformers sequence-classification model with one output (``num_labels=1``) scores a text; it is
trained on preference pairs with the Bradley-Terry loss (Bradley & Terry 1952; InstructGPT, Ouyang et
al. 2022, arXiv 2203.02155, Eq. 1)::

    L = -log sigmoid(r(x, y_w) - r(x, y_l))        mean over the pairs of a step

The texts scored are ``prompt + response``, tokenized as `proxim.train.rewards.RewardModel` tokenizes
them when ``proxim train --reward-model DIR`` uses the result; the score is read at the last non-pad
token. The backbone is the starting policy's (``--init DIR``, e.g. the model of ``proxim sft``; else
the initial policy of ``proxim train``, warm start included), loaded with a fresh linear score head;
pairs come from ``--data`` or are built from the task (`proxim.train.preferences`, the same set that
``proxim train --preset dpo`` uses). Before and after, it reports the held-out pairwise accuracy
(how often the chosen response scores higher). One process: ``accelerate`` picks the device.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from proxim.train import models
from proxim.train.config import TrainConfig
from proxim.train.records import PAIR_FIELDS, Record, read_records
from proxim.train.sft import load_task, new_run_dir, say, write_evaluation

EVAL_BATCH = 64
"""Pairs per forward pass when evaluating."""


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean over pairs of -log sigmoid(chosen - rejected) (= softplus(rejected - chosen)); scores [B] -> 0-d."""
    return F.softplus(rejected - chosen).mean()


@attrs.frozen
class PairwiseEval:
    """Held-out pairs: how often the chosen response scores higher (`accuracy`), the loss, and the mean score gap."""

    n: int
    accuracy: float
    loss: float
    margin: float


@attrs.frozen
class RewardModelResult:
    run_dir: Path
    steps: int
    before: PairwiseEval
    after: PairwiseEval
    wall_time: float


def scores(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
    """r(prompt + response) [B]: the model's single logit at each text's last non-pad token (with grad when enabled)."""
    device = next(model.parameters()).device
    enc = tokenizer([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True).to(device)
    logits: Tensor = model(**enc).logits[:, 0].float()
    return logits


@torch.no_grad()
def evaluate_pairs(model: Any, tokenizer: Any, rows: Sequence[Record]) -> PairwiseEval:
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(rows), EVAL_BATCH):
        part = rows[i : i + EVAL_BATCH]
        prompts = [r["prompt"] for r in part]
        chosen.append(scores(model, tokenizer, prompts, [r["chosen"] for r in part]))
        rejected.append(scores(model, tokenizer, prompts, [r["rejected"] for r in part]))
    c, r = torch.cat(chosen), torch.cat(rejected)
    return PairwiseEval(len(rows), float((c > r).double().mean()), float(bradley_terry_loss(c, r)), float((c - r).mean()))


def train_reward_model(config: TrainConfig) -> RewardModelResult:
    """Train and save a reward model; see the module docstring."""
    from accelerate import Accelerator
    from proxim.train.loop import base_policy, warm_start_policy
    from proxim.train.preferences import preference_set
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    config.check_inputs()
    if config.data is not None:  # every record, before any model is built
        read_records(config.data, PAIR_FIELDS)
    hf_logging.disable_progress_bar()
    accelerator = Accelerator()
    task = load_task(config)
    run_dir = new_run_dir(config, "rm")
    # -- the starting policy: it samples the built-in pairs, and its backbone becomes the reward model's
    lm, tokenizer, identity = base_policy(config)
    lm.to(accelerator.device)
    steps = config.resolved_warmstart_steps()
    if steps > 0 and task is not None:
        say(config, warm_start_policy(config, task, lm, tokenizer, identity, steps, accelerator, not config.quiet))
    pairs = preference_set(config, task, lm, tokenizer, models.eos_ids(tokenizer, lm), accelerator)
    backbone = Path(config.init) if config.init is not None else run_dir / "init"
    if config.init is None:
        models.save_model_dir(lm, tokenizer, backbone)
    del lm
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # not the load report: that the score head is new is the point
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the score head's initialisation
            model = AutoModelForSequenceClassification.from_pretrained(str(backbone), num_labels=1, dtype=torch.float32, trust_remote_code=config.trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = int(tokenizer.pad_token_id)  # where the score is read; saved with the model
    model.to(accelerator.device)
    say(config, f"run folder: {run_dir}\nbackbone: {backbone} (with a new score head, Linear(hidden, 1)); pairs: {len(pairs.train)} training, {len(pairs.held_out)} held out ({pairs.origin}); device: {accelerator.device}")
    before = evaluate_pairs(model, tokenizer, pairs.held_out)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, weight_decay=config.weight_decay)
    source = pairs.source(config.seed)
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    history = []
    model.train()
    bar = tqdm(range(config.steps), desc="reward model", unit="step", disable=config.quiet, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        rows = source.batch(step, 0, 1, config.prompts_per_step)
        prompts = [r["prompt"] for r in rows]
        c = scores(model, tokenizer, prompts, [r["chosen"] for r in rows])
        r = scores(model, tokenizer, prompts, [r["rejected"] for r in rows])
        loss = bradley_terry_loss(c, r)
        torch.autograd.backward(loss)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        if math.isfinite(grad_norm) and math.isfinite(float(loss.detach())):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        c, r = c.detach(), r.detach()
        record = {"step": step + 1, "loss/bradley_terry": float(loss.detach()), "reward/accuracy": float((c > r).double().mean()), "reward/margin": float((c - r).mean()), "optim/grad_norm": grad_norm}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss/bradley_terry']:.3f}", acc=f"{record['reward/accuracy']:.2f}", refresh=False)
    bar.close()
    after = evaluate_pairs(model, tokenizer, pairs.held_out)
    models.save_model_dir(model, tokenizer, run_dir / "model")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    result = RewardModelResult(run_dir, config.steps, before, after, time.perf_counter() - t_start)
    write_evaluation(run_dir, before, after, reward_model_table(result))
    return result


def reward_model_table(result: RewardModelResult) -> str:
    from proxim.train.loop import _pct

    b, a = result.before, result.after
    return "\n".join([
        f"held-out evaluation ({a.n} pairs) -- reward model, {result.steps} steps",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        f"| pairwise accuracy (score of chosen > rejected) | {_pct(b.accuracy)} | {_pct(a.accuracy)} |",
        f"| Bradley-Terry loss | {b.loss:.3f} | {a.loss:.3f} |",
        f"| mean score margin | {b.margin:.3f} | {a.margin:.3f} |",
        "",
        f"wall time {result.wall_time:.0f} s; reward model saved in {result.run_dir / 'model'} (use it with proxim train --reward-model)",
    ])
