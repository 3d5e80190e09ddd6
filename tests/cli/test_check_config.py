"""``otpd check-config`` and ``otpd run`` on bad configs: exit 2, the key and its line, nothing forked."""

from __future__ import annotations

import grp
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import child_env, console, run_cli

GOOD = """\
[daemon]
runtime_dir = "var/run"
log_level = "info"

[root]
strategy = "one_for_one"
max_restarts = 3
max_seconds = 5

[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"
restart = "permanent"
shutdown_ms = 5000

[[root.children]]
id = "pipeline"
supervisor = "static"
strategy = "rest_for_one"

[[root.children.children]]
id = "reader"
agent = "otpd.agents.echo:EchoAgent"

[[root.children.children]]
id = "writer"
agent = "agents_for_tests:Controlled"

[[root.children]]
id = "workers"
supervisor = "dynamic"

[root.children.template]
agent = "otpd.agents.echo:EchoAgent"
shutdown_ms = "brutal_kill"
"""


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the line holding the ``occurrence``-th ``needle``."""
    found = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    return found[occurrence - 1]


def check(tmp_path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return run_cli("otpd", "check-config", str(path))


def test_good_config_prints_ok_and_exits_0(tmp_path):
    result = check(tmp_path, GOOD)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\S*bad\.toml: ok \(5 children; socket \S+/var/run/otpd\.sock\)\n", result.stdout)
    assert result.stderr == ""


def test_shipped_default_config_is_valid():
    from tests.conftest import REPO_DIR

    result = run_cli("otpd", "check-config", str(REPO_DIR / "config" / "otpd.toml"))
    assert result.returncode == 0, result.stderr
    assert ": ok (" in result.stdout


@pytest.mark.parametrize(("old", "new", "key", "message"), [
    ('restart = "permanent"', 'restart = "permanent"\ncolour = "red"', "root.children[0].colour",
     "unknown key"),
    ("max_restarts = 3", 'max_restarts = "three"', "root.max_restarts", "must be an integer, not a string"),
    ('restart = "permanent"', 'restart = "sometimes"', "root.children[0].restart",
     "'sometimes' is not one of permanent, transient, temporary"),
    ('id = "writer"', 'id = "echo"', "root.children[1].children[1].id", "'echo' is used twice"),
    ('agent = "agents_for_tests:Controlled"', 'agent = "no_such_module_for_otpd:Thing"',
     "root.children[1].children[1].agent", "cannot import 'no_such_module_for_otpd'"),
    ('agent = "agents_for_tests:Controlled"', 'agent = "agents_for_tests:NoSuchClass"',
     "root.children[1].children[1].agent", "is not a subclass of otpd.agent.base.Agent"),
    ('shutdown_ms = "brutal_kill"', "shutdown_ms = -1", "root.children[2].template.shutdown_ms",
     "must be milliseconds"),
    ('strategy = "rest_for_one"', 'strategy = "all_for_one"', "root.children[1].strategy",
     "'all_for_one' is not one of"),
    ('log_level = "info"', 'log_level = "loud"', "daemon.log_level", "'loud' is not one of"),
    ("max_seconds = 5", "max_seconds = 0", "root.max_seconds", "out of range"),
    ('shutdown_ms = 5000', 'shutdown_ms = 5000\nspare = "sometimes"', "root.children[0].spare",
     "'sometimes' is not one of on_restart, always, never"),
    ('strategy = "rest_for_one"', 'strategy = "rest_for_one"\nstart = "eager"', "root.children[1].start",
     "'eager' is not one of serial, parallel"),
    ('log_level = "info"', 'log_level = "info"\nsocket_group = "no-such-group-for-otpd"', "daemon.socket_group",
     "no group 'no-such-group-for-otpd' on this system"),
], ids=["unknown-key", "wrong-type", "bad-restart", "duplicate-id", "unimportable-module", "not-an-agent",
        "bad-shutdown", "bad-strategy", "bad-log-level", "out-of-range", "bad-spare", "bad-start", "unknown-group"])
def test_bad_value_exits_2_naming_the_key_and_its_line(tmp_path, old, new, key, message):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    bad_line = GOOD[: GOOD.index(old)].count("\n") + 1 + new.count("\n")

    result = check(tmp_path, text)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert f"bad.toml:{bad_line}: {key}: " in result.stderr, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


AGENT_ARGS = """\
[[root.children]]
id = "first"
agent = "otpd.agents.echo:EchoAgent"

