"""Every built-in part passes the conformance kit, at its defaults and at the settings that change
which properties it claims or which code path it takes."""

from __future__ import annotations

from proxim.parts import PART_KINDS
from proxim.registry import build_registry
from proxim.testing import parametrize_with_checks

pytest_plugins = ["proxim.testing"]

# Built-ins only (no third-party autoload), so that an installed contrib package cannot change this list.
REGISTRY = build_registry(autoload=False, blocked=())
BUILTINS = [cls for kind in PART_KINDS for cls, info in REGISTRY.entries[kind].values() if info.distribution == "proxim"]


def _part(kind: str, name: str, **settings: object) -> object:
    return REGISTRY.get(kind, name)(**settings)


VARIANTS = [
    _part("region", "clip", eps_high=0.28, dual_clip=3.0),  # claims bounded_weight too
    _part("region", "sequence_clip", token_level=True),
    _part("region", "divergence_mask", divergence="kl"),
    _part("region", "divergence_mask", is_cap=5.0),
    _part("region", "quadratic", delta=0.1, mu_weighted=False),  # SPO
    _part("advantage", "group_normalized", scale="batch"),  # drops group_independent
    _part("advantage", "group_normalized", scale="none"),  # Dr. GRPO
    _part("advantage", "pairwise", normalizer="weight_sum", scale="group"),  # drops zero_sum_per_group
    _part("advantage", "pairwise", normalizer="none", scale="batch"),  # drops group_independent
    _part("advantage", "gae", whiten=False),
]


def test_every_builtin_part_is_checked() -> None:
    kinds = {kind: sorted(cls.name for cls in BUILTINS if cls.kind == kind) for kind in PART_KINDS}
    assert kinds["baseline"] == ["batch_mean", "critic", "group_mean", "leave_one_out", "none"]
    assert kinds["advantage"] == ["diff", "gae", "group_normalized", "pairwise", "return_to_go", "whitened"]
    assert kinds["region"] == ["cispo", "clip", "divergence_mask", "none", "quadratic", "sequence_clip"]
    assert kinds["preference"], "preference losses get the universal checks that apply to them"


@parametrize_with_checks([*BUILTINS, *VARIANTS], max_examples=10, registry=REGISTRY)
def test_builtin_conformance(part, check) -> None:
    check(part)
