"""MonitorAgent: the health of every agent, a persisted ring buffer of samples, alerts, memmon.

The seed design's MonitorAgent (``health_history`` as a ring buffer of
``max_history`` entries, ``alert_state``), sampling real processes::

    [[root.children]]
    id = "monitor"
    agent = "otpd.agents.monitor:MonitorAgent"
    [root.children.args]
    interval_s = 5
    max_history = 1000
    thresholds = { memory_mb = 500, cpu_percent = 90, restart_rate = 5 }
    actions = { tasks = { restart_over_memory_mb = 800, for_samples = 3 } }

Every ``interval_s`` it asks the daemon for the tree (``status``) and measures
each agent's process with psutil: RSS, CPU % (since the last sample; since
the process started on its first sample), open fds, threads, uptime (from the
process's start time), plus the tree's state and restart count, and the
restart rate (restarts in the last minute).  A process that vanished between
the two is reported with ``"vanished": true`` and no figures.

* ``health_history`` is a ``PersistentQueue`` of samples ``{"t": unix time,
  "daemon": {...}, "agents": {id: {...}}}``: each sample appends one record and
  drops the oldest once there are ``max_history`` (O(1) per sample, bounded on
  disk, restored across restarts).
* ``alert_state`` ``{agent id: {metric: {"since", "value", "threshold"}}}``: an
  alert is set when a figure goes over its threshold (``memory_mb``,
  ``cpu_percent``, ``restart_rate``; and ``failed`` when the agent's state is
  ``failed``) and cleared when it is back at or under it.  Each change is a
  log line and an entry of ``alert_events`` (the last 100).
* ``actions`` (superlance memmon's job): an agent whose RSS stays over
  ``restart_over_memory_mb`` for ``for_samples`` consecutive samples (default 3)
  is restarted through the daemon (``restart`` op); each restart is a log line
  and an entry of ``actions_taken`` (the last 100).

Calls (``otpctl health [ID]`` forwards to them)::

    {"op": "health"}             -> {"sampled_at", "interval_s", "samples", "history_len", "max_history",
                                     "daemon": {...}, "agents": [{"id", "pid", "state", "restarts",
                                     "restart_rate", "rss_mb", "cpu_percent", "fds", "threads",
                                     "uptime_s", "alerts": {metric: {...}}}, ...],
                                     "alerts": [{"id", "metric", "since", "value", "threshold"}, ...],
                                     "alert_events": [...last 20], "actions": [...last 20], "thresholds": {...}}
    {"op": "health", "id": X, "limit": 60}
                                 -> {"id", "agent": {... as above}, "agents": [the same], "history":
                                     [{"t", ...}, ...oldest first],
                                     "alerts": [...], "actions": [...]}   (not_found for an unknown id)
    {"op": "sample"}             -> take a sample now; the same reply as {"op": "health"}
"""

from __future__ import annotations

import importlib
import time
from collections import deque
from typing import Any

from otpd.agent.base import Agent
from otpd.agent.state import PersistentQueue
from otpd.agents import unknown_args
from otpd.errors import OtpdError

METRICS = {"memory_mb": "rss_mb", "cpu_percent": "cpu_percent", "restart_rate": "restart_rate"}
RATE_WINDOW_S = 60.0
KEPT_EVENTS = 100
SHOWN_EVENTS = 20
DEFAULT_HISTORY_LIMIT = 60


