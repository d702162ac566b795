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
``proxim train --preset dpo`` uses). Each step is one update through `proxim.train.optimization`
(micro-batches, clipping, skipped non-finite updates, the schedule); runs checkpoint and resume
(``--resume RUN_DIR``). Before and after, it reports the held-out pairwise accuracy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

import proxim
from proxim.figures import informative, write_figure
from proxim.tasks import Task
from proxim.train import adapters, distributed, models
from proxim.train.config import RewardModelConfig
from proxim.train.optimization import Optimization, parameter_groups
from proxim.train.panels import reward_model_panels
from proxim.train.preferences import PreferenceSet, preference_set
from proxim.train.prompts import encode_prompts
from proxim.train.records import Record
from proxim.train.reporting import before_after_table, number, pct
from proxim.train.run_folder import default_name
from proxim.train.session import Session
from proxim.train.warmstart import initial_policy

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
    after: PairwiseEval | None
    wall_time: float
    interrupted: int | None = None


def scores(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
    """r(prompt + response) [B]: the model's single logit at each text's last non-pad token (with grad when enabled)."""
    device = next(model.parameters()).device
    enc = tokenizer.pad({"input_ids": encode_prompts(tokenizer, [p + r for p, r in zip(prompts, responses)])}, return_tensors="pt").to(device)
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


def train_reward_model(
    config: RewardModelConfig, *, resume: str | os.PathLike[str] | None = None, registry: proxim.Registry | None = None
) -> RewardModelResult:
    """Train and save a reward model; see the module docstring."""
    t_start = time.perf_counter()
    reg = registry or proxim.default_registry()
    config.check(reg)  # every record of --data too, before any model is built
    session = Session(config, resume)
    acc = session.accelerator
    task = config.load_task(reg)
    session.open(config.run_name or default_name("rm", Path(config.data).stem if config.data else config.task or "pairs"))
    with session.building():  # a failed start leaves no empty run folder
        model, tokenizer, pairs, backbone = _reward_model_and_pairs(session, config, task)
        session.progress.say(
            f"run folder: {session.path}\nbackbone: {backbone} (with a new score head, Linear(hidden, 1)); "
            f"pairs: {len(pairs.train)} training, {len(pairs.held_out)} held out ({pairs.origin}); device: {acc.device}"
        )
        optimization = Optimization(acc, parameter_groups([(model, config.lr)]), config, horizon=config.steps)
        (prepared,) = optimization.prepare(model)
        found = session.folder.load_eval("before") if resume else None
        before = PairwiseEval(**found) if found else evaluate_pairs(model, tokenizer, pairs.held_out)
        session.folder.store_eval("before", attrs.asdict(before))
        if resume is not None:
            session.restore({"model": model}, optimization)
    session.begin()
    source = pairs.source(config.seed)

    def step(k: int) -> dict[str, float]:
        rows = source.batch(k, session.rank, session.world, config.prompts_per_step // session.world)
        size = config.micro_batch_size or len(rows)
        chosen, rejected = [], []

        def loss_of(part: Sequence[Record]) -> Tensor:
            prompts = [r["prompt"] for r in part]
            c, r = scores(prepared, tokenizer, prompts, [r["chosen"] for r in part]), scores(prepared, tokenizer, prompts, [r["rejected"] for r in part])
            chosen.append(c.detach())
            rejected.append(r.detach())
            return bradley_terry_loss(c, r) * (len(part) / len(rows))

        prepared.train()
        update = optimization.update([rows[i : i + size] for i in range(0, len(rows), size)], loss_of)
        c, r = torch.cat(chosen), torch.cat(rejected)
        metrics = {"loss/bradley_terry": float(update.loss), "reward/accuracy": float((c > r).double().mean()), "reward/margin": float((c - r).mean())}
        metrics.update(
            {
                "optim/grad_norm": float("nan") if update.grad_norm is None else update.grad_norm,
                "optim/lr": optimization.lr,
                "optim/skipped": float(update.skipped),
            }
        )
        return {**distributed.reduce_mean(acc, metrics), "optim/skipped_total": float(optimization.nonfinite_total)}

    def save(completed: int, train_time: float) -> None:
        session.save(completed, train_time, {"model": model}, optimization, {"proxim": proxim.__version__})

    outcome = session.run_steps(step, total=config.steps, save=save, describe=_describe, desc="reward model")
    if outcome.interrupted is not None:
        return RewardModelResult(session.path, outcome.steps, before, None, time.perf_counter() - t_start, outcome.interrupted)
    after = evaluate_pairs(model, tokenizer, pairs.held_out)
    session.folder.store_eval("after", attrs.asdict(after))
    result = RewardModelResult(session.path, config.steps, before, after, time.perf_counter() - t_start)
    if session.is_main:
        panels = informative(reward_model_panels(session.folder.history()))
        write_figure(session.path / "plot.png", panels, title=f"reward model on {pairs.origin}: {config.steps} steps")
    session.folder.write_summary(reward_model_table(result))
    session.save_trained(model, tokenizer, config.merge_lora)  # last: merging changes the model
    acc.wait_for_everyone()
    return result


def _reward_model_and_pairs(session: Session, config: RewardModelConfig, task: Task | None) -> tuple[Any, Any, PreferenceSet, Path]:
    """The reward model (the backbone with a new score head), its tokenizer, the pairs and the backbone's folder.

    The backbone is ``--init``, or else the initial policy (warm start included), saved as ``RUN/init``;
    it also samples the built-in pairs.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    acc = session.accelerator
    backbone = Path(config.init) if config.init is not None else session.path / "init"
    if config.init is None and not (backbone / "config.json").is_file():
        lm, tokenizer, message = initial_policy(config, config, task, config.seed, acc, session.progress.enabled)
        session.progress.say(message or "no warm start")
        if acc.is_main_process:
            models.save_model_dir(lm, tokenizer, backbone)
        acc.wait_for_everyone()
    lm, tokenizer = models.load_policy(backbone, config, tokenizer_beside=config.init is None)
    pairs = preference_set(config, task, lm.to(acc.device), tokenizer, models.eos_ids(tokenizer, lm), acc)
    del lm
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # not the load report: that the score head is new is the point
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the score head's initialisation
            model = AutoModelForSequenceClassification.from_pretrained(
                str(backbone), num_labels=1, dtype=torch.float32, trust_remote_code=config.trust_remote_code
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = int(tokenizer.pad_token_id)  # where the score is read; saved with the model
    return adapters.prepare(model.to(acc.device), config, config.seed, task_type="SEQ_CLS"), tokenizer, pairs, backbone


def _describe(record: Mapping[str, float]) -> dict[str, str]:
    return {"loss": f"{record['loss/bradley_terry']:.3f}", "acc": f"{record['reward/accuracy']:.2f}"}


def reward_model_table(result: RewardModelResult) -> str:
    b, a = result.before, result.after
    return before_after_table(
        f"held-out evaluation ({b.n} pairs) -- reward model, {result.steps} steps",
        [
            ("pairwise accuracy (score of chosen > rejected)", pct(b.accuracy), pct(a.accuracy if a else None)),
            ("Bradley-Terry loss", number(b.loss), number(a.loss if a else None)),
            ("mean score margin", number(b.margin), number(a.margin if a else None)),
        ],
        f"wall time {result.wall_time:.0f} s; reward model saved in {result.run_dir / 'model'} (use it with proxim train --reward-model)",
    )
