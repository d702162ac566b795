"""Precision: the ``auto`` choice (CUDA queries monkeypatched), fp16's loss scaling wired through the
optimisation step (a real ``torch.amp.GradScaler``, which also runs on CPU), and the log-prob chunk's size
by bytes for a given vocabulary and dtype, derived by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from proxim.errors import ConfigurationError
from proxim.train.distributed import choose_precision, loss_scaling, resolved_precision
from proxim.train.logprobs import chunk_rows


@pytest.mark.parametrize(
    ("setting", "cuda", "bf16", "launcher", "expected"),
    [
        ("auto", True, True, None, "bf16"),  # an Ampere-or-later GPU
        ("auto", True, False, None, "no"),  # a V100 or T4: float32 unless fp16 is asked for
        ("auto", False, False, None, "no"),  # CPU
        ("auto", True, True, "no", "bf16"),  # the launcher's "no" is also its default: not a choice
        ("auto", True, True, "fp16", "fp16"),  # accelerate launch --mixed_precision fp16
        ("auto", False, False, "bf16", "bf16"),  # ... and bf16, also on CPU
        ("no", True, True, "bf16", "no"),  # an explicit setting overrides the launcher
        ("fp16", True, False, None, "fp16"),
        ("bf16", False, False, None, "bf16"),
    ],
)
def test_auto_precision(setting: str, cuda: bool, bf16: bool, launcher: str | None, expected: str) -> None:
    assert choose_precision(setting, cuda=cuda, bf16_supported=bf16, launcher=launcher) == expected


def test_fp16_needs_a_gpu_and_unknown_values_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"fp16.*needs a CUDA GPU.*mixed_precision='no'"):
        choose_precision("fp16", cuda=False, bf16_supported=False)
    with pytest.raises(ConfigurationError, match="needs a CUDA GPU"):
        choose_precision("auto", cuda=False, bf16_supported=False, launcher="fp16")
    with pytest.raises(ConfigurationError, match="expected one of auto, no, fp16, bf16"):
        choose_precision("fp32", cuda=False, bf16_supported=False)


def test_the_machine_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """`resolved_precision` asks torch.cuda what this machine has, and the environment what the launch asked for."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolved_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolved_precision("auto") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolved_precision("auto") == "fp16"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu on a GPU machine
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolved_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert resolved_precision("auto") == "no"


def test_loss_scaling_is_fp16_on_a_gpu_only() -> None:
    """accelerate creates its GradScaler exactly then (bf16 keeps float32's exponent range; none on CPU)."""
    assert loss_scaling("fp16", "cuda")
    assert not loss_scaling("bf16", "cuda")
    assert not loss_scaling("no", "cuda")
    assert not loss_scaling("fp16", "cpu")


class _Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))


@pytest.fixture
def fp16_accelerator(monkeypatch: pytest.MonkeyPatch):
    """This process's accelerator as fp16 leaves it on a GPU: native AMP, fp16, and a loss scaler (here torch's
    CPU GradScaler, the same class accelerate creates for CUDA), restored after the test."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    monkeypatch.setattr(acc, "native_amp", True)
    monkeypatch.setattr(acc.state, "_mixed_precision", "fp16")
    monkeypatch.setattr(acc, "scaler", torch.amp.GradScaler("cpu", init_scale=2.0**16))
    return acc


def test_fp16_updates_are_unscaled_and_overflows_are_the_scalers(fp16_accelerator) -> None:
    from proxim.train.optimization import NonFiniteUpdates, Optimization, parameter_groups
    from proxim.train.step_sections import Optimizer

    acc = fp16_accelerator
    model = _Weights()
    settings = Optimizer(max_grad_norm=0.0, max_nonfinite=1, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8)
    optimization = Optimization(acc, parameter_groups([(model, 0.1)]), settings, horizon=10)
    (prepared,) = optimization.prepare(model)
    x = torch.tensor([0.5, -1.0, 2.0])

    # loss = w . x: the gradient is x, scaled by 2**16 in backward and unscaled before the norm and the step
    update = optimization.update([0], lambda _: (prepared.w * x).sum())
    assert update.grad_norm == pytest.approx(math.sqrt(0.25 + 1.0 + 4.0), rel=1e-6)
    # AdamW's first step is lr * g / (|g| + eps): 0.1 against the sign of each gradient
    assert prepared.w.detach().tolist() == pytest.approx([1.0 - 0.1, -2.0 + 0.1, 3.0 - 0.1], abs=1e-6)
    assert acc.scaler.get_scale() == 2.0**16

    # a finite loss whose scaled gradient overflows (1e35 * 2**16 > float32's 3.4e38): the scaler skips the
    # step and halves its scale; the update is counted, but not towards max_nonfinite (1 here: it would raise)
    before = prepared.w.detach().clone()
    update = optimization.update([0], lambda _: (prepared.w * 1e35).sum())
    assert update.skipped and torch.equal(prepared.w.detach(), before)
    assert acc.scaler.get_scale() == 2.0**15
    assert (optimization.nonfinite_total, optimization.nonfinite_streak) == (1, 0)

    # a non-finite loss is no overflow: it counts, and max_nonfinite=1 stops the run
    with pytest.raises(NonFiniteUpdates, match="1 optimiser updates in a row"):
        optimization.update([0], lambda _: prepared.w.sum() * float("nan"))


@pytest.mark.parametrize(
    ("chunk", "vocab", "dtype", "device", "rows"),
    [
        # a GPU's budget is 2**30 bytes of logits, reduced in float32 (4 bytes) or wider
        (4096, 151936, torch.float32, "cuda", 1766),  # 1073741824 / (151936 * 4) = 1766.8
        (4096, 151936, torch.bfloat16, "cuda", 1766),  # bf16 logits are reduced in float32: the same
        (4096, 151936, torch.float64, "cuda", 883),  # 1073741824 / (151936 * 8) = 883.4
        (4096, 32000, torch.float32, "cuda", 4096),  # 8388.6 fit: the setting is smaller
        (4096, 151936, torch.float32, "xpu", 1766),  # another accelerator: the GPU's budget
        # the CPU's budget is 2**25 bytes (cache-sized), never below 256 positions
        (4096, 259, torch.float32, "cpu", 4096),  # 33554432 / (259 * 4) = 32388.4: the setting
        (4096, 32000, torch.float32, "cpu", 262),  # 33554432 / (32000 * 4) = 262.1
        (4096, 128256, torch.float32, "cpu", 256),  # 65.4, raised to the floor of 256
        (100, 128256, torch.float32, "cpu", 100),  # ... but never above the setting
    ],
)
def test_chunk_rows_by_bytes(chunk: int, vocab: int, dtype: torch.dtype, device: str, rows: int) -> None:
    assert chunk_rows(chunk, vocab, dtype, device) == rows