def _number(name: str, value: Any, minimum: float, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise OtpdError("config_invalid", f"MonitorAgent: {name} must be {kind} >= {minimum}, got {value!r}")
    return value


class MonitorAgent(Agent):
    state_version = 1
    fields = {"alert_state": dict, "over_counts": dict, "actions_taken": list, "alert_events": list,
              "samples_taken": 0}
    persistent_fields = ("alert_state", "over_counts", "actions_taken", "alert_events", "samples_taken")
    collections = {"health_history": PersistentQueue}

    health_history: PersistentQueue
    alert_state: dict[str, dict[str, dict[str, Any]]]
    over_counts: dict[str, dict[str, Any]]
    actions_taken: list[dict[str, Any]]
    alert_events: list[dict[str, Any]]
    samples_taken: int

    # -- start ------------------------------------------------------------------

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        cls._settings(args)

    @staticmethod
    def _settings(args: dict[str, Any]) -> tuple[float, int, dict[str, float], dict[str, tuple[float, int]]]:
        """(interval_s, max_history, thresholds, actions) from the args, or ``config_invalid``."""
        unknown_args(args, {"interval_s", "max_history", "thresholds", "actions"}, "MonitorAgent")
        interval_s = float(_number("interval_s", args.get("interval_s", 5), 0.01))
        max_history = _number("max_history", args.get("max_history", 1000), 1, integer=True)
        thresholds = args.get("thresholds", {})
        if not isinstance(thresholds, dict) or set(thresholds) - set(METRICS):
            raise OtpdError("config_invalid", f"MonitorAgent: thresholds takes {', '.join(METRICS)}")
        limits = {k: _number(f"thresholds.{k}", v, 0) for k, v in thresholds.items()}
        actions = args.get("actions", {})
        if not isinstance(actions, dict):
            raise OtpdError("config_invalid", "MonitorAgent: actions must be a table {agent_id: {...}}")
        rules: dict[str, tuple[float, int]] = {}
        for agent_id, action in actions.items():
            if not isinstance(action, dict) or "restart_over_memory_mb" not in action \
                    or set(action) - {"restart_over_memory_mb", "for_samples"}:
                raise OtpdError("config_invalid", f"MonitorAgent: actions.{agent_id} is "
                                "{restart_over_memory_mb = N, for_samples = K}")
            rules[agent_id] = (
                _number(f"actions.{agent_id}.restart_over_memory_mb", action["restart_over_memory_mb"], 1),
                _number(f"actions.{agent_id}.for_samples", action.get("for_samples", 3), 1, integer=True))
        return interval_s, max_history, limits, rules

    def init(self) -> None:
        self.interval_s, self.max_history, self.thresholds, self.actions = self._settings(self.args)
        self.psutil = importlib.import_module("psutil")  # here, not at import: the daemon imports this module
        self.boot_time: float = self.psutil.boot_time()
        self.boottime_clock = getattr(time, "CLOCK_BOOTTIME", None)
        self.procs: dict[int, Any] = {}  # pid -> psutil.Process, for CPU % between samples
        self.first_seen: dict[int, float] = {}  # pid -> when first sampled (if its start time is unreadable)
        while len(self.health_history) > self.max_history:  # max_history was lowered
            self.health_history.popleft()
        self.latest: dict[str, Any] | None = self.health_history.peek(len(self.health_history) - 1) \
            if self.health_history else None
        self.windows: dict[str, deque[tuple[float, int]]] = {}  # id -> (t, restarts) over the last minute
        self._rebuild_windows()
        self.sampled_mono = -float("inf")
        self.send_after(0, "sample")
        self.send_interval(self.interval_s, "sample")

    def _rebuild_windows(self) -> None:
        since = time.time() - RATE_WINDOW_S
        samples = []
        for offset in range(len(self.health_history) - 1, -1, -1):
            sample = self.health_history.peek(offset)
            if sample["t"] < since:
                break
            samples.append(sample)
        for sample in reversed(samples):
            for agent_id, entry in sample["agents"].items():
                self.windows.setdefault(agent_id, deque()).append((sample["t"], entry["restarts"]))

    # -- sampling ---------------------------------------------------------------

    def handle_info(self, message: Any) -> None:
        # A periodic timer catches up after a stall by firing back to back: one sample is enough.
        if message == "sample" and time.monotonic() - self.sampled_mono >= self.interval_s / 2:
            try:
                self._sample()
            except OtpdError as err:  # the daemon is shutting down, or too busy to answer in time
                self.log(f"no sample this time: {err.code}: {err.message}")

    def _sample(self) -> dict[str, Any]:
        self.sampled_mono = time.monotonic()
        status = self.system("status")
        now = time.time()
        seen: set[int] = set()
        agents: dict[str, dict[str, Any]] = {}
        for child in status["children"]:
            if child["type"] != "agent":
                continue
            pid = child["pid"]
            entry: dict[str, Any] = {"pid": pid, "state": child["state"], "restarts": child["restarts"]}
            if pid is not None:
                seen.add(pid)
                figures = self._measure(pid, now)
                if figures is None:
                    entry["vanished"] = True
                else:
                    entry.update(figures)
            entry["restart_rate"] = self._restart_rate(child["id"], child["restarts"], now)
            agents[child["id"]] = entry
        daemon_pid = status["daemon"]["pid"]
        seen.add(daemon_pid)
        daemon = {"pid": daemon_pid, **(self._measure(daemon_pid, now) or {"vanished": True})}
        for pid in set(self.procs) - seen:
            del self.procs[pid]
        for pid in set(self.first_seen) - seen:
            del self.first_seen[pid]
        for agent_id in set(self.windows) - set(agents):
            del self.windows[agent_id]
        sample = {"t": round(now, 3), "daemon": daemon, "agents": agents}
        self.health_history.append(sample)
        while len(self.health_history) > self.max_history:
            self.health_history.popleft()
        self.samples_taken += 1
        self.latest = sample
        self._alerts(sample)
        self._act(sample)
        return sample

    def _measure(self, pid: int, now: float) -> dict[str, Any] | None:
        psutil = self.psutil
        try:
            proc = self.procs.get(pid)
            fresh = proc is None
            if proc is None:
                proc = psutil.Process(pid)
            with proc.oneshot():
                rss = proc.memory_info().rss
                fds = proc.num_fds()
                threads = proc.num_threads()
                uptime = self._uptime(proc, pid, now)
                if fresh:  # no previous sample: the average since the process started
                    proc.cpu_percent(None)
                    times = proc.cpu_times()
                    cpu = 100.0 * (times.user + times.system) / max(uptime, 1e-3)
                else:
                    cpu = proc.cpu_percent(None)
            self.procs[pid] = proc
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ProcessLookupError):
            self.procs.pop(pid, None)
            return None
        return {"rss_mb": round(rss / 1048576, 2), "cpu_percent": round(cpu, 1), "fds": fds,
                "threads": threads, "uptime_s": round(max(0.0, uptime), 3)}

    def _uptime(self, proc: Any, pid: int, now: float) -> float:
        """Seconds since the process started.  The kernel counts a start in ticks since boot; psutil
        adds the boot time, which /proc/stat gives in whole seconds (up to 1 s off), so the tick
        count is recovered and compared with the clock since boot (exact to a tick)."""
        try:
            started: float = proc.create_time()
            if self.boottime_clock is not None:
                return time.clock_gettime(self.boottime_clock) - (started - self.boot_time)
            return now - started
        except self.psutil.AccessDenied:
            return now - self.first_seen.setdefault(pid, now)

    def _restart_rate(self, agent_id: str, restarts: int, now: float) -> int:
        """Restarts in the last minute (the count in the tree is cumulative)."""
        window = self.windows.setdefault(agent_id, deque())
        if window and restarts < window[-1][1]:
            window.clear()  # the daemon restarted: its counts started again
        window.append((now, restarts))
        while window and window[0][0] < now - RATE_WINDOW_S:
            window.popleft()
        return restarts - window[0][1]

    # -- alerts and actions --------------------------------------------------------

    def _alerts(self, sample: dict[str, Any]) -> None:
        now = sample["t"]
        for agent_id in list(self.alert_state):
            if agent_id not in sample["agents"]:  # removed from the tree
                for metric in list(self.alert_state[agent_id]):
                    self._clear(agent_id, metric, now, "removed")
        for agent_id, entry in sample["agents"].items():
            checks = [(metric, entry.get(key), self.thresholds[metric]) for metric, key in METRICS.items()
                      if metric in self.thresholds]
            checks.append(("failed", 1 if entry["state"] == "failed" else 0, 0))
            current = self.alert_state.get(agent_id, {})
            for metric, value, threshold in checks:
                if value is None:
                    continue  # no figure this time (not running): the alert stays as it is
                if value > threshold:
                    if metric in current:
                        current[metric]["value"] = value
                    else:
                        current = self.alert_state.setdefault(agent_id, {})
                        current[metric] = {"since": now, "value": value, "threshold": threshold}
                        self._event("set", agent_id, metric, value, threshold, now)
                elif metric in current:
                    self._clear(agent_id, metric, now, value)

    def _clear(self, agent_id: str, metric: str, now: float, value: Any) -> None:
        alert = self.alert_state[agent_id].pop(metric)
        if not self.alert_state[agent_id]:
            del self.alert_state[agent_id]
        self._event("cleared", agent_id, metric, value, alert["threshold"], now)

    def _event(self, what: str, agent_id: str, metric: str, value: Any, threshold: Any, now: float) -> None:
        self.alert_events.append({"t": now, "id": agent_id, "metric": metric, "alert": what,
                                  "value": value, "threshold": threshold})
        del self.alert_events[:-KEPT_EVENTS]
        self.log(f"alert {what}: {agent_id} {metric} = {value} (threshold {threshold})")

    def _act(self, sample: dict[str, Any]) -> None:
        for agent_id, (limit_mb, for_samples) in self.actions.items():
            entry = sample["agents"].get(agent_id)
            rss = entry.get("rss_mb") if entry else None
            if entry is None or entry["state"] != "running" or rss is None or rss <= limit_mb:
                self.over_counts.pop(agent_id, None)
                continue
            over = self.over_counts.get(agent_id)
            if over is None or over["pid"] != entry["pid"]:
                over = self.over_counts[agent_id] = {"pid": entry["pid"], "count": 0, "since": sample["t"]}
            over["count"] += 1
            if over["count"] < for_samples:
                continue
            del self.over_counts[agent_id]
            record = {"t": sample["t"], "id": agent_id, "action": "restart", "pid": entry["pid"],
                      "rss_mb": rss, "limit_mb": limit_mb, "samples": for_samples}
            try:
                self.system("restart", id=agent_id)
            except OtpdError as err:
                record["error"] = f"{err.code}: {err.message}"
            self.actions_taken.append(record)
            del self.actions_taken[:-KEPT_EVENTS]
            self.log(f"restart {agent_id} (pid {entry['pid']}): RSS {rss} MiB over "
                 f"{limit_mb} MiB for {for_samples} samples" + (f"; failed: {record['error']}"
                                                                 if "error" in record else ""))

    # -- calls ----------------------------------------------------------------------

    def handle_call(self, request: Any) -> Any:
        if not isinstance(request, dict) or request.get("op") not in ("health", "sample"):
            raise OtpdError("bad_request", 'a monitor request is {"op": "health", "id": optional} or '
                            '{"op": "sample"}')
        if request["op"] == "sample" or self.latest is None:
            self._sample()
        agent_id = request.get("id")
        if agent_id is None:
            return self._overview()
        if not isinstance(agent_id, str):
            raise OtpdError("bad_request", "'id' must be an agent id (a string)")
        limit = request.get("limit", DEFAULT_HISTORY_LIMIT)
        if type(limit) is not int or limit < 0:
            raise OtpdError("bad_request", "'limit' must be a non-negative integer")
        return self._one(agent_id, limit)

    def _with_alerts(self, agent_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        return {"id": agent_id, **entry, "alerts": self.alert_state.get(agent_id, {})}

    def _alert_list(self, only: str | None = None) -> list[dict[str, Any]]:
        return [{"id": agent_id, "metric": metric, **alert}
                for agent_id, alerts in self.alert_state.items() if only is None or agent_id == only
                for metric, alert in alerts.items()]

    def _overview(self) -> dict[str, Any]:
        latest = self.latest or {"t": None, "daemon": {}, "agents": {}}
        return {
            "sampled_at": latest["t"],
            "interval_s": self.interval_s,
            "samples": self.samples_taken,
            "history_len": len(self.health_history),
            "max_history": self.max_history,
            "daemon": latest["daemon"],
            "agents": [self._with_alerts(agent_id, entry) for agent_id, entry in latest["agents"].items()],
            "alerts": self._alert_list(),
            "alert_events": self.alert_events[-SHOWN_EVENTS:],
            "actions": self.actions_taken[-SHOWN_EVENTS:],
            "thresholds": self.thresholds,
        }

    def _one(self, agent_id: str, limit: int) -> dict[str, Any]:
        latest = self.latest or {"agents": {}}
        entry = latest["agents"].get(agent_id)
        if entry is None:
            raise OtpdError("not_found", f"no agent {agent_id!r} in the latest sample", {"id": agent_id})
        history = []
        length = len(self.health_history)
        for offset in range(length - 1, max(-1, length - 1 - limit), -1):
            sample = self.health_history.peek(offset)
            past = sample["agents"].get(agent_id)
            if past is not None:
                history.append({"t": sample["t"], **past})
        history.reverse()
        current = self._with_alerts(agent_id, entry)
        return {
            "id": agent_id,
            "sampled_at": latest["t"],
            "agent": current,
            "agents": [current],  # the overview's shape too: one row
            "history": history,
            "alerts": self._alert_list(agent_id),
            "actions": [a for a in self.actions_taken if a["id"] == agent_id][-SHOWN_EVENTS:],
        }

