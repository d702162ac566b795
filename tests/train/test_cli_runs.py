"""`proxim compare` and bringing your own prompts file and reward function, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import proxim
from proxim.cli import main
from proxim.train.prompts import RowSource

from .helpers import TINY_RUN_FLAGS

RUN_FLAGS = [*TINY_RUN_FLAGS, "--steps", "2"]
TINY_FLAGS = [*RUN_FLAGS, "--eval-size", "4"]


def test_compare_writes_one_table_and_one_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    presets = [p for p in ("grpo", "rloo") if p in proxim.available()["preset"]]
    if len(presets) < 2:
        pytest.skip("grpo and rloo are not both registered yet")
    # reverse: graded rewards, so that even the untrained tiny model has advantages, updates, and a ratio that moves
    assert main(["compare", *presets, *TINY_FLAGS, "--task", "reverse", "--output-dir", str(tmp_path), "--name", "cmp"]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    for p in presets:
        assert f"| {p} |" in table
        assert (tmp_path / "cmp" / p / "metrics.jsonl").is_file()
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["preset"] for r in rows] == presets
    assert all(r["regime"] == "2 passes of 4 minibatches per rollout" for r in rows)  # off-policy by default
    for r in rows:  # every update after a rollout's first is off-policy: the ratio has moved
        assert r["diagnostics"]["gradient/ratio_std"] > 0 and 0 <= r["diagnostics"]["gradient/zero_fraction_pos"] <= 1
    out = capsys.readouterr().out
    assert "| preset | accuracy before |" in out and "| preset | zero gradient, A > 0 | zero gradient, A < 0 |" in out


def test_compare_in_the_regime_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # On-policy (one pass, one minibatch) with recomputed old log-probs the ratio is exactly 1 at every update: no region clips or reweights anything.
    flags = [
        *TINY_FLAGS,
        "--task",
        "reverse",
        "--epochs",
        "1",
        "--minibatches",
        "1",
        "--old-logprobs",
        "recompute",
        "--output-dir",
        str(tmp_path),
        "--name",
        "on",
    ]
    assert main(["compare", "grpo", "drpo", *flags]) == 0
    rows = json.loads((tmp_path / "on" / "compare.json").read_text())
    for r in rows:
        assert r["regime"] == "1 pass of 1 minibatch per rollout"
        assert r["diagnostics"]["gradient/ratio_std"] == 0.0 and r["diagnostics"]["gradient/zero_fraction_pos"] == 0.0
        assert r["diagnostics"]["gradient/weight_mean"] == pytest.approx(1.0)


def test_prompts_file_and_reward_file(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}:", "target": w}) + "\n" for w in ["cat", "dog", "owl", "bee", "ant", "elk"] * 4))
    (tmp_path / "my_rewards.py").write_text(
        "def starts_right(prompts, completions, target, step, **batch):\n    return [float(c.startswith(t[0])) for c, t in zip(completions, target)]\n"
    )
    code = main(
        [
            "train",
            *RUN_FLAGS,
            "--task",
            "none",
            "--prompts-file",
            str(prompts),
            "--eval-size",
            "4",
            "--max-new-tokens",
            "4",
            "--rewards",
            f"{tmp_path / 'my_rewards.py'}:starts_right",
            "--reward-weights",
            "2",
            "--output-dir",
            str(tmp_path / "runs"),
            "--run-name",
            "own",
        ]
    )
    assert code == 0
    run = tmp_path / "runs" / "own"
    evaluated = [json.loads(line) for line in (run / "eval_after.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in evaluated] == ["say cat:", "say dog:", "say owl:", "say bee:"]  # the first rows are held out
    assert all(r["correct"] is None for r in evaluated)  # no task, so no accuracy
    assert "| accuracy | n/a | n/a |" in (run / "summary.md").read_text()
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reward"] == 2 * s["starts_right"] for s in samples)


def test_row_source_is_deterministic_and_keeps_held_out_rows_apart() -> None:
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(30)]
    source = RowSource(rows, seed=1, eval_size=5)
    assert [r["prompt"] for r in source.eval_rows()] == [f"p{i}" for i in range(5)]
    seen = [r["prompt"] for step in range(10) for r in source.batch(step, 0, 1, 5)]
    assert not {f"p{i}" for i in range(5)} & set(seen)
    assert set(seen[:25]) == {f"p{i}" for i in range(5, 30)}  # one pass covers every training row once
    again = RowSource(rows, seed=1, eval_size=5)
    assert [r["prompt"] for r in again.batch(3, 0, 1, 5)] == [r["prompt"] for r in source.batch(3, 0, 1, 5)]
    # two processes split a step's prompts exactly as one process takes them
    assert source.batch(2, 0, 2, 3) + source.batch(2, 1, 2, 3) == RowSource(rows, seed=1, eval_size=5).batch(2, 0, 1, 6)
