"""The kit has teeth: each deliberately broken part is caught by the check named for its fault, and a
property check rejects a built-in that claims a property it does not have."""

from __future__ import annotations

import pytest
import torch

from proxim.registry import build_registry
from proxim.testing import CHECKS, CheckFailure, run_checks

from .broken import CAUGHT_BY, CreatesCPUTensor, IgnoresMask, LeaksGradient, MixesGroups, MutatesInput, NaNOnEmptyRow, ReducesOverBatch

REGISTRY = build_registry(autoload=False, blocked=())
MESSAGES = {
    IgnoresMask: r"region 'ignores_mask' fails masked_positions_ignored: with padded \(masked\) inputs set to \w+ values instead of 0, the output at valid tokens changed: loss at \[\d+, \d+\]",
    LeaksGradient: r"baseline 'leaks_gradient' fails no_gradient_leak: the baseline requires grad although it was computed under torch\.no_grad\(\)",
    ReducesOverBatch: r"region 'reduces_over_batch' fails rows_independent: changing only row \d+ changed another row's output \(a region must not reduce over the batch\)",
    MixesGroups: r"advantage 'mixes_groups' fails group_independent: changing only group \d+ \(rows \[[\d, ]+\]\) changed another group's output: advantages at",
    NaNOnEmptyRow: r"advantage 'nan_on_empty_row' fails fully_masked_rows: advantages at \[\d+, \d+\] is (nan|inf|-inf) for a batch with a fully masked row",
    MutatesInput: r"region 'mutates_input' fails inputs_not_mutated: it modified its input advantages in place",
}


@pytest.mark.parametrize("broken", list(CAUGHT_BY), ids=lambda cls: cls.name)
def test_named_check_catches_the_broken_part(broken: type) -> None:
    check = CHECKS[CAUGHT_BY[broken]].configured(max_examples=25, registry=REGISTRY)
    with pytest.raises(CheckFailure, match=MESSAGES[broken]) as info:
        check(broken)
    assert any("Failing test case" in note or "Falsifying example" in note for note in getattr(info.value, "__notes__", [])), "the shrunk example is attached"


@pytest.mark.parametrize("broken", list(CAUGHT_BY), ids=lambda cls: cls.name)
def test_full_run_reports_the_named_check(broken: type) -> None:
    results = run_checks(broken, max_examples=5, registry=REGISTRY)
    failed = {r.check.name for r in results if not r.passed}
    assert CAUGHT_BY[broken] in failed
    assert "shape_dtype_device" not in failed and "properties_known" not in failed, "each part is otherwise well formed"


FALSE_CLAIMS = [
    ("bounded_weight", "region", "clip", {}, r"weight \|g / A\| is .* at log-ratio"),
    ("bounded_weight", "region", "quadratic", {}, r"keeps growing with the ratio"),
    ("pg_at_anchor", "region", "sequence_clip", {}, r"-dloss/dlogprob is not A"),
    ("tokens_independent", "region", "sequence_clip", {}, r"changing only token"),
    ("zero_grad_clipped_side", "region", "quadratic", {}, r"far past the trust region in A's direction\) the gradient is"),
    ("zero_grad_clipped_side", "region", "cispo", {}, r"the gradient is"),
    ("group_independent", "advantage", "group_normalized", {"scale": "batch"}, r"changed another group's output"),
    ("group_independent", "advantage", "whitened", {}, r"changed another group's output"),
    ("group_independent", "baseline", "batch_mean", {}, r"changed another group's output"),
    ("shift_equivariant", "baseline", "none", {}, r"did not shift the baseline"),
    ("shift_invariant", "advantage", "diff", {}, r"changed the advantages"),
    ("zero_sum_per_group", "advantage", "pairwise", {"normalizer": "weight_sum"}, r"summing to .*, not 0"),
    ("degenerate_groups_zero", "advantage", "diff", {}, r"has identical rewards"),
    ("outcome_broadcast", "advantage", "gae", {}, r"not one value per sequence"),
]


@pytest.mark.parametrize(
    ("check", "kind", "name", "settings", "message"),
    [pytest.param(*claim, id=f"{claim[1]}:{claim[2]}{''.join(f'({k}={v})' for k, v in claim[3].items())}-{claim[0]}") for claim in FALSE_CLAIMS],
)
def test_property_check_rejects_a_false_claim(check: str, kind: str, name: str, settings: dict, message: str) -> None:
    part = REGISTRY.get(kind, name)(**settings)
    assert check not in part.declared_properties(), "the built-in does not claim it"
    with pytest.raises(CheckFailure, match=message):
        CHECKS[check].configured(max_examples=25, registry=REGISTRY)(part)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the fault only shows off the CPU")
def test_device_setting_catches_a_part_that_creates_cpu_tensors() -> None:
    CHECKS["shape_dtype_device"].configured(max_examples=5, device="cpu")(CreatesCPUTensor)  # passes on the CPU
    with pytest.raises(CheckFailure, match=r"region 'creates_cpu_tensor' fails shape_dtype_device: it raised RuntimeError: .*device"):
        CHECKS["shape_dtype_device"].configured(max_examples=5, device="cuda")(CreatesCPUTensor)
