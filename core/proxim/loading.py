"""Loading plugins one at a time, each quarantined when it fails (the machinery behind `proxim.build_registry`).

A plugin gets a pluggy manager of its own: its ``proxim_*`` functions are checked, it is registered, and
its registration hooks are called once into a staging table. Only when all of that succeeded do its
names join the shared tables; a plugin is all or nothing. A plugin that fails anywhere is recorded as
broken with its failure, and the names it tried to register are held unavailable with that failure.
Presets are checked last, once every part is known (`Loader.check_presets`).

Every failure message names the plugin with its distribution and version, so that it can be shown on
its own (``proxim plugins``, the `PluginWarning`, strict mode).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, NoReturn

import attrs
import pluggy

from proxim import hookspecs
from proxim.errors import DuplicateNameError, PluginError, UnavailableError, suggest
from proxim.parts import AXES, Preset, check_part_class, check_task_class

BUILTIN_DISTRIBUTION = "proxim"
DIRECT = "<direct>"
"""The distribution shown for a plugin passed to `build_registry` directly."""
KINDS = tuple(hookspecs.HOOKS)

Status = Literal["loaded", "broken", "blocked", "disabled"]
HookMonitor = Callable[[str, Sequence[pluggy.HookImpl], Mapping[str, Any]], None]
"""Called before every hook call with the hook's name, implementations and arguments (pluggy's
``add_hookcall_monitoring`` "before" callback)."""


class PartInfo(NamedTuple):
    """Where a registered name came from."""

    plugin: str
    distribution: str
    version: str

    def describe(self) -> str:
        """``plugin 'hello' (distribution proxim-hello 0.1.0)``."""
        return f"plugin {self.plugin!r} (distribution {self.distribution}{' ' + self.version if self.version else ''})"


NOT_LOADED = {"blocked": "blocked by PROXIM_BLOCK_PLUGINS", "disabled": "disabled by PROXIM_DISABLE_PLUGIN_AUTOLOAD=1", "broken": "broken"}
"""What a plugin's status says about it, for those that are not loaded."""


@attrs.frozen
class PluginRecord:
    """One plugin the registry found: loaded, broken (with its `failure`), blocked or disabled."""

    name: str
    distribution: str
    version: str
    entry_point: str
    status: Status = "loaded"
    failure: PluginError | None = attrs.field(default=None, eq=False)

    @property
    def error(self) -> str | None:
        """Why the plugin is broken: its failure's message (None unless broken)."""
        return None if self.failure is None else str(self.failure)

    @property
    def info(self) -> PartInfo:
        return PartInfo(self.name, self.distribution, self.version)


@attrs.frozen
class Unavailable:
    """A name that cannot be used: `message` says why (its plugin is broken, or a part it needs is missing)."""

    kind: str
    name: str
    info: PartInfo
    """The plugin that registered (or tried to register) the name."""
    reason: str
    """Why, as a clause: ``because its plugin is broken: ...``, ``because it names the advantage ..., which ...``."""
    cause: BaseException | None = attrs.field(default=None, eq=False)

    @property
    def message(self) -> str:
        return f"{self.kind} {self.name!r} of {self.info.describe()} is unavailable {self.reason}"

    def error(self) -> UnavailableError:
        exc = UnavailableError(self.message)
        exc.__cause__ = self.cause
        return exc


class NameTable(dict[str, tuple[Any, PartInfo]]):
    """One kind's usable names -> (class or `Preset`, where it came from), and the names held unavailable.

    Iterating, ``len`` and ``get`` see the usable names only. ``name in table`` is also true of a name
    held unavailable, and ``table[name]`` then raises its `UnavailableError`: a name that a broken plugin
    registered is known, so looking it up says why it cannot be used rather than that nothing has it.
    """

    def __init__(self, entries: Mapping[str, tuple[Any, PartInfo]] | None = None, withheld: Mapping[str, Unavailable] | None = None) -> None:
        super().__init__(entries or {})
        self.withheld: dict[str, Unavailable] = dict(withheld or {})

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or name in self.withheld

    def __missing__(self, name: str) -> NoReturn:
        if name in self.withheld:
            raise self.withheld[name].error()
        raise KeyError(name)

    def withhold(self, unavailable: Unavailable) -> None:
        self.pop(unavailable.name, None)
        self.withheld[unavailable.name] = unavailable


def is_builtin(info: PartInfo) -> bool:
    return info.distribution.lower() == BUILTIN_DISTRIBUTION


def advice(info: PartInfo, *fixes: str) -> str:
    """What to do about a broken plugin: `fixes`, or skipping it; never blocking a built-in plugin, which
    other plugins build on."""
    if is_builtin(info):
        return f"Plugin {info.plugin!r} is built into proxim: reinstall proxim, or report this as a proxim bug."
    *first, last = [*fixes, f"skip it with PROXIM_BLOCK_PLUGINS={info.plugin}"]
    return f"{', '.join(first)}, or {last}."


