"""What a person watching a run sees: progress messages, the progress bar, and the before/after tables."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any


def pct(x: float | None) -> str:
    """``86.0%``, or ``n/a`` for a number that does not exist (no task, no accuracy)."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def number(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def before_after_table(title: str, rows: Sequence[tuple[str, str, str]], footer: str) -> str:
    """A markdown table of (metric, before, after) rows under `title`, with a `footer` line."""
    lines = [title, "", "| metric | before | after |", "| --- | ---: | ---: |"]
    lines += [f"| {metric} | {before} | {after} |" for metric, before, after in rows]
    return "\n".join([*lines, "", footer])


class Progress:
    """A tqdm progress bar on stderr and messages that do not break it, on the main process; silent when `quiet`
    (but for `notice`: what the person must know, such as how to resume an interrupted run)."""

    def __init__(self, quiet: bool, is_main: bool):
        self.enabled = not quiet and is_main
        self.is_main = is_main
        self.bar: Any = None

    def notice(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    def start(self, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)

    def advance(self, postfix: Mapping[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(dict(postfix), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