[[root.children]]
id = "checked"
agent = "{agent}"
args = {args}
"""


@pytest.mark.parametrize(("agent", "args", "message"), [
    ("otpd.agents.task:TaskAgent", '{ handler = "otpd.examples.jobs:sha256", concurrency = "four" }',
     "concurrency must be an integer >= 1, got 'four'"),
    ("otpd.agents.task:TaskAgent", '{ handler = "otpd.examples.jobs:sha256", concurency = 2 }',
     "TaskAgent: unknown args concurency (known: concurrency, handler, keep_completed, max_attempts, "
     "retry_delay_max_s, retry_delay_s, timeout_s)"),
    ("otpd.agents.task:TaskAgent", "{ concurrency = 2 }", 'TaskAgent needs args.handler = "module:function"'),
    ("otpd.agents.task:TaskAgent", '{ handler = "otpd.examples.nosuch:sha256" }',
     "handler 'otpd.examples.nosuch:sha256': no module 'otpd.examples.nosuch'"),
    ("otpd.agents.task:TaskAgent", '{ handler = "otpd.examples.jobs:sha265" }',
     "handler 'otpd.examples.jobs:sha265': 'otpd.examples.jobs' defines no 'sha265'"),
    ("otpd.agents.task:TaskAgent", '{ handler = "otpd.examples.jobs:sha256", timeout_s = -1 }',
     "timeout_s must be a number of seconds >= 0"),
    ("otpd.agents.monitor:MonitorAgent", "{ thresholds = { memory = 5 } }",
     "MonitorAgent: thresholds takes memory_mb, cpu_percent, restart_rate"),
    ("otpd.agents.monitor:MonitorAgent", "{ interval_s = 0 }", "MonitorAgent: interval_s must be a number >= 0.01"),
    ("otpd.agents.coordinator:CoordinatorAgent", "{ retention = \"all\" }",
     "retention must be an integer >= 0, got 'all'"),
    ("otpd.agents.coordinator:CoordinatorAgent", '{ handlers = "myapp.steps:*" }',
     'handlers must be a list of "module:function" patterns'),
    ("agents_for_tests:Picky", '{ size = "big" }', "size must be an integer, got 'big'"),
    ("agents_for_tests:Picky", "{ crash_check = true }",
     "agents_for_tests:Picky.check_args raised KeyError: 'a bug in the check'"),
], ids=["task-type", "task-unknown", "task-no-handler", "task-no-module", "task-no-function", "task-timeout",
        "monitor-thresholds", "monitor-interval", "coordinator-retention", "coordinator-handlers",
        "user-check", "user-check-bug"])
def test_bad_agent_args_exit_2_at_the_args_line(tmp_path, agent, args, message):
    """An agent's own check of its args (``Agent.check_args``) runs with the config's: a typo in
    args is exit 2 before anything is forked, not a start failure at every restart."""
    text = AGENT_ARGS.format(agent=agent, args=args)
    result = check(tmp_path, text)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"bad.toml:{line_of(text, 'args = ')}: root.children[1].args: {message}" in result.stderr, result.stderr
    assert f"(checked by {agent})" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_good_agent_args_pass_and_the_agent_gets_them_unchanged(daemon, tmp_path):
    d = daemon(AGENT_ARGS.format(agent="agents_for_tests:Picky", args="{ size = 3 }"))
    assert d.request("call", {"id": "checked", "request": "args"}) == {"size": 3}
    text = AGENT_ARGS.format(agent="otpd.agents.task:TaskAgent",
                             args='{ handler = "otpd.examples.jobs:sha256", concurrency = 2, timeout_s = 1.5 }')
    assert check(tmp_path, text).returncode == 0


TEMPLATE_ARGS = """\
[[root.children]]
id = "pool"
supervisor = "dynamic"

[root.children.template]
agent = "{agent}"
args = {args}
"""


@pytest.mark.parametrize(("agent", "args", "message"), [
    ("otpd.agents.workflow:WorkflowProcess", '{ handlers = "otpd.examples.steps:*" }',
     'handlers must be a list of "module:function" patterns'),
    ("otpd.agents.workflow:WorkflowProcess", '{ definition = {} }',
     "WorkflowProcess (template): unknown args definition"),
    ("otpd.agents.task:TaskAgent", "{ concurrency = 2 }", 'TaskAgent needs args.handler = "module:function"'),
], ids=["workflow-handlers", "workflow-per-add-arg", "task-no-handler"])
def test_a_templates_args_are_checked_as_far_as_they_go(tmp_path, agent, args, message):
    """A template's args are completed by each add, but what they hold (and the config_args, which
    no add can set) is checked at config load: not found only when every add is refused."""
    text = TEMPLATE_ARGS.format(agent=agent, args=args)
    result = check(tmp_path, text)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"bad.toml:{line_of(text, 'args = ')}: root.children[0].template.args: {message}" in result.stderr, \
        result.stderr
    good = TEMPLATE_ARGS.format(agent=agent, args='{ handlers = ["otpd.examples.steps:*"] }'
                                if "workflow" in agent else '{ handler = "otpd.examples.jobs:echo" }')
    assert check(tmp_path, good).returncode == 0


def test_an_unimportable_agent_is_one_error_not_two(tmp_path):
    result = check(tmp_path, AGENT_ARGS.format(agent="agents_for_tests:NoSuchClass", args="{}"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no "missing key 'agent'" beside it


def test_toml_syntax_error_exits_2_with_its_line(tmp_path):
    text = GOOD.replace('id = "reader"', 'id = "reader', 1)
    result = check(tmp_path, text)
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr
    bad_line = line_of(text, 'id = "reader')
    assert f"line {bad_line}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_every_error_is_reported_not_just_the_first(tmp_path):
    text = GOOD.replace('restart = "permanent"', 'restart = "sometimes"')
    text = text.replace("max_restarts = 3", "max_restarts = -1")
    result = check(tmp_path, text)
    assert result.returncode == 2
    assert f":{line_of(text, 'sometimes')}: root.children[0].restart" in result.stderr
    assert f":{line_of(text, 'max_restarts = -1')}: root.max_restarts" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2, result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli("otpd", "check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_run_on_a_bad_config_exits_2_and_forks_nothing(daemon, tmp_path):
    marker = tmp_path / "an-agent-started"
    path = daemon.config(f"""
