"""The warm start: a short supervised phase on the task's answers, run once and cached.

RL needs signal: a policy that never samples a correct answer gets identical rewards in every group
and learns nothing. A randomly initialised tiny model is such a policy, so ``proxim train`` first
trains it on ``prompt -> task.completion(example) <eos>`` pairs for `warmstart_steps` steps
(`proxim.train.supervised`, with the optimiser settings of ``proxim sft``: AdamW, warm-up over 100
updates), deliberately too few to solve the task: the held-out accuracy RL starts from is low but not
zero, and RL has to do the rest.

The result depends only on the task, the model (its config, or its directory), the tokenizer and the
supervised settings; it is saved under ``CACHE/warmstart/<task>-<hash>/`` (a few MB) and reused by
every later run with the same key, so only the first run pays for it. In a multi-process run the main
process trains and the others wait and load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from proxim.train import models
from proxim.train.optimization import Optimization, parameter_groups
from proxim.train.step_sections import SupervisedOptimizer
from proxim.train.supervised import SupervisedStep, task_batches

if TYPE_CHECKING:
    from accelerate import Accelerator

    from proxim.tasks import Task
    from proxim.train.reporting import Progress
    from proxim.train.sections import Model, WarmStart

RECIPE_VERSION = 2
"""Bump when the supervised recipe changes, so old cache entries are not reused (2: transformers' warm-up schedule)."""


def cache_root(cache_dir: str | None) -> Path:
    """Where cached results live: `cache_dir`, else $PROXIM_CACHE_DIR, else $XDG_CACHE_HOME/proxim or ~/.cache/proxim."""
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("PROXIM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "proxim"


def cache_key(task: Task, model_identity: dict[str, Any], steps: int, lr: float, batch_size: int, seed: int, optimizer: SupervisedOptimizer) -> str:
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
            "optimizer": optimizer.to_dict(),
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start(
    lm: Any,
    tokenizer: Any,
    task: Task,
    *,
    model_identity: dict[str, Any],
    steps: int,
    settings: WarmStart,
    seed: int,
    accelerator: Accelerator,
    progress: bool,
    optimizer: SupervisedOptimizer | None = None,
) -> tuple[Path, bool]:
    """Load the cached warm start of `lm` or make it; returns (cache entry, whether it was cached).

    optimizer: the supervised optimiser settings (default those of ``proxim sft``).
    """
    from tqdm.auto import tqdm

    optimizer = optimizer or SupervisedOptimizer()
    key = cache_key(task, model_identity, steps, settings.warmstart_lr, settings.warmstart_batch_size, seed, optimizer)
    entry = cache_root(settings.cache_dir) / "warmstart" / f"{task.name}-{key}"
    hit = (entry / "done").is_file()
    if not hit and accelerator.is_main_process:
        device = next(lm.parameters()).device
        optimization = Optimization(accelerator, parameter_groups([(lm, settings.warmstart_lr)]), optimizer, horizon=steps, local=True)
        step = SupervisedStep(lm, task_batches(task, tokenizer, seed, settings.warmstart_batch_size, device), optimization, optimizer.micro_batch_size)
        losses = []
        bar = tqdm(range(steps), desc=f"warm start ({task.name})", unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for k in bar:
            losses.append(step(k)["loss/supervised"])
            if k % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        models.save_model_dir(lm, tokenizer, tmp)
        record = {"task": task.name, "steps": steps, "lr": settings.warmstart_lr, "batch_size": settings.warmstart_batch_size, "seed": seed}
        (tmp / "warmstart.json").write_text(
            json.dumps({**record, "final_loss": losses[-1] if losses else None, "model": model_identity}, indent=2, default=str)
        )
        (tmp / "done").write_text("ok\n")
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:  # another run finished first: use its (identical) result
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    models.load_weights(lm, entry)
    return entry, hit


def initial_policy_dir(
    model: Model,
    settings: WarmStart,
    task: Task | None,
    seed: int,
    run_dir: Path,
    accelerator: Accelerator,
    progress: Progress,
    resuming: bool,
) -> Path:
    """The folder a run's policy (and its reference) load from: ``RUN/init``, where a new run saves its
    warm-started initial policy with its tokenizer; or the model directory as is, when there is no warm start."""
    from proxim.errors import TrainingError

    init_dir, start = run_dir / "init", model.start_model()
    if not resuming and not (start is not None and settings.warmstart_steps_for(start) == 0):
        lm, tokenizer, message = initial_policy(model, settings, task, seed, accelerator, progress.enabled)
        if message:
            progress.say(message)
        if accelerator.is_main_process:
            models.save_model_dir(lm, tokenizer, init_dir)
        accelerator.wait_for_everyone()
    if (init_dir / "config.json").is_file():
        return init_dir
    if start is None:
        raise TrainingError(f"{run_dir} has no init/ folder and the configuration names no model to start from.")
    return Path(start)


def initial_policy(
    model: Model,
    settings: WarmStart,
    task: Task | None,
    seed: int,
    accelerator: Accelerator,
    progress: bool,
) -> tuple[Any, Any, str | None]:
    """The policy a run starts from: the starting model (`models.start_policy`) after its warm start, on the
    accelerator's device; its tokenizer; and what the warm start did, in words (None when there was none)."""
    from proxim.errors import ConfigurationError

    lm, tokenizer, identity = models.start_policy(model, seed)
    lm.to(accelerator.device)
    steps = settings.warmstart_steps_for(model.start_model())
    if steps == 0:
        return lm, tokenizer, None
    if task is None:
        raise ConfigurationError("warmstart_steps > 0 needs a task (its answers are the supervised targets); set warmstart_steps=0.")
    t0 = time.perf_counter()
    entry, hit = warm_start(lm, tokenizer, task, model_identity=identity, steps=steps, settings=settings, seed=seed, accelerator=accelerator, progress=progress)
    how = "loaded from the cache" if hit else f"trained in {time.perf_counter() - t0:.0f} s and cached"
    return lm, tokenizer, f"warm start: {steps} supervised steps on {task.name}, {how} ({entry})"
