"""Shared helpers for the parity tests: random float64 batches and close-enough checks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

import proxim

#: Values and gradients must agree within this (float64 everywhere).
TOL = {"atol": 1e-6, "rtol": 1e-6}


class Batch(SimpleNamespace):
    """Random float64 test tensors; ``rollout()`` wraps them for proxim."""

    def rollout(self, rewards: torch.Tensor | None = None, **extra: Any) -> proxim.Rollout:
        return proxim.Rollout(
            old_logprobs=self.old,
            mask=self.mask,
            rewards=self.rewards if rewards is None else rewards,
            group=self.group,
            ref_logprobs=self.ref,
            **extra,
        )

    def leaf(self) -> torch.Tensor:
        """A fresh copy of the current log-probs that requires grad."""
        return self.logp.clone().requires_grad_(True)


def make_batch(
    seed: int = 0, sizes: tuple[int, ...] = (4, 3, 5, 4), t: int = 11, spread: float = 0.35, empty_row: bool = False, token_advantages: bool = True
) -> Batch:
    """A batch with right padding and a few masked positions inside rows (multi-turn observation tokens)."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    group = torch.repeat_interleave(torch.arange(len(sizes)) * 7 + 3, torch.tensor(sizes))
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    holes = torch.rand(b, t, generator=g) < 0.1
    holes[:, 0] = False
    mask = mask & ~holes
    if empty_row:
        mask[1] = False
    # Token probabilities spread over (0.02, 0.98) so that TV and binary-KL masks trigger on both sides.
    old = torch.empty(b, t, dtype=torch.float64).uniform_(0.02, 0.98, generator=g).log()
    logp = (old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    ref = (old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).clamp(max=-1e-4)
    rewards = torch.randn(b, generator=g, dtype=torch.float64)
    if token_advantages:
        adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    adv = torch.where(mask, adv, torch.zeros((), dtype=torch.float64))
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    return Batch(old=old, logp=logp, ref=ref, mask=mask, group=group, rewards=rewards, adv=adv, values=values)


def grad(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}" if what else m)


def proxim_loss(batch: Batch, leaf: torch.Tensor, region: str, adv: torch.Tensor | None = None, **settings: Any) -> proxim.LossOutput:
    """Stage 2 through proxim's public API: compose an objective around `region`, call ``loss``.

    `settings` are routed like ``proxim.objective`` overrides (region hyperparameters and options such as
    ``aggregation``, ``kl_coef``, ``max_length``). KL is off unless asked for.
    """
    settings.setdefault("kl_coef", 0.0)
    obj = proxim.objective(advantage="group_normalized", region=region, **settings)
    return obj.loss(leaf, batch.rollout(), proxim.Estimate(advantages=batch.adv if adv is None else adv))


#: proxim aggregation name -> verl loss_agg_mode.
VERL_AGG = {
    "token_mean": "token-mean",
    "seq_mean_token_mean": "seq-mean-token-mean",
    "seq_mean_token_sum": "seq-mean-token-sum",
    "seq_mean_token_sum_norm": "seq-mean-token-sum-norm",
}
