"""Operator tools over the store: show, export, import, quarantine.

They open the store themselves, so they work while the daemon is stopped
(LMDB lets any number of processes read while agents write).

Export format: JSON lines, one record per line.

  {"type": "agent", "id": ID, "raw": B64, "value": VIEW}
  {"type": "item",  "id": ID, "key": B64, "raw": B64, "value": VIEW}

``raw`` is the record's exact msgpack bytes (base64), so an export is lossless
for every msgpack type; ``key`` is the item key after the agent's prefix.
``value`` is a readable JSON view (bytes as ``{"$bytes": B64}``); it is null,
with an ``error``, when the bytes do not decode.  To fix a record by hand,
edit ``value`` and delete ``raw``: import encodes ``value`` when ``raw`` is
absent (``{"$bytes": ...}`` turns back into bytes).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from otpd.config import ID_RE
from otpd.errors import OtpdError
from otpd.store.lmdb_store import Store, agent_prefix, check_record, decode, encode, with_seq_past


def view(obj: Any) -> Any:
    """A JSON-able view of a msgpack value."""
    if isinstance(obj, bytes):
        return {"$bytes": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else json.dumps(view(k)): view(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [view(v) for v in obj]
    return obj


def unview(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"$bytes"}:
            return base64.b64decode(obj["$bytes"])
        return {k: unview(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unview(v) for v in obj]
    return obj


def _view_raw(raw: bytes) -> tuple[Any, str | None]:
    try:
        return view(decode(raw)), None
    except Exception as exc:  # a corrupt record is exported as bytes, with the reason
        return None, f"{type(exc).__name__}: {exc}"


def show(store: Store, agent_id: str, max_items: int = 1000) -> dict[str, Any]:
    """An agent's persisted state: the main record and up to ``max_items`` items per collection
    (one commit's: ``Store.snapshot``)."""
    with store.snapshot(agent_id) as (raw, scan):
        if raw is None:
            raise OtpdError("not_found", f"no persisted state for {agent_id!r}", {"id": agent_id})
        record = check_record(agent_id, raw)  # store_corrupt with the reason
        out = view(record)
        prefix = agent_prefix(agent_id)
        items: dict[str, list[Any]] = {}
        truncated: dict[str, bool] = {}
        markers = record.get("collections") or {}
        for key, value in scan(prefix):
            raw_name, _, rest = key[len(prefix):].partition(b"\x00")
            name = raw_name.decode(errors="backslashreplace")
            bucket = items.setdefault(name, [])
            if len(bucket) >= max_items:
                truncated[name] = True
                continue
            if "head" in markers.get(name, {}):  # a queue: items in order
                bucket.append(_view_raw(value)[0])
            else:  # a map: [key, value] pairs
                bucket.append([_view_raw(rest)[0], _view_raw(value)[0]])
    out["items"] = items
    if truncated:
        out["items_truncated"] = truncated
    return {"id": agent_id, **out}


def export(store: Store, ids: Iterable[str] | None = None) -> Iterator[str]:
    """JSON lines for the given agents (all when ``ids`` is None), each agent as of one commit."""
    for agent_id in (ids if ids is not None else store.agent_ids()):
        problems: list[str] = []  # a corrupt log: what was acknowledged before the bad entry, and why
        with store.snapshot(agent_id, salvage=problems) as (raw, scan):
            yield from _export_agent(agent_id, raw, scan, "; ".join(problems) or None)


def _export_agent(agent_id: str, raw: bytes | None, scan: Callable[[bytes], Iterator[tuple[bytes, bytes]]],
                  log_error: str | None) -> Iterator[str]:
    if raw is None and log_error is None:
        raise OtpdError("not_found", f"no persisted state for {agent_id!r}", {"id": agent_id})
    value, error = _view_raw(raw) if raw is not None else (None, None)
    line: dict[str, Any] = {"type": "agent", "id": agent_id,
                            "raw": base64.b64encode(raw).decode() if raw is not None else None, "value": value}
    if error or log_error:
        line["error"] = "; ".join(e for e in (error, log_error) if e)
    yield json.dumps(line, sort_keys=True)
    prefix = agent_prefix(agent_id)
    for key, item in scan(prefix):
        value, error = _view_raw(item)
        line = {"type": "item", "id": agent_id, "key": base64.b64encode(key[len(prefix):]).decode(),
                "raw": base64.b64encode(item).decode(), "value": value}
        if error:
            line["error"] = error
        yield json.dumps(line, sort_keys=True)


def parse_export(lines: Iterable[str | bytes]) -> dict[str, tuple[bytes, list[tuple[bytes, bytes]]]]:
    """Check a whole export before anything is written: {id: (main record, [(item key, value)])}.

    Every line must be one otpd could load: an agent id the config would take, a main record of
    the right shape (``check_record``), each agent and each item once."""
    agents: dict[str, bytes] = {}
    seen: dict[str, int] = {}
    items: dict[str, list[tuple[bytes, bytes]]] = {}
    keys: set[tuple[str, bytes]] = set()
    number = 0
    try:
        for number, text in enumerate(lines, start=1):
            if isinstance(text, bytes):
                text = text.decode()
            if not text.strip():
                continue
            line = json.loads(text)
            kind, agent_id = line["type"], line["id"]
            if kind not in ("agent", "item"):
                raise ValueError(f"'type' is {kind!r}, not 'agent' or 'item'")
            if not isinstance(agent_id, str) or not ID_RE.match(agent_id):
                raise ValueError(f"'id' {agent_id!r} is not an agent id")
            if "raw" in line and line["raw"] is None:  # exported without bytes: a log that did not read
                raise ValueError(f"{agent_id!r} has no record here ({line.get('error') or 'raw is null'})")
            raw = base64.b64decode(line["raw"], validate=True) if "raw" in line else encode(unview(line["value"]))
            if kind == "agent":
                if agent_id in seen:
                    raise ValueError(f"a second record for {agent_id!r} (the first is on line {seen[agent_id]})")
                try:
                    check_record(agent_id, raw)
                except OtpdError as err:
                    raise ValueError(f"not a record otpd can load: {err.message.split('; ')[0]}") from None
                agents[agent_id], seen[agent_id] = raw, number
            else:
                key = agent_prefix(agent_id) + base64.b64decode(line["key"], validate=True)
                if (agent_id, key) in keys:
                    raise ValueError(f"a second item of {agent_id!r} at the same key")
                keys.add((agent_id, key))
                items.setdefault(agent_id, []).append((key, raw))
    except (OtpdError, OSError):  # (a read that failed is not a bad line: the caller says so)
        raise
    except Exception as exc:  # anything a line can hold (not UTF-8, not JSON, too deep, too large)
        raise OtpdError("bad_request", f"line {number + (number == 0)}: not an export record "
                        f"({type(exc).__name__}: {exc}); nothing was imported") from None
    stray = set(items) - set(agents)
    if stray:
        raise OtpdError("bad_request", f"items without their agent record: {', '.join(sorted(stray))}; "
                        "nothing was imported")
    return {agent_id: (main, items.get(agent_id, [])) for agent_id, main in agents.items()}


def import_records(store: Store, records: dict[str, tuple[bytes, list[tuple[bytes, bytes]]]]) -> list[str]:
    """Restore agents from ``parse_export``. ``seq`` is moved past the one on disk, so it still only grows.

    Agent by agent, each in one transaction (each agent is whole, its old records or the
    file's); an error midway names the agents written and those not, and the same import run
    again replaces them all."""
    done: list[str] = []
    for agent_id, (main, items) in sorted(records.items()):
        try:
            store.put_raw(agent_id, _past_seq(store, agent_id, main), items)
        except OtpdError as err:
            left = sorted(set(records) - set(done))
            raise OtpdError(err.code, f"{err.message}\nimported: {', '.join(done) or 'none'}; not imported: "
                            f"{', '.join(left)} (each agent is whole: run the import again once this is fixed)",
                            {**err.details, "imported": done, "not_imported": left}) from None
        done.append(agent_id)
    return done


def _past_seq(store: Store, agent_id: str, main: bytes) -> bytes:
    try:
        current = store.read(agent_id)
    except Exception:
        return main  # restored over a corrupt record: kept exactly
    return main if current is None else with_seq_past(main, current["seq"])


def migrate_records(store: Store, classes: dict[str, str], allowed: set[str], ids: list[str] | None,
                    write: bool) -> list[dict[str, Any]]:
    """What each record becomes under its class's migrations; with ``write``, save it.

    ``classes`` maps agent ids to ``module:Class`` (the config's effective classes); a
    record of an id not in it (a workflow, say) is migrated for the class that wrote it if
    that class is in ``allowed`` (named by the config), and skipped otherwise.  Nothing is
    written unless every record migrates."""
    from otpd.agent.runtime import load_class
    from otpd.agent.state import migrate

    out: list[dict[str, Any]] = []
    plans: list[tuple[str, dict[str, Any]]] = []
    for agent_id in ids if ids is not None else store.agent_ids():
        row: dict[str, Any] = {"id": agent_id}
        out.append(row)
        try:
            record = store.read(agent_id)
            if record is None:
                raise OtpdError("not_found", f"no persisted state for {agent_id!r}")
            ref = classes.get(agent_id) or record.get("agent")
            if ref not in allowed:
                row["skipped"] = f"its class {ref!r} is not in the config"
                continue
            cls = load_class(str(ref))
            row.update(agent=ref, from_version=record["version"], to_version=cls.state_version,
                       before=view(record["state"]))
            state = migrate(cls, agent_id, record["version"], record["state"])
            row["after"] = view(state)
            if record["version"] != cls.state_version:
                plans.append((agent_id, {**record, "agent": ref, "version": cls.state_version, "state": state,
                                         "seq": record["seq"] + 1}))
        except OtpdError as err:
            row["error"] = err.to_wire()
        except Exception as exc:  # its class does not import (the config's code changed since)
            row["error"] = OtpdError("internal", f"{type(exc).__name__}: {exc}").to_wire()
    if write:
        failed = [r["id"] for r in out if "error" in r]
        if failed:
            raise OtpdError("store_corrupt", f"not migrated (nothing written): {', '.join(failed)}",
                            {"results": out})
        for agent_id, record in plans:
            store.put_main(agent_id, encode(record))
            next(r for r in out if r["id"] == agent_id)["written"] = True
    return out
