"""Plugin discovery and the registry of parts it fills.

Discovery reads the ``proxim`` entry-point group (built-in plugins are declared there too, by the
``proxim`` distribution itself). Each plugin is loaded on its own, with a pluggy manager of its own:
imported, its ``proxim_*`` functions checked, and its registration hooks called once into a staging
table. Only when all of that succeeded do its names join the registry: a plugin is all or nothing.
Presets are checked last, once every part is known. The result is a plain `Registry` of classes;
objectives hold the resolved parts, so pluggy is never on the training hot path.

Quarantine: a plugin that fails anywhere (import, hook names, a ``register(...)`` check, a hook that
raises, a name another plugin already has, a preset naming a part nobody registers) is left out with
its reason in `Registry.plugins`. Every other plugin stays usable; the names it registered are held
unavailable, so that asking for one raises `UnavailableError` naming the plugin and the failure; one
`PluginWarning` lists the broken plugins when the registry is built. A preset that names a part of a
plugin that is not loaded (blocked, disabled or broken) is unavailable alone; its plugin stays.

Load order: the built-in plugins (distribution ``proxim``) first, then the others by entry-point name.
A name stays with the plugin that registered it first, so a built-in part always keeps its name.

Switches (read when a registry is built):
  PROXIM_DISABLE_PLUGIN_AUTOLOAD=1  load only the plugins of the ``proxim`` distribution itself
  PROXIM_BLOCK_PLUGINS=a,b          skip the plugins (entry-point names) a and b
  PROXIM_STRICT_PLUGINS=1           raise a broken plugin's error instead of leaving it out
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, overload

import attrs

from proxim.errors import PluginError, PluginWarning, UnknownNameError, suggest
from proxim.loading import (
    BUILTIN_DISTRIBUTION,
    DIRECT,
    KINDS,
    NOT_LOADED,
    HookMonitor,
    Loader,
    NameTable,
    PartInfo,
    PluginRecord,
    Unavailable,
    advice,
    is_builtin,
)
from proxim.parts import Advantage, Baseline, Part, Preference, Preset, TrustRegion
from proxim.tasks import Task

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "GROUP",
    "KINDS",
    "NameTable",
    "PartInfo",
    "PluginRecord",
    "Registry",
    "Unavailable",
    "available",
    "build_registry",
    "default_registry",
    "report_registry",
]

GROUP = "proxim"


def _tables(entries: Mapping[str, Mapping[str, tuple[Any, PartInfo]]]) -> dict[str, NameTable]:
    return {kind: table if isinstance(table, NameTable) else NameTable(table) for kind, table in entries.items()}


@attrs.frozen(eq=False)
class Registry:
    """Every registered part and preset, by kind and name, with where each came from; the names held
    unavailable (`unavailable`) and every plugin found, with its status (`plugins`)."""

    entries: dict[str, NameTable] = attrs.field(converter=_tables)
    plugins: tuple[PluginRecord, ...] = ()

    @overload
    def get(self, kind: Literal["baseline"], name: str) -> type[Baseline]: ...
    @overload
    def get(self, kind: Literal["advantage"], name: str) -> type[Advantage]: ...
    @overload
    def get(self, kind: Literal["region"], name: str) -> type[TrustRegion]: ...
    @overload
    def get(self, kind: Literal["preference"], name: str) -> type[Preference]: ...
    @overload
    def get(self, kind: Literal["preset"], name: str) -> Preset: ...
    @overload
    def get(self, kind: Literal["task"], name: str) -> type[Task]: ...
    @overload
    def get(self, kind: str, name: str) -> Any: ...  # a kind known only at run time: any of the above

    def get(self, kind: str, name: str) -> Any:
        """The part class (or `Preset`) registered as `name`.

        `UnavailableError` when its plugin is broken (or, for a preset, a part it names is missing),
        naming the plugin and the failure; `UnknownNameError` listing what exists, and the plugins that
        are not loaded, when nothing registered it.
        """
        table = self.entries[kind]
        entry = table.get(name)
        if entry is not None:
            return entry[0]
        if name in table.withheld:
            raise table.withheld[name].error()
        known = sorted(table)
        raise UnknownNameError(f"no {kind} named {name!r}.{suggest(name, known)} Registered {kind}s: {', '.join(known) or '(none)'}.{self._not_loaded()}")

    def info(self, kind: str, name: str) -> PartInfo:
        self.get(kind, name)
        return self.entries[kind][name][1]

    def info_of(self, part: Part) -> PartInfo | None:
        """Where the class of `part` was registered, or None for an unregistered instance."""
        entry = self.entries[part.kind].get(part.name)
        return entry[1] if entry is not None and entry[0] is type(part) else None

    def available(self) -> dict[str, dict[str, PartInfo]]:
        return {kind: {name: info for name, (_, info) in sorted(table.items())} for kind, table in self.entries.items()}

    def unavailable(self) -> dict[str, dict[str, Unavailable]]:
        """kind -> name -> why it cannot be used, for every name held unavailable."""
        return {kind: dict(sorted(table.withheld.items())) for kind, table in self.entries.items()}

    def _not_loaded(self) -> str:
        absent = [r for r in self.plugins if r.status != "loaded"]
        if not absent:
            return ""
        listing = "; ".join(r.error.rstrip(".") if r.error else f"{r.info.describe()}, {NOT_LOADED[r.status]}" for r in absent)
        return f" Plugins not loaded, which may provide it: {listing}."


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "<unknown>", "<unknown>"
    return dist.metadata["Name"] or dist.name, dist.version


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def build_registry(
    *,
    plugins: Iterable[tuple[str, object]] = (),
    autoload: bool | None = None,
    blocked: Iterable[str] | None = None,
    entry_points: Iterable[EntryPoint] | None = None,
    strict: bool | None = None,
    hook_monitor: HookMonitor | None = None,
) -> Registry:
    """Discover plugins and collect what they register, leaving out (quarantining) each broken plugin.

    plugins: extra ``(name, module_or_object)`` pairs registered directly (tests, notebooks). They load
             last, and their errors are raised: you asked for them.
    autoload / blocked: default to the environment switches above.
    entry_points: the entry points to consider (tests pass fakes); default, the installed ``proxim`` group.
    strict: True raises once every plugin was tried: a broken plugin's own error (its type, message and
            traceback), or one `PluginError` listing them when several are broken. False leaves them out
            with one `PluginWarning`. Default: the PROXIM_STRICT_PLUGINS switch (off).
    hook_monitor: called before every hook call (tests use it to prove no hook runs after this).
    """
    if autoload is None:
        autoload = not _env_flag("PROXIM_DISABLE_PLUGIN_AUTOLOAD")
    if blocked is None:
        blocked = os.environ.get("PROXIM_BLOCK_PLUGINS", "").split(",")
    blocked = {b.strip() for b in blocked if b.strip()}
    if strict is None:
        strict = _env_flag("PROXIM_STRICT_PLUGINS")

    loader = Loader(hook_monitor)
    for ep in sorted(_entry_points(entry_points), key=_load_order):
        dist, version = _dist_of(ep)
        info = PartInfo(ep.name, dist, version)
        if ep.name in blocked:
            loader.skip(info, ep.value, "blocked")
        elif not autoload and not is_builtin(info):
            loader.skip(info, ep.value, "disabled")
        else:
            loader.load(info, ep.value, functools.partial(_import, ep, info))
    for name, obj in plugins:
        loader.load(PartInfo(name, DIRECT, ""), repr(obj), _given(obj), direct=True)
    loader.check_presets()

    registry = Registry(entries=loader.tables, plugins=tuple(loader.records))
    failures = [r.failure for r in registry.plugins if r.failure is not None]
    if failures and strict:
        if len(failures) == 1:
            raise failures[0]
        raise PluginError(f"{len(failures)} plugins are broken (PROXIM_STRICT_PLUGINS is on): {_listing(failures)}") from failures[0]
    if failures:
        one = len(failures) == 1
        warnings.warn(
            f"{len(failures)} proxim plugin{' is' if one else 's are'} broken and left out (asking for {'its' if one else 'their'} parts raises "
            f"UnavailableError; everything else works): {_listing(failures)} `proxim plugins` lists every plugin; PROXIM_STRICT_PLUGINS=1 makes "
            "a broken plugin an error.",
            PluginWarning,
            stacklevel=2,
        )
    return registry


def _listing(failures: Sequence[PluginError]) -> str:
    return str(failures[0]) if len(failures) == 1 else " ".join(f"({i}) {failure}" for i, failure in enumerate(failures, 1))


def _entry_points(eps: Iterable[EntryPoint] | None) -> list[EntryPoint]:
    """`eps`, or the installed entry points of the ``proxim`` group."""
    return list(entry_points(group=GROUP) if eps is None else eps)


def _load_order(ep: EntryPoint) -> tuple[bool, str, str]:
    """Built-in plugins first, then by entry-point name (and distribution, between equal names)."""
    dist = _dist_of(ep)[0]
    return dist.lower() != BUILTIN_DISTRIBUTION, ep.name, dist


def _given(plugin: object) -> Callable[[], object]:
    return lambda: plugin


def _import(ep: EntryPoint, info: PartInfo) -> object:
    try:
        return ep.load()
    except (Exception, SystemExit) as exc:  # a module that calls sys.exit() on import is broken too, not the end of proxim
        raise PluginError(
            f"plugin {ep.name!r} (entry point {ep.name} = {ep.value!r} in group {GROUP!r}, distribution {info.distribution} "
            f"{info.version}) failed to import: {type(exc).__name__}: {exc}. {advice(info, 'Fix or uninstall that distribution')}"
        ) from exc


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry, built on first use from the installed plugins."""
    return build_registry()


def report_registry() -> Registry:
    """The installed plugins' registry for a report (``proxim plugins``, ``proxim check``): broken plugins
    are left out whatever PROXIM_STRICT_PLUGINS says, and without a warning, since the report lists them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        return build_registry(strict=False)


def available() -> dict[str, dict[str, PartInfo]]:
    """kind -> name -> (plugin, distribution, version) for every registered part and preset."""
    return default_registry().available()
