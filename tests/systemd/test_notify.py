"""The daemon's side of sd_notify and journald, against a stand-in for systemd (no root needed).

A NOTIFY_SOCKET listener with SO_PASSCRED records what a real ``otpd run`` sends
and who sent it: READY=1 from the main pid only once every permanent agent runs,
STATUS= on change, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 then exit 0 on
SIGTERM, EXTEND_TIMEOUT_USEC while a slow stop makes progress; agents never see
the notify variables; nothing changes without NOTIFY_SOCKET; with JOURNAL_STREAM
naming its stderr every log line carries journald's ``<N>`` priority.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from otpd.errors import OtpdError
from tests.conftest import LogReader, wait_pid_exit
from tests.systemd.conftest import Message, NotifyFactory, Otpd

pytestmark = pytest.mark.timeout(60)

AGENTS = "tests.systemd.agents"

TREE = f"""
[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "kv"
agent = "otpd.agents.kv:KVAgent"

[[root.children]]
id = "pipeline"
supervisor = "static"

[[root.children.children]]
id = "slow"
agent = "{AGENTS}:SlowStart"
args = {{ start_s = 0.8 }}

[[root.children]]
id = "once"
agent = "otpd.agents.echo:EchoAgent"
restart = "temporary"
"""
AGENT_IDS = ("echo", "kv", "slow", "once")


def test_ready_comes_from_the_main_pid_once_every_agent_runs(notify_otpd):
    d = notify_otpd(TREE, watchdog_usec=5_000_000)
    ready = d.listener.wait_field("READY", "1", timeout=20)
    # Asked the moment READY=1 arrived: slow's init takes 0.8 s, so an early READY would show it starting.
    children = d.children()
    assert {i: children[i]["state"] for i in AGENT_IDS} == dict.fromkeys(AGENT_IDS, "running")
    assert all(children[i]["pid"] for i in AGENT_IDS)
    assert ready.pid == d.pid, "READY=1 must come from the main pid (NotifyAccess=main)"
    assert ready.fields["MAINPID"] == str(d.pid)
    assert re.match(r"4 running\b", ready.fields["STATUS"]), ready.fields
    before = d.listener.snapshot()[: d.listener.snapshot().index(ready)]
    assert all(set(m.fields) == {"STATUS"} for m in before), f"only STATUS= may come before READY=1: {before}"

    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    readies = [m for m in d.listener.snapshot() if m.fields.get("READY") == "1"]
    assert readies == [ready], "READY=1 is sent once"
    assert all(m.pid == d.pid for m in d.listener.snapshot()), d.listener.brief()


def test_status_follows_restarts_and_watchdog_pings_at_half_the_period(notify_otpd):
    usec = 600_000
    d = notify_otpd(TREE, watchdog_usec=usec)
    ready = d.listener.wait_field("READY", "1", timeout=20)
    pings = d.listener.wait_count("WATCHDOG", "1", 6, timeout=10)
    times = [ready.at] + [m.at for m in pings]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < usec / 1e6, f"a WATCHDOG=1 gap of {max(gaps):.3f}s reached WATCHDOG_USEC: {gaps}"
    assert min(gaps[1:]) > usec / 1e6 / 4, f"pings much faster than half the period: {gaps}"
    assert {m.pid for m in pings} == {d.pid}

    # A crash shows in STATUS= (one fewer running) and the recovery after it.
    mark = len(d.listener.snapshot())
    echo = d.children()["echo"]["pid"]
    os.kill(echo, signal.SIGKILL)
    down = d.listener.wait_field("STATUS", timeout=10, start=mark)
    assert down.fields["STATUS"].startswith("3 running"), down.fields
    d.wait("echo", "running", not_pid=echo)
    up = d.listener.wait_for(lambda m: m.fields.get("STATUS", "").startswith("4 running"), timeout=10, start=mark)
    assert up is not None and up.at > down.at, d.listener.brief()
    assert not any("READY" in m.fields for m in d.listener.snapshot()[mark:]), "a restart is no new READY=1"


POOL = 300


def _pool(n: int) -> str:
    head = ('[[root.children]]\nid = "pool"\nsupervisor = "static"\nstrategy = "one_for_all"\n'
            'start = "parallel"\nmax_restarts = 5\nmax_seconds = 60\n')
    agent = '[[root.children.children]]\nid = "e{:03d}"\nagent = "otpd.agents.echo:EchoAgent"\n'
    return head + "".join(agent.format(i) for i in range(n))


@pytest.mark.timeout(120)
def test_watchdog_pings_go_on_through_a_restart_of_hundreds_forked_in_one_go(notify_otpd):
    """A one_for_all restart forks a whole pool inside one iteration of the loop, and the spares
    for the next restart after it: on this machine that took 1.0-1.3 s, over twice the watchdog
    period below, so a ping owed meanwhile must go out from inside the burst (with it the gaps
    stay near half the period).  Gaps are taken from the kernel's arrival stamps, which do not
    move when the test itself waits for a CPU."""
    usec = 400_000
    d = notify_otpd(_pool(POOL), watchdog_usec=usec)
    ready = d.listener.wait_field("READY", "1", timeout=60)
    victim = d.children()["e000"]["pid"]
    os.kill(victim, signal.SIGKILL)
    d.wait("e000", "running", not_pid=victim, timeout=60)
    for i in range(1, POOL):
        d.wait(f"e{i:03d}", "running", timeout=60)
    # Two more pings: the window ends after the last burst (the spares forked once all were ready).
    first = d.listener.wait_field("WATCHDOG", "1", timeout=5, start=len(d.listener.snapshot()))
    last = d.listener.wait_field("WATCHDOG", "1", timeout=5, start=d.listener.snapshot().index(first) + 1)
    window = d.listener.snapshot()
    pings = [m for m in window[window.index(ready): window.index(last) + 1]
             if m.fields.get("WATCHDOG") == "1" or m is ready]
    assert all(m.stamp is not None for m in pings)
    stamps = [m.stamp for m in pings]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < usec / 1e6, f"a WATCHDOG=1 gap of {max(gaps):.3f}s reached WATCHDOG_USEC: {gaps}"
    assert {m.pid for m in pings} == {d.pid}


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(notify_otpd):
    d = notify_otpd(TREE, watchdog_usec=200_000, watchdog_pid="1")
    ready = d.listener.wait_field("READY", "1", timeout=20)
    index = d.listener.snapshot().index(ready)
    # Five periods of silence: with the watchdog on, a ping would come every 0.1 s.
    ping = d.listener.wait_for(lambda m: "WATCHDOG" in m.fields, timeout=1.0, start=index)
    assert ping is None, "WATCHDOG_PID names another process: the watchdog is not ours"


def test_sigterm_sends_stopping_then_exits_0(notify_otpd):
    d = notify_otpd(TREE, watchdog_usec=2_000_000)
    d.listener.wait_field("READY", "1", timeout=20)
    pids = [c["pid"] for c in d.children().values() if c["pid"]]
    mark = len(d.listener.snapshot())
    d.proc.send_signal(signal.SIGTERM)
    stopping = d.listener.wait_field("STOPPING", "1", timeout=10, start=mark)
    assert stopping.pid == d.pid
    assert d.wait_exit() == 0
    assert all(wait_pid_exit(pid, 5.0) for pid in pids)
    after = d.listener.snapshot()[mark:]
    assert after[0] is stopping, "STOPPING=1 is the first thing said after SIGTERM"
    assert not any("READY" in m.fields for m in after)
    lines = d.log.text()
    assert lines.index("once: stopped") < lines.index("slow: stopped") < lines.index("kv: stopped") \
        < lines.index("echo: stopped"), lines


SLOW_STOP = f"""
[[root.children]]
id = "first"
agent = "{AGENTS}:SlowStop"
shutdown_ms = 4000
args = {{ stop_s = 0.4 }}

[[root.children]]
id = "second"
agent = "{AGENTS}:SlowStop"
shutdown_ms = 4000
args = {{ stop_s = 0.4 }}

[[root.children]]
id = "third"
agent = "{AGENTS}:SlowStop"
shutdown_ms = 4000
args = {{ stop_s = 0.4 }}
"""


def test_a_slow_stop_extends_the_stop_timeout_as_each_child_stops(notify_otpd):
    d = notify_otpd(SLOW_STOP)
    d.listener.wait_field("READY", "1", timeout=20)
    mark = len(d.listener.snapshot())
    d.proc.send_signal(signal.SIGTERM)
    stopping = d.listener.wait_field("STOPPING", "1", timeout=10, start=mark)
    assert d.wait_exit() == 0
    after = d.listener.snapshot()[mark:]
    extends = [m for m in after if "EXTEND_TIMEOUT_USEC" in m.fields]
    # third stops, then second: each is progress that must buy the next child its whole shutdown_ms
    assert len(extends) >= 2, d.listener.brief()
    assert all(m.at >= stopping.at and m.pid == d.pid for m in extends)
    assert all(int(m.fields["EXTEND_TIMEOUT_USEC"]) >= 4_000_000 for m in extends), d.listener.brief()
    assert all(b.at - a.at >= 0.3 for a, b in zip(extends, extends[1:], strict=False)), \
        "one extension per child that stopped"
    order = [m.group(1) for line in d.log.lines if (m := re.search(r"(\S+): stopped ", line))]
    assert order[:3] == ["third", "second", "first"], d.log.text()


ENV_TREE = f"""
[[root.children]]
id = "env"
agent = "{AGENTS}:EnvReport"
"""


def test_agents_do_not_inherit_the_notify_variables(notify_otpd):
    d = notify_otpd(ENV_TREE, watchdog_usec=2_000_000)
    d.listener.wait_field("READY", "1", timeout=20)
    report = d.request("call", {"id": "env", "request": "env"})
    assert report["pid"] == d.children()["env"]["pid"]
    assert report["os_environ"] == dict.fromkeys(("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"))
    assert report["getenv"] == dict.fromkeys(("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")), \
        "libc's environment must not have them either (a C library calling sd_notify would find them)"
    assert report["exec_env"] == [], "a program an agent runs must not see them"


def test_agents_proc_environ_has_no_notify_variables(notify_otpd):
    d = notify_otpd(ENV_TREE, watchdog_usec=2_000_000)
    d.listener.wait_field("READY", "1", timeout=20)
    pid = d.children()["env"]["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    leaked = [e.decode() for e in environ if e.split(b"=", 1)[0] in (b"NOTIFY_SOCKET", b"WATCHDOG_USEC")]
    assert leaked == []


def test_without_notify_socket_nothing_changes(notify_otpd):
    d = notify_otpd(TREE, notify=False, watchdog_usec=200_000)
    d.log.wait_for(r"listening on", timeout=20)
    d.wait("root", "running", timeout=20)
    d.wait("slow", "running", timeout=20)
    echo = d.children()["echo"]["pid"]
    os.kill(echo, signal.SIGKILL)
    d.wait("echo", "running", not_pid=echo)
    assert d.request("call", {"id": "echo", "request": {"x": 1}}) == {"x": 1}
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_notify_socket_nobody_listens_on_changes_nothing(notify_otpd, tmp_path):
    d = notify_otpd(TREE, notify=False, watchdog_usec=200_000, env={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    d.log.wait_for(r"listening on", timeout=20)
    d.wait("slow", "running", timeout=20)
    d.wait("root", "running", timeout=20)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_abstract_notify_socket(notify_otpd):
    d = notify_otpd(TREE, abstract=True, watchdog_usec=1_000_000)
    assert d.listener.address.startswith("@")
    ready = d.listener.wait_field("READY", "1", timeout=20)
    assert ready.pid == d.pid
    d.listener.wait_field("WATCHDOG", "1", timeout=5)
    d.proc.send_signal(signal.SIGTERM)
    d.listener.wait_field("STOPPING", "1", timeout=10)
    assert d.wait_exit() == 0


JOURNAL_TREE = f"""
[root]
max_restarts = 0

[[root.children]]
id = "inner"
supervisor = "static"
max_restarts = 5

[[root.children.children]]
id = "garbler"
agent = "{AGENTS}:Garbler"

[[root.children]]
id = "victim"
agent = "otpd.agents.echo:EchoAgent"
"""


def _journal_run(notify_otpd: NotifyFactory, tmp_path: Path, matching: bool) -> tuple[LogReader, int]:
    """Run the JOURNAL_TREE with stderr on a pipe; an error, a warning, then exit 4."""
    r, w = os.pipe()
    st = os.fstat(w)
    ino = st.st_ino if matching else st.st_ino + 1
    try:
        d = notify_otpd(JOURNAL_TREE, env={"JOURNAL_STREAM": f"{st.st_dev}:{ino}"}, stderr=w)
    finally:
        os.close(w)
    log = LogReader(os.fdopen(r, "rb"), tmp_path / f"journal-{matching}.log")
    log.wait_for("listening on", timeout=20)
    d.wait("root", "running", timeout=20)
    garbler = d.wait("garbler", "running")["pid"]
    victim = d.wait("victim", "running")["pid"]
    d.request("cast", {"id": "garbler", "message": "garble"})
    log.wait_for("garbage on its channel")
    d.wait("garbler", "running", not_pid=garbler)
    os.kill(victim, signal.SIGKILL)  # root's intensity is 0: it escalates, the daemon exits 4
    status = d.wait_exit()
    assert log.wait_closed(10.0)
    return log, status


def test_journal_stream_lines_carry_syslog_priorities(notify_otpd, tmp_path):
    log, status = _journal_run(notify_otpd, tmp_path, matching=True)
    assert status == 4
    lines = [line for line in log.lines if line]
    bad = [line for line in lines if not re.match(r"<[346]>\S", line)]
    assert not bad, f"lines without a <3>/<4>/<6> prefix: {bad}"
    assert any(line.startswith("<6>") and "listening on" in line for line in lines)
    assert any(line.startswith("<3>") and "garbage on its channel" in line for line in lines)
    assert any(line.startswith("<4>") and "escalated" in line for line in lines)
    assert not any(re.search(r"otpd\[\d+\]", line) for line in lines), "journald adds its own pid and stamp"


def test_a_journal_stream_of_another_file_leaves_plain_lines(notify_otpd, tmp_path):
    log, status = _journal_run(notify_otpd, tmp_path, matching=False)
    assert status == 4
    lines = [line for line in log.lines if line]
    assert lines and not any(re.match(r"<\d>", line) for line in lines), lines
    assert any(re.match(r"otpd\[\d+\] error: garbler: garbage on its channel", line) for line in lines), lines


RELOADED = TREE.replace('id = "once"', 'id = "added"').replace(
    'agent = "otpd.agents.kv:KVAgent"', 'agent = "otpd.agents.kv:KVAgent"\nargs = { changed = 1 }')


def _reload(d: Otpd, body: str) -> tuple[Message, Message]:
    config = Path(d.proc.args[-1])
    config.write_text(config.read_text(encoding="utf-8").replace(TREE, body), encoding="utf-8")
    mark = len(d.listener.snapshot())
    d.proc.send_signal(signal.SIGHUP)
    reloading = d.listener.wait_field("RELOADING", "1", timeout=10, start=mark)
    ready = d.listener.wait_field("READY", "1", timeout=20, start=mark)
    return reloading, ready


def test_sighup_reload_says_reloading_then_ready_and_applies_the_config(notify_otpd):
    d = notify_otpd(TREE, watchdog_usec=2_000_000)
    d.listener.wait_field("READY", "1", timeout=20)
    before = d.children()
    reloading, ready = _reload(d, RELOADED)
    assert reloading.pid == ready.pid == d.pid and reloading.at <= ready.at
    assert reloading.fields.get("STATUS"), "RELOADING=1 comes with a STATUS="
    assert d.wait("added")["pid"]
    try:
        d.wait("once", "stopped")  # replied when it is removed
    except OtpdError as err:
        assert err.code == "not_found"  # removed already
    assert d.wait("kv", not_pid=before["kv"]["pid"])["pid"], "changed: restarted"
    after = d.children()
    assert "once" not in after, "removed"
    assert {i: after[i]["pid"] for i in ("echo", "slow")} == {i: before[i]["pid"] for i in ("echo", "slow")}
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_ready_after_a_reload_comes_once_the_new_tree_runs(notify_otpd):
    d = notify_otpd(TREE, watchdog_usec=2_000_000)
    d.listener.wait_field("READY", "1", timeout=20)
    before = d.children()
    _reload(d, RELOADED)
    after = d.children()  # asked when READY=1 came: the reload must be complete
    states = {i: (c["state"], c["pid"]) for i, c in after.items()}
    assert "once" not in after and after["added"]["state"] == "running", states
    assert after["kv"]["state"] == "running" and after["kv"]["pid"] != before["kv"]["pid"], states
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_refused_reload_still_ends_with_ready(notify_otpd):
    d = notify_otpd(TREE, watchdog_usec=2_000_000)
    d.listener.wait_field("READY", "1", timeout=20)
    before = d.children()
    config = Path(d.proc.args[-1])
    config.write_text(config.read_text(encoding="utf-8") + "\n[root.nonsense]\n", encoding="utf-8")
    mark = len(d.listener.snapshot())
    d.proc.send_signal(signal.SIGHUP)
    d.listener.wait_field("RELOADING", "1", timeout=10, start=mark)
    d.listener.wait_field("READY", "1", timeout=10, start=mark)  # else systemd stays in "reloading"
    d.log.wait_for("reload refused")
    assert {i: c["pid"] for i, c in d.children().items()} == {i: c["pid"] for i, c in before.items()}
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_reload_that_changes_nothing_ends_with_ready(notify_otpd):
    """Every reload test used to remove a child; one that removes nothing left the tree
    waiting for a removal that never came, so READY=1 never followed RELOADING=1."""
    d = notify_otpd(TREE, watchdog_usec=2_000_000)
    d.listener.wait_field("READY", "1", timeout=20)
    before = d.children()
    for _ in range(2):  # the second proves the first left nothing behind
        mark = len(d.listener.snapshot())
        d.proc.send_signal(signal.SIGHUP)
        d.listener.wait_field("RELOADING", "1", timeout=10, start=mark)
        d.listener.wait_field("READY", "1", timeout=10, start=mark)
    assert {i: c["pid"] for i, c in d.children().items()} == {i: c["pid"] for i, c in before.items()}
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
