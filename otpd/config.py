"""Read and validate the TOML config into frozen specs.

Validation happens once, here, at the edge: each table has a table of known
keys, each key one small check.  Every problem is collected (not just the
first) and named by its dotted key and its line in the file, e.g.
``otpd.toml:14: root.children[1].restart: 'sometimes' is not one of ...``.
tomllib gives no positions for values, so ``_key_lines`` maps each key to the
line that sets it with a small scan of the text.
"""

from __future__ import annotations

import copy
import dataclasses
import grp
import importlib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otpd.core.spec import (
    DEFAULT_HEARTBEAT_MS,
    DEFAULT_HEARTBEAT_TIMEOUT_MS,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_MAX_SECONDS,
    DEFAULT_SHUTDOWN_MS,
    RESTARTS,
    SPARE_POLICIES,
    START_ORDERS,
    STRATEGIES,
    AgentSpec,
    ChildSpec,
    SupervisorSpec,
    walk,
)
from otpd.errors import OtpdError
from otpd.store.lmdb_store import StoreSettings

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}\Z")  # (\Z: "$" would take a final newline)
LOG_LEVELS = ("debug", "info", "warning", "error")
DURABILITIES = ("process", "fsync", "none")
SYNC_HELPERS = ("auto", "always", "never")  # [store] sync_helper, under fsync: see otpd.agent.runtime.Syncer
SOCKET_NAME = "otpd.sock"


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path
    runtime_dir: Path
    socket: Path
    socket_group: str | None
    log_level: str


@dataclass(frozen=True)
class StoreConfig:
    durability: str
    map_size_mb: int
    map_size_max_mb: int
    sync_interval_ms: int
    checkpoint_ms: int = 100
    sync_helper: str = "auto"


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    store: StoreConfig
    root: SupervisorSpec
    features: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> percent
    def store_settings(self) -> StoreSettings:
        return StoreSettings(
            path=self.daemon.state_dir / "store", durability=self.store.durability,
            map_size_mb=self.store.map_size_mb, map_size_max_mb=self.store.map_size_max_mb,
            sync_interval_ms=self.store.sync_interval_ms, checkpoint_ms=self.store.checkpoint_ms,
            sync_helper=self.store.sync_helper,
        )

    def agent_specs(self) -> list[AgentSpec]:
        """Every agent spec of the tree, the dynamic supervisors' templates included."""
        nodes = walk(self.root)
        out = [n for n in nodes if isinstance(n, AgentSpec)]
        out += [n.template for n in nodes if isinstance(n, SupervisorSpec) and n.template is not None]
        return out

    def agent_classes(self) -> set[str]:
        return {spec.agent for spec in self.agent_specs()}


class ConfigError(OtpdError):
    def __init__(self, path: Path, errors: list[str]) -> None:
        super().__init__("config_invalid", "\n".join(errors), {"path": str(path), "errors": errors})
        self.errors = errors


