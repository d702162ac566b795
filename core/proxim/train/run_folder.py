"""The run folder: where a run's configuration, metrics, evaluations, samples and results are written.

``OUTPUT_DIR/<run name>/`` holds ``config.toml`` and ``config.json`` (the resolved settings),
``metrics.jsonl`` (one JSON line per step), ``eval.json`` (before/after numbers by label),
``eval_<label>.jsonl`` (every held-out completion), ``samples.jsonl``, ``summary.md``, ``plot.png``,
``model/`` and ``checkpoints/`` (`proxim.train.checkpoint`). Only the main process writes; the methods
do nothing on the others. Whole files are written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from proxim.errors import ConfigurationError, TrainingError
from proxim.train import checkpoint
from proxim.train.files import atomic_write, check_run_name

if TYPE_CHECKING:
    from accelerate import Accelerator


class RunSettings(Protocol):
    """What the run folder and the session read of a recipe's configuration: its run settings, the model's
    precision and threads, and how it writes itself (every recipe configuration has these)."""

    command: ClassVar[str]

    @property
    def output_dir(self) -> str: ...
    @property
    def tracker(self) -> str: ...
    @property
    def quiet(self) -> bool: ...
    @property
    def save_every(self) -> int: ...
    @property
    def keep_checkpoints(self) -> int: ...
    @property
    def mixed_precision(self) -> str: ...
    @property
    def threads(self) -> str: ...
    def to_toml(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


def default_name(label: str, source: str) -> str:
    """``<label>-<source>-<YYYYmmdd-HHMMSS>``: a run's folder name when none is given (label: the preset or the
    recipe; source: the task or the data file)."""
    return f"{label}-{source}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RunFolder:
    """One run's folder. Make it with `create` (a new run) or `existing` (a run to continue).

    `say` reports what the folder repairs or skips on its way (a truncated last line of ``metrics.jsonl``,
    a checkpoint that cannot be read); the session points it at the progress messages.
    """

    def __init__(self, path: Path, is_main: bool, say: Callable[[str], None] = _say, created: bool = False):
        self.path = path
        self.is_main = is_main
        self.say = say
        self.created = created
        """Whether this run made the folder (then a failed start may remove it: nothing of the user's is in it)."""

    @classmethod
    def create(cls, output_dir: str, name: str, accelerator: Accelerator, say: Callable[[str], None] = _say) -> RunFolder:
        """``output_dir/name``, created by the main process; every process gets the main process's `name`."""
        from accelerate.utils import broadcast_object_list

        check_run_name(name)
        names = broadcast_object_list([name]) if accelerator.num_processes > 1 else [name]
        path = Path(output_dir) / names[0]
        if checkpoint.latest(path) is not None:
            raise ConfigurationError(f"{path} already holds a run; continue it with --resume {path}, or choose another --run-name.")
        if (path / "summary.md").is_file():
            raise ConfigurationError(f"{path} already holds a finished run; choose another --run-name.")
        created = not path.exists()
        if accelerator.is_main_process:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"cannot create the run folder {path}: {exc.strerror or exc}; choose another --output-dir.") from exc
        accelerator.wait_for_everyone()
        return cls(path, accelerator.is_main_process, say, created)

    @classmethod
    def existing(cls, path: str | os.PathLike[str], accelerator: Accelerator, say: Callable[[str], None] = _say) -> RunFolder:
        """A run folder with at least one checkpoint that looks complete, to continue (newer broken ones are named and skipped)."""
        folder = Path(path)
        if checkpoint.usable(folder, say) is None:
            raise ConfigurationError(f"--resume {folder}: no complete checkpoint under {folder / 'checkpoints'}.")
        return cls(folder, accelerator.is_main_process, say)

    # -- files -----------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            atomic_write(self.path / name, text)

    def write_jsonl(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        self.write_text(name, "".join(json.dumps(r) + "\n" for r in records))

    def append_jsonl(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        if self.is_main:
            path = self.path / name
            try:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in records)
            except OSError as exc:
                raise TrainingError(
                    f"could not append to {path}: {exc.strerror or exc}; free space on that disk and continue with --resume {self.path}."
                ) from exc

    def write_config(self, config: RunSettings) -> None:
        """``config.toml`` (rerun with ``--config``) and ``config.json`` (what ``--resume`` reads)."""
        self.write_text("config.toml", config.to_toml())
        self.write_text("config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))

    def saved_config(self) -> dict[str, Any]:
        """The settings in ``config.json``: what ``--resume`` continues with."""
        path = self.path / "config.json"
        if not path.is_file():
            raise ConfigurationError(f"--resume {self.path}: no config.json there; is it a proxim run folder?")
        try:
            values = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigurationError(f"{path}: not valid JSON ({exc}); the run's settings are also in the checkpoints' config.toml.") from exc
        if not isinstance(values, dict):
            raise ConfigurationError(f"{path}: expected a table of settings, got {type(values).__name__}.")
        return values

    # -- metrics ---------------------------------------------------------------------------------
    def history(self, upto: int | None = None) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (those of steps up to `upto` when given). A last line cut short (a run
        killed while writing it) is dropped with a note; a bad line before it is an error naming the line."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        records = []
        for k, (n, line) in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                if k == len(lines) - 1:
                    self.say(f"{path}:{n}: the last line is cut short (the run was killed while writing it); it is dropped.")
                    break
                raise ConfigurationError(f"{path}:{n}: not JSON ({exc}); remove the line to continue the run.") from exc
        return [r for r in records if upto is None or r.get("step", 0) <= upto]

    def start_metrics(self, history: list[dict[str, Any]]) -> None:
        """Begin ``metrics.jsonl`` with `history` (the steps a resumed run keeps; empty for a new run)."""
        self.write_jsonl("metrics.jsonl", history)

    # -- evaluations -----------------------------------------------------------------------------
    def _evaluations(self) -> dict[str, Any]:
        path = self.path / "eval.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self.say(f"{path}: not a valid evaluation record; its evaluations will be made again.")
            return {}
        return data

    def store_eval(self, label: str, result: Mapping[str, Any]) -> None:
        """Record an evaluation under `label` in ``eval.json`` (``before``, ``after``, ``pairs_before``, ...)."""
        if self.is_main:
            atomic_write(self.path / "eval.json", json.dumps({**self._evaluations(), label: dict(result)}, indent=2))

    def load_eval(self, label: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._evaluations().get(label)
        return found

    def write_summary(self, table: str) -> None:
        """``summary.md``, and the table printed (by the main process)."""
        if self.is_main:
            self.write_text("summary.md", table + "\n")
            print(table)
