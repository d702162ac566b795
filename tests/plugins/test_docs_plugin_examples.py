"""docs/plugins.md stays true beyond proxim-hello: its worked advantage and preset (section 7) run, with
their tests, as written; and what it says a region may return at masked positions holds."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch

import proxim
from proxim.registry import build_registry

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
# <!-- example: FILE --> on the line before a fenced block: FILE's text, run by the test below.
EXAMPLE = re.compile(r"^<!-- example: (?P<file>\S+) -->\n```[^\n]*\n(?P<body>.*?)\n```$", re.M | re.S)


def _examples() -> dict[str, str]:
    return {m["file"]: m["body"] + "\n" for m in EXAMPLE.finditer(DOC.read_text())}


def test_the_worked_advantage_and_preset_pass_their_tests_as_written(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = _examples()
    assert sorted(examples) == ["proxim_clipped.py", "test_proxim_clipped.py"]
    for name, body in examples.items():
        (pytester.path / name).write_text(body)
    monkeypatch.delenv("PROXIM_TESTING_DEVICE", raising=False)
    result = pytester.runpytest_subprocess("-p", "proxim.testing", "--proxim-max-examples", "5", "-p", "no:cacheprovider")
    # The kit on two advantages (10 universal and property checks each, 5 claimed properties included),
    # and the two hand-written tests.
    result.assert_outcomes(passed=28)


@attrs.frozen
class Dirty(proxim.TrustRegion):
    """-r A at valid tokens; `fill` at masked ones, and a backward that is NaN there (0 * log 0)."""

    name: ClassVar[str] = "dirty"
    fill: float = float("nan")

    def __call__(self, logprobs: torch.Tensor, anchor: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> proxim.RegionOutput:
        ratio = (logprobs - anchor).exp()
        loss = torch.where(mask, -ratio * advantages, torch.full_like(ratio, self.fill))
        loss = loss + torch.where(mask, torch.zeros_like(ratio), 0 * logprobs.abs().log())
        return proxim.RegionOutput(loss=loss, metrics={"ratio": torch.where(mask, ratio, torch.full_like(ratio, self.fill))})


class DirtyPlugin:
    @proxim.hookimpl
    def proxim_register_regions(self, register: proxim.Register[type[proxim.TrustRegion]]) -> None:
        register(Dirty)


@pytest.mark.parametrize("aggregation", proxim.AGGREGATIONS)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_what_a_region_returns_at_masked_positions_never_reaches_loss_gradient_or_metrics(aggregation: str, fill: float) -> None:
    registry = build_registry(plugins=[("dirty", DirtyPlugin())], autoload=False)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    f64 = torch.float64
    batch = proxim.Rollout(
        old_logprobs=torch.full(mask.shape, -0.5, dtype=f64).masked_fill(~mask, 0.0),
        mask=mask,
        rewards=torch.tensor([1.0, 0.0], dtype=f64),
        group=torch.tensor([0, 0]),
    )
    clean = proxim.objective("grpo", region="clip", kl_coef=0.0, aggregation=aggregation, registry=registry)
    dirty = proxim.objective("grpo", region="dirty", fill=fill, kl_coef=0.0, aggregation=aggregation, registry=registry)
    results = []
    for obj in (clean, dirty):
        logprobs = torch.full(mask.shape, -0.4, dtype=f64).masked_fill(~mask, float("nan")).requires_grad_(True)  # the trainer's padding: NaN
        out = obj.loss(logprobs, batch, obj.advantages(batch))
        out.loss.backward()
        assert logprobs.grad is not None
        results.append((out, logprobs.grad))
    (clean_out, clean_grad), (dirty_out, dirty_grad) = results
    # Ratio 1.1 (inside clip's trust region): both regions are -r A at valid tokens, so they agree exactly.
    torch.testing.assert_close(dirty_out.loss, clean_out.loss, rtol=0, atol=0)
    torch.testing.assert_close(dirty_grad, clean_grad, rtol=0, atol=0)
    assert bool((dirty_grad[~mask] == 0).all())
    assert dirty_out.metrics["region/ratio"].item() == pytest.approx(math.exp(-0.4 - -0.5), rel=1e-12)
