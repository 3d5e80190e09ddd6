"""Reload (the ``reload`` op and SIGHUP): the running tree moves to the edited config file."""

from __future__ import annotations

import os
import signal

import pytest

from otpd.errors import OtpdError
from tests.conftest import brief, is_live, wait_pid_exit

BEFORE = """
[[root.children]]
id = "same"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "goes"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "new_args"
agent = "agents_for_tests:Controlled"
args = { v = 1 }

[[root.children]]
id = "new_restart"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "workers"
supervisor = "dynamic"

[root.children.template]
agent = "agents_for_tests:Controlled"
"""

AFTER = """
[[root.children]]
id = "same"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "new_args"
agent = "agents_for_tests:Controlled"
args = { v = 2 }

[[root.children]]
id = "new_restart"
agent = "agents_for_tests:Controlled"
restart = "transient"

[[root.children]]
id = "workers"
supervisor = "dynamic"

[root.children.template]
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "comes"
agent = "agents_for_tests:Controlled"
"""


def test_reload_adds_removes_restarts_and_updates_only_what_changed(daemon):
    d = daemon(BEFORE)
    d.request("add", {"supervisor": "workers", "id": "w1"})
    d.wait("w1", "running")
    before = d.pids("same", "goes", "new_args", "new_restart", "w1")

    d.write_config(AFTER)
    with d.events() as events:
        summary = d.request("reload")
        events.until(("ready", "comes"))
        if ("ready", "new_args") not in brief(events.seen):
            events.until(("ready", "new_args"))

    assert summary["added"] == ["comes"] and summary["removed"] == ["goes"]
    assert summary["restarted"] == ["new_args"] and "new_restart" in summary["updated"]
    children = d.children()
    assert "goes" not in children and wait_pid_exit(before["goes"], 5.0)
    assert children["comes"]["state"] == "running"
    assert children["new_args"]["pid"] not in (None, before["new_args"])
    assert d.request("call", {"id": "new_args", "request": "args"}) == {"v": 2}
    assert children["new_restart"]["pid"] == before["new_restart"]
    assert children["new_restart"]["restart"] == "transient"
    assert children["same"]["pid"] == before["same"]
    assert children["w1"]["pid"] == before["w1"]  # dynamic children are not in the config
    assert ("reloaded", "root") in brief(events.seen)


def test_reload_with_a_bad_config_is_refused_whole(daemon):
    d = daemon(BEFORE)
    before = d.pids("same", "goes", "new_args", "new_restart")
    d.write_config(AFTER.replace('restart = "transient"', 'restart = "sometimes"'))

    with pytest.raises(OtpdError) as err:
        d.request("reload")

    assert err.value.code == "config_invalid"
    assert any("root.children[2].restart" in e for e in err.value.details["errors"])
    children = d.children()
    assert "comes" not in children
    assert {i: children[i]["pid"] for i in before} == before


def test_sighup_reloads_the_config(daemon):
    d = daemon(BEFORE)
    same = d.pid_of("same")
    d.write_config(BEFORE + """
[[root.children]]
id = "comes"
agent = "agents_for_tests:Controlled"
""")
    with d.events() as events:
        d.proc.send_signal(signal.SIGHUP)
        seen = events.until(("ready", "comes"))
    assert ("reloaded", "root") in brief(seen)
    assert d.pid_of("same") == same


def test_sighup_with_a_bad_config_changes_nothing_and_the_daemon_goes_on(daemon):
    d = daemon(BEFORE)
    before = d.pids("same", "goes")
    d.write_config("this is not toml")
    d.proc.send_signal(signal.SIGHUP)
    d.log.wait_for(r"reload refused")
    assert d.status()["daemon"]["state"] == "running"
    assert d.pids("same", "goes") == before


def test_reload_during_shutdown_starts_nothing(daemon):
    d = daemon("""
[[root.children]]
id = "a"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "stubborn"
agent = "agents_for_tests:IgnoresTerm"
shutdown_ms = 1000

[[root.children]]
id = "c"
agent = "agents_for_tests:Controlled"
""")
    with d.events() as events:
        d.request("shutdown")
        events.until(("stopped", "c"))  # stubborn now holds the shutdown for 1 s
        try:
            d.request("reload")
        except OtpdError as err:
            assert err.code == "shutting_down"
        seen = events.until_closed(timeout=20.0)
    assert d.wait_exit(10.0) == 0
    started = [e["pid"] for e in seen if e["event"] == "started"]
    for pid in started:  # what the daemon left running died with it (PDEATHSIG); reap it here
        wait_pid_exit(pid, 10.0)
        os.waitpid(pid, 0)
        d.agent_pids.pop(pid, None)
    assert started == [], brief(seen)


