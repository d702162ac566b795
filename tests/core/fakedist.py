"""Fake installed distributions for entry-point tests: a ``NAME-VERSION.dist-info`` folder on sys.path."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_counter = itertools.count()


def install(root: Path, dist: str, version: str, plugins: dict[str, str]) -> dict[str, str]:
    """Write one module per plugin (source given) and a dist-info declaring them in the ``proxim`` group.

    Returns plugin name -> module name (unique per call, so modules never collide across tests).
    """
    modules = {}
    for plugin, source in plugins.items():
        module = f"fake_{plugin}_{next(_counter)}"
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        modules[plugin] = module
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{plugin} = {module}\n" for plugin, module in modules.items())
    (info / "entry_points.txt").write_text(f"[proxim]\n{lines}")
    return modules


def forget(modules: dict[str, str]) -> None:
    for module in modules.values():
        sys.modules.pop(module, None)


def run(args: list[str], site: Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a subprocess that sees the fake distributions in `site`, with every PROXIM_*
    switch cleared except those given in `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROXIM_")}
    environ.update(PYTHONPATH=str(site), **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environ, cwd=cwd or site)
