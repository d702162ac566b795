"""The ``proxim`` command line: ``proxim plugins``, ``proxim check``, ``proxim train``, ``proxim compare``,
``proxim sft``, ``proxim reward-model``.

Training subcommands live in `proxim.train.cli` and are imported only when used, so that
``proxim plugins`` needs nothing beyond the core.
"""

from __future__ import annotations

import argparse
import ast
import sys
import textwrap
from collections.abc import Sequence

from proxim.registry import PluginRecord, report_registry

_STATUS = {
    "broken": "BROKEN: {error}",
    "blocked": "BLOCKED: not loaded (PROXIM_BLOCK_PLUGINS)",
    "disabled": "DISABLED: not loaded (PROXIM_DISABLE_PLUGIN_AUTOLOAD=1 loads only the built-in plugins)",
}


def _plugins(args: argparse.Namespace) -> int:
    """Print every plugin with its distribution, version and status, and every part and preset it supplies.

    Exits 1 while any plugin is broken; blocked and disabled plugins are listed but are no failure.
    """
    registry = report_registry()
    supplied: dict[str, list[str]] = {}
    for kind, table in registry.available().items():
        for name, info in table.items():
            regime = registry.get("preset", name).training if kind == "preset" else {}
            trains = f"  (trains with {', '.join(f'{k}={v}' for k, v in regime.items())})" if regime else ""
            supplied.setdefault(info.plugin, []).append(f"{kind} {name}{trains}")
    broken = {r.name for r in registry.plugins if r.status == "broken"}
    for kind, withheld in registry.unavailable().items():
        for name, why in withheld.items():
            note = "because the plugin is broken" if why.info.plugin in broken else why.reason
            supplied.setdefault(why.info.plugin, []).append(f"{kind} {name}  UNAVAILABLE {note}")
    for record in registry.plugins:
        print(f"{record.name}  ({record.distribution} {record.version}; {record.entry_point})")
        if record.status != "loaded":
            print(textwrap.indent(_STATUS[record.status].format(error=record.error), "    "))
        for item in supplied.get(record.name, []):
            print(f"    {item}")
    print(f"\n{_summary(registry.plugins)}")
    unavailable = registry.unavailable()
    for kind, table in registry.available().items():
        held = f"; unavailable: {', '.join(unavailable[kind])}" if unavailable[kind] else ""
        print(f"{kind}s: {', '.join(table) or '(none)'}{held}")
    return 1 if broken else 0


def _summary(records: tuple[PluginRecord, ...]) -> str:
    counts = {status: sum(r.status == status for r in records) for status in ("broken", "blocked", "disabled")}
    return f"{len(records)} plugins, {', '.join(f'{n} {status}' for status, n in counts.items())}."


def _check(args: argparse.Namespace) -> int:
    """Run the conformance kit (``proxim.testing``) on every installed part; non-zero naming each failure."""
    try:
        from proxim.testing.runner import check_installed
    except ImportError as exc:  # the `test` extra (pytest, hypothesis) is not installed
        print(f"proxim check needs the test extra: pip install 'proxim[test]' ({exc})", file=sys.stderr)
        return 2
    settings = dict(args.set or ())
    return check_installed(args.names, args.kind, settings=settings, max_examples=args.max_examples, device=args.device, verbose=args.verbose)


def _explain(args: argparse.Namespace) -> int:
    """Write each region's loss and gradient coefficient against the ratio (CSV, JSON, PNG); see `proxim.explain`."""
    from pathlib import Path

    from proxim.errors import ProximError
    from proxim.explain import explain, write

    registry = report_registry()
    names = args.regions or sorted(registry.available()["region"])
    settings = dict(args.set or ())
    try:
        regions = [registry.get("region", name) for name in names]
        unused = [k for k in settings if not any(k in cls.hyperparameters() for cls in regions)]
        if unused:
            raise ProximError(f"--set {unused[0]}: no region among {', '.join(names)} has that hyperparameter.")
        parts = [cls(**{k: v for k, v in settings.items() if k in cls.hyperparameters()}) for cls in regions]
    except (ProximError, LookupError, TypeError, ValueError) as exc:
        print(f"proxim explain: error: {exc}", file=sys.stderr)
        return 2
    curves = [explain(part, points=args.points) for part in parts]
    written = write(curves, Path(args.output))
    for c in curves:
        print(f"{c.description}: {'depends on the anchor probability' if c.depends_on_anchor else 'the same at every anchor probability'}")
    print(f"written: {', '.join(str(p) for p in written)}")
    return 0


def _setting(text: str) -> tuple[str, object]:
    """``--set FIELD=VALUE``: the value as a Python literal (``0.1``, ``None``, ``True``, ``'group'``), or else the text itself."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE (eps_low=0.1, or region.eps_low=0.1), got {text!r}")
    try:
        parsed: object = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


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
    check.add_argument(
        "--set",
        action="append",
        type=_setting,
        metavar="FIELD=VALUE",
        help="check at this hyperparameter value (repeatable): routed by field name to the part that has it, "
        "or qualified as KIND.FIELD or NAME.FIELD (region.eps_low=0.1); values are Python literals",
    )
    check.add_argument("-v", "--verbose", action="store_true", help="list every check run on every part")
    check.set_defaults(run=_check)
    explain = sub.add_parser(
        "explain",
        help="a trust region's per-token loss and gradient coefficient against the ratio (PNG, CSV, JSON)",
        description="For each REGION (default every installed one), evaluate the region itself on one-token sequences with "
        "log-ratios log(r) for r from 0.5 to 2, advantages +1 and -1, and anchor probabilities 0.1, 0.5 and 0.9 when the region "
        "depends on them; the gradient coefficient d loss / d logprob comes from autograd. Writes explain.csv, explain.json "
        "and REGION.png (matplotlib, the train extra) into --output.",
    )
    explain.add_argument("regions", nargs="*", metavar="REGION", help="regions to explain (see proxim plugins)")
    explain.add_argument("--output", default="explain", metavar="DIR", help="where to write the files (default: explain)")
    explain.add_argument("--set", action="append", type=_setting, metavar="FIELD=VALUE", help="a region hyperparameter, e.g. --set delta=0.1 (repeatable)")
    explain.add_argument("--points", type=int, default=151, metavar="N", help="ratios on the grid (default 151)")
    explain.set_defaults(run=_explain)
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
