"""The built-in agents, and what they share."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from otpd.errors import OtpdError


def timeout_arg(value: Any, name: str, code: str) -> float:
    """A timeout in seconds from the config (``code`` config_invalid) or a request (bad_request)."""
    if type(value) not in (int, float) or not 0 <= value <= 86_400 * 365:  # NaN fails too
        raise OtpdError(code, f"{name} must be a number of seconds >= 0 (0: no limit), got {value!r}")
    return float(value)


def error_text(error: BaseException) -> str:
    """What a task's or a step's failure is recorded as: its type and message, at most 2,000
    characters.  A message that cannot be had (a ``__str__`` that raises, or gives no string)
    is said to be so: user code must not crash the agent that records its failure."""
    try:
        message = str(error)
    except Exception as exc:
        message = f"<its message could not be read: {type(exc).__name__}>"
    text = f"{type(error).__name__}: {message}"
    return text if len(text) <= 2000 else text[:2000] + "..."


def handler_parts(ref: Any) -> tuple[str, str]:
    """(module, function) of a ``"module:function"`` handler; ``config_invalid`` if it is not one."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise OtpdError("config_invalid", f'handler must be "module:function", got {ref!r}')
    module_name, _, name = ref.partition(":")
    return module_name, name


def check_handler(ref: Any) -> None:
    """For ``check_args``, in the daemon: the handler's form, that its module exists, and that
    its source binds the name.  Nothing of it is run, its parent packages' ``__init__`` neither:
    its code runs only in the agent's process (which imports it afresh at every start), where
    ``load_handler`` finds what this cannot tell."""
    module_name, name = handler_parts(ref)
    try:
        found = find_module(module_name)
    except Exception as exc:  # a bad path entry, a broken finder
        raise OtpdError("config_invalid", f"handler {ref!r}: cannot find {module_name!r} "
                        f"({type(exc).__name__}: {exc})") from None
    if found is None:
        raise OtpdError("config_invalid", f"handler {ref!r}: no module {module_name!r}")
    names = _bound_names(found.origin)
    if names is not None and name not in names:
        raise OtpdError("config_invalid", f"handler {ref!r}: {module_name!r} defines no {name!r}")


def find_module(dotted: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of module ``dotted``, found on ``sys.path`` part by part without importing
    anything (``importlib.util.find_spec`` would run every parent package); a module or
    package imported already is looked up as it is."""
    if dotted in sys.modules:  # imported already (os.path, which is no submodule of a package, too)
        return getattr(sys.modules[dotted], "__spec__", None) or importlib.util.find_spec(dotted)
    parts = dotted.split(".")
    spec = None
    path: list[str] | None = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        module = sys.modules.get(name)
        if module is not None:
            spec = getattr(module, "__spec__", None)
        elif i == 0 and name in sys.builtin_module_names:
            return importlib.util.find_spec(name)  # built into the interpreter: nothing to run
        else:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or []) if i < len(parts) - 1 else None
        if i < len(parts) - 1 and not path:
            return None  # a module, not a package: it has no submodules
    return spec


def _bound_names(origin: str | None) -> set[str] | None:
    """Every name a Python source file binds anywhere (a superset of its module's names),
    read without running it; None where that cannot tell: no source, a star import, a
    ``global`` statement, a module ``__getattr__``, code that binds names at run time
    (``exec``, ``globals()``, ``locals()``, ``setattr``, ``__dict__``, ``sys.modules``)."""
    if not origin or not origin.endswith(".py"):
        return None
    try:
        with open(origin, "rb") as f:
            tree = ast.parse(f.read(), origin)
    except (OSError, SyntaxError, ValueError):
        return None  # the agent's own import will say what is wrong
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif node.id in ("globals", "locals", "setattr", "vars", "exec", "eval", "__import__"):
                return None
        elif isinstance(node, ast.Global) or (isinstance(node, ast.Attribute)
                                              and node.attr in ("__dict__", "modules")):
            return None
    return None if "__getattr__" in names else names


def load_handler(ref: Any) -> Callable[..., Any]:
    """Import ``module:function``; a clear ``config_invalid`` error otherwise."""
    module_name, name = handler_parts(ref)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise OtpdError("config_invalid", f"handler {ref!r}: cannot import {module_name!r} "
                        f"({type(exc).__name__}: {exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise OtpdError("config_invalid", f"handler {ref!r}: {module_name!r} has no function {name!r}")
    return fn  # type: ignore[no-any-return]


def unknown_args(args: dict[str, Any], known: set[str], agent: str) -> None:
    """``config_invalid`` naming the keys of ``args`` that ``agent`` does not take."""
    unknown = sorted(map(str, set(args) - known))
    if unknown:
        raise OtpdError("config_invalid", f"{agent}: unknown args {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(known))})")


def int_arg(args: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = args.get(name, default)
    if type(value) is not int or value < minimum:
        raise OtpdError("config_invalid", f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


DEFAULT_HANDLERS = ("otpd.examples.steps:*",)


def handler_patterns(args: dict[str, Any]) -> list[str]:
    """The allowlist of step handlers in ``args.handlers`` (fnmatch patterns on
    ``module:function``; default ``DEFAULT_HANDLERS``), or ``config_invalid``."""
    value = args.get("handlers", list(DEFAULT_HANDLERS))
    if not isinstance(value, list) or not all(isinstance(p, str) and ":" in p for p in value):
        raise OtpdError("config_invalid", 'handlers must be a list of "module:function" patterns '
                        f'(fnmatch, e.g. "myapp.steps:*"), got {value!r}')
    return list(value)
