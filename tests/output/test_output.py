"""Agents' output reaches the daemon's log line by line, with the agent's id, rate-limited."""

from __future__ import annotations

from typing import Any

TREE = """
[[root.children]]
id = "talker"
agent = "tests.output.agents:Talker"
"""


def test_each_line_an_agent_prints_is_logged_with_its_id(daemon: Any) -> None:
    d = daemon(TREE)
    d.request("call", {"id": "talker", "request": {"kind": "stdout", "count": 3}})
    d.request("call", {"id": "talker", "request": {"kind": "stderr"}})
    d.log.wait_for(r"talker: stdout line 2$")
    d.log.wait_for(r"talker: stderr line 0$")


def test_a_flood_is_cut_to_the_rate_limit_and_the_drop_is_reported(daemon: Any) -> None:
    d = daemon(TREE)
    d.request("call", {"id": "talker", "request": {"kind": "stdout", "count": 20_000}}, timeout=60)
    d.log.wait_for(r"talker: \d+ output lines dropped", timeout=30)
    # Reported in pieces, each time the agent is back within its rate: count what is there.
    dropped = sum(int(x.split("talker: ")[1].split()[0]) for x in list(d.log.lines) if "output lines dropped" in x)
    kept = sum(1 for x in list(d.log.lines) if "talker: stdout line" in x)
    assert kept >= 1000 and dropped > 0 and kept + dropped <= 20_000
    assert d.request("call", {"id": "talker", "request": {"kind": "stdout"}}) == 1  # still answering


def test_a_crash_traceback_is_logged_as_lines_of_the_agent(daemon: Any) -> None:
    d = daemon(TREE)
    pid = d.pid_of("talker")
    try:
        d.request("call", {"id": "talker", "request": {"kind": "stdout", "count": "not a number"}})
    except Exception:
        pass
    d.wait("talker", not_pid=pid)
    d.log.wait_for(r"talker: ValueError: invalid literal")
