"""TRL 1.16's ``GRPOTrainer._compute_loss`` driven on given log-probs through a stub trainer (docs/parity.md).

Shared by the parity tests (``tests/parity/conftest.py``, fixture ``trl_loss``) and the benchmarks
(``benchmarks/_common.py``, ``trl_grpo_loss``). It lives here, outside both, so that neither imports the
other. It is not part of the ``proxim`` package and is never installed: both load it by file path
(``importlib.util.spec_from_file_location``). It reads TRL's private attributes, so it is pinned to
trl 1.16.x; it imports only torch at load time, trl when called.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch


class _Accelerator:
    """The few ``accelerate.Accelerator`` members ``_compute_loss`` touches, for one process."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x: Any) -> Any:
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x: Any, reduction: str = "sum") -> Any:
        return x


def grpo_loss(
    loss_type: str, *, output_dir: str, use_cpu: bool, max_completion_length: int, **config: Any
) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """``loss(logprobs, inputs)`` running TRL's own ``GRPOTrainer._compute_loss``.

    The trainer is made without ``__init__`` and the attributes the method reads are set from a real
    ``GRPOConfig(output_dir=..., bf16=False, report_to="none", use_cpu=..., loss_type=...,
    max_completion_length=..., **config)``. The model call that would produce per-token log-probs
    returns `logprobs` instead (entropies: zeros, made on the first call). Built once; each call runs
    only TRL's loss code, metrics included as in training, and then empties the metric lists so they do
    not grow over repeated calls. `inputs` is the batch dict ``_compute_loss`` reads (see `grpo_inputs`).
    """
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=output_dir, bf16=False, report_to="none", use_cpu=use_cpu, loss_type=loss_type, max_completion_length=max_completion_length, **config
    )
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.args = args
    trainer.loss_type = args.loss_type
    trainer.beta = args.beta
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer.model = SimpleNamespace(training=True)
    trainer.current_gradient_accumulation_steps = 1
    trainer.max_completion_length = args.max_completion_length
    trainer._entropy_bonus_enabled = False
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.accelerator = _Accelerator()
    current: dict[str, torch.Tensor] = {}
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (current["logps"], current["entropy"], None)

    def loss(logps: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        current["logps"] = logps
        current.setdefault("entropy", torch.zeros_like(logps.detach()))
        out = trainer._compute_loss(None, inputs)
        for series in trainer._metrics["train"].values():  # keep the metric lists from growing
            series.clear()
        return out

    return loss


def grpo_inputs(
    mask: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The batch dict ``_compute_loss`` reads, on `mask`'s device: a one-token dummy prompt, dummy completion
    ids, `mask` as the completion mask, per-sequence `advantages` [B], `old` (and `ref`) per-token log-probs
    [B, T]; ``num_items_in_batch`` defaults to the number of unmasked tokens."""
    b, t = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long, device=mask.device),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long, device=mask.device),
        "completion_ids": torch.zeros(b, t, dtype=torch.long, device=mask.device),
        "completion_mask": mask.to(torch.long),
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else num_items_in_batch,
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return inputs
