"""``proxim check``: every installed part through the kit (or at given hyperparameters, ``--set``); a non-zero
exit naming each failing part and check, and each broken plugin."""

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
    masked: bool = True  # False: the sequence mean counts padding

    def __call__(self, logprobs, anchor, advantages, mask):
        lr = logprobs - anchor
        if self.masked:
            sequence = ((lr * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)).clamp(-20, 20)
        else:
            sequence = lr.mean(dim=1, keepdim=True).clamp(-20, 20)
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
    monkeypatch.delenv("PROXIM_STRICT_PLUGINS", raising=False)
    return tmp_path


def test_check_passes_on_builtins_and_names_each_failure(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fakedist.install(site, "proxim-sloppy", "1.0", {"sloppy": SLOPPY, "broken": "raise RuntimeError('boom')\n"})
    code = main(["check", "--kind", "region", "--max-examples", "5", "clip", "sloppy", "--set", "masked=False"])
    out = capsys.readouterr().out
    assert code == 1
    assert "proxim check: 2 parts, 5 hypothesis examples per check" in out
    assert "region clip (ppo: proxim 0.1.0)  ok, 13 checks" in out
    assert "region sloppy(masked=False) (sloppy: proxim-sloppy 1.0)  FAILED masked_positions_ignored" in out
    assert "    region 'sloppy(masked=False)' fails masked_positions_ignored: with padded (masked) inputs set to" in out
    assert "Failing test case" in out or "Falsifying example" in out, "the shrunk example is shown"
    assert "plugin broken (proxim-sloppy 1.0)  BROKEN, its parts were not checked: plugin 'broken'" in out and "RuntimeError: boom" in out
    assert "Traceback" not in out
    assert out.rstrip().endswith("2 failed (21 checks run):\n  region sloppy(masked=False): masked_positions_ignored\n  plugin broken: failed to load")
    assert main(["check", "--max-examples", "5", "sloppy"]) == 1, "the broken plugin still fails the run"
    assert "region sloppy (sloppy: proxim-sloppy 1.0)  ok, " in capsys.readouterr().out


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


def test_check_at_given_hyperparameters(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--max-examples", "3", "clip", "--set", "eps_low=0.1", "--set", "dual_clip=3.0"]) == 0
    out = capsys.readouterr().out
    # dual_clip makes clip claim bounded_weight: one check more than at the defaults' 13.
    assert "region clip(eps_low=0.1, dual_clip=3.0) (ppo: proxim 0.1.0)  ok, 14 checks" in out
    assert main(["check", "--max-examples", "3", "clip", "gae", "--set", "region.eps_low=0.1", "--set", "gae.lam=0.5"]) == 0
    out = capsys.readouterr().out
    assert "region clip(eps_low=0.1) (ppo: proxim 0.1.0)  ok" in out and "advantage gae(lam=0.5) (ppo: proxim 0.1.0)  ok" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["clip", "--set", "eps_lo=0.1"],
            "proxim check: --set 'eps_lo': no part being checked has a hyperparameter 'eps_lo'. Did you mean 'eps_low'? "
            "Hyperparameters — region 'clip': eps_low, eps_high, dual_clip.",
        ),
        (
            ["clip", "cispo", "--set", "eps_low=0.1"],
            "proxim check: --set 'eps_low' is ambiguous: 2 parts being checked have 'eps_low'; write one of 'cispo.eps_low', 'clip.eps_low'.",
        ),
        (
            ["clip", "--set", "baseline.eps=1"],
            "proxim check: --set 'baseline.eps': 'baseline' is neither the kind nor the name of a part being checked. Checked: region 'clip'.",
        ),
        (["clip", "--set", "eps_low=-1"], "proxim check: --set eps_low=-1: region 'clip': 'eps_low' must be >= 0.0: -1"),
    ],
)
def test_check_set_names_what_is_wrong(site: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["check", *args]) == 2
    assert capsys.readouterr().out.strip() == message


def test_check_set_needs_field_equals_value(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["check", "clip", "--set", "eps_low"])
    assert info.value.code == 2
    assert "argument --set: expected FIELD=VALUE (eps_low=0.1, or region.eps_low=0.1), got 'eps_low'" in capsys.readouterr().err
