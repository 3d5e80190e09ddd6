"""Step handlers for the workflow tests (allowed by the test configs' coordinator)."""

from __future__ import annotations

import os
from typing import Any


def _log(args: dict[str, Any], line: str) -> None:
    with open(args["log"], "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def record(args: dict[str, Any], results: list[Any]) -> Any:
    """Note that this step ran; return what it saw."""
    _log(args, args["name"])
    return {"name": args["name"], "earlier": len(results)}


def gate(args: dict[str, Any], results: list[Any]) -> Any:
    """Block until the test opens the FIFO for writing and writes to it."""
    _log(args, "gate")
    with open(args["fifo"], encoding="utf-8") as fh:  # blocks until the test is the writer
        return {"gate": fh.read().strip(), "earlier": len(results)}


def boom(args: dict[str, Any], results: list[Any]) -> Any:
    _log(args, "boom")
    raise RuntimeError("the poison step")


def crash(args: dict[str, Any], results: list[Any]) -> Any:
    os._exit(3)


class BadStr(Exception):
    def __str__(self) -> str:
        raise ValueError("no str for you")


class NotStr(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


def raises_bad_str(args: dict[str, Any], results: list[Any]) -> Any:
    _log(args, "bad_str")
    raise BadStr()


def returns_a_set(args: dict[str, Any], results: list[Any]) -> Any:
    _log(args, "set")
    return {1, 2, 3}


def exits_0(args: dict[str, Any], results: list[Any]) -> Any:
    """Ends the process with status 0, as a normal exit looks."""
    _log(args, "exit0")
    os._exit(0)


def tuple_key(args: dict[str, Any], results: list[Any]) -> Any:
    """Packs (a tuple as a map key), and does not load back."""
    _log(args, "tuple")
    return {(1, 2): "x"}


def big(args: dict[str, Any], results: list[Any]) -> Any:
    """A result a 1 MiB store can never take."""
    _log(args, "big")
    return b"x" * (2 << 20)
