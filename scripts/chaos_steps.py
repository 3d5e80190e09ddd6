"""The workflow step the chaos run uses: it notes what it saw, so re-runs can be checked."""

from __future__ import annotations

import json
import os
from typing import Any


def step(args: dict[str, Any], results: list[Any]) -> Any:
    """Step ``args["i"]`` of workflow ``args["token"]``: it must see exactly ``i`` saved results."""
    line = json.dumps({"token": args["token"], "i": args["i"], "seen": len(results)}) + "\n"
    fd = os.open(args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())  # one O_APPEND write: lines of concurrent steps never mix
    finally:
        os.close(fd)
    return {"i": args["i"]}
