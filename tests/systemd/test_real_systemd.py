"""otpd under a REAL systemd: installed by scripts/install-systemd into a throw-away box.

One box for the module (scripts/sdbox.sh: systemd as PID 1 of new namespaces, an
overlay of the host's root, the checkout and a wheelhouse bound in read-only).
scripts/install-systemd installs otpd into it exactly as on a host (venv under
/opt/otpd, unit, /etc/otpd/otpd.toml, enabled); then the tests drive it with
systemctl and otpctl from inside the box:

  start returns after READY=1 with every agent running, hardening in force;
  an agent's SIGKILL is otpd's business (systemd sees nothing); the daemon's
  SIGKILL is systemd's (restart, nothing of the old daemon left, state intact);
  the root supervisor giving up (exit 4) is restarted; a SIGSTOPped daemon is
  killed by the watchdog and restarted; reload applies a config change without
  touching the other agents; stop ends the children in reverse order, exit 0,
  within TimeoutStopSec, and a slow stop is extended past it; a bad config is
  not restarted; a crash loop ends in the start limit; uninstall.

Needs root, util-linux's unshare/nsenter/setpriv and /lib/systemd/systemd; skipped
with the reason otherwise.  Waits are on systemctl (which blocks until the job is
done), on `otpctl wait`, and on `journalctl --follow` lines; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_DIR

pytestmark = pytest.mark.timeout(300)

SDBOX = REPO_DIR / "scripts" / "sdbox.sh"
BOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SRC = "/opt/otpd-src"  # the checkout, read-only inside the box
WHEELS = "/opt/otpd-wheelhouse"
TEST_AGENTS = "/opt/otpd-test"  # tests/systemd/agents.py as otpd_sd_agents.py
UNIT = "otpd.service"
CGROUP = "/sys/fs/cgroup/system.slice/otpd.service"
DROPIN = "/run/systemd/system/otpd.service.d"
CONFIG = "/etc/otpd/otpd.toml"
SHIPPED_CONFIG = (REPO_DIR / "config" / "otpd-system.toml").read_text(encoding="utf-8")
AGENTS = ("echo", "kv")  # the shipped config's agents, in start order


def is_otpd(entry: dict[str, Any]) -> bool:
    """An entry of otpd's own (its stdout/stderr) or systemd's about otpd.service."""
    return UNIT in (entry.get("_SYSTEMD_UNIT"), entry.get("UNIT")) and isinstance(entry.get("MESSAGE"), str)


class Journal:
    """``journalctl --follow -o json`` read by a thread; tests wait for a line of otpd's."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if is_otpd(entry):
                with self.cond:
                    self.lines.append(entry["MESSAGE"])
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> int:
        """The index of the first line from ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = start
            while True:
                for i, line in enumerate(self.lines[seen:], seen):
                    if regex.search(line):
                        return i
                seen = max(seen, len(self.lines))
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise AssertionError(f"no journal line matches {pattern!r} within {timeout}s:\n{self.text()}")
                self.cond.wait(left)

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: a real systemd runs as PID 1 of new namespaces (scripts/sdbox.sh)"
    result = subprocess.run([str(SDBOX), "check"], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        return f"cannot run systemd in a box here: {result.stdout.strip() or result.stderr.strip()}"
    return None


class Box:
    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.tmp = tmp
        self.followers: list[tuple[subprocess.Popen[bytes], int]] = []
        self.install_output = ""

    def run(self, *cmd: str, input: str | None = None, timeout: float = 60, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        """CMD inside the box, with a clean environment (nothing of the host's leaks in)."""
        full = [str(SDBOX), "exec", self.name, "env", "-i", f"PATH={BOX_PATH}", "LANG=C.UTF-8", *cmd]
        result = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"in the box: {' '.join(cmd)} -> {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)

    def props(self, *names: str) -> dict[str, str]:
        out = self.run("systemctl", "show", *(f"--property={n}" for n in names), UNIT).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, name: str) -> str:
        return self.props(name)[name]

    def ctl(self, *args: str, timeout: float = 60) -> Any:
        """otpctl --json ARGS... (the installed one, on the default socket /run/otpd/otpd.sock)."""
        return json.loads(self.run("otpctl", "--json", *args, timeout=timeout).stdout)

    def status(self) -> dict[str, dict[str, Any]]:
        result = self.ctl("status")
        return {"daemon": result["daemon"], **{c["id"]: c for c in result["children"]}}

    def kv(self, op: str, key: str, value: Any = None) -> Any:
        return self.ctl("call", "kv", json.dumps({"op": op, "key": key, "value": value}))

    def write(self, path: str, text: str) -> None:
        self.sh(f"test -e /run/otpd-sdbox && mkdir -p \"$(dirname {path})\" && cat > {path}", input=text)

    def cursor(self) -> str:
        out = self.run("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
        match = re.search(r"^-- cursor: (\S+)", out, re.M)
        assert match, out
        return match.group(1)

    def follow(self, cursor: str) -> Journal:
        """otpd's journal (its own lines and systemd's about it) after ``cursor``, as entries arrive."""
        proc = subprocess.Popen(
            [str(SDBOX), "exec", self.name, "env", "-i", f"PATH={BOX_PATH}", "sh", "-c",
             'echo "$$"; exec journalctl --follow --no-pager -o json --after-cursor="$1"', "sh", cursor],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        inner_pid = int(proc.stdout.readline())
        self.followers.append((proc, inner_pid))
        return Journal(proc.stdout)

    def journal(self, cursor: str, max_priority: int = 7) -> list[str]:
        """otpd's journal lines after ``cursor`` (journalctl's own -u with --after-cursor skips one)."""
        out = self.run("journalctl", "--no-pager", "-o", "json", f"--after-cursor={cursor}").stdout
        entries = [json.loads(line) for line in out.splitlines()]
        return [e["MESSAGE"] for e in entries if is_otpd(e) and int(e.get("PRIORITY", 6)) <= max_priority]

    def stop_followers(self) -> None:
        for proc, inner in self.followers:
            self.run("kill", str(inner), check=False)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.followers.clear()

    def wait_props(self, expected: dict[str, str], timeout: float = 20.0) -> None:
        """Poll systemctl show until ``expected`` holds (systemd has no event for a state it reaches)."""
        deadline = time.monotonic() + timeout
        while True:
            props = self.props(*expected)  # each round is a process in the box: no busy spin
            if props == expected:
                return
            assert time.monotonic() < deadline, f"{props} != {expected} after {timeout}s"

    def cgroup_pids(self) -> set[int]:
        out = self.run("cat", f"{CGROUP}/cgroup.procs").stdout
        return {int(p) for p in out.split()}

    def proc_status(self, pid: int) -> dict[str, str]:
        out = self.run("cat", f"/proc/{pid}/status").stdout
        return {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}

    def fresh(self, config: str = SHIPPED_CONFIG, dropin: str | None = None, start: bool = True) -> None:
        """Stop otpd, put ``config`` and the drop-in in place, reset the counters, start it."""
        self.run("systemctl", "stop", UNIT, timeout=90)
        self.write(CONFIG, config)
        self.sh(f"test -e /run/otpd-sdbox && rm -rf {DROPIN}")
        if dropin is not None:
            self.write(f"{DROPIN}/test.conf", "[Service]\n" + dropin)
        self.run("systemctl", "daemon-reload")
        self.run("systemctl", "reset-failed", UNIT, check=False)
        if start:
            self.run("systemctl", "start", UNIT, timeout=90)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("sdbox")
    wheels = tmp / "wheels"
    made = subprocess.run([str(REPO_DIR / "scripts" / "install-systemd"), "--make-wheelhouse", str(wheels)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert made.returncode == 0, f"cannot build the wheelhouse (needs the package index):\n{made.stdout}{made.stderr}"
    name = f"otpd-test-{os.getpid()}"
    state = Path(os.environ.get("OTPD_SDBOX_STATE", "/tmp/otpd-sdbox")) / name
    started = subprocess.run([str(SDBOX), "start", name, "--ro-bind", f"{REPO_DIR}:{SRC}",
                              "--ro-bind", f"{wheels}:{WHEELS}"], capture_output=True, text=True, timeout=180,
                             check=False)
    unshare_pid = int((state / "unshare.pid").read_text()) if (state / "unshare.pid").exists() else None
    b = Box(name, tmp)
    try:
        assert started.returncode == 0, f"sdbox start failed:\n{started.stdout}{started.stderr}"
        # The box's root is an overlay of the host's: hide anything a host install left there.
        b.sh("test -e /run/otpd-sdbox && rm -rf /etc/otpd /opt/otpd /var/lib/otpd /var/lib/private/otpd "
             "/etc/systemd/system/otpd.service /etc/systemd/system/otpd.service.d "
             "/etc/systemd/system/multi-user.target.wants/otpd.service /usr/local/bin/otpctl /usr/local/bin/otpd")
        result = b.run(f"{SRC}/scripts/install-systemd", "--wheelhouse", WHEELS, timeout=600)
        b.install_output = result.stdout + result.stderr
        b.write(f"{TEST_AGENTS}/otpd_sd_agents.py", (REPO_DIR / "tests" / "systemd" / "agents.py").read_text())
        yield b
    finally:
        try:
            b.stop_followers()
            journal = b.run("journalctl", "--no-pager", "-o", "short-monotonic", check=False).stdout
            (tmp / "box-journal.txt").write_text(journal)
        except Exception:  # noqa: BLE001 - the box may be gone already
            pass
        subprocess.run([str(SDBOX), "stop", name], capture_output=True, timeout=120, check=False)
        if unshare_pid is not None:  # re-parented to us when the test process is a subreaper
            try:
                os.waitpid(unshare_pid, os.WNOHANG)
            except ChildProcessError:
                pass


def running_agents(status: dict[str, dict[str, Any]], ids: tuple[str, ...] = AGENTS) -> dict[str, int]:
    assert {i: status[i]["state"] for i in ids} == dict.fromkeys(ids, "running"), status
    return {i: status[i]["pid"] for i in ids}


# -- install ---------------------------------------------------------------------


def test_install_puts_venv_unit_and_config_in_place_and_enables(box):
    assert "installed /etc/otpd/otpd.toml" in box.install_output, box.install_output
    assert box.run("cat", "/etc/systemd/system/otpd.service").stdout == \
        (REPO_DIR / "systemd" / "otpd.service").read_text()
    assert box.run("cat", CONFIG).stdout == SHIPPED_CONFIG
    assert box.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "enabled"
    assert box.run("readlink", "/usr/local/bin/otpctl").stdout.strip() == "/opt/otpd/venv/bin/otpctl"
    where = box.run("/opt/otpd/venv/bin/python", "-c", "import otpd; print(otpd.__file__)").stdout
    assert where.startswith("/opt/otpd/venv/lib/"), f"a copy, not the checkout: {where}"
    # verify the installed unit where its ExecStart exists: not a single diagnostic
    verify = box.run("systemd-analyze", "verify", "--man=no", "/etc/systemd/system/otpd.service", check=False)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr


def test_install_again_upgrades_in_place_and_keeps_the_config(box):
    box.sh(f"echo '# a local edit' >> {CONFIG}")
    again = box.run(f"{SRC}/scripts/install-systemd", "--wheelhouse", WHEELS, timeout=600)
    assert "keeping the existing /etc/otpd/otpd.toml" in again.stdout
    assert box.run("tail", "-n", "1", CONFIG).stdout == "# a local edit\n"
    assert box.run("/opt/otpd/venv/bin/otpd", "--version").returncode == 0
    box.write(CONFIG, SHIPPED_CONFIG)


# -- start -------------------------------------------------------------------------


def test_start_returns_after_ready_with_every_agent_running(box):
    box.fresh(start=False)
    box.run("systemctl", "start", UNIT, timeout=90)  # Type=notify: returns once READY=1 came
    status = box.status()  # asked right after start returned
    props = box.props("ActiveState", "SubState", "MainPID", "StatusText", "NRestarts", "Result", "WatchdogUSec")
    assert (props["ActiveState"], props["SubState"], props["Result"]) == ("active", "running", "success"), props
    main = int(props["MainPID"])
    assert status["daemon"]["pid"] == main and status["daemon"]["state"] == "running"
    agents = running_agents(status)
    assert status["workers"]["state"] == "running"
    assert props["StatusText"].startswith("2 running"), props
    assert props["WatchdogUSec"] == "10s"

    # The sandbox is in force, on the daemon and on the agents it forked (Python + ctypes run under it).
    for pid in (main, *agents.values()):
        st = box.proc_status(pid)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2" and st["CapBnd"] == "0000000000000000", st
        assert st["Uid"].split()[0] != "0", "DynamicUser: not root"
    sock = box.run("stat", "-c", "%A %U", "/run/otpd", "/run/otpd/otpd.sock").stdout.split("\n")
    assert sock[0].startswith("drwxr-x---") and sock[1].startswith("srw-------"), sock
    assert box.run("test", "-d", "/var/lib/private/otpd/store").returncode == 0

    # journald got the priority prefixes: the lines carry PRIORITY, not "<6>"
    entries = [json.loads(line) for line in
               box.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager", f"_PID={main}").stdout.splitlines()]
    listening = [e for e in entries if "listening on /run/otpd/otpd.sock" in e["MESSAGE"]]
    assert listening and listening[0]["PRIORITY"] == "6", entries[:3]
    assert not any(e["MESSAGE"].startswith("<") for e in entries)


# -- failures inside and outside -------------------------------------------------------


def test_agent_killed_by_pid_is_restarted_by_otpd_and_systemd_sees_nothing(box):
    box.fresh()
    assert box.kv("put", "agent-kill", "kept")["ok"]
    before = box.props("MainPID", "NRestarts")
    kv = box.status()["kv"]["pid"]
    box.run("kill", "-KILL", str(kv))
    back = box.ctl("wait", "kv", "--state", "running", "--not-pid", str(kv), "--timeout", "20", timeout=40)
    assert back["pid"] != kv
    assert box.props("MainPID", "NRestarts") == before, "systemd must not notice an agent's crash"
    assert box.prop("ActiveState") == "active"
    status = box.status()
    assert status["kv"]["restarts"] == 1 and status["kv"]["pid"] == back["pid"]
    assert box.kv("get", "agent-kill") == {"found": True, "value": "kept"}


def test_daemon_killed_is_restarted_by_systemd_with_nothing_left_and_state_intact(box):
    box.fresh()
    assert box.kv("put", "daemon-kill", [1, 2, 3])["ok"]
    before = box.props("MainPID", "NRestarts")
    old_main = int(before["MainPID"])
    old = {old_main, *running_agents(box.status()).values()}
    assert box.cgroup_pids() == old, "the unit's cgroup holds the daemon and its agents, nothing else"
    journal = box.follow(box.cursor())
    box.run("kill", "-KILL", str(old_main))
    journal.wait_for(r"Main process exited, code=killed, status=9/KILL", timeout=20)
    journal.wait_for(r"Started otpd\.service", timeout=60)
    after = box.props("MainPID", "NRestarts", "ActiveState")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1 and after["ActiveState"] == "active", after
    new_main = int(after["MainPID"])
    assert new_main != old_main
    new = {new_main, *running_agents(box.status()).values()}
    assert box.cgroup_pids() == new, "only the new daemon and its agents"
    assert not old & new
    assert box.kv("get", "daemon-kill") == {"found": True, "value": [1, 2, 3]}


ESCALATE = """
pid=
for i in 1 2 3 4; do
  pid=$(otpctl wait echo --state running ${pid:+--not-pid $pid} --timeout 10 | sed -n 's/.* pid \\([0-9]*\\).*/\\1/p')
  [ -n "$pid" ] || exit 1
  otpctl kill echo >/dev/null
done
"""


def test_root_supervisor_giving_up_exits_4_and_systemd_restarts_it(box):
    box.fresh()  # root: max_restarts = 3 within 5 s
    before = box.props("MainPID", "NRestarts")
    cursor = box.cursor()
    journal = box.follow(cursor)
    box.sh(ESCALATE, timeout=60)  # the 4th crash in 5 s is one too many
    journal.wait_for(r"root: escalated", timeout=20)
    journal.wait_for(r"Main process exited, code=exited, status=4", timeout=20)
    journal.wait_for(r"Started otpd\.service", timeout=60)
    after = box.props("MainPID", "NRestarts", "ActiveState")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1 and after["ActiveState"] == "active", after
    assert after["MainPID"] != before["MainPID"]
    running_agents(box.status())
    warnings = box.journal(cursor, max_priority=4)
    assert any("root: escalated" in line for line in warnings), "the escalation is logged as a warning (<4>)"


def test_a_stopped_daemon_is_killed_by_the_watchdog_and_restarted(box):
    box.fresh(dropin="WatchdogSec=2s\n")
    assert box.prop("WatchdogUSec") == "2s"
    before = box.props("MainPID", "NRestarts")
    journal = box.follow(box.cursor())
    box.run("kill", "-STOP", before["MainPID"])
    journal.wait_for(r"Watchdog timeout \(limit 2s\)", timeout=20)
    journal.wait_for(r"Failed with result 'watchdog'", timeout=40)
    journal.wait_for(r"Started otpd\.service", timeout=60)
    after = box.props("MainPID", "NRestarts", "ActiveState")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1 and after["ActiveState"] == "active", after
    assert after["MainPID"] != before["MainPID"]
    running_agents(box.status())


# -- reload ----------------------------------------------------------------------------

EXTRA = """
[[root.children]]
id = "extra"
agent = "otpd.agents.echo:EchoAgent"
"""
ECHO = 'id = "echo"\nagent = "otpd.agents.echo:EchoAgent"\n'
RELOADED = (SHIPPED_CONFIG.replace(ECHO, ECHO + "args = { changed = 1 }\n").split("# Children added at run time")[0]
            + EXTRA)


def test_reload_applies_the_config_and_leaves_untouched_agents_alone(box):
    assert ECHO in SHIPPED_CONFIG
    box.fresh()
    before = box.props("MainPID", "NRestarts")
    pids = running_agents(box.status())
    cursor = box.cursor()
    box.write(CONFIG, RELOADED)  # echo changed, kv untouched, workers removed, extra added
    box.run("systemctl", "reload", UNIT, timeout=60)  # ExecReload: SIGHUP
    assert box.ctl("wait", "extra", "--state", "running", "--timeout", "20", timeout=40)["pid"]
    echo = box.ctl("wait", "echo", "--state", "running", "--not-pid", str(pids["echo"]), "--timeout", "20", timeout=40)
    assert echo["pid"] != pids["echo"], "a changed child is restarted"
    box.wait_props({"ActiveState": "active", "SubState": "running"})  # READY=1 after RELOADING=1
    status = box.status()
    assert "workers" not in status, "a removed child is stopped and forgotten"
    assert status["kv"]["pid"] == pids["kv"] and status["kv"]["restarts"] == 0, "untouched: same process"
    assert box.props("MainPID", "NRestarts") == before, "a reload is no restart"
    assert any("reloaded" in line for line in box.journal(cursor))

    # A config that does not validate is refused whole; the running tree stays as it is.
    pids = running_agents(box.status(), ("echo", "kv", "extra"))
    cursor = box.cursor()
    box.write(CONFIG, RELOADED + "\n[root.nonsense]\n")
    box.run("systemctl", "reload", UNIT, timeout=60)
    journal = box.follow(cursor)
    journal.wait_for(r"reload refused", timeout=20)
    box.wait_props({"ActiveState": "active", "SubState": "running"})
    assert running_agents(box.status(), ("echo", "kv", "extra")) == pids
    assert box.props("MainPID", "NRestarts") == before


# -- stop ------------------------------------------------------------------------------


def test_stop_ends_children_in_reverse_order_exit_0_within_the_timeout(box):
    box.fresh()
    box.ctl("add", "workers", "w1")
    box.ctl("wait", "w1", "--state", "running", "--timeout", "20", timeout=40)
    order = [c for c in box.status() if c not in ("daemon", "workers")]
    assert order == ["echo", "kv", "w1"]
    timeout_s = float(box.prop("TimeoutStopUSec").rstrip("s"))
    cursor = box.cursor()
    started = time.monotonic()
    box.run("systemctl", "stop", UNIT, timeout=120)
    took = time.monotonic() - started
    props = box.props("Result", "ExecMainStatus", "ActiveState", "MainPID")
    assert props == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive", "MainPID": "0"}, props
    assert took < timeout_s
    journal = box.follow(cursor)
    journal.wait_for(r"otpd exits with status 0", timeout=20)
    stopped = [m.group(1) for line in journal.lines if (m := re.match(r"(\S+): stopped ", line))]
    assert [s for s in stopped if s in order] == order[::-1], journal.text()
    assert box.run("test", "-e", CGROUP, check=False).returncode != 0, "nothing of the unit is left"
    assert box.run("test", "-e", "/run/otpd", check=False).returncode != 0, "RuntimeDirectory removed"
    assert box.run("test", "-d", "/var/lib/private/otpd/store").returncode == 0, "StateDirectory kept"


SLOW = """
[daemon]
state_dir = "/var/lib/otpd"
runtime_dir = "/run/otpd"

[[root.children]]
id = "slow-start"
agent = "otpd_sd_agents:SlowStart"
args = { start_s = 1.5 }

[[root.children]]
id = "slow-stop-1"
agent = "otpd_sd_agents:SlowStop"
shutdown_ms = 5000
args = { stop_s = 1.5 }

[[root.children]]
id = "slow-stop-2"
agent = "otpd_sd_agents:SlowStop"
shutdown_ms = 5000
args = { stop_s = 1.5 }
"""


def test_start_waits_for_a_slow_agent_and_a_progressing_stop_outlasts_TimeoutStopSec(box):
    box.fresh(SLOW, dropin=f"Environment=PYTHONPATH={TEST_AGENTS}\nTimeoutStopSec=2s\n", start=False)
    started = time.monotonic()
    box.run("systemctl", "start", UNIT, timeout=90)
    assert time.monotonic() - started >= 1.5, "start returned before the slow agent was ready"
    running_agents(box.status(), ("slow-start", "slow-stop-1", "slow-stop-2"))

    cursor = box.cursor()
    started = time.monotonic()
    box.run("systemctl", "stop", UNIT, timeout=120)
    took = time.monotonic() - started
    props = box.props("Result", "ExecMainStatus", "ActiveState")
    # two children of 1.5 s each, one after the other: past the 2 s, extended as each one stopped
    assert took >= 3.0, f"stop took {took:.2f}s"
    assert props == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}, (props, took)
    assert not any("timed out" in line for line in box.journal(cursor))


# -- escalation ends at systemd -----------------------------------------------------------


def test_a_bad_config_fails_once_and_is_not_restarted(box):
    box.fresh("[daemon]\nno_such_key = 1\n", start=False)
    cursor = box.cursor()
    start = box.run("systemctl", "start", UNIT, timeout=90, check=False)
    assert start.returncode != 0
    props = box.props("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert props == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2", "NRestarts": "0"}, props
    assert any("no_such_key" in line for line in box.journal(cursor)), "the config error is in the journal"


CRASH_LOOP = """
[root]
max_restarts = 1
max_seconds = 5

[[root.children]]
id = "broken"
agent = "otpd_sd_agents:SlowStart"
args = { start_s = "not a number" }
"""


def test_a_crash_loop_ends_in_the_start_limit(box):
    box.fresh(SHIPPED_CONFIG.split("[root]")[0] + CRASH_LOOP, dropin=f"Environment=PYTHONPATH={TEST_AGENTS}\n",
              start=False)
    journal = box.follow(box.cursor())
    box.run("systemctl", "start", UNIT, timeout=90, check=False)  # fails: exit 4 before READY=1
    hit = journal.wait_for(r"Start request repeated too quickly", timeout=90)
    journal.wait_for(r"Failed with result", timeout=20, start=hit)
    props = box.props("ActiveState", "SubState", "NRestarts")
    assert (props["ActiveState"], props["SubState"]) == ("failed", "failed"), props
    exits = [line for line in journal.lines if "Main process exited, code=exited, status=4" in line]
    assert len(exits) == int(box.run("systemctl", "show", "-P", "StartLimitBurst", UNIT).stdout), journal.text()


# -- uninstall --------------------------------------------------------------------------


def test_uninstall_removes_service_and_venv_keeps_config_and_state_unless_purged(box):
    box.fresh()
    out = box.run(f"{SRC}/scripts/uninstall-systemd", timeout=120).stdout
    assert "stopping otpd" in out
    gone = ["/etc/systemd/system/otpd.service", "/opt/otpd/venv", "/usr/local/bin/otpctl", "/usr/local/bin/otpd"]
    for path in gone:
        assert box.run("test", "-e", path, check=False).returncode != 0, path
    assert box.run("systemctl", "cat", UNIT, check=False).returncode != 0
    assert box.run("test", "-e", CONFIG).returncode == 0
    assert box.run("test", "-d", "/var/lib/private/otpd/store").returncode == 0
    box.run(f"{SRC}/scripts/uninstall-systemd", timeout=120)  # again: nothing to do, still fine
    box.run(f"{SRC}/scripts/uninstall-systemd", "--purge", timeout=120)
    for path in ("/etc/otpd", "/var/lib/private/otpd", "/var/lib/otpd"):
        assert box.run("test", "-e", path, check=False).returncode != 0, path
