"""Non-finite losses skip the update and are counted; K in a row stop the run with a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch
from safetensors.torch import load_file

import proxim
from proxim.train import TrainingError, train

CALLS: list[int] = []


@attrs.frozen
class NaNRegion(proxim.TrustRegion):
    """Plain policy gradient, except that calls listed in `bad` return NaN."""

    name: ClassVar[str] = "nan_region"
    bad: tuple[int, ...] = ()

    def __call__(self, logprobs, anchor, advantages, mask):
        CALLS.append(1)
        loss = -advantages * logprobs
        if len(CALLS) - 1 in self.bad:
            loss = loss * float("nan")
        return proxim.RegionOutput(loss=loss)


def _objective(bad: tuple[int, ...]) -> proxim.Objective:
    CALLS.clear()
    return proxim.objective(advantage="group_normalized", region=NaNRegion(bad=bad))


def _lowercase(prompts, completions, **batch):
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def test_one_bad_update_is_skipped_and_counted(tiny_config) -> None:
    result = train(tiny_config(steps=3, max_nonfinite=2), objective=_objective(bad=(0,)), rewards=[_lowercase])
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["optim/skipped"] for h in history] == [1.0, 0.0, 0.0]
    assert [h["optim/skipped_total"] for h in history] == [1.0, 1.0, 1.0]


def test_k_bad_updates_in_a_row_stop_the_run_with_a_checkpoint(tiny_config) -> None:
    config = tiny_config(steps=5, max_nonfinite=2)
    with pytest.raises(TrainingError, match="2 optimiser updates in a row had a non-finite loss"):
        train(config, objective=_objective(bad=tuple(range(100))), rewards=[_lowercase])
    run = config.output_dir + "/run"
    latest = Path(run, "checkpoints", "latest").read_text().strip()
    saved = load_file(f"{run}/checkpoints/{latest}/model.safetensors")
    initial = load_file(f"{run}/init/model.safetensors")
    # every update was skipped, so the checkpointed weights are still the initial ones
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in saved)
