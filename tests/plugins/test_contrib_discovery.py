"""The contrib packages, installed for real: found by name through entry points, usable in an objective,
listed by ``proxim plugins``, and switched off by PROXIM_DISABLE_PLUGIN_AUTOLOAD / PROXIM_BLOCK_PLUGINS (and
listed as such).

Each test skips when its package is not installed (``pip install -e contrib/proxim-hello`` etc.); CI
installs all three.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

import proxim
from proxim.registry import build_registry

CONTRIB = {"proxim-hello": "hello", "proxim-sapo": "sapo", "proxim-opo": "opo"}  # distribution -> plugin name


def _installed(dist: str) -> bool:
    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def needs(*dists: str) -> pytest.MarkDecorator:
    missing = [d for d in dists if not _installed(d)]
    reason = f"{', '.join(missing)} not installed; pip install " + " ".join(f"-e contrib/{d}" for d in missing)
    return pytest.mark.skipif(bool(missing), reason=reason)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXIM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PROXIM_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("PROXIM_STRICT_PLUGINS", raising=False)


def _batch() -> proxim.Rollout:
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False], [True, True, True]])
    return proxim.Rollout(
        old_logprobs=torch.where(mask, -0.5, 0.0).to(torch.float64),
        mask=mask,
        rewards=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64),
        group=torch.tensor([3, 3, 8, 8]),
    )


@needs("proxim-hello")
def test_hello_region_resolves_by_name_and_computes_a_loss(clean_env: None) -> None:
    registry = build_registry()
    assert registry.available()["region"]["truncated_is"] == ("hello", "proxim-hello", version("proxim-hello"))
    obj = proxim.objective(advantage="group_normalized", region="truncated_is", cap=2.0, registry=registry)
    assert f"proxim-hello=={version('proxim-hello')}" in obj.fingerprint
    batch = _batch()
    # Ratios 3 on every token (log 3 above the anchor): the cap binds, so g = 2 A; loss_t = -2 A_t.
    logprobs = (batch.old_logprobs + math.log(3.0)).requires_grad_(True)
    out = obj.loss(logprobs, batch, obj.advantages(batch))
    out.loss.backward()
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # group 3: rewards (1, 0) -> z-scores +-a; group 8: equal rewards -> 0
    # token_mean over the 9 valid tokens: (2 tokens * -2a + 3 tokens * 2a) / 9
    assert out.loss.item() == pytest.approx((-2 * 2 * a + 3 * 2 * a) / 9, rel=1e-12)
    assert out.metrics["region/truncated_fraction"].item() == pytest.approx(1.0)


@needs("proxim-sapo")
def test_sapo_preset_resolves_by_name_and_computes_a_loss(clean_env: None) -> None:
    registry = build_registry()
    obj = proxim.objective("sapo", registry=registry)
    assert obj.region.name == "sapo" and registry.info("preset", "sapo").distribution == "proxim-sapo"
    batch = _batch()
    out = obj.loss(batch.old_logprobs.clone().requires_grad_(True), batch, obj.advantages(batch))
    # At r = 1, loss_t = -2 A / tau; seq_mean_token_mean over the 4 sequences: -(2a/1 - 2a/1.05) / 4.
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert out.loss.item() == pytest.approx(-(2 * a - 2 * a / 1.05) / 4, rel=1e-12)


@needs("proxim-opo")
def test_opo_baseline_resolves_by_name_and_computes_advantages(clean_env: None) -> None:
    obj = proxim.objective(baseline="length_weighted_mean", advantage="diff", region="clip", registry=build_registry())
    est = obj.advantages(_batch())
    # group 3: lengths 2 and 3, rewards 1 and 0 -> b = 2/5, A = (0.6, -0.4); group 8: equal rewards -> 0.
    assert est.advantages[0, 0].item() == pytest.approx(0.6) and est.advantages[1, 0].item() == pytest.approx(-0.4)
    assert est.advantages[2:].abs().max().item() == 0.0


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROXIM_")}
    environ.update(env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environ, cwd=tmp_path)


SUMMARY = (
    "import json, proxim\n"
    "table = proxim.available()\n"
    "print(json.dumps({kind: {name: info.distribution for name, info in t.items()} for kind, t in table.items()}))\n"
)


@needs(*CONTRIB)
def test_disable_autoload_keeps_only_the_builtins(tmp_path: Path) -> None:
    code = SUMMARY + "from proxim.cli import main\nraise SystemExit(main(['plugins']))\n"  # and the listing
    out = _run(["-c", code], tmp_path, PROXIM_DISABLE_PLUGIN_AUTOLOAD="1")
    table = json.loads(out.stdout.splitlines()[0])
    assert {dist for names in table.values() for dist in names.values()} == {"proxim"}
    assert "clip" in table["region"] and "truncated_is" not in table["region"] and "sapo" not in table["preset"]
    assert out.returncode == 0 and "grpo  (proxim " in out.stdout
    lines = out.stdout.splitlines()
    for dist, plugin in CONTRIB.items():
        header = f"{plugin}  ({dist} {version(dist)}; {dist.replace('-', '_')})"
        assert lines[lines.index(header) + 1] == "    DISABLED: not loaded (PROXIM_DISABLE_PLUGIN_AUTOLOAD=1 loads only the built-in plugins)"
        assert lines[lines.index(header) + 2] != "    region truncated_is", "a disabled plugin supplies nothing"
    assert "plugins, 0 broken, 0 blocked, 3 disabled." in out.stdout


@needs(*CONTRIB)
def test_block_list_skips_named_plugins_only(tmp_path: Path) -> None:
    code = SUMMARY + ("try:\n    proxim.objective('grpo', region='truncated_is')\nexcept proxim.UnknownNameError as exc:\n    print(exc)\n")
    out = _run(["-c", code], tmp_path, PROXIM_BLOCK_PLUGINS="hello, opo,lampo")
    table = json.loads(out.stdout.splitlines()[0])
    assert "truncated_is" not in table["region"] and "length_weighted_mean" not in table["baseline"]
    assert "pairwise" not in table["advantage"], "built-in plugins can be blocked too"
    assert table["region"]["sapo"] == "proxim-sapo" and table["preset"]["grpo"] == "proxim"
    unknown = out.stdout.splitlines()[1]
    assert "no region named 'truncated_is'." in unknown
    assert "Plugins not loaded, which may provide it: plugin 'lampo' (distribution proxim " in unknown
    assert f"plugin 'hello' (distribution proxim-hello {version('proxim-hello')}), blocked by PROXIM_BLOCK_PLUGINS" in unknown


@needs(*CONTRIB)
def test_plugins_lists_contrib_and_a_broken_plugin_with_its_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "proxim_broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    info = site / "proxim_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: proxim-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[proxim]\nbroken = proxim_broken_plugin\n")
    out = _run(["-m", "proxim", "plugins"], tmp_path, PYTHONPATH=str(site))
    assert out.returncode == 1, "a broken plugin makes the listing exit 1, but it still lists everything"
    lines = out.stdout.splitlines()
    assert f"hello  (proxim-hello {version('proxim-hello')}; proxim_hello)" in lines and "    region truncated_is" in lines
    assert f"sapo  (proxim-sapo {version('proxim-sapo')}; proxim_sapo)" in lines and "    preset sapo" in lines
    assert f"opo  (proxim-opo {version('proxim-opo')}; proxim_opo)" in lines and "    baseline length_weighted_mean" in lines
    assert "broken  (proxim-broken 0.3; proxim_broken_plugin)" in lines
    broken = lines[lines.index("broken  (proxim-broken 0.3; proxim_broken_plugin)") + 1]
    assert broken.startswith("    BROKEN: plugin 'broken' (entry point broken = 'proxim_broken_plugin'") and "RuntimeError: boom at import" in broken
    assert any(line.startswith("regions: ") and "sapo" in line and "truncated_is" in line for line in lines)
    assert "plugins, 1 broken, 0 blocked, 0 disabled." in out.stdout and "Traceback" not in out.stdout + out.stderr


@needs(*CONTRIB)
def test_check_runs_the_kit_on_the_contrib_parts(clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    from proxim.cli import main

    assert main(["check", "--max-examples", "5", "truncated_is", "sapo", "length_weighted_mean"]) == 0
    out = capsys.readouterr().out
    assert f"region truncated_is (hello: proxim-hello {version('proxim-hello')})  ok, 13 checks" in out
    assert "region sapo (sapo: proxim-sapo" in out and "baseline length_weighted_mean (opo: proxim-opo" in out
    assert out.rstrip().endswith("checks passed on 3 parts.")


def test_contrib_packages_use_only_the_public_api() -> None:
    # Written exactly as an outside author would: `proxim`, `proxim.ops` and `proxim.testing`, nothing deeper.
    root = Path(__file__).resolve().parents[2] / "contrib"
    allowed = {"proxim", "proxim.ops", "proxim.testing"}
    found = {}
    for path in sorted(root.glob("*/**/*.py")):
        if any(part.endswith(".egg-info") or part.startswith(".") for part in path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "proxim" and name not in allowed:
                    found[f"{path.relative_to(root)}:{node.lineno}"] = name
    assert len(list(root.glob("*/pyproject.toml"))) >= 3
    assert found == {}
