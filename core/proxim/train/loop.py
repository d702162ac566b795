"""The step loop every recipe runs: its steps in order, each logged, checkpoints on a cadence and on a signal.

    for step in start .. total - 1:
        metrics = step_fn(step)                      the recipe's step (a `TrainingError` inside it, such as
                                                     too many non-finite updates, checkpoints the completed
                                                     steps first, then stops the run)
        + evaluate(step + 1) every eval_every steps  (held-out numbers between before and after)
        append {"step": step + 1, **metrics} to metrics.jsonl and the tracker; advance the progress bar
        checkpoint every save_every steps, and when SIGINT/SIGTERM arrived (on any process)
    checkpoint at the end

On the first SIGINT or SIGTERM the step in flight finishes, a checkpoint is written and the loop returns
with `Outcome.interrupted` set; a second signal stops the process at once. The stop flag crosses
processes through accelerate's trigger, so every process stops after the same step.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from proxim.errors import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from proxim.train.reporting import Progress
    from proxim.train.run_folder import RunFolder

Metrics = dict[str, float]


def step_seed(seed: int, *parts: int) -> int:
    """A seed that is a pure function of (seed, parts), e.g. (seed, step, rank): how a resumed run draws what
    the uninterrupted run would have."""
    return random.Random("proxim-" + "-".join(map(str, (seed, *parts)))).getrandbits(63)


@attrs.frozen
class Outcome:
    """How the loop ended: steps completed, the signal that stopped it early (None when it ran to the end),
    and the training time of the whole run (earlier sessions of a resumed run included)."""

    steps: int
    interrupted: int | None
    train_time: float


class StepLoop:
    """Runs a recipe's steps; see the module docstring.

    save: ``save(completed_steps, train_time)`` writes a checkpoint (collective). describe: the progress
    bar's few numbers from a step's record. time_before: training time of earlier sessions (resume).
    """

    def __init__(
        self,
        *,
        accelerator: Accelerator,
        run: RunFolder,
        total: int,
        start: int,
        save_every: int,
        save: Callable[[int, float], None],
        progress: Progress,
        describe: Callable[[Mapping[str, float]], dict[str, str]],
        desc: str,
        tracker_config: Mapping[str, Any],
        time_before: float = 0.0,
    ):
        self.accelerator, self.run, self.total, self.start = accelerator, run, total, start
        self.save_every, self.save, self.progress, self.describe, self.desc = save_every, save, progress, describe, desc
        self.tracker_config = tracker_config
        self.time_before = time_before
        self.signalled: list[int] = []
        self.t0 = time.perf_counter()

    @property
    def train_time(self) -> float:
        return self.time_before + time.perf_counter() - self.t0

    def run_steps(self, step_fn: Callable[[int], Metrics], evaluate: Callable[[int], Metrics] | None = None, eval_every: int = 0) -> Outcome:
        acc = self.accelerator
        if acc.log_with:
            acc.init_trackers(
                f"{self.run.path.name}/tensorboard", config={k: v for k, v in self.tracker_config.items() if isinstance(v, (int, float, str, bool))}
            )
        handlers = self._install_signal_handlers()
        self.progress.start(self.total, self.start, self.desc)
        self.t0 = time.perf_counter()
        saved = -1
        try:
            for step in range(self.start, self.total):
                try:
                    record: dict[str, float] = {"step": step + 1, **step_fn(step)}
                except TrainingError as exc:  # the run cannot continue: keep what is done, then stop
                    self.save(step, self.train_time)
                    raise TrainingError(f"{exc} (step {step + 1}). The last complete state is checkpointed in {self.run.path / 'checkpoints'}.") from exc
                except Exception:
                    self._save_before_failing(step)
                    raise
                if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < self.total:
                    record.update(evaluate(step + 1))
                self.run.append_jsonl("metrics.jsonl", [record])
                if acc.log_with:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=step + 1)
                self.progress.advance(self.describe(record))
                stop = self._stop_requested()
                if stop or (self.save_every and (step + 1) % self.save_every == 0):
                    self.save(step + 1, self.train_time)
                    saved = step + 1
                if stop:
                    return Outcome(step + 1, self.signalled[0] if self.signalled else signal.SIGTERM, self.train_time)
        finally:
            self.progress.close()
            self._restore_signal_handlers(handlers)
            if acc.log_with:
                acc.end_training()
        if saved != self.total:
            self.save(self.total, self.train_time)
        return Outcome(self.total, None, self.train_time)

    def _save_before_failing(self, step: int) -> None:
        """An error ends the run in step `step`: checkpoint the steps done in this session first (none done: nothing to keep)."""
        if step == self.start:
            return
        try:
            self.save(step, self.train_time)
        except Exception as exc:
            self.progress.notice(f"the run failed in step {step + 1}, and its checkpoint could not be written either: {exc}")
            return
        self.progress.notice(f"the run failed in step {step + 1}; its {step} completed steps are checkpointed in {self.run.path / 'checkpoints'}.")

    def _stop_requested(self) -> bool:
        """Whether any process was signalled (one all-reduce; every process calls it after every step)."""
        return bool(self.accelerator.check_trigger())

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self.signalled:  # a second signal: stop now, without a checkpoint
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.signalled.append(signum)
            self.accelerator.set_trigger()
            if self.accelerator.is_main_process:
                print(f"\nsignal {signum}: finishing this step, then saving a checkpoint (send it again to stop at once)", file=sys.stderr)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)
