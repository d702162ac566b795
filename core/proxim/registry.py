"""Plugin discovery and the registry of parts it fills.

Discovery reads the ``proxim`` entry-point group (built-in plugins are declared there too, by the
``proxim`` distribution itself), registers each module with a pluggy manager, and calls the
registration hooks once per plugin. The result is a plain `Registry` of classes; objectives hold the
resolved parts, so pluggy is never on the training hot path.

Switches (read when a registry is built):
  PROXIM_DISABLE_PLUGIN_AUTOLOAD=1  load only the plugins of the ``proxim`` distribution itself
  PROXIM_BLOCK_PLUGINS=a,b          skip the plugins (entry-point names) a and b
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, NamedTuple, overload

import attrs
import pluggy

from proxim import hookspecs
from proxim.errors import DuplicateNameError, PluginError, UnknownNameError, suggest
from proxim.parts import AXES, Advantage, Baseline, Part, Preference, Preset, TrustRegion, check_part_class, check_task_class
from proxim.tasks import Task

GROUP = "proxim"
BUILTIN_DISTRIBUTION = "proxim"
KINDS = tuple(hookspecs.HOOKS)


class PartInfo(NamedTuple):
    """Where a registered name came from."""

    plugin: str
    distribution: str
    version: str


@attrs.frozen
class PluginRecord:
    """One plugin the registry tried to load; `error` is set when it failed (non-strict builds only)."""

    name: str
    distribution: str
    version: str
    entry_point: str
    error: str | None = None


@attrs.frozen(eq=False)
class Registry:
    """Every registered part and preset, by kind and name, with where each came from."""

    entries: dict[str, dict[str, tuple[Any, PartInfo]]]
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
        """The part class (or `Preset`) registered as `name`; `UnknownNameError` lists what exists."""
        table = self.entries[kind]
        if name not in table:
            known = sorted(table)
            raise UnknownNameError(f"no {kind} named {name!r}.{suggest(name, known)} Registered {kind}s: {', '.join(known) or '(none)'}.")
        return table[name][0]

    def info(self, kind: str, name: str) -> PartInfo:
        self.get(kind, name)
        return self.entries[kind][name][1]

    def info_of(self, part: Part) -> PartInfo | None:
        """Where the class of `part` was registered, or None for an unregistered instance."""
        entry = self.entries[part.kind].get(part.name)
        return entry[1] if entry is not None and entry[0] is type(part) else None

    def available(self) -> dict[str, dict[str, PartInfo]]:
        return {kind: {name: info for name, (_, info) in sorted(table.items())} for kind, table in self.entries.items()}


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "<unknown>", "<unknown>"
    return dist.metadata["Name"] or dist.name, dist.version


def _plugin_entry_points(autoload: bool, blocked: set[str], eps: Iterable[EntryPoint] | None) -> list[EntryPoint]:
    found = list(entry_points(group=GROUP) if eps is None else eps)
    chosen = []
    for ep in sorted(found, key=lambda e: e.name):
        if ep.name in blocked:
            continue
        if not autoload and _dist_of(ep)[0].lower() != BUILTIN_DISTRIBUTION:
            continue
        chosen.append(ep)
    return chosen


def _check_hook_names(module: object, plugin: str, dist: str) -> None:
    """Fail on a ``proxim_*`` attribute that names no hook: almost always a misspelt hook."""
    for attr in dir(module):
        if attr.startswith("proxim_") and attr not in hookspecs.HOOKS.values() and callable(getattr(module, attr)):
            raise PluginError(
                f"plugin {plugin!r} (distribution {dist}) defines {attr!r}, which is not a proxim hook."
                f"{suggest(attr, hookspecs.HOOKS.values())} Hooks: {', '.join(hookspecs.HOOKS.values())}."
            )


class _Registrar:
    """The typed ``register`` callable handed to one plugin for one kind."""

    def __init__(self, kind: str, info: PartInfo, table: dict[str, tuple[Any, PartInfo]]):
        self.kind, self.info, self.table = kind, info, table

    def __call__(self, part: Any) -> Any:
        if self.kind == "preset":
            if not isinstance(part, Preset):
                raise PluginError(f"plugin {self.info.plugin!r}: presets are registered as proxim.Preset(...) records, got {part!r}.")
            name = part.name
        elif self.kind == "task":
            name = check_task_class(part, self.info.plugin).name
        else:
            name = check_part_class(part, self.kind, self.info.plugin).name
        if name in self.table:
            other = self.table[name][1]
            raise DuplicateNameError(
                f"two plugins register the {self.kind} {name!r}: plugin {other.plugin!r} "
                f"(distribution {other.distribution} {other.version}) and plugin {self.info.plugin!r} "
                f"(distribution {self.info.distribution} {self.info.version}). Uninstall one, or block one "
                f"with PROXIM_BLOCK_PLUGINS={self.info.plugin}."
            )
        self.table[name] = (part, self.info)
        return part


def build_registry(
    *,
    plugins: Iterable[tuple[str, object]] = (),
    autoload: bool | None = None,
    blocked: Iterable[str] | None = None,
    entry_points: Iterable[EntryPoint] | None = None,
    strict: bool = True,
    hook_monitor: pluggy.PluginManager | None = None,
) -> Registry:
    """Discover plugins and collect what they register.

    plugins: extra ``(name, module_or_object)`` pairs registered directly (tests, notebooks).
    autoload / blocked: default to the environment switches above.
    entry_points: the entry points to consider (tests pass fakes); default, the installed ``proxim`` group.
    strict: when False, a plugin that fails to load is recorded in `Registry.plugins` instead of raising.
    hook_monitor: a plugin manager to use instead of a fresh one (tests attach hook-call monitoring).
    """
    if autoload is None:
        autoload = os.environ.get("PROXIM_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    if blocked is None:
        blocked = {b.strip() for b in os.environ.get("PROXIM_BLOCK_PLUGINS", "").split(",") if b.strip()}
    pm = hook_monitor or pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)

    infos: dict[str, PartInfo] = {}
    records: list[PluginRecord] = []
    for ep in _plugin_entry_points(autoload, set(blocked), entry_points):
        dist, version = _dist_of(ep)
        try:
            module = _load(ep, dist, version)
            _register(pm, module, ep.name, dist)
        except PluginError as exc:
            if strict:
                raise
            records.append(PluginRecord(ep.name, dist, version, ep.value, error=str(exc)))
            continue
        infos[ep.name] = PartInfo(ep.name, dist, version)
        records.append(PluginRecord(ep.name, dist, version, ep.value))
    for name, obj in plugins:
        _register(pm, obj, name, "<direct>")
        infos[name] = PartInfo(name, "<direct>", "")
        records.append(PluginRecord(name, "<direct>", "", repr(obj)))

    entries: dict[str, dict[str, tuple[Any, PartInfo]]] = {kind: {} for kind in KINDS}
    for kind, hook_name in hookspecs.HOOKS.items():
        for plugin_name, info in infos.items():
            plugin = pm.get_plugin(plugin_name)
            if not any(impl.plugin is plugin for impl in getattr(pm.hook, hook_name).get_hookimpls()):
                continue
            others = [p for n, p in pm.list_name_plugin() if n != plugin_name]
            caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
            caller(register=_Registrar(kind, info, entries[kind]))
    _check_presets(entries)
    return Registry(entries=entries, plugins=tuple(records))


def _load(ep: EntryPoint, dist: str, version: str) -> object:
    try:
        return ep.load()
    except Exception as exc:
        raise PluginError(
            f"plugin {ep.name!r} (entry point {ep.name} = {ep.value!r} in group {GROUP!r}, distribution "
            f"{dist} {version}) failed to import: {type(exc).__name__}: {exc}. Fix or uninstall that "
            f"distribution, or skip it with PROXIM_BLOCK_PLUGINS={ep.name}."
        ) from exc


def _register(pm: pluggy.PluginManager, module: object, name: str, dist: str) -> None:
    _check_hook_names(module, name, dist)
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin {name!r} (distribution {dist}) is invalid: {exc}") from exc


def _check_presets(entries: dict[str, dict[str, tuple[Any, PartInfo]]]) -> None:
    for name, (preset, info) in entries["preset"].items():
        for kind in AXES:
            part = getattr(preset, kind)
            if part not in entries[kind]:
                known = sorted(entries[kind])
                raise PluginError(
                    f"preset {name!r} from plugin {info.plugin!r} names the {kind} {part!r}, which no plugin "
                    f"registered.{suggest(part, known)} Registered {kind}s: {', '.join(known)}."
                )


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry, built on first use from the installed plugins."""
    return build_registry()


def available() -> dict[str, dict[str, PartInfo]]:
    """kind -> name -> (plugin, distribution, version) for every registered part and preset."""
    return default_registry().available()
