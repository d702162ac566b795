"""Parity with verl 0.9.x and TRL 1.16.x on identical random float64 tensors (docs/parity.md).

The peers live in their own environment (see docs/parity.md for the install lines). Without them every
test here is skipped with the reason, so the main suite stays green; nothing imports a peer at module
level. Fixtures:

  core_algos   verl.trainer.ppo.core_algos (skips when verl is absent)
  actor_config factory for verl's ActorConfig, which every verl policy loss reads its settings from
  trl_loss     factory calling TRL's real GRPOTrainer._compute_loss through a minimal stub trainer
               (the harness itself is peers/trl_harness.py, shared with the benchmarks)

Random batches and the comparison helpers are in `_helpers.py`.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

VERL_MISSING = "verl 0.9.x is not installed: parity tests run in the peer environment (docs/parity.md)"
TRL_MISSING = "trl 1.16.x is not installed: parity tests run in the peer environment (docs/parity.md)"


def _import(name: str, reason: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{reason} ({exc})")


@pytest.fixture(scope="session")
def core_algos() -> Any:
    module = _import("verl.trainer.ppo.core_algos", VERL_MISSING)
    version = getattr(importlib.import_module("verl"), "__version__", "?")
    if not str(version).startswith("0.9."):
        pytest.skip(f"parity is pinned to verl 0.9.x, found {version}")
    return module


@pytest.fixture(scope="session")
def actor_config(core_algos: Any) -> Callable[..., Any]:
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    def make(
        loss_mode: str = "vanilla",
        clip_ratio: float = 0.2,
        clip_ratio_low: float | None = None,
        clip_ratio_high: float | None = None,
        clip_ratio_c: float = 3.0,
        loss_agg_mode: str = "token-mean",
        **extra: Any,
    ) -> Any:
        return ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=1,
            clip_ratio=clip_ratio,
            clip_ratio_low=clip_ratio_low,
            clip_ratio_high=clip_ratio_high,
            clip_ratio_c=clip_ratio_c,
            loss_agg_mode=loss_agg_mode,
            policy_loss=PolicyLossConfig(loss_mode=loss_mode),
            **extra,
        )

    return make


def _load_trl_harness() -> Any:
    """``peers/trl_harness.py`` at the repository root, loaded by file path. The stub-trainer harness is
    shared with the benchmarks (benchmarks/_common.py) and lives outside both, so that tests never import
    from benchmarks (nor benchmarks from tests); it is not part of the package, hence no regular import."""
    path = Path(__file__).resolve().parents[2] / "peers" / "trl_harness.py"
    spec = importlib.util.spec_from_file_location("proxim_peers_trl_harness", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def trl_loss() -> Callable[..., torch.Tensor]:
    """``trl_loss(loss_type, logprobs, old, advantages, mask, ref=None, beta=0.0, ..., **grpo_config) -> loss``.

    Runs TRL's own ``GRPOTrainer._compute_loss`` (the stub-trainer harness in peers/trl_harness.py): the object is
    made without ``__init__``, the attributes the method reads are set from a real ``GRPOConfig``, and the
    model call that would produce per-token log-probs returns `logprobs` (a leaf with grad) instead.
    """
    trl = _import("trl", TRL_MISSING)
    if not trl.__version__.startswith("1.16."):
        pytest.skip(f"the TRL harness is pinned to trl 1.16.x (private attributes), found {trl.__version__}")
    harness = _load_trl_harness()

    outdir = tempfile.mkdtemp(prefix="proxim-parity-")

    def run(
        loss_type: str,
        logprobs: torch.Tensor,
        old: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref: torch.Tensor | None = None,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        use_bias_correction_kl: bool = False,
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        num_items_in_batch: torch.Tensor | None = None,
        delta: float | None = None,
        **config: Any,
    ) -> torch.Tensor:
        loss = harness.grpo_loss(
            loss_type,
            output_dir=outdir,
            use_cpu=True,
            max_completion_length=max_completion_length or mask.shape[1],
            beta=beta,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            use_bias_correction_kl=use_bias_correction_kl,
            importance_sampling_level=importance_sampling_level,
            delta=delta,
            **config,
        )
        return loss(logprobs, harness.grpo_inputs(mask, advantages, old, ref=ref, num_items_in_batch=num_items_in_batch))

    return run