def test_reload_applies_a_new_heartbeat_timeout_to_the_running_child(daemon):
    body = """
[[root.children]]
id = "hb"
agent = "agents_for_tests:Controlled"
heartbeat_ms = 50
heartbeat_timeout_ms = {timeout}
"""
    d = daemon(body.format(timeout=0))
    pid = d.pid_of("hb")
    d.write_config(body.format(timeout=300))
    summary = d.request("reload")
    assert "hb" in summary["updated"] and summary["restarted"] == []
    assert d.pid_of("hb") == pid  # updated in place: the same process
    d.kill("hb", "STOP")
    try:
        assert d.wait("hb", "running", not_pid=pid, timeout=3.0)["pid"] != pid
    finally:
        if is_live(pid):
            os.kill(pid, signal.SIGCONT)  # the daemon's child, reported by it: let the teardown stop it


VERSIONED = '''
from otpd.agent.base import Agent


class Versioned(Agent):
    def handle_call(self, request):
        return {VERSION!r}
'''

CODE_TREE = """
[[root.children]]
id = "v"
agent = "versioned_agent:Versioned"

[[root.children]]
id = "v2"
agent = "versioned_agent:Versioned"
spare = "always"

[[root.children]]
id = "bystander"
agent = "agents_for_tests:Controlled"
"""


def write_version(folder, text, bump_ns):
    """The agent's module with new source and an mtime moved on by ``bump_ns`` (a later edit)."""
    path = folder / "versioned_agent.py"
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + bump_ns, before + bump_ns))


