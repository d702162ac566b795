"""What the verl and TRL integrations share. Imports torch and proxim only.

Both trainers hand stage 1 what they have at the time: verl's ``compute_advantage`` passes rewards,
the mask and the group ids, but not the old log-probs; TRL skips computing them when the update is
on-policy. Most advantages never read ``Rollout.old_logprobs``, but some do (``pairwise``'s confidence
weights, a KL folded into the reward), and would silently compute something else on placeholder
log-probs. `reads_old_logprobs` tells which, by running stage 1 twice on a small fixed batch.
"""

from __future__ import annotations

import functools

import torch

from proxim.composed import Objective
from proxim.errors import ProximError
from proxim.rollout import Rollout

__all__ = ["reads_old_logprobs"]

#: A fixed batch (no random numbers, so that probing never moves a trainer's RNG): 4 responses of one
#: prompt, 3 tokens each, distinct rewards, and two sets of old log-probs that differ from row to row.
_REWARDS = (1.0, 0.0, 2.0, 0.5)
_OLD = (
    ((-1.0, -1.0, -1.0), (-1.0, -1.0, -1.0), (-1.0, -1.0, -1.0), (-1.0, -1.0, -1.0)),
    ((-0.1, -0.2, -0.3), (-2.0, -1.0, -0.5), (-0.7, -0.7, -0.7), (-3.0, -0.1, -1.0)),
)


def reads_old_logprobs(objective: Objective) -> bool:
    """Whether stage 1 of `objective` depends on ``Rollout.old_logprobs``.

    Runs ``objective.advantages`` on one small fixed batch with two different sets of old log-probs and
    compares the advantages; every other field is the same in both. An objective whose stage 1 fails on
    that batch counts as reading them (the safe answer: the caller then supplies the real ones). Cached
    per objective.
    """
    return _probe(objective)


@functools.lru_cache(maxsize=64)
def _probe(objective: Objective) -> bool:
    rewards = torch.tensor(_REWARDS, dtype=torch.float64)
    shape = (len(_REWARDS), len(_OLD[0][0]))
    mask = torch.ones(shape, dtype=torch.bool)
    extra = {
        "values": torch.linspace(-0.5, 0.5, shape[0] * shape[1], dtype=torch.float64).reshape(shape),
        "ref_logprobs": torch.full(shape, -0.8, dtype=torch.float64),
        "rollout_logprobs": torch.full(shape, -0.9, dtype=torch.float64),
    }
    group = torch.zeros(shape[0], dtype=torch.long)
    try:
        first, second = (
            objective.advantages(Rollout(old_logprobs=torch.tensor(old, dtype=torch.float64), mask=mask, rewards=rewards, group=group, **extra)) for old in _OLD
        )
    except ProximError:
        return True
    return not torch.equal(first.advantages, second.advantages)
