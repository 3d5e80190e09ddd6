"""Agent code the daemon holds, and a new version of it on reload.

An agent's process is forked, not exec'd: it runs the module objects the daemon
imported.  So a new version of an agent's module reaches its processes only if the
daemon imports it again.  A reload does that for each agent module (the module of
``agent = "module:Class"``) whose file changed since it was imported: the new version
runs into a fresh module object, and the fresh modules replace the old ones only if
every one of them imports and checks; otherwise nothing changes.  The agents that run
a re-imported module then restart.

An agent module that holds something of a module imported anew (``from base import
Base`` to subclass it, a function, the module itself) is imported anew after it, changed
or not, until none holds an old version: so a subclass gets the new base whatever the
modules' names, and its agents restart too.  Other modules are not imported again (the
helpers agent modules import, otpd's own code): a new version of those needs a restart
of the daemon.
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


def note_loaded() -> None:
    """Remember the file of every module imported so far (the daemon calls this at start,
    before the first fork): a module the config names only later, once its file changed,
    is then still seen as changed."""
    for name, module in list(sys.modules.items()):
        note(name, module)


def note(module_name: str, module: ModuleType | None = None) -> None:
    """``module_name`` is imported (to check an agent class, say): remember its file, unless
    it already is remembered."""
    if module_name not in _seen and _reloadable(module_name):
        stamp = _stamp(module or sys.modules.get(module_name))
        if stamp is not None:
            _seen[module_name] = stamp


def is_changed(module_name: str) -> bool:
    return module_name in _seen and _stamp(sys.modules.get(module_name)) != _seen[module_name]


def changed(refs: Iterable[str]) -> list[str]:
    """The agent modules among ``refs`` ("module:Class") whose file is not the one imported."""
    return [n for n in sorted({ref.partition(":")[0] for ref in refs}) if is_changed(n)]


def reimport(changed: list[str], check: Callable[[list[str]], None], others: Iterable[str] = ()) -> list[str]:
    """Import each of ``changed`` afresh, then each module of ``others`` (the config's other
    agent modules) or of ``changed`` that holds an old version of something imported anew,
    round after round until none does, or a round would import the same modules as the last
    (a cycle, or a holder out of reach: it keeps what it has).  Then ``check(names)`` raises
    if the new code is not usable.  Returns every module imported anew; on any failure (an
    exception, ``SystemExit`` included) every old module is put back and ReimportFailed raised."""
    pool = sorted(set(changed) | {n for n in others if n in sys.modules and _reloadable(n)})
    old = {name: sys.modules[name] for name in pool}
    old_seen = {name: _seen[name] for name in pool if name in _seen}
    done: list[str] = []
    versions: dict[str, list[ModuleType]] = {}  # every version a module had before its current one
    try:
        todo = sorted(changed)
        for _round in range(len(pool)):
            for name in todo:
                stamp = _stamp(old[name])  # before it runs: an edit meanwhile is seen next time
                versions.setdefault(name, []).append(sys.modules[name])  # the first time: old[name]
                _fresh(name, old[name])
                if stamp is not None:
                    _seen[name] = stamp  # this is the version imported now
                if name not in done:
                    done.append(name)
            gone = _replaced(versions)
            again = [name for name in pool if _holds_old(sys.modules[name], versions, gone)]
            if not again or again == todo:
                break
            todo = again
        done.sort()
        check(done)
    except BaseException as exc:  # whatever the new code raises, sys.exit() too: the daemon goes on
        _restore(old)
        _seen.update(old_seen)
        if isinstance(exc, ReimportFailed):
            raise
        raise ReimportFailed(f"{type(exc).__name__}: {exc}") from None
    return done


def _replaced(versions: dict[str, list[ModuleType]]) -> set[int]:
    """The ids of what the earlier versions of these modules held and their current versions
    do not (an earlier version: the one before the reload, or one of a round before)."""
    gone: set[int] = set()
    for name, earlier in versions.items():
        kept = {id(value) for value in vars(sys.modules[name]).values()}
        for version in earlier:
            gone.update(id(value) for value in vars(version).values() if id(value) not in kept)
    return gone


def _holds_old(module: ModuleType, versions: dict[str, list[ModuleType]], gone: set[int]) -> bool:
    """Does ``module`` hold an earlier version of a module imported anew, or a value (or an
    instance of a class) that such a version held and the current one does not?  By identity,
    whatever names they go by (constants too); values inside containers are out of its sight."""
    for value in list(vars(module).values()):
        if isinstance(value, ModuleType):
            if any(value is version for earlier in versions.values() for version in earlier):
                return True
        elif id(value) in gone or id(type(value)) in gone:
            return True
    return False


def _fresh(name: str, old: ModuleType) -> None:
    """Run the module's current source into a new module object, which is ``sys.modules[name]``
    while it runs (where its own code, dataclasses among it, looks for it) and after."""
    spec = old.__spec__
    if spec is None or spec.loader is None:
        raise ReimportFailed(f"cannot import {name!r} again: it has no loader")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _link(name, module)
    try:
        loader = spec.loader
        if isinstance(loader, importlib.machinery.SourceFileLoader) and spec.origin:
            # compiled from the source, not a cached .pyc: a .pyc is checked against the
            # source's size and mtime in whole seconds, which an edit can leave unchanged
            code = loader.source_to_code(loader.get_data(spec.origin), spec.origin)
            exec(code, module.__dict__)  # noqa: S102 - the agent module the config names
        else:
            loader.exec_module(module)
    except BaseException as exc:  # sys.exit() at its top level too
        raise ReimportFailed(f"cannot import {name!r} again: {type(exc).__name__}: {exc}") from None
    prefix = name + "."
    for sub, submodule in list(sys.modules.items()):  # a package keeps its imported submodules
        child = sub[len(prefix):]
        if sub.startswith(prefix) and "." not in child and not hasattr(module, child):
            setattr(module, child, submodule)


def _link(name: str, module: ModuleType) -> None:
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def _restore(old: dict[str, ModuleType]) -> None:
    for name, module in old.items():
        sys.modules[name] = module
        _link(name, module)
