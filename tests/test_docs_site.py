"""The docs site (mkdocs.yml, docs/, and the API reference generated from the docstrings) builds with --strict.

Needs the ``docs`` extra (``pip install -e '.[docs]'``) and skips without it. One build takes a few seconds.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is absent
            found = False
        if not found:
            missing.append(name)
    return missing


pytestmark = pytest.mark.skipif(
    bool(_missing()),
    reason=f"the docs extra is not installed (missing {', '.join(_missing())}): pip install -e '.[docs]'",
)


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    # The API reference was generated from the docstrings, built-in plugins included.
    objective = (site / "api" / "objective" / "index.html").read_text(encoding="utf-8")
    assert 'id="proxim.objective.Objective"' in objective
    ppo = (site / "api" / "plugins" / "ppo" / "index.html").read_text(encoding="utf-8")
    assert 'id="proxim_plugins.ppo.GAE"' in ppo
    assert (site / "index.html").is_file()
