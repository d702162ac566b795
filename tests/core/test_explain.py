"""`proxim.explain`: a region's per-token loss and d loss / d logprob against the ratio, checked by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import attrs
import pytest

import proxim
from proxim.explain import explain, write


def _at(curves, advantage: float, ratio: float, anchor_prob: float | None = None):
    for c in curves.curves:
        if c.advantage == advantage and (anchor_prob is None or c.anchor_prob == anchor_prob):
            k = min(range(len(c.ratios)), key=lambda i: abs(c.ratios[i] - ratio))
            assert abs(c.ratios[k] - ratio) < 1e-12, "the grid holds the ratio"
            return c.loss[k], c.grad[k]
    raise AssertionError("no such curve")


def test_ppo_clip_by_hand() -> None:
    # loss = -min(r A, clip(r, 0.8, 1.2) A) with r = exp(logprob - anchor), so d loss / d logprob = -A r where the
    # unclipped term is the minimum, and 0 where the clipped one is (the token sends no gradient).
    curves = explain(proxim.default_registry().get("region", "clip")(), points=3, ratios=(0.5, 2.0))  # grid 0.5, 1, 2
    assert not curves.depends_on_anchor and len(curves.curves) == 2
    assert _at(curves, 1.0, 0.5) == pytest.approx((-0.5, -0.5))  # A > 0, r < 1 - eps: unclipped
    assert _at(curves, 1.0, 2.0) == pytest.approx((-1.2, 0.0))  # A > 0, r > 1 + eps: clipped, no gradient
    assert _at(curves, -1.0, 0.5) == pytest.approx((0.8, 0.0))  # A < 0, r < 1 - eps: clipped
    assert _at(curves, -1.0, 2.0) == pytest.approx((2.0, 2.0))  # A < 0, r > 1 + eps: unclipped, -A r = r
    assert _at(curves, 1.0, 1.0) == pytest.approx((-1.0, -1.0))


def test_no_region_is_the_importance_weighted_gradient() -> None:
    curves = explain(proxim.default_registry().get("region", "none")(), points=5, ratios=(0.5, 2.0))
    for c in curves.curves:
        for r, loss, grad in zip(c.ratios, c.loss, c.grad):
            assert loss == pytest.approx(-c.advantage * r) and grad == pytest.approx(-c.advantage * r)


def test_an_anchor_dependent_region_is_shown_at_several_anchor_probabilities() -> None:
    # DPPO (binary TV, delta 0.15): a token is masked when A > 0 and p - mu > 0.15, with p = r mu.
    curves = explain(proxim.default_registry().get("region", "divergence_mask")(), points=4, ratios=(1.0, 1.5), anchor_probs=(0.1, 0.5))
    assert curves.depends_on_anchor and {c.anchor_prob for c in curves.curves} == {0.1, 0.5}
    assert _at(curves, 1.0, 1.5, anchor_prob=0.1)[1] == pytest.approx(-1.5)  # p - mu = 0.05: kept, g = -A r
    assert _at(curves, 1.0, 1.5, anchor_prob=0.5)[1] == 0.0  # p - mu = 0.25 > 0.15: masked


def test_a_third_party_region_without_the_metrics_keyword(tmp_path: Path) -> None:
    @attrs.frozen
    class Doubled(proxim.TrustRegion):
        name: ClassVar[str] = "doubled"

        def __call__(self, logprobs, anchor, advantages, mask):
            return proxim.RegionOutput(loss=-2.0 * advantages * (logprobs - anchor).exp())

    curves = explain(Doubled(), points=3)
    assert _at(curves, 1.0, 2.0) == pytest.approx((-4.0, -4.0))
    written = write([curves], tmp_path)
    assert {p.name for p in written} >= {"explain.csv", "explain.json"}
    data = json.loads((tmp_path / "explain.json").read_text())
    assert data[0]["region"] == "doubled" and len(data[0]["points"]) == 2 * 3
    assert (tmp_path / "explain.csv").read_text().splitlines()[0] == "region,advantage,anchor_prob,ratio,loss,grad"
    if (tmp_path / "doubled.png").exists():
        assert (tmp_path / "doubled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(*args: str) -> int:
    from proxim.cli import main

    return main(["explain", *args])


def test_the_command_writes_the_data_with_a_region_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # DRPO with delta 0.08: g = A r w with w = 1 - sign(A) (p - mu) / delta and p = r mu (docs/parts.md); the command
    # reports d loss / d logprob = -g. Grid r = 0.5, 1, 2.
    assert _cli("quadratic", "--set", "delta=0.08", "--points", "3", "--output", str(tmp_path)) == 0
    assert "depends on the anchor probability" in capsys.readouterr().out
    rows = json.loads((tmp_path / "explain.json").read_text())[0]["points"]
    grad = {(r["advantage"], r["anchor_prob"], round(r["ratio"], 9)): r["grad"] for r in rows}
    assert len(grad) == 2 * 3 * 3
    assert grad[1.0, 0.5, 2.0] == pytest.approx(-2.0 * (1 - 0.5 / 0.08))  # p = 1.0: 10.5, pulled back hard
    assert grad[1.0, 0.1, 2.0] == pytest.approx(-2.0 * (1 - 0.1 / 0.08))  # p = 0.2: 0.5
    assert grad[-1.0, 0.1, 0.5] == pytest.approx(0.5 * (1 - 0.05 / 0.08))  # p = 0.05, A < 0: 0.1875
    assert grad[1.0, 0.9, 1.0] == pytest.approx(-1.0)  # at the anchor every region gives -A
    assert (tmp_path / "explain.csv").read_text().count("\n") == 1 + 18


def test_the_command_names_the_problem_for_a_wrong_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("clip", "--set", "delta=0.1", "--output", str(tmp_path)) == 2
    assert "no region among clip has that hyperparameter" in capsys.readouterr().err
    assert _cli("clipp", "--output", str(tmp_path)) == 2
    assert "clipp" in capsys.readouterr().err
    assert not (tmp_path / "explain.csv").exists()
