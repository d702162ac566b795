"""The optimisation step every recipe shares: accumulation, clipping, skipping non-finite updates, the schedule.

One update::

    for each micro-batch: loss = loss_of(micro-batch)   (already its share: normalised by the caller over
                          accelerator.backward(loss)      the whole update, e.g. the objective's global count)
                                                          gradient sync only on the last micro-batch (DDP)
    clip the global gradient norm (max_grad_norm; 0 = no clipping, the norm is still measured)
    loss and norm finite on every process?  AdamW step and schedule step  :  skip, count, zero the gradients
    K skipped updates in a row (max_nonfinite) raise `NonFiniteUpdates`; the recipe's loop checkpoints first

The learning-rate schedule is transformers' (``constant`` with warm-up, ``linear``, ``cosine``) over a
horizon of optimiser updates fixed when the run starts; the horizon is saved with the optimiser, so a
resumed run with more ``--steps`` continues the same curve instead of stretching it.

With fp16 (`proxim.train.distributed.loss_scaling`) accelerate scales the loss in ``backward`` and unscales
the gradients before clipping; an update whose loss is finite but whose scaled gradients overflowed is
the scaler's to handle (it skips the step and lowers its scale), so it is skipped and counted but does not
count towards ``max_nonfinite`` while the scale is at least 1. Sharded (FSDP2) models are prepared by
`proxim.train.sharding`, and the optimiser's state dict is gathered to full tensors for checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import torch
from torch import nn

from proxim.errors import TrainingError
from proxim.train import sharding

if TYPE_CHECKING:
    from accelerate import Accelerator

    from proxim.train.step_sections import Optimizer

_M = TypeVar("_M")

#: The ``lr_schedule`` setting -> the transformers scheduler (each with linear warm-up).
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class NonFiniteUpdates(TrainingError):
    """Too many optimiser updates in a row had a non-finite loss or gradient."""


@attrs.frozen
class Update:
    """One optimiser update: the summed micro-batch losses and the gradient norm (None when it was skipped)."""

    loss: torch.Tensor
    grad_norm: float | None

    @property
    def skipped(self) -> bool:
        return self.grad_norm is None


class Optimization:
    """AdamW over parameter groups, its learning-rate schedule, and the update rule above.

    groups: ``[{"params": [...], "lr": ...}, ...]`` (one per model: policy, critic). horizon: optimiser
    updates the schedule spans. Call `prepare` once with the run's models (accelerate wraps them and the
    optimiser), then `update` for each update. local: this process trains alone while the others wait (the
    warm start): nothing is wrapped or synchronised across processes.
    """

    def __init__(self, accelerator: Accelerator, groups: list[dict[str, Any]], settings: Optimizer, horizon: int, local: bool = False):
        self.accelerator = accelerator
        self.local = local
        self.settings = settings
        self.optimizer: Any = torch.optim.AdamW(
            groups, betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps, weight_decay=settings.weight_decay
        )
        self.horizon = horizon
        self.scheduler = self._schedule(horizon)
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.models: tuple[nn.Module, ...] = ()

    def _schedule(self, horizon: int) -> Any:
        from transformers import get_scheduler

        return get_scheduler(
            SCHEDULES[self.settings.lr_schedule], self.optimizer, num_warmup_steps=self.settings.warmup_updates, num_training_steps=max(horizon, 1)
        )

    def prepare(self, *models: _M) -> tuple[_M, ...]:
        """Let accelerate place and wrap `models` and the optimiser (DDP, FSDP2, mixed precision); returns the wrapped models."""
        if sharding.is_sharded(self.accelerator):
            sharded, self.optimizer = sharding.prepare(self.accelerator, list(models), self.optimizer)  # type: ignore[arg-type]
            wrapped: list[Any] = list(sharded)
        else:
            *wrapped, self.optimizer = self.accelerator.prepare(*models, self.optimizer)
        self.models = tuple(wrapped)
        return tuple(wrapped)

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group, as the next update will use it."""
        return float(self.scheduler.get_last_lr()[0])

    def update(self, micro_batches: Sequence[_M], loss_of: Callable[[_M], torch.Tensor]) -> Update:
        """Accumulate `loss_of` over `micro_batches`, then clip and step (or skip a non-finite update); see the module docstring."""
        acc = self.accelerator
        if not micro_batches:
            raise ValueError("an update needs at least one micro-batch")
        total: torch.Tensor | None = None
        for k, micro in enumerate(micro_batches):
            with contextlib.ExitStack() as stack:
                if k < len(micro_batches) - 1:  # gradients are synchronised once, on the last micro-batch
                    for model in self.models:
                        stack.enter_context(acc.no_sync(model))
                loss = loss_of(micro)
                if self.local:
                    torch.autograd.backward(loss)
                else:
                    acc.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return Update(total, self._step(total))

    def _step(self, loss: torch.Tensor) -> float | None:
        acc, settings = self.accelerator, self.settings
        max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
        if self.local:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        elif sharding.is_sharded(acc):
            acc.unscale_gradients()  # (fp16: the loss scaler's; nothing otherwise)
            grad_norm = sharding.clip_grad_norm(self.parameters, max_norm)
        else:
            grad_norm = acc.clip_grad_norm_(self.parameters, max_norm)
        # [gradient and loss finite, loss finite] on every process
        flags = torch.stack([torch.isfinite(torch.as_tensor(grad_norm, device=loss.device)) & torch.isfinite(loss), torch.isfinite(loss)]).float()
        if acc.num_processes > 1 and not self.local:
            flags = acc.reduce(flags, reduction="min")
        ok, loss_finite = bool(flags[0] > 0), bool(flags[1] > 0)
        scaler = acc.scaler if not self.local else None
        if ok:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_streak = 0
        else:
            if scaler is not None:  # fp16: the loss scaler skips the step itself and lowers its scale
                self.optimizer.step()
            self.nonfinite_total += 1
            if not (scaler is not None and loss_finite and scaler.get_scale() >= 1.0):  # not an overflow the scaler handles
                self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_streak >= settings.max_nonfinite:
            raise NonFiniteUpdates(
                f"{self.nonfinite_streak} optimiser updates in a row had a non-finite loss or gradient; stopped. "
                "Lower the learning rate, check the rewards or the data, or raise max_nonfinite."
            )
        return float(grad_norm) if ok else None

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimisation state; with sharded models every process must call it (the optimiser's states are
        gathered to full tensors, which only the main process keeps: `proxim.train.sharding.full_tensors`)."""
        optimizer = self.optimizer.state_dict()
        if sharding.is_sharded(self.accelerator) and not self.local:
            optimizer = sharding.full_tensors(optimizer, keep=self.accelerator.is_main_process)
        return {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "horizon": self.horizon,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_streak": self.nonfinite_streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state, its schedule horizon included (the schedule continues the saved curve)."""
        self.horizon = int(state["horizon"])
        self.scheduler = self._schedule(self.horizon)  # before the optimiser's state: building a schedule resets the groups' lr
        optimizer = state["optimizer"]
        if sharding.is_sharded(self.accelerator) and not self.local:
            optimizer = sharding.shard_optimizer_state(optimizer, self.optimizer)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_streak = int(state["nonfinite_streak"])


def parameter_groups(models: Iterable[tuple[nn.Module, float]]) -> list[dict[str, Any]]:
    """One AdamW parameter group per (model, learning rate), with the model's trainable parameters."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr} for model, lr in models]
