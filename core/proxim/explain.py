"""What a trust region does to one token: its loss and gradient coefficient against the probability ratio.

For a region (any installed one, third-party included), `explain` evaluates the region itself on one-token
sequences: the current policy's log-prob is ``log(mu) + log(r)`` for a grid of ratios r (0.5 to 2 by
default), the anchor's is ``log(mu)``, the advantage is +1 or -1, and autograd gives the coefficient
``d loss / d logprob`` (the gradient the token sends back, per unit advantage sign). Regions whose
shape depends on the anchor's own probability mu (DPPO's divergence masks, DRPO's mu-weighted
regulariser) are evaluated at several mu; `Curves.depends_on_anchor` says whether the curves differ.

``proxim explain clip quadratic --output DIR`` writes the numbers (CSV and JSON) and, with matplotlib
installed (the ``train`` extra), one PNG per region.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from proxim.parts import TrustRegion

RATIOS = (0.5, 2.0)
"""The range of ratios r = pi / mu shown."""
ANCHOR_PROBS = (0.1, 0.5, 0.9)
"""The anchor probabilities mu at which an anchor-dependent region is shown."""
ADVANTAGES = (1.0, -1.0)


@attrs.frozen
class Curve:
    """One advantage sign and anchor probability: the ratios, the per-token loss and d loss / d logprob at each."""

    advantage: float
    anchor_prob: float
    ratios: tuple[float, ...]
    loss: tuple[float, ...]
    grad: tuple[float, ...]


@attrs.frozen
class Curves:
    """A region's curves; `depends_on_anchor`: whether its loss or gradient changes with mu at a fixed ratio."""

    region: str
    description: str
    curves: tuple[Curve, ...]
    depends_on_anchor: bool

    def rows(self) -> list[dict[str, float | str]]:
        """One row per (advantage, anchor probability, ratio), for CSV and JSON."""
        return [
            {"region": self.region, "advantage": c.advantage, "anchor_prob": c.anchor_prob, "ratio": r, "loss": lo, "grad": g}
            for c in self.curves
            for r, lo, g in zip(c.ratios, c.loss, c.grad)
        ]


def _curve(region: TrustRegion, advantage: float, mu: float, ratios: torch.Tensor) -> Curve:
    n = ratios.numel()
    anchor = torch.full((n, 1), math.log(mu), dtype=torch.float64)
    logprobs = (anchor + ratios.log().unsqueeze(1)).requires_grad_(True)
    advantages = torch.full((n, 1), advantage, dtype=torch.float64)
    mask = torch.ones((n, 1), dtype=torch.bool)
    loss = region(logprobs, anchor, advantages, mask, metrics=False).loss[:, 0]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)  # rows are independent one-token sequences
    return Curve(advantage, mu, tuple(ratios.tolist()), tuple(loss.detach().tolist()), tuple(grad[:, 0].tolist()))


def explain(region: TrustRegion, points: int = 151, ratios: tuple[float, float] = RATIOS, anchor_probs: Sequence[float] = ANCHOR_PROBS) -> Curves:
    """The region's loss and gradient coefficient against the ratio, for A = +1 and -1 (and several mu when they matter)."""
    grid = torch.exp(torch.linspace(math.log(ratios[0]), math.log(ratios[1]), points, dtype=torch.float64))
    with torch.enable_grad():
        by_mu = {mu: [_curve(region, a, mu, grid) for a in ADVANTAGES] for mu in anchor_probs}
    reference = by_mu[anchor_probs[len(anchor_probs) // 2]]
    depends = any(
        not (torch.allclose(torch.tensor(c.loss), torch.tensor(r.loss), atol=1e-9) and torch.allclose(torch.tensor(c.grad), torch.tensor(r.grad), atol=1e-9))
        for curves in by_mu.values()
        for c, r in zip(curves, reference)
    )
    chosen = [c for curves in by_mu.values() for c in curves] if depends else reference
    return Curves(region.name, region.describe(), tuple(chosen), depends)


def write(curves: Sequence[Curves], output: Path) -> list[Path]:
    """``explain.csv`` and ``explain.json`` of every region's curves in `output`, and ``<region>.png`` each when
    matplotlib is installed; returns the files written."""
    output.mkdir(parents=True, exist_ok=True)
    rows = [row for c in curves for row in c.rows()]
    with open(output / "explain.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["region", "advantage", "anchor_prob", "ratio", "loss", "grad"])
        writer.writeheader()
        writer.writerows(rows)
    summary = [{"region": c.region, "description": c.description, "depends_on_anchor": c.depends_on_anchor, "points": c.rows()} for c in curves]
    (output / "explain.json").write_text(json.dumps(summary, indent=1))
    written = [output / "explain.csv", output / "explain.json"]
    try:
        from proxim.figures import Panel, Series, write_figure
    except ImportError:
        return written
    for c in curves:

        def label(curve: Curve, c: Curves = c) -> str:
            sign = "A > 0" if curve.advantage > 0 else "A < 0"
            return f"{sign}, mu = {curve.anchor_prob:g}" if c.depends_on_anchor else sign

        loss = [Series(label(k), list(zip(k.ratios, k.loss)), style="solid" if k.advantage > 0 else "dashed") for k in c.curves]
        grad = [Series(label(k), list(zip(k.ratios, k.grad)), style="solid" if k.advantage > 0 else "dashed") for k in c.curves]
        panels = [Panel("Per-token loss", "loss", loss, essential=True), Panel("Gradient coefficient", "d loss / d logprob", grad, essential=True)]
        path = write_figure(output / f"{c.region}.png", panels, title=c.description, xlabel="ratio r = pi / mu", smooth=False)
        if path is not None:
            written.append(path)
    return written
