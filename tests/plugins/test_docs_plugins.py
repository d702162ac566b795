"""docs/plugins.md stays true: its embedded proxim-hello files are the tested package, and it documents
every hook (with every argument), every conformance check and every property."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from proxim import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plugins.md"
HELLO = ROOT / "contrib" / "proxim-hello"
IGNORED = {"__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}

# <!-- file: PATH --> on the line before a fenced block (``` or ````) embeds PATH verbatim.
EMBED = re.compile(r"^<!-- file: (?P<path>\S+) -->\n(?P<fence>`{3,})[^\n]*\n(?P<body>.*?)\n(?P=fence)$", re.M | re.S)


def _embedded() -> dict[str, str]:
    return {m["path"]: m["body"] for m in EMBED.finditer(DOC.read_text())}


def _package_files() -> list[Path]:
    return sorted(p for p in HELLO.rglob("*") if p.is_file() and not any(part in IGNORED or part.endswith(".egg-info") for part in p.relative_to(HELLO).parts))


def test_every_proxim_hello_file_is_embedded() -> None:
    embedded = _embedded()
    files = [str(p.relative_to(ROOT)) for p in _package_files()]
    assert files, "contrib/proxim-hello is missing"
    assert sorted(embedded) == files, "docs/plugins.md must embed exactly the files of contrib/proxim-hello"


@pytest.mark.parametrize("path", sorted(_embedded()))
def test_embedded_block_equals_the_file(path: str) -> None:
    assert _embedded()[path] == (ROOT / path).read_text().rstrip("\n"), f"docs/plugins.md shows an outdated {path}"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^#{1,3} ", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + (following.start() if following else len(text))]


@pytest.mark.parametrize("hook", list(hookspecs.HOOKS.values()))
def test_every_hook_is_documented_with_its_arguments(hook: str) -> None:
    text = DOC.read_text()
    arguments = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    heading = f"### `{hook}({', '.join(arguments)})`"
    assert heading in text, f"docs/plugins.md has no section {heading!r}"
    section = _section(text, heading)
    for argument in arguments:
        assert f"- `{argument}`:" in section, f"{hook}: argument {argument!r} is not described"


def test_every_check_and_property_is_documented() -> None:
    from proxim.testing import CHECKS, PROPERTIES

    text = DOC.read_text()
    missing = [name for name in [*CHECKS, *PROPERTIES] if f"| `{name}` |" not in text]
    assert missing == [], f"docs/plugins.md does not list {missing}"


def test_the_compatibility_promise_is_stated() -> None:
    section = _section(DOC.read_text(), "## Compatibility promise")
    assert "Hook specs may gain arguments; plugins keep working." in section
