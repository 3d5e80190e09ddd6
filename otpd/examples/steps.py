"""Example workflow steps: ``fn(args, results) -> result``, small but real work.

A three-step pipeline: ``words`` splits a text, ``count`` counts the words the first
step found, ``digest`` hashes the earlier results.  Each step's result is saved before
the next starts, so a crash resumes at the step that was running.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any


def words(args: dict[str, Any], results: list[Any]) -> list[str]:
    return str(args.get("text", "")).lower().split()


def count(args: dict[str, Any], results: list[Any]) -> dict[str, int]:
    top = int(args.get("top", 3))
    return dict(Counter(results[-1]).most_common(top))


def digest(args: dict[str, Any], results: list[Any]) -> str:
    return hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()
