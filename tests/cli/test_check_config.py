"""``otpd check-config`` and ``otpd run`` on bad configs: exit 2, the key and its line, nothing forked."""

from __future__ import annotations

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
], ids=["unknown-key", "wrong-type", "bad-restart", "duplicate-id", "unimportable-module", "not-an-agent",
        "bad-shutdown", "bad-strategy", "bad-log-level", "out-of-range", "bad-spare", "bad-start"])
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