[[root.children]]
id = "toucher"
agent = "agents_for_tests:TouchOnInit"
args = {{ path = "{marker}" }}

[[root.children]]
id = "broken"
agent = "otpd.agents.echo:EchoAgent"
restart = "sometimes"
""")
    result = subprocess.run(console("otpd") + ["run", "--config", str(path)], capture_output=True, text=True,
                            env=child_env(), timeout=30, check=False)

    assert result.returncode == 2, result.stderr
    assert "root.children[1].restart" in result.stderr
    assert "listening" not in result.stderr and "started" not in result.stderr
    assert not marker.exists()
    assert not daemon.socket_of(path).exists()


def test_run_with_a_good_config_starts_its_agents(daemon, tmp_path):
    # the counterpart of the test above: the marker does appear when the config is good
    marker = tmp_path / "an-agent-started"
    d = daemon(f"""
[[root.children]]
id = "toucher"
agent = "agents_for_tests:TouchOnInit"
args = {{ path = "{marker}" }}
""")
    assert marker.exists()
    assert d.children()["toucher"]["state"] == "running"


@pytest.mark.parametrize("module", ["otpd.cli.otpd_main", "otpd.cli.otpctl"])
def test_cli_modules_run_with_python_dash_m(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                            env=child_env(), timeout=30, check=False)
    assert result.returncode == 0
    assert "Usage:" in result.stdout


def run_daemon(path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(console("otpd") + ["run", "--config", str(path)], capture_output=True, text=True,
                          env=child_env(), timeout=30, check=False)


def test_socket_group_is_a_group_of_this_system(daemon, tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    assert check(tmp_path, GOOD.replace('log_level = "info"', f'socket_group = "{group}"')).returncode == 0
    path = daemon.config('socket_group = "no-such-group-for-otpd"\n' + GOOD[GOOD.index("[root]"):])
    text = path.read_text(encoding="utf-8")
    result = run_daemon(path)  # it used to pass the check and die in the socket's grp.getgrnam
    assert result.returncode == 2, result.stderr
    assert f"{path.name}:{line_of(text, 'socket_group = ')}: daemon.socket_group: no group" in result.stderr
    assert "Traceback" not in result.stderr
    assert not daemon.socket_of(path).exists()


def test_run_on_a_missing_config_file_exits_2(tmp_path):
    result = run_daemon(tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "cannot read" in result.stderr


@pytest.mark.parametrize("problem", ["runtime-dir-under-a-file", "world-writable-runtime-dir", "socket-path-too-long"])
def test_run_that_cannot_open_its_socket_exits_1_and_forks_nothing(tmp_path, problem):
    marker = tmp_path / "an-agent-started"
    if problem == "runtime-dir-under-a-file":
        (tmp_path / "a-file").write_text("")
        runtime_dir = tmp_path / "a-file" / "run"
    elif problem == "world-writable-runtime-dir":
        runtime_dir = tmp_path / "open"
        runtime_dir.mkdir()
        runtime_dir.chmod(0o777)
    else:
        runtime_dir = tmp_path / ("x" * 120)
    path = tmp_path / "otpd.toml"
    path.write_text(f"""
[daemon]
runtime_dir = "{runtime_dir}"

[[root.children]]
id = "toucher"
agent = "agents_for_tests:TouchOnInit"
args = {{ path = "{marker}" }}
""", encoding="utf-8")

    result = run_daemon(path)

    assert result.returncode == 1, result.stderr
    assert "otpd: cannot start:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
