"""Example handlers: plain functions named ``module:function`` in a config.

A task handler is ``fn(payload) -> result``, called by ``TaskAgent`` on one
of its worker threads.  Raising fails the attempt (the agent retries it up to
``max_attempts``, then dead-letters it with the error); the return value is
the task's result (the agent counts it and does not keep it).

* ``echo``       returns its input: the handler every example and test can rely on.
* ``sha256``     real CPU work: hashes ``payload["data"]`` ``payload["rounds"]`` times.
* ``transform``  a real transformation of a record (normalise, count, sort).
* ``fail``       always raises (``payload["message"]``): dead letters on demand.
* ``sleep``      sleeps ``payload["seconds"]``: a slow task.

Workflow step handlers live here too, below the task handlers.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

# -- task handlers ----------------------------------------------------------------


def echo(payload: Any) -> Any:
    """Return the payload unchanged (a no-op task)."""
    return payload


def sha256(payload: Any) -> dict[str, Any]:
    """Hash ``payload["data"]`` (str or bytes) ``payload.get("rounds", 1)`` times, each round over
    the previous digest: ``{"digest": hex, "rounds": n}``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), (str, bytes)):
        raise ValueError('sha256 needs {"data": str | bytes, "rounds": int}')
    data = payload["data"]
    digest = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    rounds = int(payload.get("rounds", 1))
    if not 1 <= rounds <= 10_000_000:
        raise ValueError("rounds must be between 1 and 10,000,000")
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return {"digest": digest.hex(), "rounds": rounds}


_WORD = re.compile(r"[a-z0-9']+")


def transform(payload: Any) -> dict[str, Any]:
    """Normalise a record: ``{"name": " Ada  Lovelace ", "tags": ["B", "a", "b"], "text": "..."}``
    -> name title-cased with single spaces, tags lower-cased, deduplicated and sorted, and the
    text's word count and five most frequent words."""
    if not isinstance(payload, dict):
        raise ValueError("transform needs a JSON object")
    out: dict[str, Any] = {}
    if "name" in payload:
        out["name"] = " ".join(str(payload["name"]).split()).title()
    if "tags" in payload:
        tags = payload["tags"]
        if not isinstance(tags, list):
            raise ValueError("tags must be a list")
        out["tags"] = sorted({str(t).strip().lower() for t in tags if str(t).strip()})
    if "text" in payload:
        words = _WORD.findall(str(payload["text"]).lower())
        counts: dict[str, int] = {}
        for word in words:
            counts[word] = counts.get(word, 0) + 1
        out["words"] = len(words)
        out["top"] = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
    return out


def fail(payload: Any) -> Any:
    """Always raise: ``RuntimeError(payload["message"])`` (or a default message)."""
    message = payload.get("message") if isinstance(payload, dict) else None
    raise RuntimeError(str(message or "this task always fails"))


def sleep(payload: Any) -> dict[str, float]:
    """Sleep ``payload["seconds"]`` (at most an hour): ``{"slept": seconds}``."""
    seconds = float(payload.get("seconds", 0)) if isinstance(payload, dict) else float(payload)
    if not 0 <= seconds <= 3600:
        raise ValueError("seconds must be between 0 and 3600")
    time.sleep(seconds)
    return {"slept": seconds}


# -- workflow step handlers ---------------------------------------------------------
# (written with the workflow agent)