class Loader:
    """Loads plugins one at a time into `tables`, quarantining each that fails; `records` says what happened."""

    def __init__(self, monitor: HookMonitor | None = None) -> None:
        self.tables = {kind: NameTable() for kind in KINDS}
        self.records: list[PluginRecord] = []
        self.monitor = monitor

    def skip(self, info: PartInfo, entry_point: str, status: Status) -> None:
        self.records.append(PluginRecord(*info, entry_point, status=status))

    def load(self, info: PartInfo, entry_point: str, obtain: Callable[[], object], *, direct: bool = False) -> None:
        """Import (`obtain`), check and register one plugin: all of its names join the tables, or none.
        A `direct` plugin's failure is raised instead of recorded."""
        staged: dict[str, dict[str, tuple[Any, PartInfo]]] = {kind: {} for kind in KINDS}
        claimed: list[tuple[str, str]] = []  # (kind, name) of everything it tried to register
        try:
            self._check_unique(info)
            self._call_hooks(obtain(), info, staged, claimed)
        except PluginError as exc:
            if direct:
                raise
            self.records.append(PluginRecord(*info, entry_point, status="broken", failure=exc))
            self._withhold(info, exc, claimed)
            return
        for kind, names in staged.items():
            self.tables[kind].update(names)
            for name in names:
                self.tables[kind].withheld.pop(name, None)
        self.records.append(PluginRecord(*info, entry_point))

    def _check_unique(self, info: PartInfo) -> None:
        for other in self.records:
            if other.name == info.plugin:
                raise PluginError(
                    f"two distributions declare a plugin named {info.plugin!r}: {other.distribution} {other.version} and {info.distribution} "
                    f"{info.version}; the one loaded second ({info.describe()}) is left out. {advice(info, 'Rename its entry point', 'uninstall it')}"
                )

    def _call_hooks(self, plugin: object, info: PartInfo, staged: dict[str, dict[str, tuple[Any, PartInfo]]], claimed: list[tuple[str, str]]) -> None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        if self.monitor is not None:
            pm.add_hookcall_monitoring(self.monitor, lambda *args: None)
        check_hook_names(pm, plugin, info)
        try:
            pm.register(plugin, name=info.plugin)
            pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"{info.describe()} is invalid: {' '.join(str(exc).split())}") from exc
        for kind, hook_name in hookspecs.HOOKS.items():
            register = Registrar(kind, info, staged[kind], self.tables[kind], claimed)
            try:
                getattr(pm.hook, hook_name)(register=register)
            except PluginError:
                raise  # from register(...): its traceback points at the plugin's own line
            except (Exception, SystemExit) as exc:
                raise PluginError(
                    f"{info.describe()}: its hook {hook_name} raised {type(exc).__name__}: {exc}. {advice(info, 'Fix or uninstall that distribution')}"
                ) from exc

    def _withhold(self, info: PartInfo, failure: PluginError, claimed: Iterable[tuple[str, str]]) -> None:
        for kind, name in claimed:
            if self.tables[kind].get(name) is None:  # not a name another plugin holds (a duplicate)
                self.tables[kind].withhold(Unavailable(kind, name, info, f"because its plugin is broken: {failure}", failure))

    def check_presets(self) -> None:
        """Every part a preset names must be registered. When a part is missing and some plugin is not
        loaded (blocked or broken), it may be that plugin's: the preset alone is unavailable. Otherwise no
        plugin could have it, so the preset's plugin is at fault and is quarantined (which may in turn
        make presets naming its parts unavailable)."""
        absent = [r for r in self.records if r.status in ("blocked", "broken")]
        changed = True
        while changed:
            changed = False
            for name, (preset, info) in list(self.tables["preset"].items()):
                problem = self._missing_part(name, preset, info, absent)
                if isinstance(problem, Unavailable):
                    self.tables["preset"].withhold(problem)
                elif problem is not None:
                    if info.distribution == DIRECT:
                        raise problem
                    self._quarantine_loaded(info, problem)
                    changed = True
                    break

    def _missing_part(self, name: str, preset: Preset, info: PartInfo, absent: list[PluginRecord]) -> Unavailable | PluginError | None:
        for kind in AXES:
            part = getattr(preset, kind)
            table = self.tables[kind]
            if table.get(part) is not None:
                continue
            if part in table.withheld:
                missing = table.withheld[part]
                return Unavailable("preset", name, info, f"because it names the {kind} {part!r}, which is unavailable {missing.reason}", missing.cause)
            known = sorted(table)
            if absent:
                plugins = "; ".join(f"{r.info.describe()}, {NOT_LOADED[r.status]}" for r in absent)
                return Unavailable(
                    "preset",
                    name,
                    info,
                    f"because it names the {kind} {part!r}, which no loaded plugin registers.{suggest(part, known)} It may come from {plugins}.",
                )
            return PluginError(
                f"preset {name!r} of {info.describe()} names the {kind} {part!r}, which no plugin registers.{suggest(part, known)} "
                f"Registered {kind}s: {', '.join(known)}. Name a registered {kind} in the preset, or install the plugin that provides it."
            )
        return None

    def _quarantine_loaded(self, info: PartInfo, failure: PluginError) -> None:
        index = next(i for i, r in enumerate(self.records) if r.info == info and r.status == "loaded")
        self.records[index] = attrs.evolve(self.records[index], status="broken", failure=failure)
        claims = [(kind, name) for kind, table in self.tables.items() for name, (_, owner) in table.items() if owner == info]
        for kind, name in claims:
            del self.tables[kind][name]
        self._withhold(info, failure, claims)