def test_reload_imports_a_changed_agent_module_anew_and_restarts_only_its_agents(daemon, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    write_version(code, VERSIONED.replace("{VERSION!r}", "'one'"), 0)
    d = daemon(CODE_TREE, import_from=code)
    assert d.request("call", {"id": "v", "request": None}) == "one"
    before = d.pids("v", "v2", "bystander")

    assert d.request("reload")["reimported"] == []  # nothing changed: nothing imported, nothing restarted
    assert d.pids("v", "v2", "bystander") == before

    write_version(code, VERSIONED.replace("{VERSION!r}", "'two'"), 10**9)
    result = d.request("reload")
    assert result["reimported"] == ["versioned_agent"] and sorted(result["restarted"]) == ["v", "v2"]
    for child_id in ("v", "v2"):
        d.wait(child_id, "running", not_pid=before[child_id])
        assert d.request("call", {"id": child_id, "request": None}) == "two"
    assert d.pids("bystander") == {"bystander": before["bystander"]}
    after = d.pids("v", "v2")
    d.kill("v2")  # its restart runs the new code too (not a spare booted with the old one)
    d.wait("v2", "running", not_pid=after["v2"])
    assert d.request("call", {"id": "v2", "request": None}) == "two"


def test_new_agent_code_that_does_not_import_is_refused_and_nothing_changes(daemon, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    write_version(code, VERSIONED.replace("{VERSION!r}", "'one'"), 0)
    d = daemon(CODE_TREE, import_from=code)
    before = d.pids("v", "v2", "bystander")
    for broken in ("class Versioned(:\n", VERSIONED.replace("{VERSION!r}", "'two'") + "raise RuntimeError('boom')\n",
                   "Versioned = 3\n"):
        write_version(code, broken, 10**9)
        with pytest.raises(OtpdError) as err:
            d.request("reload")
        assert err.value.code == "config_invalid" and "versioned_agent" in err.value.message
        assert d.pids("v", "v2", "bystander") == before
        d.kill("v")  # a restart still runs the old code, which the daemon kept
        d.wait("v", "running", not_pid=before["v"])
        before["v"] = d.pid_of("v")
        assert d.request("call", {"id": "v", "request": None}) == "one"


CHECKED = '''
from otpd.agent.base import Agent


class Versioned(Agent):
    @classmethod
    def check_args(cls, args):
        if set(args) - {KNOWN!r}:
            raise ValueError(f"unknown args {sorted(set(args) - {KNOWN!r})}")

    def handle_call(self, request):
        return self.args
'''


def test_a_reload_checks_args_with_the_check_of_the_code_it_imports(daemon, tmp_path):
    """New code and new args together: the new class's check_args judges them, not the old one's."""
    code = tmp_path / "code"
    code.mkdir()
    write_version(code, CHECKED.replace("{KNOWN!r}", "set()"), 0)
    d = daemon(CODE_TREE, import_from=code)
    before = d.pids("v", "v2", "bystander")
    with_args = CODE_TREE.replace('agent = "versioned_agent:Versioned"\n', 'agent = "versioned_agent:Versioned"\n'
                                  'args = { colour = "red" }\n', 1)
    d.write_config(with_args)
    with pytest.raises(OtpdError) as err:  # the running code's check refuses the new arg
        d.request("reload")
    assert err.value.code == "config_invalid" and "unknown args ['colour']" in err.value.message
    assert d.pids("v", "v2", "bystander") == before

    write_version(code, CHECKED.replace("{KNOWN!r}", "{'colour'}"), 10**9)  # code that takes it
    result = d.request("reload")
    assert result["reimported"] == ["versioned_agent"]
    d.wait("v", "running", not_pid=before["v"])
    assert d.request("call", {"id": "v", "request": None}) == {"colour": "red"}
    after = d.pids("v", "v2", "bystander")

    write_version(code, CHECKED.replace("{KNOWN!r}", "{'size'}"), 2 * 10**9)  # code that does not
    with pytest.raises(OtpdError) as err:
        d.request("reload")
    assert err.value.code == "config_invalid" and "v.args: unknown args ['colour']" in err.value.message
    assert d.pids("v", "v2", "bystander") == after
    assert d.request("call", {"id": "v", "request": None}) == {"colour": "red"}


def test_a_reload_may_name_a_new_class_of_a_changed_module_or_a_module_edited_before_it_was_named(
        daemon, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    write_version(code, VERSIONED.replace("{VERSION!r}", "'one'") + "import helper_agent  # noqa\n", 0)
    (code / "helper_agent.py").write_text(VERSIONED.replace("Versioned", "Helper").replace("{VERSION!r}", "'h1'"))
    d = daemon(CODE_TREE, import_from=code)  # helper_agent is imported (by versioned_agent), not named
    # the edit comes before the config names it: the daemon still knows which file it imported
    (code / "helper_agent.py").write_text(VERSIONED.replace("Versioned", "Helper").replace("{VERSION!r}", "'h2'"))
    write_version(code, VERSIONED.replace("{VERSION!r}", "'two'") + "\n\nclass Added(Versioned):\n"
                  "    def handle_call(self, request):\n        return 'added'\n", 10**9)
    d.config_path.write_text(d.config_path.read_text() + '\n[[root.children]]\nid = "added"\n'
                             'agent = "versioned_agent:Added"\n\n[[root.children]]\nid = "helper"\n'
                             'agent = "helper_agent:Helper"\n')
    result = d.request("reload")
    assert result["reimported"] == ["helper_agent", "versioned_agent"]
    assert sorted(result["added"]) == ["added", "helper"]
    d.wait("added")
    d.wait("helper")
    assert d.request("call", {"id": "added", "request": None}) == "added"
    assert d.request("call", {"id": "helper", "request": None}) == "h2"
    assert d.request("call", {"id": "v", "request": None}) == "two"


def test_a_module_that_subclasses_a_changed_one_is_imported_anew_after_it(daemon, tmp_path):
    """``a_child`` subclasses ``z_base``'s class, and comes first by name: the base's new
    version must still reach the subclass's agents, though its own file did not change."""
    code = tmp_path / "code"
    code.mkdir()
    base = code / "z_base.py"
    base.write_text(VERSIONED.replace("Versioned", "Base").replace("{VERSION!r}", "'base one'"))
    (code / "a_child.py").write_text("from z_base import Base\n\n\nclass Child(Base):\n    pass\n")
    tree = ('[[root.children]]\nid = "child"\nagent = "a_child:Child"\n\n'
            '[[root.children]]\nid = "base"\nagent = "z_base:Base"\n\n'
            '[[root.children]]\nid = "bystander"\nagent = "agents_for_tests:Controlled"\n')
    d = daemon(tree, import_from=code)
    assert d.request("call", {"id": "child", "request": None}) == "base one"
    before = d.pids("child", "base", "bystander")
    stamp = base.stat().st_mtime_ns + 10**9
    base.write_text(VERSIONED.replace("Versioned", "Base").replace("{VERSION!r}", "'base two'"))
    os.utime(base, ns=(stamp, stamp))
    result = d.request("reload")
    assert result["reimported"] == ["a_child", "z_base"]
    assert sorted(result["restarted"]) == ["base", "child"]
    for child_id in ("child", "base"):
        d.wait(child_id, "running", not_pid=before[child_id])
        assert d.request("call", {"id": child_id, "request": None}) == "base two"
    assert d.pids("bystander") == {"bystander": before["bystander"]}


def test_a_reload_naming_a_module_that_calls_sys_exit_is_refused_and_the_daemon_goes_on(daemon, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "quitter.py").write_text("import sys\nsys.exit(0)\n")
    d = daemon(CODE_TREE.split('[[root.children]]\nid = "v2"')[0].replace("versioned_agent:Versioned",
                                                                          "agents_for_tests:Controlled"),
               import_from=code)
    before = d.pids("v")
    d.config_path.write_text(d.config_path.read_text() + '\n[[root.children]]\nid = "q"\nagent = "quitter:Q"\n')
    with pytest.raises(OtpdError) as err:
        d.request("reload")
    assert err.value.code == "config_invalid" and "SystemExit" in err.value.message
    assert d.pids("v") == before and d.status()["daemon"]["state"] == "running"


GATED = """
[[root.children]]
id = "pool"
supervisor = "dynamic"

[root.children.template]
agent = "agents_for_tests:Gated"
args = {{ {args} }}
"""


def test_a_reload_gives_dynamic_children_their_templates_config_only_args(daemon):
    """Narrowing what only the config may set (a workflow's ``handlers``) reached only children
    added after the reload: the ones running went on with the old allowlist."""
    d = daemon(GATED.format(args='allowed = ["a", "b"], colour = "red"'))
    for n, child in ((1, "g1"), (2, "g2")):
        d.request("add", {"supervisor": "pool", "id": child, "args": {"n": n}})
        d.wait(child, "running")
    d.request("stop", {"id": "g2"})
    g1 = d.pid_of("g1")
    d.write_config(GATED.format(args='allowed = ["a"], colour = "blue"'))
    with d.events() as events:
        summary = d.request("reload")
        events.until(("ready", "g1"))
    assert summary["restarted"] == ["g1"] and "g2" in summary["updated"]
    assert d.pid_of("g1") != g1
    # the config-only arg follows the template; the others stay as the child was added with
    assert d.request("call", {"id": "g1", "request": "args"}) == {"allowed": ["a"], "colour": "red", "n": 1}
    d.request("start", {"id": "g2"})
    d.wait("g2", "running")
    assert d.request("call", {"id": "g2", "request": "args"}) == {"allowed": ["a"], "colour": "red", "n": 2}
    g1 = d.pid_of("g1")
    assert d.request("reload")["restarted"] == []  # nothing changed: nothing restarts
    d.write_config(GATED.format(args='colour = "blue"'))  # not set any more: the class's default
    with d.events() as events:
        assert sorted(d.request("reload")["restarted"]) == ["g1", "g2"]
        events.until(("ready", "g1"))
    assert d.request("call", {"id": "g1", "request": "args"}) == {"colour": "red", "n": 1}
    assert d.pid_of("g1") != g1


ESCALATING = """
[[root.children]]
id = "s"
supervisor = "static"
restart = "temporary"
max_restarts = 0

[[root.children.children]]
id = "a"
agent = "agents_for_tests:Controlled"

[[root.children.children]]
id = "b"
agent = "agents_for_tests:Controlled"
args = {{ v = {v} }}

[[root.children.children]]
id = "c"
agent = "agents_for_tests:IgnoresTerm"
shutdown_ms = 1000
"""


def test_a_reload_during_an_escalation_starts_nothing_under_the_supervisor_giving_up(daemon):
    """Found by a review helper: the reload restarted b inside s while s stopped its children (it
    had given up), so b ran on under a failed s, and the daemon's shutdown never stopped it."""
    d = daemon(ESCALATING.format(v=1))
    b = d.pid_of("b")
    d.kill("a")  # s is over its intensity: it stops c (ignores SIGTERM: 1 s), then b
    d.wait("c", "stopping")
    d.write_config(ESCALATING.format(v=2))
    assert "b" not in d.request("reload")["restarted"]
    d.wait("s", "failed", timeout=15)
    children = d.children()
    assert [children[c]["state"] for c in "abc"] == ["failed", "stopped", "stopped"], children
    assert wait_pid_exit(b, 5.0)
    d.request("start", {"id": "s"})  # its next start takes the new args
    d.wait("s", "running")
    assert d.request("call", {"id": "b", "request": "args"}) == {"v": 2}
