"""Plugin discovery through real entry points, and every registry error message (raised with strict=True;
without it a broken plugin is left out: tests/core/test_quarantine.py)."""

from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import proxim
from proxim.registry import build_registry

from . import fakedist

REGION_SOURCE = """
import attrs
import proxim

@attrs.frozen
class Scaled(proxim.TrustRegion):
    name = "scaled"
    factor: float = 2.0

    def __call__(self, logprobs, anchor, advantages, mask):
        ratio = (logprobs - anchor).exp()
        return proxim.RegionOutput(loss=-self.factor * ratio * advantages)

@proxim.hookimpl
def proxim_register_regions(register):
    register(Scaled)
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path where fake distributions are installed; switches cleared."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PROXIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PROXIM_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("PROXIM_STRICT_PLUGINS", raising=False)
    return tmp_path


def small_batch() -> proxim.Rollout:
    old = torch.full((4, 3), -1.0, dtype=torch.float64)
    return proxim.Rollout(
        old_logprobs=old,
        mask=torch.ones(4, 3, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64),
        group=torch.tensor([0, 0, 1, 1]),
        ref_logprobs=old.clone(),
    )


def test_builtins_come_from_the_proxim_distribution_entry_points(site: Path) -> None:
    registry = build_registry()
    table = {kind: {n: i for n, i in entries.items() if i.distribution == "proxim"} for kind, entries in registry.available().items()}
    assert set(table["preset"]) == {"ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "dppo", "drpo", "lampo"}
    assert set(table["baseline"]) == {"critic", "group_mean", "leave_one_out", "batch_mean", "none"}
    assert set(table["advantage"]) == {"diff", "group_normalized", "gae", "return_to_go", "pairwise", "whitened"}
    assert set(table["region"]) == {"clip", "divergence_mask", "quadratic", "sequence_clip", "cispo", "none"}
    assert table["region"]["clip"] == ("ppo", "proxim", proxim.__version__)
    assert table["advantage"]["pairwise"].plugin == "lampo"
    assert table["baseline"]["leave_one_out"].plugin == "rloo"


def test_third_party_part_is_found_by_entry_point_and_used(site: Path) -> None:
    fakedist.install(site, "proxim-scaled", "1.2.3", {"scaled": REGION_SOURCE})
    registry = build_registry()
    assert registry.available()["region"]["scaled"] == ("scaled", "proxim-scaled", "1.2.3")
    obj = proxim.objective("grpo", region="scaled", factor=3.0, registry=registry)
    assert obj.region.factor == 3.0
    assert "proxim-scaled==1.2.3" in obj.fingerprint
    batch = small_batch()
    lp = batch.old_logprobs.clone().requires_grad_(True)
    out = obj.loss(lp, batch, obj.advantages(batch))
    # At the anchor r = 1, so loss_t = -3 A_t; GRPO advantages are +-0.7071 and cancel within groups,
    # but the KL term is 0 too: the total is exactly -3 * mean of A over sequences = 0.
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)


def test_autoload_switch_keeps_only_builtins(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakedist.install(site, "proxim-scaled", "1.0", {"scaled": REGION_SOURCE})
    monkeypatch.setenv("PROXIM_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = build_registry()
    assert "scaled" not in registry.available()["region"]
    assert "clip" in registry.available()["region"]


def test_block_switch_skips_named_plugins(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakedist.install(site, "proxim-scaled", "1.0", {"scaled": REGION_SOURCE})
    monkeypatch.setenv("PROXIM_BLOCK_PLUGINS", "scaled, lampo")
    table = build_registry().available()
    assert "scaled" not in table["region"]
    assert "pairwise" not in table["advantage"] and "lampo" not in table["preset"]
    assert "grpo" in table["preset"]


def test_unknown_name_lists_what_exists_and_suggests(site: Path) -> None:
    registry = build_registry()
    with pytest.raises(proxim.UnknownNameError, match=r"no preset named 'grpoo'\. Did you mean 'grpo'.*Registered presets: cispo, dapo"):
        proxim.objective("grpoo", registry=registry)
    with pytest.raises(LookupError, match=r"no region named 'quadratik'\. Did you mean 'quadratic'\?"):
        proxim.objective("grpo", region="quadratik", registry=registry)


def test_two_plugins_claiming_one_name_fail_naming_both(site: Path) -> None:
    source = """
    import attrs, proxim

    @attrs.frozen
    class MyClip(proxim.TrustRegion):
        name = "clip"
        def __call__(self, logprobs, anchor, advantages, mask):
            return proxim.RegionOutput(loss=-advantages)

    @proxim.hookimpl
    def proxim_register_regions(register):
        register(MyClip)
    """
    fakedist.install(site, "proxim-rival", "0.3", {"rival": source})
    with pytest.raises(proxim.DuplicateNameError) as info:
        build_registry(strict=True)
    assert str(info.value) == (
        "two plugins register the region 'clip': plugin 'ppo' (distribution proxim 0.1.0, built in) and plugin 'rival' (distribution "
        "proxim-rival 0.3); a built-in part keeps its name, so plugin 'rival' is left out. Rename its region (the class attribute `name`), "
        "uninstall proxim-rival, or skip it with PROXIM_BLOCK_PLUGINS=rival."
    )


def test_plugin_that_fails_to_import_names_entry_point_and_distribution(site: Path) -> None:
    fakedist.install(site, "proxim-broken", "9.9", {"broken": "import not_a_module_anywhere\n"})
    with pytest.raises(
        proxim.PluginError,
        match=r"plugin 'broken' \(entry point broken = 'fake_broken_\d+'.*distribution proxim-broken 9\.9\) failed to import: ModuleNotFoundError",
    ) as info:
        build_registry(strict=True)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_broken_plugin_is_listed_not_raised_when_not_strict(site: Path) -> None:
    fakedist.install(site, "proxim-broken", "9.9", {"broken": "raise RuntimeError('boom')\n"})
    with pytest.warns(proxim.PluginWarning, match=r"1 proxim plugin is broken and left out .*RuntimeError: boom"):
        registry = build_registry(strict=False)
    (record,) = [r for r in registry.plugins if r.name == "broken"]
    assert record.distribution == "proxim-broken" and "RuntimeError: boom" in (record.error or "")
    assert "grpo" in registry.available()["preset"]


def test_misspelt_hook_name_is_caught(site: Path) -> None:
    source = """
    import proxim

    @proxim.hookimpl
    def proxim_register_regoins(register):
        pass
    """
    fakedist.install(site, "proxim-typo", "1.0", {"typo": source})
    with pytest.raises(
        proxim.PluginError, match=r"marks 'proxim_register_regoins' with @proxim\.hookimpl, but proxim has no hook .* Did you mean 'proxim_register_regions'\?"
    ):
        build_registry(strict=True)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("register(Good())", r"register\(\) takes a class \(pass the class Good, not an instance\)"),
        ("register(int)", r"registered int as a region, but it does not subclass proxim\.TrustRegion"),
        ("register(NoName)", r"needs a class attribute `name`, a lower_snake_case string"),
        ("register(BadRequires)", r"requires unknown Rollout fields \['valuez'\]"),
        ("register(BadSignature)", r"must define __call__\(self, logprobs, anchor, advantages, mask\)"),
        ("register(BadDefault)", r"BadDefault\(\) with default hyperparameters raised"),
    ],
)
def test_register_validates_at_the_plugins_own_line(site: Path, body: str, message: str) -> None:
    source = f"""
    import attrs, proxim

    @attrs.frozen
    class Good(proxim.TrustRegion):
        name = "good"
        def __call__(self, logprobs, anchor, advantages, mask):
            return proxim.RegionOutput(loss=-advantages)

    class NoName(Good):
        name = "Not A Name"

    class BadRequires(Good):
        name = "bad_requires"
        requires = frozenset({{"valuez"}})

    class BadSignature(proxim.TrustRegion):
        name = "bad_signature"
        def __call__(self, logprobs):
            return logprobs

    @attrs.frozen
    class BadDefault(Good):
        name = "bad_default"
        eps: float = attrs.field(default=-1.0, validator=attrs.validators.ge(0.0))

    @proxim.hookimpl
    def proxim_register_regions(register):
        {body}
    """
    modules = fakedist.install(site, "proxim-bad", "1.0", {"bad": source})
    with pytest.raises(proxim.PluginError, match=message) as info:
        build_registry(strict=True)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.filename.endswith(f"{modules['bad']}.py") and f.line == body for f in frames), "error must point at the plugin's register() line"


def test_preset_naming_an_unregistered_part_fails(site: Path) -> None:
    source = """
    import proxim

    @proxim.hookimpl
    def proxim_register_presets(register):
        register(proxim.Preset(name="mine", baseline="group_mean", advantage="group_normalised", region="clip"))
    """
    fakedist.install(site, "proxim-mine", "1.0", {"mine": source})
    with pytest.raises(
        proxim.PluginError,
        match=r"preset 'mine' of plugin 'mine' \(distribution proxim-mine 1\.0\) names the advantage 'group_normalised'.*Did you mean 'group_normalized'",
    ):
        build_registry(strict=True)


def test_no_hook_runs_while_computing_advantages_and_loss(site: Path) -> None:
    calls: list[str] = []
    registry = build_registry(hook_monitor=lambda name, impls, kwargs: calls.append(name))
    assert "proxim_register_regions" in calls, "monitoring must see the registration hooks"
    calls.clear()
    batch = small_batch()
    for preset in ("grpo", "drpo", "lampo"):
        obj = proxim.objective(preset, registry=registry)
        est = obj.advantages(batch)
        lp = batch.old_logprobs.clone().requires_grad_(True)
        idx = torch.tensor([0, 1])
        obj.loss(lp[idx], batch[idx], est[idx]).loss.backward()
    assert calls == []


def test_import_proxim_scans_nothing_and_imports_only_its_core() -> None:
    code = (
        "import sys, proxim\n"
        "assert proxim.default_registry.cache_info().currsize == 0, 'registry built at import'\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('proxim_plugins'))\n"
        "heavy = sorted(m for m in ('transformers', 'accelerate', 'hypothesis', 'pytest', 'numpy.random') if m in sys.modules)\n"
        "print(loaded, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"


def test_available_and_cli_list_parts_with_distribution(site: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "proxim", "plugins"], capture_output=True, text=True, check=True)
    assert "grpo  (proxim 0.1.0; proxim_plugins.grpo)" in out.stdout
    assert "    region quadratic" in out.stdout
    assert "presets: cispo, dapo, dppo, dr_grpo, drpo, grpo, gspo, lampo, ppo, reinforce_pp, rloo" in out.stdout
