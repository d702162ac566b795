"""What each kind of run plots: its panels, from the metric names every run logs (docs/train.md lists them).

`informative` (in `proxim.figures`) then drops the diagnostics that stayed at zero for the whole run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proxim.figures import Panel, Series, Style
from proxim.train.results import EvalResult

History = Sequence[Mapping[str, float]]


def series(history: History, key: str, label: str | None = None, style: Style = "auto") -> Series:
    """The values of metric `key` against step, labelled `label` (default the key)."""
    return Series(label or key, [(h["step"], h[key]) for h in history if key in h], style=style)


def online_panels(history: History, before: EvalResult | None = None, after: EvalResult | None = None) -> list[Panel]:
    """The panels of an online run's plot (diagnostics that stay at zero are dropped by `informative`)."""

    parts = sorted(
        {k for h in history for k in h if k.startswith("reward/")} - {"reward/mean", "reward/std", "reward/accuracy", "reward/failed"}
    )  # failed: a count of skipped steps, not a reward
    rewards = [series(history, "reward/mean", "mean (train)"), *(series(history, k) for k in parts if len(parts) > 1)]
    held_out: list[tuple[float, float]] = [(0.0, before.accuracy)] if before is not None and before.accuracy is not None else []
    held_out += [(history[-1]["step"], after.accuracy)] if history and after is not None and after.accuracy is not None else []
    evaluated = sorted(held_out + [(h["step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h])
    region = sorted({k for h in history for k in h if k.startswith("region/") and any(w in k for w in ("clip", "frac", "mask"))})
    return [
        Panel("Reward", "reward", rewards, essential=True),
        Panel(
            "Accuracy",
            "accuracy",
            [series(history, "reward/accuracy", "train (sampled)"), Series("held-out (greedy)", evaluated, style="dashed")],
            percent=True,
            essential=True,
        ),
        Panel(
            "KL",
            "nats / token",
            [
                series(history, "kl/ref", "sampling policy to reference"),
                series(history, "loss/kl", "policy to reference (in the loss)"),
                series(history, "region/approx_kl", "policy to old policy"),
            ],
        ),
        Panel("Trust region", "fraction of tokens", [series(history, k) for k in region], percent=True),
        Panel("Loss", "loss", [series(history, k) for k in ("loss/total", "loss/policy", "loss/value", "loss/entropy")]),
        Panel("Gradient norm", "L2 norm (before clipping)", [series(history, "optim/grad_norm")]),
        Panel("Response length", "tokens", [series(history, "response/length")]),
    ]


def preference_panels(history: History) -> list[Panel]:
    """The panels of an offline run's plot (empty ones are dropped by `informative`)."""

    return [
        Panel("Preference loss", "loss", [series(history, "loss/preference")], essential=True),
        Panel(
            "Pairwise accuracy",
            "pairs",
            [
                series(history, "preference/accuracy", "train (implicit reward)"),
                series(history, "eval/preference_accuracy", "held-out (log-prob)", "dashed"),
                series(history, "eval/reward_accuracy", "held-out (implicit reward)", "dotted"),
            ],
            percent=True,
            essential=True,
        ),
        Panel("Implicit-reward margin", "nats", [series(history, "preference/margin")]),
        Panel("Task accuracy", "accuracy", [series(history, "eval/accuracy", "held-out (greedy)", "dashed")], percent=True, essential=True),
        Panel("Gradient norm", "L2 norm (before clipping)", [series(history, "optim/grad_norm")]),
    ]


def supervised_panels(history: History) -> list[Panel]:
    """The panels of a supervised run's plot."""
    return [
        Panel(
            "Supervised loss",
            "NLL per response token (nats)",
            [series(history, "loss/supervised")],
            log=True,
            essential=True,
        ),
        Panel(
            "Gradient norm",
            "L2 norm (before clipping)",
            [series(history, "optim/grad_norm")],
        ),
    ]


def reward_model_panels(history: History) -> list[Panel]:
    """The panels of a reward-model run's plot."""

    return [
        Panel("Bradley-Terry loss", "loss", [series(history, "loss/bradley_terry")], essential=True),
        Panel("Pairwise accuracy (training pairs)", "pairs", [series(history, "reward/accuracy")], percent=True, essential=True),
        Panel("Score margin", "chosen - rejected score", [series(history, "reward/margin")]),
        Panel("Gradient norm", "L2 norm (before clipping)", [series(history, "optim/grad_norm")]),
    ]
