"""The ``proxim`` command line: ``proxim plugins``, ``proxim check``, ``proxim train``, ``proxim compare``,
``proxim sft``, ``proxim reward-model``.

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


def _check(args: argparse.Namespace) -> int:
    """Run the conformance kit (``proxim.testing``) on every installed part; non-zero naming each failure."""
    try:
        from proxim.testing.runner import check_installed
    except ImportError as exc:  # the `test` extra (pytest, hypothesis) is not installed
        print(f"proxim check needs the test extra: pip install 'proxim[test]' ({exc})", file=sys.stderr)
        return 2
    return check_installed(args.names, args.kind, max_examples=args.max_examples, device=args.device, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxim", description="Composable RL objectives for language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list every plugin, part and preset with its distribution")
    plugins.set_defaults(run=_plugins)
    check = sub.add_parser("check", help="run the conformance kit on every installed part (needs the test extra)")
    check.add_argument("names", nargs="*", metavar="NAME", help="check only the parts with these names (default: every part)")
    check.add_argument("--kind", action="append", choices=("baseline", "advantage", "region", "preference"), help="check only this kind (repeatable)")
    check.add_argument("--max-examples", type=int, default=None, metavar="N", help="hypothesis examples per check (default 25)")
    check.add_argument("--device", default=None, help="call the parts on this device, e.g. cuda (default cpu)")
    check.add_argument("-v", "--verbose", action="store_true", help="list every check run on every part")
    check.set_defaults(run=_check)
    try:
        from proxim.train.cli import add_subcommands
    except ImportError as exc:  # the `train` extra is not installed
        missing = str(exc)

        def _needs_train_extra(args: argparse.Namespace) -> int:
            print(f"proxim {args.command} needs the train extra: pip install 'proxim[train]' ({missing})", file=sys.stderr)
            return 2

        for name in ("train", "compare", "sft", "reward-model"):
            sub.add_parser(name, help="(needs pip install 'proxim[train]')").set_defaults(run=_needs_train_extra)
    else:
        add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
