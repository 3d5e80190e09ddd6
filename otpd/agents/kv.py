"""KVAgent: a persistent key-value map, the example of the state API to copy.

Calls: ``{"op": "put", "key": k, "value": v}`` -> ``{"ok": true, "len": n}``;
``{"op": "get", "key": k}`` -> ``{"found": bool, "value": v}``;
``{"op": "delete", "key": k}`` -> ``{"deleted": bool, "len": n}``;
``{"op": "len"}`` -> ``{"len": n, "puts": m}``; ``{"op": "keys"}`` -> ``{"keys": [...]}``.

Every entry is its own LMDB record (``PersistentMap``), so a put costs the
same with ten entries or ten million, and a restart reads one record.  A put
is answered only after it is committed.
"""

from __future__ import annotations

from typing import Any

from otpd.agent.base import Agent
from otpd.agent.state import PersistentMap
from otpd.errors import OtpdError


class KVAgent(Agent):
    state_version = 1
    fields = {"puts": 0, "deletes": 0}
    persistent_fields = ("puts", "deletes")
    collections = {"data": PersistentMap}

    data: PersistentMap
    puts: int
    deletes: int

    def handle_call(self, request: Any) -> Any:
        return self.dispatch_op(request)

    def _key(self, request: dict[str, Any]) -> Any:
        if "key" not in request:
            raise OtpdError("bad_request", "missing 'key'")
        key = request["key"]
        if isinstance(key, (dict, list)):
            raise OtpdError("bad_request", "a key is a string, a number or bytes")
        return key

    def op_put(self, request: dict[str, Any]) -> Any:
        self.data[self._key(request)] = request.get("value")
        self.puts += 1
        return {"ok": True, "len": len(self.data)}

    def op_get(self, request: dict[str, Any]) -> Any:
        key = self._key(request)
        found = key in self.data
        return {"found": found, "value": self.data.get(key)}

    def op_delete(self, request: dict[str, Any]) -> Any:
        key = self._key(request)
        if key not in self.data:
            return {"deleted": False, "len": len(self.data)}
        del self.data[key]
        self.deletes += 1
        return {"deleted": True, "len": len(self.data)}

    def op_len(self, request: dict[str, Any]) -> Any:
        return {"len": len(self.data), "puts": self.puts}

    def op_keys(self, request: dict[str, Any]) -> Any:
        return {"keys": list(self.data.keys())}
