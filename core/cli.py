"""The ``proxim`` command line: ``proxim plugins``, ``proxim train``, ``proxim compare``.

Training subcommands live in `proxim.train.cli` and are imported only when used, so that
``proxim plugins`` needs nothing beyond the core.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxim.registry import build_registry


def _plugins(args: argparse.Namespace) -> int:
    """Print every plugin with its distribution and version, and every part and preset it supplies."""
    registry = build_registry(strict=False)
    supplied: dict[str, list[str]] = {}
    for kind, table in registry.available().items():
        for name, info in table.items():
            supplied.setdefault(info.plugin, []).append(f"{kind} {name}")
    for record in registry.plugins:
        print(f"{record.name}  ({record.distribution} {record.version}; {record.entry_point})")
        if record.error:
            print(f"    BROKEN: {record.error}")
        for item in supplied.get(record.name, []):
            print(f"    {item}")
    broken = [r for r in registry.plugins if r.error]
    print(f"\n{len(registry.plugins)} plugins, {len(broken)} broken.")
    for kind, table in registry.available().items():
        print(f"{kind}s: {', '.join(table) or '(none)'}")
    return 1 if broken else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxim", description="Composable RL objectives for language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list every plugin, part and preset with its distribution")
    plugins.set_defaults(run=_plugins)
    try:
        from proxim.train.cli import add_subcommands
    except ImportError as exc:  # the `train` extra is not installed
        missing = str(exc)

        def _needs_train_extra(args: argparse.Namespace) -> int:
            print(f"proxim {args.command} needs the train extra: pip install 'proxim[train]' ({missing})", file=sys.stderr)
            return 2

        for name in ("train", "compare"):
            sub.add_parser(name, help=f"(needs pip install 'proxim[train]')").set_defaults(run=_needs_train_extra)
    else:
        add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