class Registrar:
    """The typed ``register`` callable handed to one plugin for one kind: validates, then stages."""

    def __init__(self, kind: str, info: PartInfo, staged: dict[str, tuple[Any, PartInfo]], table: NameTable, claimed: list[tuple[str, str]]):
        self.kind, self.info, self.staged, self.table, self.claimed = kind, info, staged, table, claimed

    def __call__(self, part: Any) -> Any:
        claim = getattr(part, "name", None)
        if isinstance(claim, str):
            self.claimed.append((self.kind, claim))
        name = self._validated_name(part)
        if name in self.staged:
            raise DuplicateNameError(f"{self.info.describe()} registers the {self.kind} {name!r} twice.")
        owner = self.table.get(name)
        if owner is not None:
            raise DuplicateNameError(duplicate_message(self.kind, name, owner[1], self.info))
        self.staged[name] = (part, self.info)
        return part

    def _validated_name(self, part: Any) -> str:
        who = self.info.describe()
        if self.kind == "preset":
            if not isinstance(part, Preset):
                raise PluginError(f"{who}: presets are registered as proxim.Preset(...) records, got {part!r}.")
            return part.name
        if self.kind == "task":
            return check_task_class(part, self.info.plugin, who=who).name
        return check_part_class(part, self.kind, self.info.plugin, who=who).name


def duplicate_message(kind: str, name: str, first: PartInfo, second: PartInfo) -> str:
    builtin = ", built in" if is_builtin(first) else ""
    keeps = "a built-in part keeps its name" if builtin else "the plugin loaded first keeps it (built-ins first, then by entry-point name)"
    return (
        f"two plugins register the {kind} {name!r}: plugin {first.plugin!r} (distribution {first.distribution} {first.version}{builtin}) "
        f"and plugin {second.plugin!r} (distribution {second.distribution} {second.version}); {keeps}, so plugin {second.plugin!r} is left "
        f"out. {advice(second, f'Rename its {kind} (the class attribute `name`)', f'uninstall {second.distribution}')}"
    )


def check_hook_names(pm: pluggy.PluginManager, plugin: object, info: PartInfo) -> None:
    """Fail on a hook pluggy would not call: a ``proxim_*`` function that is not a hook (almost always a
    misspelt one), a hook without the ``@proxim.hookimpl`` marker, or a marked function that names no hook."""
    hooks = tuple(hookspecs.HOOKS.values())
    listing = f"The hooks: {', '.join(hooks)}."
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is not None:
            target = opts.get("specname") or attr
            if target not in hooks:
                raise PluginError(
                    f"{info.describe()} marks {attr!r} with @proxim.hookimpl, but proxim has no hook {target!r}.{suggest(target, hooks)} "
                    f"Rename it to the hook it implements. {listing}"
                )
        elif attr.startswith(f"{hookspecs.PROJECT}_") and _is_function(plugin, attr):
            if attr in hooks:
                raise PluginError(
                    f"{info.describe()} defines {attr!r} without the @proxim.hookimpl marker, so it would never be called. "
                    f"Put @proxim.hookimpl on the line above `def {attr}(register):`."
                )
            raise PluginError(
                f"{info.describe()} defines {attr!r}, which is not a proxim hook.{suggest(attr, hooks)} Rename it to the hook it "
                f"implements (with @proxim.hookimpl), or give a helper a name that does not start with 'proxim_'. {listing}"
            )


def _is_function(plugin: object, attr: str) -> bool:
    value = inspect.getattr_static(plugin, attr, None)
    return inspect.isfunction(value) or inspect.ismethod(value) or isinstance(value, (staticmethod, classmethod))
