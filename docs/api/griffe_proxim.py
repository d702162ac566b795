"""Griffe extension for the docs build (build code, not a page). Two jobs:

1. Read ``proxim`` from this checkout. pyproject.toml maps ``proxim`` to ``core/`` and ``proxim.plugins`` to
   ``plugins/``. Griffe, which reads the source statically, cannot find such a package from an editable
   install: it falls back to importing ``proxim``, or, when ``mkdocs`` runs as a console script, takes the
   ``proxim`` console script beside it for an empty namespace package. So whenever the loaded ``proxim`` is
   not this checkout's ``core/__init__.py``, this loads ``core/`` as ``proxim`` and ``plugins/`` as
   ``proxim.plugins``, exactly as Griffe loads any package.
2. Use ``#:`` comments above an attribute (Sphinx's convention, used for the ``Part`` class variables) as
   its docstring when it has none.

Wired up in mkdocs.yml (mkdocstrings ``extensions``) and kept out of the site by ``exclude_docs``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core" / "__init__.py"
PLUGINS = ROOT / "plugins" / "__init__.py"


class ProximFromCheckout(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "proxim":
            return
        # GriffeLoader._load_module is how Griffe itself loads a package or a subpackage (private, but stable
        # from Griffe 0.x to 2.x). With no parent it replaces the collection's "proxim", which mkdocstrings
        # looks the documented objects up in once this hook returns.
        if isinstance(pkg.filepath, list) or pkg.filepath.resolve() != CORE:
            pkg = loader._load_module("proxim", CORE, submodules=True)
        if "plugins" not in pkg.members:
            pkg.set_member("plugins", loader._load_module("plugins", PLUGINS, submodules=True, parent=pkg))
        loader.expand_exports(pkg)
        loader.expand_wildcards(pkg, external=False)

    def on_attribute_instance(
        self, *, node: ast.AST | griffe.ObjectNode, attr: griffe.Attribute, agent: Any, **kwargs: Any
    ) -> None:
        if attr.docstring is not None or not isinstance(node, ast.AST) or not attr.lineno:
            return
        lines = getattr(agent, "code", "").splitlines()
        start = attr.lineno - 1  # the comment block ends on the line above the assignment
        while start > 0 and lines[start - 1].lstrip().startswith("#:"):
            start -= 1
        if start == attr.lineno - 1:
            return
        comment = [line.lstrip()[2:].removeprefix(" ") for line in lines[start : attr.lineno - 1]]
        attr.docstring = griffe.Docstring(
            "\n".join(comment),
            lineno=start + 1,
            endlineno=attr.lineno - 1,
            parent=attr,
            parser=agent.docstring_parser,
            parser_options=agent.docstring_options,
        )
