"""What otpctl and its client refuse before the daemon sees it: bad timeouts, requests that cannot
be encoded or are over the frame limit, a missing import file; and replies it cannot put in words.
Each is a usage error (exit 2) or a clear exit 1, never a traceback."""

from __future__ import annotations

import json
import math

import pytest

from otpd.control import protocol
from otpd.control.client import Client
from otpd.errors import OtpdError
from tests.conftest import run_cli

CONFIG = """
[[root.children]]
id = "echo"
agent = "otpd.agents.echo:EchoAgent"
"""

BAD_TIMEOUTS = ["-1", "-10", "nan", "inf", "-inf", "1e300", "604800.5"]


def otpctl(d, *args: str) -> object:
    return run_cli("otpctl", "--socket", str(d.socket), *args)


def assert_usage_error(result, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in result.stderr, result.stderr


# -- timeouts ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [["call", "echo", "1"], ["wait", "echo", "--state", "stopped"], ["shutdown"]],
                         ids=["call", "wait", "shutdown"])
def test_a_timeout_that_is_not_0_to_a_week_of_seconds_is_a_usage_error(daemon, command):
    d = daemon(CONFIG)
    for value in BAD_TIMEOUTS:
        result = otpctl(d, *command, "--timeout", value)
        assert_usage_error(result, "--timeout", "604800")
    assert d.children()["echo"]["state"] == "running"  # nothing reached the daemon (not the shutdown either)


def test_the_largest_timeout_is_accepted(daemon):
    d = daemon(CONFIG)
    call = otpctl(d, "call", "echo", "[1]", "--timeout", "604800")
    assert call.returncode == 0, call.stderr
    assert json.loads(call.stdout) == [1]
    wait = otpctl(d, "wait", "echo", "--timeout", "604800")
    assert wait.returncode == 0, wait.stderr


def test_the_clients_limit_is_the_daemons():
    from otpd.control.client import MAX_TIMEOUT
    from otpd.posix.daemon import MAX_TIMEOUT as DAEMONS

    assert MAX_TIMEOUT == DAEMONS


@pytest.mark.parametrize("timeout", [-1.0, 0, math.nan, math.inf, -math.inf, 1e300, "5"])
def test_the_client_refuses_a_timeout_that_is_not_one(tmp_path, timeout):
    with pytest.raises(OtpdError) as caught:
        Client(tmp_path / "otpd.sock", timeout=timeout)  # refused before it tries to connect
    assert caught.value.code == "bad_request"
    assert "timeout" in caught.value.message


# -- requests the daemon would not take ------------------------------------------------


def test_a_request_over_the_frame_limit_is_refused_before_it_is_sent(daemon):
    d = daemon(CONFIG)

    def args(size: int) -> dict[str, object]:
        return {"id": "nosuch", "request": "x" * size}

    with d.client() as client:
        overhead = len(protocol.pack({"id": 1, "op": "call", "args": args(protocol.MAX_FRAME)})) - protocol.MAX_FRAME
        with pytest.raises(OtpdError) as caught:
            client.request("call", args(protocol.MAX_FRAME - overhead + 1))
        assert caught.value.code == "bad_request"
        assert str(protocol.MAX_FRAME) in caught.value.message
        # nothing was sent: the connection still answers, and a frame of exactly the limit is taken
        # (its id is 1 again: a refused request uses none)
        with pytest.raises(OtpdError) as answered:
            client.request("call", args(protocol.MAX_FRAME - overhead))
        assert answered.value.code == "not_found"
        assert client.call("echo", [1]) == [1]


def test_a_workflow_over_the_frame_limit_is_a_usage_error(daemon, tmp_path):
    d = daemon(CONFIG)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"steps": [{"handler": "otpd.examples.steps:echo", "pad": "x" * (2 << 20)}]}))
    result = otpctl(d, "workflow", "start", f"@{big}")
    assert_usage_error(result, "limit")
    assert d.children()["echo"]["state"] == "running"


@pytest.mark.parametrize("as_json", [[], ["--json"]], ids=["human", "json"])
def test_an_argument_msgpack_cannot_carry_is_a_usage_error(daemon, as_json):
    d = daemon(CONFIG)
    result = otpctl(d, *as_json, "call", "echo", "100000000000000000000000000")
    assert_usage_error(result, "cannot be encoded")
    assert "error bad_request" not in result.stderr


# -- state import ---------------------------------------------------------------------


def test_state_import_of_a_missing_file_is_a_usage_error_naming_it(tmp_path):
    config = tmp_path / "otpd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}/lib"\n' + CONFIG, encoding="utf-8")
    missing = tmp_path / "no-such-export.jsonl"
    result = run_cli("otpctl", "--socket", str(tmp_path / "otpd.sock"), "state", "import", str(missing),
                     "--config", str(config))
    assert_usage_error(result, str(missing))


# -- replies otpctl cannot put in words -------------------------------------------------

# TaskAgents whose replies are not a TaskAgent's.  Each class is named TaskAgent and subclasses it,
# so the daemon forwards task.* to it however it decides what a TaskAgent is: these tests are about
# the CLI, which must not trust a reply's shape.
ODD_TASK_AGENT = """\
from otpd.agents import task


class TaskAgent(task.TaskAgent):
    def handle_call(self, request):
        return {REPLY}
"""

ODD_CONFIG = """
[[root.children]]
id = "echoing"
agent = "echoing_tasks:TaskAgent"
args = { handler = "otpd.examples.jobs:echo" }

[[root.children]]
id = "listing"
agent = "listing_tasks:TaskAgent"
args = { handler = "otpd.examples.jobs:echo" }
"""


@pytest.fixture
def odd_tasks(daemon, tmp_path):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "echoing_tasks.py").write_text(ODD_TASK_AGENT.replace("{REPLY}", "request"), encoding="utf-8")
    (modules / "listing_tasks.py").write_text(ODD_TASK_AGENT.replace("{REPLY}", "[request]"), encoding="utf-8")
    return daemon(ODD_CONFIG, import_from=modules)


TASK_COMMANDS = [["task", "add", "{ID}", '{"data": 1}'], ["task", "list", "{ID}"], ["task", "stats", "{ID}"],
                 ["task", "pause", "{ID}"], ["task", "resume", "{ID}"]]


@pytest.mark.parametrize("agent_id", ["echoing", "listing"])
def test_a_reply_that_is_not_a_task_agents_is_printed_as_it_came(odd_tasks, agent_id):
    for command in TASK_COMMANDS:
        args = [agent_id if word == "{ID}" else word for word in command]
        as_json = otpctl(odd_tasks, "--json", *args)
        assert as_json.returncode == 0, (args, as_json.stderr)
        reply = json.loads(as_json.stdout)
        assert (reply[0] if agent_id == "listing" else reply)["op"] == args[1]  # the agent's reply, as it is

        human = otpctl(odd_tasks, *args)
        assert "Traceback" not in human.stderr, (args, human.stderr)
        if agent_id == "echoing" and args[1] in ("stats", "pause", "resume"):  # a map is all they need
            assert human.returncode == 0, (args, human.stderr)
            continue
        assert human.returncode == 1, (args, human.stdout, human.stderr)
        assert f"the reply of {agent_id!r} is not a TaskAgent's" in human.stderr
        assert json.loads(human.stdout) == reply
