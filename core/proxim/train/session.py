"""A run's session: its processes (accelerate), its folder, what it prints, and how it checkpoints and resumes.

Every recipe opens one::

    session = Session(config, resume)            accelerate and the progress messages; nothing on disk yet
    ...check the settings, build what fails without a model first...
    session.open(name)                           the run folder: created, or the one being resumed
    ...build the models and the optimiser...
    session.restore(models, optimization)        a resumed run: weights, optimiser, RNG, the start step
    session.begin()                              config.toml/json, metrics.jsonl (the steps a resumed run keeps)
    outcome = session.run_steps(step, ...)       `proxim.train.loop.StepLoop`, checkpoints through `save`
    session.save_trained(model, tokenizer, merge) RUN/model (and RUN/model-merged)

Saving is collective: with sharded (FSDP2) models every process takes part in gathering the weights,
and the main process writes them (`proxim.train.checkpoint`, `proxim.train.sharding`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from proxim.errors import ConfigurationError, TrainingError
from proxim.train import adapters, checkpoint, distributed, sharding, threads
from proxim.train.loop import Metrics, Outcome, StepLoop
from proxim.train.reporting import Progress
from proxim.train.run_folder import RunFolder, RunSettings
from proxim.train.settings import resumable

if TYPE_CHECKING:
    from proxim.train.optimization import Optimization


class Session:
    """See the module docstring. `config` is the recipe's whole configuration (written to the run folder)."""

    def __init__(self, config: RunSettings, resume: str | os.PathLike[str] | None):
        self.config, self.resume = config, resume
        project = Path(resume).resolve().parent if resume is not None else Path(config.output_dir)
        self.accelerator = distributed.make_accelerator(config.mixed_precision, config.tracker, project)
        self.rank: int = self.accelerator.process_index
        self.world: int = self.accelerator.num_processes
        self.is_main: bool = self.accelerator.is_main_process
        self.sharded: bool = sharding.is_sharded(self.accelerator)
        # each process resolved its precision (auto) and sharding on its own machine: they must agree
        distributed.agree(self.accelerator, f"mixed_precision={self.accelerator.mixed_precision}, sharded={self.sharded}", "precision and sharding")
        if self.sharded and getattr(config, "merge_lora", False):
            raise ConfigurationError(
                "merge_lora with sharded (FSDP) models: the merge needs the whole model in one process. Train without "
                "--merge-lora (RUN/model holds the adapter), then merge it in one process: "
                "peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('RUN/init'), 'RUN/model').merge_and_unload().save_pretrained(DIR)."
            )
        self.progress = Progress(config.quiet, self.is_main)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.threads = threads.choose(config.threads, local_processes)
        threads.apply(self.threads.count)
        self.progress.say(f"torch threads: {self.threads.count} ({self.threads.reason})")
        if self.accelerator.mixed_precision != "no":
            self.progress.say(f"mixed precision: {self.accelerator.mixed_precision} (setting: {config.mixed_precision})")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the training bar
        self.start_step, self.time_before = 0, 0.0
        self._folder: RunFolder | None = None

    @property
    def folder(self) -> RunFolder:
        if self._folder is None:
            raise RuntimeError("Session.open() has not been called yet")
        return self._folder

    @property
    def path(self) -> Path:
        return self.folder.path

    def open(self, name: str) -> RunFolder:
        """The run folder: ``output_dir/name`` for a new run (refused if it holds one), else the folder being resumed."""
        say = self.progress.notice
        if self.resume is not None:
            self._folder = RunFolder.existing(self.resume, self.accelerator, say)
        else:
            self._folder = RunFolder.create(self.config.output_dir, name, self.accelerator, say)
        return self._folder

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Wrap what a recipe builds after `open`: if it fails, the folder this new run created (no checkpoint in it
        yet) is removed, so that a failed start leaves no empty run folder behind."""
        try:
            yield
        except BaseException:
            folder = self._folder
            if folder is not None and folder.created and self.is_main and checkpoint.latest(folder.path) is None:
                shutil.rmtree(folder.path, ignore_errors=True)
            raise

    def restore(
        self, models: Mapping[str, nn.Module], optimization: Optimization, fingerprint: str | None = None, updates: int | None = None
    ) -> dict[str, Any]:
        """Load the latest checkpoint into `models` and `optimization` and set the start step; returns its state.

        fingerprint: the objective's; a checkpoint written by another objective is refused. updates: the
        optimiser updates of the whole run now (more ``--steps`` than the checkpoint's run: the schedule keeps its horizon).
        """
        latest, state = checkpoint.load_latest(self.path, accelerator=self.accelerator, models=models, optimization=optimization, say=self.progress.notice)
        self._check_same_settings(latest)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise TrainingError(
                f"--resume {self.path}: the objective differs from the checkpoint's.\n  checkpoint: {state.get('fingerprint')}\n  now:        {fingerprint}"
            )
        if state.get("world_size", self.world) != self.world:
            self.progress.say(
                f"warning: the checkpoint was written by {state.get('world_size')} processes, this run has {self.world}: "
                "prompts and sampling will differ from an uninterrupted run."
            )
        if updates is not None and updates > optimization.horizon and optimization.settings.lr_schedule != "constant":
            self.progress.say(
                f"note: the {optimization.settings.lr_schedule} schedule spans the first {optimization.horizon} updates of this run; "
                "later updates keep its final learning rate."
            )
        self._keep_threads(state.get("threads"))
        self.start_step, self.time_before = int(state["step"]), float(state.get("train_time", 0.0))
        self.progress.say(f"resuming {self.path} from step {self.start_step} ({latest.name})")
        return state

    def _keep_threads(self, then: int | None) -> None:
        """A resumed run continues with its checkpoint's thread count (torch's results differ in their last bits
        between counts), unless the user names one."""
        if then is None or then == self.threads.count:
            return
        if self.config.threads == "auto":
            self.threads = threads.ThreadChoice(int(then), "the checkpoint's, so that the run continues bit for bit")
            threads.apply(self.threads.count)
            self.progress.say(f"torch threads: {then} (the checkpoint's, so that the run continues bit for bit)")
        else:
            self.progress.say(f"note: the checkpoint was written with {then} threads, this run has {self.threads.count}: numbers differ in their last bits.")

    def _check_same_settings(self, directory: Path) -> None:
        """Refuse to continue with settings (other than the resumable ones) that differ from the checkpoint's copy."""
        saved = directory / "config.toml"
        if not saved.is_file():
            return
        then = type(self.config).from_toml(saved).to_dict()  # type: ignore[attr-defined]
        now = self.config.to_dict()
        allowed = set(resumable(type(self.config)))  # type: ignore[arg-type]
        changed = [f"{k}: {then.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(then) | set(now)) if k not in allowed and then.get(k) != now.get(k)]
        if changed:
            raise ConfigurationError(
                f"--resume {self.path}: the settings differ from the checkpoint's copy ({saved}):\n  "
                + "\n  ".join(changed)
                + "\nA run continues with the settings it started with: restore them (config.json), or start a new run."
            )

    def begin(self) -> None:
        """Write the configuration, and begin ``metrics.jsonl`` with the steps a resumed run keeps."""
        self.folder.write_config(self.config)
        self.folder.start_metrics(self.folder.history(upto=self.start_step) if self.start_step else [])

    def save(self, completed: int, train_time: float, models: Mapping[str, nn.Module], optimization: Optimization, state: Mapping[str, Any]) -> None:
        """Checkpoint after `completed` steps (collective): `models` (unwrapped), the optimiser, and the recipe's `state`."""
        checkpoint.save(
            self.path,
            completed,
            accelerator=self.accelerator,
            models=models,
            optimization=optimization,
            state={"train_time": train_time, "world_size": self.world, "threads": self.threads.count, **state},
            config_toml=self.config.to_toml(),
            keep=self.config.keep_checkpoints,
        )

    def save_trained(self, model: nn.Module, tokenizer: Any, merge: bool) -> None:
        """Write RUN/model (the adapter alone, for a LoRA run) and, with `merge`, RUN/model-merged (collective).

        A sharded model is gathered on every process first and written by the main one (merging is refused
        for sharded runs when the session opens). Call it last: merging changes the model."""
        full = checkpoint.full_weights(model, keep=self.is_main)
        if self.is_main:
            if full is None:
                adapters.save_trained(model, tokenizer, self.path, merge)
            else:
                model.save_pretrained(str(self.path / "model"), state_dict=full, safe_serialization=True)  # type: ignore[operator]
                tokenizer.save_pretrained(str(self.path / "model"))
        self.accelerator.wait_for_everyone()

    def run_steps(
        self,
        step: Callable[[int], Metrics],
        *,
        total: int,
        save: Callable[[int, float], None],
        describe: Callable[[Mapping[str, float]], dict[str, str]],
        desc: str,
        evaluate: Callable[[int], Metrics] | None = None,
        eval_every: int = 0,
    ) -> Outcome:
        """Steps from the start step to `total` (`proxim.train.loop.StepLoop`), checkpointed with `save`."""
        loop = StepLoop(
            accelerator=self.accelerator,
            run=self.folder,
            total=total,
            start=self.start_step,
            save_every=self.config.save_every,
            save=save,
            progress=self.progress,
            describe=describe,
            desc=desc,
            tracker_config=self.config.to_dict(),
            time_before=self.time_before,
        )
        outcome = loop.run_steps(step, evaluate, eval_every)
        if outcome.interrupted is not None:
            self.progress.notice(
                f"interrupted (signal {outcome.interrupted}) after step {outcome.steps}; checkpoint in {self.path / 'checkpoints'}. "
                f"Continue with: proxim {self.config.command} --resume {self.path}"
            )
        return outcome
