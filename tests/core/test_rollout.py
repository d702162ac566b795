"""Rollout validation: every bad input gets an error naming the tensor and the fix."""

from __future__ import annotations

import pytest
import torch

import proxim


def good(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "old_logprobs": -torch.rand(3, 4, dtype=torch.float64) - 0.01,
        "mask": torch.ones(3, 4, dtype=torch.bool),
        "rewards": torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64),
        "group": torch.tensor([0, 0, 1]),
    }
    fields.update(changes)
    return fields


def test_valid_batch_constructs() -> None:
    rollout = proxim.Rollout(**good())  # type: ignore[arg-type]
    assert rollout.batch_size == 3 and not rollout.token_rewards
    assert torch.equal(rollout.group_sizes(), torch.tensor([2, 2, 1]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"old_logprobs": -torch.rand(3)}, r"Rollout\.old_logprobs must be a \[B, T\] tensor, got shape \(3,\)"),
        ({"old_logprobs": torch.zeros(3, 4, dtype=torch.long)}, r"old_logprobs must be floating point, got dtype torch\.int64"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, r"Rollout\.mask must be a bool tensor of shape \(3, 4\)"),
        ({"mask": torch.ones(3, 4)}, r"Rollout\.mask must have dtype torch\.bool, got torch\.float32; convert with mask\.bool\(\)"),
        ({"rewards": torch.ones(4)}, r"Rollout\.rewards has shape \(4,\).*expected \[B\] = \(3,\) sequence rewards or \[B, T\] = \(3, 4\)"),
        ({"rewards": [1.0, 2.0, 3.0]}, r"Rollout\.rewards must be a torch\.Tensor, got list"),
        ({"rewards": torch.tensor([1.0, float("nan"), 0.0])}, r"Rollout\.rewards holds NaN or inf \(first bad positions \[1\]\)"),
        ({"rewards": torch.tensor([1.0, float("inf"), 0.0])}, r"Rollout\.rewards holds NaN or inf"),
        ({"rewards": torch.tensor([1, 0, 1])}, r"Rollout\.rewards must be floating point, got dtype torch\.int64"),
        ({"group": torch.tensor([0.0, 0.0, 1.0])}, r"Rollout\.group must hold integer prompt ids, got dtype torch\.float32; convert with \.long\(\)"),
        ({"group": torch.tensor([0, 1])}, r"Rollout\.group must be a \[B\] = \(3,\) tensor of prompt ids"),
        ({"old_logprobs": torch.full((3, 4), 0.5, dtype=torch.float64)}, r"Rollout\.old_logprobs holds a log-probability above 0 \(max 0\.5\).*not logits"),
        ({"ref_logprobs": -torch.rand(3, 3)}, r"Rollout\.ref_logprobs has shape \(3, 3\).*old_logprobs has shape \(3, 4\)"),
        ({"values": torch.full((3, 4), float("nan"))}, r"Rollout\.values holds NaN or inf at positions where mask is True"),
    ],
)
def test_bad_input_names_the_tensor(changes: dict[str, object], message: str) -> None:
    with pytest.raises(proxim.BatchError, match=message):
        proxim.Rollout(**good(**changes))  # type: ignore[arg-type]


def test_padding_may_hold_anything() -> None:
    old = -torch.rand(2, 3, dtype=torch.float64)
    old[0, 2] = float("nan")
    values = torch.zeros(2, 3, dtype=torch.float64)
    values[1, 0] = float("inf")
    mask = torch.tensor([[True, True, False], [False, True, True]])
    rewards = torch.tensor([[0.0, 1.0, float("nan")], [float("inf"), 0.0, 2.0]])
    proxim.Rollout(old_logprobs=old, mask=mask, rewards=rewards.double(), values=values)


def test_batch_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        proxim.Rollout(**good(rewards=torch.tensor([1.0, float("nan"), 0.0])))  # type: ignore[arg-type]
