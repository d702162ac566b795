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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from proxim.errors import ConfigurationError
from proxim.train import checkpoint
from proxim.train.files import atomic_write

if TYPE_CHECKING:
    from accelerate import Accelerator


class RunSettings(Protocol):
    """What the run folder and the session read of a recipe's configuration: its run settings, the model's
    precision, and how it writes itself (every recipe configuration has these)."""

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
    def to_toml(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


def default_name(label: str, source: str) -> str:
    """``<label>-<source>-<YYYYmmdd-HHMMSS>``: a run's folder name when none is given (label: the preset or the
    recipe; source: the task or the data file)."""
    return f"{label}-{source}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RunFolder:
    """One run's folder. Make it with `create` (a new run) or `existing` (a run to continue)."""

    def __init__(self, path: Path, is_main: bool):
        self.path = path
        self.is_main = is_main

    @classmethod
    def create(cls, output_dir: str, name: str, accelerator: Accelerator) -> RunFolder:
        """``output_dir/name``, created by the main process; every process gets the main process's `name`."""
        from accelerate.utils import broadcast_object_list

        names = broadcast_object_list([name]) if accelerator.num_processes > 1 else [name]
        path = Path(output_dir) / names[0]
        if checkpoint.latest(path) is not None:
            raise ConfigurationError(f"{path} already holds a run; continue it with --resume {path}, or choose another --run-name.")
        if (path / "summary.md").is_file():
            raise ConfigurationError(f"{path} already holds a finished run; choose another --run-name.")
        if accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        return cls(path, accelerator.is_main_process)

    @classmethod
    def existing(cls, path: str | os.PathLike[str], accelerator: Accelerator) -> RunFolder:
        """A run folder with at least one complete checkpoint, to continue."""
        folder = Path(path)
        if checkpoint.latest(folder) is None:
            raise ConfigurationError(f"--resume {folder}: no complete checkpoint under {folder / 'checkpoints'}.")
        return cls(folder, accelerator.is_main_process)

    # -- files -----------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            atomic_write(self.path / name, text)

    def write_jsonl(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        self.write_text(name, "".join(json.dumps(r) + "\n" for r in records))

    def append_jsonl(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        if self.is_main:
            with open(self.path / name, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in records)

    def write_config(self, config: RunSettings) -> None:
        """``config.toml`` (rerun with ``--config``) and ``config.json`` (what ``--resume`` reads)."""
        self.write_text("config.toml", config.to_toml())
        self.write_text("config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))

    # -- metrics ---------------------------------------------------------------------------------
    def history(self, upto: int | None = None) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (those of steps up to `upto` when given)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if upto is None or r.get("step", 0) <= upto]

    def start_metrics(self, history: list[dict[str, Any]]) -> None:
        """Begin ``metrics.jsonl`` with `history` (the steps a resumed run keeps; empty for a new run)."""
        self.write_jsonl("metrics.jsonl", history)

    # -- evaluations -----------------------------------------------------------------------------
    def store_eval(self, label: str, result: Mapping[str, Any]) -> None:
        """Record an evaluation under `label` in ``eval.json`` (``before``, ``after``, ``pairs_before``, ...)."""
        if self.is_main:
            path = self.path / "eval.json"
            data = json.loads(path.read_text()) if path.is_file() else {}
            data[label] = dict(result)
            atomic_write(path, json.dumps(data, indent=2))

    def load_eval(self, label: str) -> dict[str, Any] | None:
        path = self.path / "eval.json"
        if not path.is_file():
            return None
        found: dict[str, Any] | None = json.loads(path.read_text()).get(label)
        return found

    def write_summary(self, table: str) -> None:
        """``summary.md``, and the table printed (by the main process)."""
        if self.is_main:
            self.write_text("summary.md", table + "\n")
            print(table)
