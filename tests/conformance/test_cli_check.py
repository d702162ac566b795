"""``proxim check``: every installed part through the kit; a non-zero exit naming each failing part and check."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxim.cli import main

from ..core import fakedist

SLOPPY = """
from typing import ClassVar
import attrs, proxim

@attrs.frozen
class Sloppy(proxim.TrustRegion):
    name: ClassVar[str] = "sloppy"

    def __call__(self, logprobs, anchor, advantages, mask):
        sequence = (logprobs - anchor).mean(dim=1, keepdim=True).clamp(-20, 20)  # counts padding
        return proxim.RegionOutput(loss=-sequence.exp().expand_as(advantages) * advantages)

@proxim.hookimpl
def proxim_register_regions(register):
    register(Sloppy)
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PROXIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("PROXIM_BLOCK_PLUGINS", "hello,sapo,opo")  # the contrib packages, when installed
    monkeypatch.delenv("PROXIM_TESTING_DEVICE", raising=False)
    return tmp_path


def test_check_passes_on_builtins_and_names_each_failure(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fakedist.install(site, "proxim-sloppy", "1.0", {"sloppy": SLOPPY, "broken": "raise RuntimeError('boom')\n"})
    code = main(["check", "--kind", "region", "--max-examples", "5", "clip", "sloppy"])
    out = capsys.readouterr().out
    assert code == 1
    assert "proxim check: 2 parts, 5 hypothesis examples per check" in out
    assert "region clip (ppo: proxim 0.1.0)  ok, 13 checks" in out
    assert "region sloppy (sloppy: proxim-sloppy 1.0)  FAILED masked_positions_ignored" in out
    assert "    region 'sloppy' fails masked_positions_ignored: with padded (masked) inputs set to" in out
    assert "Failing test case" in out or "Falsifying example" in out, "the shrunk example is shown"
    assert "plugin broken (proxim-sloppy 1.0)  BROKEN, its parts were not checked: plugin 'broken'" in out and "RuntimeError: boom" in out
    assert out.rstrip().endswith("2 failed (21 checks run):\n  region sloppy: masked_positions_ignored\n  plugin broken: failed to load")


def test_check_exits_zero_when_everything_passes(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--max-examples", "3", "group_mean", "gae"]) == 0
    out = capsys.readouterr().out
    assert "baseline group_mean (grpo: proxim 0.1.0)  ok, 11 checks" in out and "advantage gae (ppo: proxim 0.1.0)  ok, 9 checks" in out
    assert out.rstrip().endswith("all 20 checks passed on 2 parts.")


def test_check_unknown_name_suggests(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "quadratik"]) == 2
    assert "proxim check: no part named 'quadratik'. Did you mean 'quadratic'?" in capsys.readouterr().out
    assert main(["check", "--kind", "baseline", "clip"]) == 2
    assert "proxim check: no baseline named 'clip'." in capsys.readouterr().out
