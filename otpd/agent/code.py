"""Agent code the daemon holds, and a new version of it on reload.

An agent's process is forked, not exec'd: it runs the module objects the daemon
imported.  So a new version of an agent's module reaches its processes only if the
daemon imports it again.  A reload does that for each agent module (the module of
``agent = "module:Class"``) whose file changed since it was imported: the new version
runs into a fresh module object, and the fresh modules replace the old ones only if
every one of them imports and checks; otherwise nothing changes.  The agents that run
a re-imported module then restart.

Only those modules: the modules they import are not imported again, and neither is
otpd's own code (``otpd.*``); a new version of those needs a restart of the daemon.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from types import ModuleType

_seen: dict[str, tuple[int, int, int]] = {}  # module -> its file's (mtime_ns, size, inode) when imported


class ReimportFailed(Exception):
    """A new version did not import or check; ``str()`` says which and why."""


def _stamp(module: ModuleType | None) -> tuple[int, int, int] | None:
    path = getattr(module, "__file__", None)
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _reloadable(name: str) -> bool:
    return name != "otpd" and not name.startswith("otpd.") and name != "__main__"


def note(module_name: str) -> None:
    """The daemon has imported ``module_name`` (to check an agent class): remember its file."""
    if module_name not in _seen and _reloadable(module_name):
        stamp = _stamp(sys.modules.get(module_name))
        if stamp is not None:
            _seen[module_name] = stamp


def changed(refs: Iterable[str]) -> list[str]:
    """The agent modules among ``refs`` ("module:Class") whose file is not the one imported."""
    names = sorted({ref.partition(":")[0] for ref in refs})
    return [n for n in names if n in _seen and _stamp(sys.modules.get(n)) != _seen[n]]


def reimport(names: list[str], check: Callable[[], None]) -> None:
    """Import each of ``names`` afresh, then ``check()`` (which raises if the new code is
    not usable); on any failure every old module is put back and ReimportFailed raised."""
    old = {name: sys.modules[name] for name in names}
    try:
        for name in names:
            sys.modules[name] = _fresh(name, old[name])  # where the module's own code looks for itself
            _link(name, sys.modules[name])
        check()
    except ReimportFailed:
        _restore(old)
        raise
    except Exception as exc:
        _restore(old)
        raise ReimportFailed(f"{type(exc).__name__}: {exc}") from None
    for name in names:
        _seen[name] = _stamp(sys.modules[name]) or _seen[name]


def _fresh(name: str, old: ModuleType) -> ModuleType:
    spec = old.__spec__
    if spec is None or spec.loader is None:
        raise ReimportFailed(f"cannot import {name!r} again: it has no loader")
    module = importlib.util.module_from_spec(spec)
    try:
        loader = spec.loader
        if isinstance(loader, importlib.machinery.SourceFileLoader) and spec.origin:
            # compiled from the source, not a cached .pyc: a .pyc is checked against the
            # source's size and mtime in whole seconds, which an edit can leave unchanged
            code = loader.source_to_code(loader.get_data(spec.origin), spec.origin)
            exec(code, module.__dict__)  # noqa: S102 - the agent module the config names
        else:
            loader.exec_module(module)
    except Exception as exc:
        raise ReimportFailed(f"cannot import {name!r} again: {type(exc).__name__}: {exc}") from None
    return module


def _link(name: str, module: ModuleType) -> None:
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def _restore(old: dict[str, ModuleType]) -> None:
    for name, module in old.items():
        sys.modules[name] = module
        _link(name, module)
