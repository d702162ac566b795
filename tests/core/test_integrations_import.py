"""proxim.integrations without verl and TRL (docs/integrations.md): nothing imports them eagerly, and the verl
plugin registers lazily, once ``verl.trainer.ppo.core_algos`` is imported (here a stand-in package).

The comparisons with the real verl and TRL are in tests/parity/test_verl_plugin.py and test_trl_trainer.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import proxim
from proxim.integrations.common import reads_old_logprobs

ROOT = Path(__file__).resolve().parents[2]

#: A stand-in for verl: its package and the registries of verl.trainer.ppo.core_algos, nothing else.
FAKE_CORE_ALGOS = """
POLICY_LOSS_REGISTRY, ADV_ESTIMATOR_REGISTRY = {}, {}
def register_policy_loss(name):
    def decorator(fn):
        POLICY_LOSS_REGISTRY[name] = fn
        return fn
    return decorator
def register_adv_est(name):
    def decorator(fn):
        ADV_ESTIMATOR_REGISTRY[name] = fn
        return fn
    return decorator
"""


def python(code: str, path: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(path) if path else "", os.environ.get("PYTHONPATH", "")) if p)}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, check=False, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_import_proxim_imports_neither_verl_nor_trl() -> None:
    out = python(
        """
        import sys
        import proxim, proxim.integrations, proxim.integrations.common, proxim.integrations.verl
        proxim.objective("grpo")
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("verl", "trl")))
        """
    )
    assert out == "[]"


def test_verl_plugin_registers_when_core_algos_is_imported(tmp_path: Path) -> None:
    package = tmp_path / "verl" / "trainer" / "ppo"
    package.mkdir(parents=True)
    for folder in (tmp_path / "verl", tmp_path / "verl" / "trainer", package):
        (folder / "__init__.py").write_text("")
    (package / "core_algos.py").write_text(FAKE_CORE_ALGOS)
    out = python(
        """
        import sys, warnings
        warnings.simplefilter("error")
        import proxim.integrations.verl  # what verl's entry-point loop does on `import verl`
        print("verl.trainer.ppo.core_algos" in sys.modules)
        from verl.trainer.ppo import core_algos
        print(sorted(core_algos.POLICY_LOSS_REGISTRY))
        print(sorted(core_algos.ADV_ESTIMATOR_REGISTRY))
        """,
        tmp_path,
    )
    imported, losses, estimators = out.splitlines()
    assert imported == "False"
    assert losses == str(sorted(f"proxim:{r}" for r in proxim.available()["region"]))
    assert estimators == str(sorted(f"proxim:{a}" for a in proxim.available()["advantage"]))


def test_clip_policy_loss_is_proxims_clip_with_verls_settings() -> None:
    """The adapter alone (verl's config as a dict): proxim's clip with eps from clip_ratio_low/high and
    verl's always-on dual clip, token-mean with the global token count, times dp_size."""
    from proxim.integrations import verl as plugin

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(6, 5, generator=g, dtype=torch.float64) - 0.1
    logp = (old + 0.8 * torch.randn(6, 5, generator=g, dtype=torch.float64)).clamp(max=0.0).requires_grad_(True)
    adv = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=g) < 0.8
    info = {"dp_size": 2, "batch_num_tokens": 40}
    config = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "global_batch_info": info}
    loss, metrics = plugin.policy_loss("clip")(old, logp, adv, mask.long(), "token-mean", config)
    expected = proxim.objective(advantage="diff", region="clip", eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.0)
    want = expected.loss(
        logp, proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.zeros(6, dtype=torch.float64)), proxim.Estimate(advantages=adv), normalizer=40
    )
    torch.testing.assert_close(loss, 2 * want.loss)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(float(want.metrics["region/clip_fraction_low"] + want.metrics["region/clip_fraction_high"]))


def test_reads_old_logprobs() -> None:
    assert reads_old_logprobs(proxim.objective("lampo"))  # pairwise confidence weights
    assert reads_old_logprobs(proxim.objective("rloo", kl_coef=0.05))  # KL folded into the reward
    for preset in ("grpo", "rloo", "ppo", "reinforce_pp"):
        assert not reads_old_logprobs(proxim.objective(preset, kl_coef=0.0, kl_in="loss")), preset


def test_pyproject_declares_the_entry_point_and_extras() -> None:
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = toml.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["verl.plugins"] == {"proxim": "proxim.integrations.verl"}
    extras = project["optional-dependencies"]
    assert extras["verl"] == ["verl==0.9.1"] and extras["trl"] == ["trl>=1.16,<1.17"]
    assert not any(dep.split("=")[0].split(">")[0] in ("verl", "trl") for dep in project["dependencies"])


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="TRL is installed")
def test_trl_integration_without_trl_says_what_to_install() -> None:
    with pytest.raises(ImportError, match=r"proxim\[trl\]"):
        import proxim.integrations.trl  # noqa: F401