# -- key -> line ------------------------------------------------------------

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
_KEY_RE = re.compile(r"""^\s*([A-Za-z0-9_\-]+|"[^"]*"|'[^']*')\s*=""")


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted paths (``root.children[1].restart``) to 1-based line numbers."""
    lines: dict[str, int] = {}
    arrays: dict[str, int] = {}
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER_RE.match(line)
        if header:
            parts = [p.strip().strip("\"'") for p in header.group(2).split(".")]
            resolved: list[str] = []
            for part in parts[:-1]:
                resolved.append(part)
                key = ".".join(resolved)
                if key in arrays:
                    resolved[-1] = f"{part}[{arrays[key] - 1}]"
            resolved.append(parts[-1])
            current = ".".join(resolved)
            if header.group(1) == "[[":
                arrays[current] = arrays.get(current, 0) + 1
                current = f"{current}[{arrays[current] - 1}]"
            lines.setdefault(current, number)
            continue
        assignment = _KEY_RE.match(line)
        if assignment:
            name = assignment.group(1).strip("\"'")
            lines.setdefault(f"{current}.{name}" if current else name, number)
    return lines


class _Checker:
    """Collects errors, each located by dotted path and line."""

    def __init__(self, path: Path, lines: dict[str, int]) -> None:
        self.path = path
        self.lines = lines
        self.errors: list[str] = []
        self.bad: set[str] = set()  # the paths with an error
        self.switches: list[tuple[str, str]] = []  # (where, flag) to check against [features]

    def error(self, where: str, message: str) -> None:
        probe = where
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = self.lines.get(probe)
        loc = f"{self.path.name}:{line}" if line else self.path.name
        self.bad.add(where)
        self.errors.append(f"{loc}: {where}: {message}")

    def table(self, where: str, value: Any, known: dict[str, Callable[[str, Any], Any]]) -> dict[str, Any]:
        """Check every key of a table; return the checked values of the valid ones."""
        if not isinstance(value, dict):
            self.error(where, f"must be a table, not {_type(value)}")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            at = f"{where}.{key}" if where else key
            check = known.get(key)
            if check is None:
                self.error(at, f"unknown key (known: {', '.join(sorted(known))})")
                continue
            try:
                out[key] = check(at, item)
            except _Bad as bad:
                self.error(at, str(bad))
        return out


class _Bad(Exception):
    pass


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _str(_: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string, not {_type(value)}")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(at: str, value: Any) -> str:
        _str(at, value)
        if value not in choices:
            raise _Bad(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return check


def _int(low: int, high: int) -> Callable[[str, Any], int]:
    def check(_: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"must be an integer, not {_type(value)}")
        if not low <= value <= high:
            raise _Bad(f"{value} is out of range {low}..{high}")
        return value

    return check


def _seconds(_: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Bad(f"must be a number, not {_type(value)}")
    if not 0 < value <= 86400:
        raise _Bad(f"{value} is out of range (0, 86400]")
    return float(value)


def _shutdown(_: str, value: Any) -> int | None:
    if value == "brutal_kill":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3_600_000:
        raise _Bad(f"must be milliseconds (0..3600000) or \"brutal_kill\", not {value!r}")
    return value


def _id(_: str, value: Any) -> str:
    _str(_, value)
    if not ID_RE.match(value):
        raise _Bad(f"{value!r} is not a valid id (letters, digits, _ . @ : -; at most 128)")
    return str(value)


def _group(_: str, value: Any) -> str:
    # checked here, not first when the socket is made: there it would end `otpd run` with a
    # KeyError that `otpd check-config` had not seen
    _str(_, value)
    try:
        grp.getgrnam(value)
    except KeyError:
        raise _Bad(f"no group {value!r} on this system") from None
    return str(value)


def _args(_: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"must be a table, not {_type(value)}")
    return value


class _FeatureKeys(dict):  # type: ignore[type-arg]
    """[features]: any flag name (checked as an id) whose value is on / off / a percentage."""

    def get(self, key: Any, default: Any = None) -> Any:
        return _feature

    def __contains__(self, key: object) -> bool:
        return True


def _feature(where: str, value: Any) -> float:
    _id(where, where.rpartition(".")[2])
    from otpd.flags import parse

    try:
        return parse(value)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def check_agent_class(ref: str) -> None:
    """Import ``module:Class`` and check it is an Agent; raise _Bad with the reason."""
    from otpd.agent.base import Agent

    module_name, sep, class_name = ref.partition(":")
    if not sep or not module_name or not class_name:
        raise _Bad(f"{ref!r} is not \"module:Class\"")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # any import-time failure of user code is a config error,
        # sys.exit() at its top level too: in a reload it would otherwise end the daemon
        raise _Bad(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    from otpd.agent import code

    if code.is_changed(module_name):
        return  # a reload imports the new version and checks that (this is the old one)
    code.note(module_name)  # a reload imports it again if its file changes
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise _Bad(f"{ref!r} is not a subclass of otpd.agent.base.Agent")
    from otpd.agent.state import validate_declaration

    try:
        validate_declaration(cls)
    except TypeError as exc:
        raise _Bad(f"{ref}: bad state declaration: {exc}") from None


def agent_class(ref: str) -> Any:
    """The class ``module:Class`` names, its module imported already (``check_agent_class``)."""
    module_name, _, class_name = ref.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def agent_args_error(ref: str, args: dict[str, Any], template: bool = False) -> str | None:
    """What the ``check_args`` (``check_template_args`` for a template's) of ``ref`` (imported
    already, by ``check_agent_class``) finds wrong with ``args``; None if nothing.  It gets a
    copy: a check cannot change what the child gets."""
    from otpd.agent import code

    if code.is_changed(ref.partition(":")[0]):
        return None  # a reload checks with the new version's check_args, once it is imported
    try:
        cls = agent_class(ref)
        (cls.check_template_args if template else cls.check_args)(copy.deepcopy(args))
    except OtpdError as err:
        return err.message
    except (ValueError, TypeError) as exc:
        return str(exc)
    except (Exception, SystemExit) as exc:  # a bug in a user's check is still a clear error, never a traceback
        return f"{ref}.check_args raised {type(exc).__name__}: {exc}"
    return None


def _agent_ref(_: str, value: Any) -> str:
    _str(_, value)
    check_agent_class(value)
    return str(value)


AGENT_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "id": _id,
    "agent": _agent_ref,
    "restart": _one_of(RESTARTS),
    "shutdown_ms": _shutdown,
    "heartbeat_ms": _int(10, 3_600_000),
    "heartbeat_timeout_ms": _int(0, 86_400_000),
    "args": _args,
    "agent_next": _agent_ref,
    "switch": _id,
    "spare": _one_of(SPARE_POLICIES),
}
SUPERVISOR_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "id": _id,
    "supervisor": _one_of(("static", "dynamic")),
    "strategy": _one_of(STRATEGIES),
    "max_restarts": _int(0, 1_000_000),
    "max_seconds": _seconds,
    "restart": _one_of(RESTARTS),
    "children": lambda _, v: v,  # checked node by node below
    "template": lambda _, v: v,
    "start": _one_of(START_ORDERS),
}
ROOT_KEYS = {k: v for k, v in SUPERVISOR_KEYS.items()
             if k in ("strategy", "max_restarts", "max_seconds", "children", "start")}


def _agent_spec(c: _Checker, where: str, raw: dict[str, Any], child_id: str,
                check_args: bool = False) -> AgentSpec | None:
    if "agent" not in raw:
        if f"{where}.agent" not in c.bad:  # not there at all, rather than a bad one
            c.error(where, "missing key 'agent'")
        return None
    if ("agent_next" in raw) != ("switch" in raw):
        c.error(where, "a version switch needs both 'agent_next' and 'switch' (a feature flag)")
    elif "switch" in raw:
        c.switches.append((f"{where}.switch", raw["switch"]))
    if check_args:  # a template's args are completed by each add: checked as far as they go
        for key in ("agent", "agent_next"):
            problem = agent_args_error(raw[key], raw.get("args", {}), template=child_id == "*") \
                if key in raw else None
            if problem is not None:
                c.error(f"{where}.args", f"{problem} (checked by {raw[key]})")
    return AgentSpec(
        id=child_id,
        agent=raw["agent"],
        restart=raw.get("restart", "permanent"),
        shutdown_ms=raw.get("shutdown_ms", DEFAULT_SHUTDOWN_MS),
        heartbeat_ms=raw.get("heartbeat_ms", DEFAULT_HEARTBEAT_MS),
        heartbeat_timeout_ms=raw.get("heartbeat_timeout_ms", DEFAULT_HEARTBEAT_TIMEOUT_MS),
        args=raw.get("args", {}),
        agent_next=raw.get("agent_next"),
        switch=raw.get("switch"),
        spare=raw.get("spare", "on_restart"),
    )


def _children(c: _Checker, where: str, value: Any, seen: set[str]) -> tuple[ChildSpec, ...]:
    if not isinstance(value, list):
        c.error(where, f"must be an array of tables ([[{where}]]), not {_type(value)}")
        return ()
    out: list[ChildSpec] = []
    for i, item in enumerate(value):
        spec = _child(c, f"{where}[{i}]", item, seen)
        if spec is not None:
            out.append(spec)
    return tuple(out)


def _child(c: _Checker, where: str, item: Any, seen: set[str]) -> ChildSpec | None:
    if not isinstance(item, dict):
        c.error(where, f"must be a table, not {_type(item)}")
        return None
    if "supervisor" in item and "agent" in item:
        c.error(where, "has both 'agent' and 'supervisor': a child is one or the other")
        return None
    is_sup = "supervisor" in item
    raw = c.table(where, item, SUPERVISOR_KEYS if is_sup else AGENT_KEYS)
    child_id = raw.get("id")
    if "id" not in item:
        c.error(where, "missing key 'id'")
    elif child_id is not None:
        if child_id in seen or child_id == "root":
            c.error(f"{where}.id", f"{child_id!r} is used twice (ids name children across the whole tree)")
        seen.add(child_id)
    if child_id is None:
        return None
    if not is_sup:
        if "agent" not in item and "supervisor" not in item:
            c.error(where, "needs 'agent = \"module:Class\"' or 'supervisor = \"static\"|\"dynamic\"'")
            return None
        # args that are not a table are reported already
        return _agent_spec(c, where, raw, child_id, check_args="args" not in item or "args" in raw)
    return _supervisor(c, where, item, raw, child_id, seen)


def _supervisor(
    c: _Checker, where: str, item: dict[str, Any], raw: dict[str, Any], sup_id: str, seen: set[str]
) -> SupervisorSpec | None:
    kind = raw.get("supervisor", "static")
    children: tuple[ChildSpec, ...] = ()
    template = None
    if kind == "dynamic":
        if "children" in item:
            c.error(f"{where}.children", "a dynamic supervisor's children are added at run time")
        if raw.get("strategy", "one_for_one") != "one_for_one":
            c.error(f"{where}.strategy", "a dynamic supervisor is one_for_one")
        if "template" in item:
            t_where = f"{where}.template"
            t_keys = {k: v for k, v in AGENT_KEYS.items() if k != "id"}
            t_raw = c.table(t_where, item["template"], t_keys)
            if isinstance(item["template"], dict):
                template = _agent_spec(c, t_where, {"restart": "transient", **t_raw}, "*",
                                       check_args="args" not in item["template"] or "args" in t_raw)
    else:
        if "template" in item:
            c.error(f"{where}.template", "only a dynamic supervisor has a template")
        children = _children(c, f"{where}.children", item.get("children", []), seen)
    return SupervisorSpec(
        id=sup_id,
        kind=kind,
        strategy=raw.get("strategy", "one_for_one"),
        max_restarts=raw.get("max_restarts", DEFAULT_MAX_RESTARTS),
        max_seconds=raw.get("max_seconds", DEFAULT_MAX_SECONDS),
        restart=raw.get("restart", "permanent"),
        children=children,
        template=template,
        start=raw.get("start", "serial"),
    )


def parse(text: str, path: Path) -> Config:
    """Validate ``text`` (the contents of ``path``); raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"{path.name}: not valid TOML: {exc}"]) from None
    c = _Checker(path, _key_lines(text))
    top = c.table("", data, {"daemon": lambda _, v: v, "store": lambda _, v: v, "root": lambda _, v: v,
                             "features": lambda _, v: v})
    base = path.parent
    daemon = c.table("daemon", top.get("daemon", {}), {
        "state_dir": _str, "runtime_dir": _str, "socket": _str, "socket_group": _group,
        "log_level": _one_of(LOG_LEVELS),
    })
    store = c.table("store", top.get("store", {}), {
        "durability": _one_of(DURABILITIES), "map_size_mb": _int(1, 1 << 24),
        "map_size_max_mb": _int(1, 1 << 24), "sync_interval_ms": _int(1, 3_600_000),
        "checkpoint_ms": _int(1, 3_600_000), "sync_helper": _one_of(SYNC_HELPERS),
    })
    root_raw = top.get("root", {})
    root_keys = c.table("root", root_raw, ROOT_KEYS)
    seen: set[str] = set()
    children = _children(c, "root.children", root_raw.get("children", []) if isinstance(root_raw, dict) else [], seen)
    features = c.table("features", top.get("features", {}), _FeatureKeys())
    for where, flag in c.switches:
        if flag not in features:
            c.error(where, f"feature {flag!r} is not declared in [features]")
    if c.errors:
        raise ConfigError(path, c.errors)
    runtime_dir = base / daemon.get("runtime_dir", "var/run")
    return Config(
        path=path,
        daemon=DaemonConfig(
            state_dir=base / daemon.get("state_dir", "var/lib"),
            runtime_dir=runtime_dir,
            socket=base / daemon["socket"] if "socket" in daemon else runtime_dir / SOCKET_NAME,
            socket_group=daemon.get("socket_group"),
            log_level=daemon.get("log_level", "info"),
        ),
        store=StoreConfig(
            durability=store.get("durability", "process"),
            map_size_mb=store.get("map_size_mb", 1024),
            map_size_max_mb=max(store.get("map_size_max_mb", 65536), store.get("map_size_mb", 1024)),
            sync_interval_ms=store.get("sync_interval_ms", 1000),
            checkpoint_ms=store.get("checkpoint_ms", 100),
            sync_helper=store.get("sync_helper", "auto"),
        ),
        root=SupervisorSpec(
            id="root",
            strategy=root_keys.get("strategy", "one_for_one"),
            max_restarts=root_keys.get("max_restarts", DEFAULT_MAX_RESTARTS),
            max_seconds=root_keys.get("max_seconds", DEFAULT_MAX_SECONDS),
            children=children,
            start=root_keys.get("start", "serial"),
        ),
        features=features,
    )


def load(path: str | Path) -> Config:
    p = Path(path).resolve()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(p, [f"{p}: cannot read: {exc}"]) from None
    return parse(text, p)
