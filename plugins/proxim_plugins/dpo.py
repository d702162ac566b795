"""Offline preference losses: DPO (arXiv 2305.18290), IPO (arXiv 2310.12036) and the SLiC hinge (arXiv 2305.10425).

Registers the preference losses ``dpo``, ``ipo`` and ``hinge``. Each takes the implicit rewards'
log-ratios h_w = log pi(y_w|x) - log pi_ref(y_w|x) and h_l (sequence log-probs, summed over tokens).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch.nn.functional as F
from torch import Tensor

import proxim
from proxim_plugins.validators import between, gt


@attrs.frozen
class DPO(proxim.Preference):
    """DPO's sigmoid loss (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    z = beta (h_w - h_l);  L = -(1 - s) log sigmoid(z) - s log sigmoid(-z)  (s = label_smoothing; s = 0 is DPO,
    s > 0 the conservative cDPO of Mitchell 2023). grad L = -beta sigmoid(-z) (grad h_w - grad h_l) at s = 0.
    Hyperparameters: beta 0.1 > 0 (TRL's default; the paper used 0.1-0.5), label_smoothing 0.0 in [0, 0.5).
    Shapes: [B] in, [B] out.
    """

    name: ClassVar[str] = "dpo"

    beta: float = attrs.field(default=0.1, validator=gt(0.0))
    label_smoothing: float = attrs.field(default=0.0, validator=between(0.0, 0.5, high_open=True))

    def __call__(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        z = self.beta * (chosen - rejected)
        return (1 - self.label_smoothing) * F.softplus(-z) + self.label_smoothing * F.softplus(z)


@attrs.frozen
class IPO(proxim.Preference):
    """IPO's squared loss (Azar et al. 2023, arXiv 2310.12036, Eq. 17): L = (h_w - h_l - 1/(2 beta))^2.

    Regresses the log-ratio margin to 1/(2 beta) instead of pushing it to infinity. Hyperparameters:
    beta 0.1 > 0. Shapes: [B] in, [B] out.
    """

    name: ClassVar[str] = "ipo"

    beta: float = attrs.field(default=0.1, validator=gt(0.0))

    def __call__(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return (chosen - rejected - 1.0 / (2.0 * self.beta)) ** 2


@attrs.frozen
class Hinge(proxim.Preference):
    """The SLiC hinge loss (Zhao et al. 2023, arXiv 2305.10425), as TRL writes it: L = max(0, 1 - beta (h_w - h_l)).

    Hyperparameters: beta 0.1 > 0 (1/beta is the margin in log-ratio units). Shapes: [B] in, [B] out.
    """

    name: ClassVar[str] = "hinge"

    beta: float = attrs.field(default=0.1, validator=gt(0.0))

    def __call__(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return F.relu(1.0 - self.beta * (chosen - rejected))


@proxim.hookimpl
def proxim_register_preferences(register: proxim.Register[type[proxim.Preference]]) -> None:
    register(DPO)
    register(IPO)
    register(Hinge)
