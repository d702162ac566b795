"""Writing the files of a run safely: whole files atomically (a temporary file beside it, then a rename), and
only inside the folder they belong to."""

from __future__ import annotations

import os
from pathlib import Path

from proxim.errors import ConfigurationError, TrainingError


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a reader sees the old file or the new one, never a part.

    A write that fails (a full disk, no permission) raises `TrainingError` naming the file; the old one stays."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TrainingError(f"could not write {path}: {exc.strerror or exc}; free space on that disk or choose another --output-dir.") from exc


def check_run_name(name: str) -> None:
    """A run name is one folder name: ``OUTPUT_DIR/name`` stays inside ``OUTPUT_DIR``."""
    if not name or name in (".", "..") or Path(name).is_absolute() or Path(name).name != name or "\\" in name:
        raise ConfigurationError(f"run_name={name!r} must be a single folder name (no '/', '..' or absolute path): run folders stay inside --output-dir.")
