"""``otpctl``: drive a running otpd over its control socket.

Exit codes: 0 ok; 1 the daemon answered with an error (its code is printed);
2 usage; 3 the daemon cannot be reached.  ``--json`` prints exactly one JSON
document (``events`` prints one per line).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click

from otpd.control.client import MAX_TIMEOUT, REPLY_MARGIN, BadRequest, Client, Unreachable
from otpd.errors import OtpdError

EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
REQUEST_TIMEOUT = 60.0  # seconds for an answer, where the command has no --timeout


class Ctx:
    def __init__(self, socket_path: str | None, as_json: bool) -> None:
        self.socket_path = socket_path
        self.as_json = as_json

    def request(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = REQUEST_TIMEOUT) -> Any:
        with self.answered(), Client(self.socket_path, timeout=timeout) as client:
            return client.request(op, args)

    @contextlib.contextmanager
    def answered(self) -> Iterator[None]:
        """What went wrong talking to the daemon, as its exit code: 2 a request the client refused to
        send (the daemon never saw it), 3 no daemon, 1 the daemon's error (its code printed)."""
        try:
            yield
        except BadRequest as err:
            raise click.UsageError(err.message) from None
        except Unreachable as exc:
            _die(str(exc), EXIT_UNREACHABLE)
        except OtpdError as err:
            if self.as_json:
                click.echo(json.dumps({"error": err.to_wire()}))
            _die(f"error {err.code}: {err.message}", EXIT_DAEMON_ERROR)

    def show(self, result: Any, human: str | None = None) -> None:
        if self.as_json or human is None:
            click.echo(json.dumps(result, indent=None if self.as_json else 2, sort_keys=not self.as_json))
        else:
            click.echo(human)


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"otpctl: {message}", err=True)
    sys.exit(code)


def _json_arg(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.UsageError(f"{name} is not valid JSON: {exc}") from None


class Seconds(click.types.FloatParamType):
    """A timeout: 0 to the daemon's MAX_TIMEOUT seconds (a week).  Not click.FloatRange, which lets
    NaN through; infinity, NaN, negative or huge values would break the socket's timeout."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        seconds = super().convert(value, param, ctx)
        if not 0 <= seconds <= MAX_TIMEOUT:  # NaN fails too
            self.fail(f"{value!r} is not a number of seconds from 0 to {MAX_TIMEOUT:g}", param, ctx)
        return seconds


SECONDS = Seconds()
pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", envvar="OTPD_SOCKET", help="Control socket (default: $OTPD_SOCKET, "
              "/run/otpd/otpd.sock if present, else the checkout's var/run/otpd.sock).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document.")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None, as_json: bool) -> None:
    """Control a running otpd."""
    ctx.obj = Ctx(socket_path, as_json)


def _table(children: list[dict[str, Any]]) -> str:
    rows = [("ID", "TYPE", "SUPERVISOR", "PID", "STATE", "RESTARTS", "RESTART", "SEQ", "LINKS")]
    rows += [(c["id"], c["type"], c["supervisor"], "-" if c["pid"] is None else str(c["pid"]), c["state"],
              str(c["restarts"]), c["restart"], str(c.get("seq", "-")), str(c.get("links", "-")))
             for c in children]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


@main.command()
@pass_ctx
def status(c: Ctx) -> None:
    """The daemon and every child."""
    result = c.request("status")
    d = result["daemon"]
    running = sum(1 for ch in result["children"] if ch["state"] == "running")
    head = (f"otpd {d['version']} pid {d['pid']} {d['state']}, up {d['uptime_s']:.1f}s, "
            f"{running}/{len(result['children'])} children running")
    c.show(result, head + "\n" + _table(result["children"]))


@main.command()
@pass_ctx
def ps(c: Ctx) -> None:
    """Children as a table."""
    result = c.request("ps")
    c.show(result, _table(result["children"]))


@main.command()
@pass_ctx
def tree(c: Ctx) -> None:
    """Children as the supervision tree."""
    result = c.request("ps")
    depth = {"root": 0}
    lines = ["root"]
    for ch in result["children"]:
        depth[ch["id"]] = depth.get(ch["supervisor"], 0) + 1
        pid = "" if ch["pid"] is None else f" pid {ch['pid']}"
        lines.append(f"{'  ' * depth[ch['id']]}{ch['id']} [{ch['type']}] {ch['state']}{pid} restarts={ch['restarts']}")
    c.show(result, "\n".join(lines))


@main.command()
@click.argument("child_id", metavar="ID")
@click.option("--signal", "sig", default="KILL", show_default=True, help="Signal name or number.")
@pass_ctx
def kill(c: Ctx, child_id: str, sig: str) -> None:
    """Send a signal to a child's process (chaos)."""
    result = c.request("kill", {"id": child_id, "signal": sig})
    c.show(result, f"{result['signal']} sent to {child_id} (pid {result['pid']})")


@main.command()
@click.argument("child_id", metavar="ID")
@click.option("--state", default="running", show_default=True)
@click.option("--not-pid", type=int, default=None, help="Wait for a process other than this PID.")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="Seconds.")
@pass_ctx
def wait(c: Ctx, child_id: str, state: str, not_pid: int | None, timeout: float) -> None:
    """Block until a child reaches a state (optionally with a new PID)."""
    result = c.request("wait", {"id": child_id, "state": state, "not_pid": not_pid, "timeout": timeout},
                       timeout=timeout + REPLY_MARGIN)
    c.show(result, f"{child_id} {result['state']}" + (f" pid {result['pid']}" if result["pid"] else ""))


@main.command()
@click.option("--no-wait", is_flag=True, help="Return once the daemon accepted the request.")
@click.option("--timeout", type=SECONDS, default=120.0, show_default=True,
              help="Seconds to wait for the daemon to exit; 0: do not wait (as --no-wait).")
@pass_ctx
def shutdown(c: Ctx, no_wait: bool, timeout: float) -> None:
    """Stop every child in reverse order, then the daemon."""
    no_wait = no_wait or timeout == 0
    with c.answered(), Client(c.socket_path, timeout=timeout or REQUEST_TIMEOUT) as client:
        result = client.request("shutdown")
        if not no_wait:
            try:
                while True:
                    client.receive()
            except Unreachable:
                pass  # the daemon closed the socket as it exited
    c.show(result, f"otpd (pid {result['pid']}) " + ("stopping" if no_wait else "stopped"))


@main.command()
@click.argument("child_id", metavar="ID")
@click.argument("request_json", metavar="REQUEST_JSON")
@click.option("--timeout", type=SECONDS, default=5.0, show_default=True, help="Seconds.")
@pass_ctx
def call(c: Ctx, child_id: str, request_json: str, timeout: float) -> None:
    """Send a request to an agent and print its reply."""
    request = _json_arg(request_json, "REQUEST_JSON")
    result = c.request("call", {"id": child_id, "request": request, "timeout": timeout},
                       timeout=timeout + REPLY_MARGIN)
    c.show(result, json.dumps(result))


@main.command()
@click.argument("child_id", metavar="ID")
@click.argument("message_json", metavar="MESSAGE_JSON")
@pass_ctx
def cast(c: Ctx, child_id: str, message_json: str) -> None:
    """Send a message to an agent; no reply."""
    result = c.request("cast", {"id": child_id, "message": _json_arg(message_json, "MESSAGE_JSON")})
    c.show(result, f"sent to {child_id}")


def _lifecycle(op: str, doc: str) -> None:
    @main.command(op, help=doc)
    @click.argument("child_id", metavar="ID")
    @pass_ctx
    def command(c: Ctx, child_id: str) -> None:
        result = c.request(op, {"id": child_id})
        c.show(result, f"{child_id}: {result['state']}")


_lifecycle("start", "Start a stopped child (and let restarts manage it again).")
_lifecycle("stop", "Stop a child and keep it down until `start`.")
_lifecycle("restart", "Stop a child, then start it.")
_lifecycle("remove", "Stop a child of a dynamic supervisor and forget it.")


@main.command()
@click.argument("supervisor")
@click.argument("child_id", metavar="ID")
@click.option("--args", "args_json", default="{}", help="JSON object merged over the template's args.")
@pass_ctx
def add(c: Ctx, supervisor: str, child_id: str, args_json: str) -> None:
    """Add a child to a dynamic supervisor, from its template."""
    args = _json_arg(args_json, "--args")
    if not isinstance(args, dict):
        raise click.UsageError("--args must be a JSON object")
    result = c.request("add", {"supervisor": supervisor, "id": child_id, "args": args})
    c.show(result, f"{child_id} added to {supervisor}")


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they come (one JSON per line with --json).")
@click.option("--last", type=int, default=50, show_default=True, help="How many recent events to print first.")
@pass_ctx
def events(c: Ctx, follow: bool, last: int) -> None:
    """Print supervision events: started, ready, exited, restarted, escalated, stopped, reloaded."""
    if not follow:
        result = c.request("events", {"follow": False, "last": last})
        c.show(result, "\n".join(_event_line(e) for e in result["events"]))
        return
    with c.answered():
        client = Client(c.socket_path, timeout=None)  # no daemon: Unreachable, exit 3
        try:
            with client:
                for event in client.events(last=last):
                    click.echo(json.dumps(event) if c.as_json else _event_line(event), nl=True)
        except Unreachable:
            sys.exit(0)  # the daemon stopped: the stream is over
        except KeyboardInterrupt:
            sys.exit(0)


@main.command()
@pass_ctx
def reload(c: Ctx) -> None:
    """Re-read the config: start added children, stop removed ones, restart changed ones."""
    result = c.request("reload")
    parts = [f"{k}: {', '.join(v)}" for k, v in result.items() if v]
    c.show(result, "reloaded" + ("; " + "; ".join(parts) if parts else ": nothing changed"))


def _event_line(event: dict[str, Any]) -> str:
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "id", "time"))
    return f"{event['time']:.6f} {event['id']} {event['event']} {rest}".rstrip()


STATE_VERBS = ("show", "export", "import", "quarantine", "migrate")


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("words", nargs=-1, required=True,
                metavar="ID | show ID | export [ID...] | import FILE | quarantine ID | migrate [ID...]")
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="The daemon's config, to find its state_dir (default: the checkout's config/otpd.toml).")
@click.option("--dry-run", is_flag=True, help="migrate: show what each record would become; write nothing.")
@pass_ctx
def state(c: Ctx, words: tuple[str, ...], config_path: str | None, dry_run: bool) -> None:
    """Read, back up, restore or quarantine persisted agent state (works with the daemon stopped)."""
    verb, rest = (words[0], words[1:]) if words[0] in STATE_VERBS else ("show", words)
    from otpd.store import tools

    try:
        if verb == "show":
            if len(rest) != 1:
                raise click.UsageError("state [show] takes one ID")
            with _open_store(config_path, readonly=True) as store:
                click.echo(json.dumps(tools.show(store, rest[0]), indent=None if c.as_json else 2))
        elif verb == "export":
            with _open_store(config_path, readonly=True) as store:
                for line in tools.export(store, list(rest) or None):
                    click.echo(line)
        elif verb == "import":
            if len(rest) != 1:
                raise click.UsageError("state import takes one FILE ('-' for stdin)")
            try:
                with click.open_file(rest[0], "rb") as fh:  # (decoded line by line: an error names its line)
                    records = tools.parse_export(fh)
            except OSError as exc:
                raise click.UsageError(f"cannot read {rest[0]}: {exc.strerror or exc}") from None
            _refuse_running(c, list(records))
            with _open_store(config_path, readonly=False) as store:
                ids = tools.import_records(store, records)
            c.show({"imported": ids}, f"imported {len(ids)} agent(s): {', '.join(ids)}")
        elif verb == "migrate":
            if not dry_run:
                _refuse_running(c, list(rest) or None)
            with _open_store(config_path, readonly=dry_run) as store:
                classes, allowed = _effective_classes(config_path, store)
                results = tools.migrate_records(store, classes, allowed, list(rest) or None, write=not dry_run)
            c.show({"results": results}, "\n".join(json.dumps(r) for r in results) or "(no records)")
        else:
            if len(rest) != 1:
                raise click.UsageError("state quarantine takes one ID")
            _refuse_running(c, list(rest))
            with _open_store(config_path, readonly=False) as store:
                key = store.quarantine(rest[0])
            c.show({"id": rest[0], "quarantined_as": key},
                   f"{rest[0]}: record moved aside as {key!r}; `otpctl start {rest[0]}` starts it fresh")
    except OtpdError as err:
        if c.as_json:
            click.echo(json.dumps({"error": err.to_wire()}))
        _die(f"error {err.code}: {err.message}", EXIT_DAEMON_ERROR)


class _open_store:
    """The store named by a config, opened for this command only."""

    def __init__(self, config_path: str | None, readonly: bool) -> None:
        from otpd.cli.otpd_main import DEFAULT_CONFIG
        from otpd.config import ConfigError, load
        from otpd.store.lmdb_store import Store

        try:
            config = load(config_path or DEFAULT_CONFIG)
        except ConfigError as err:
            _die("bad config:\n" + "\n".join(err.errors), EXIT_USAGE)
        s = config.store_settings()
        self.store = Store(s.path, s.map_size_mb, s.map_size_max_mb, "process", readonly=readonly)

    def __enter__(self) -> Any:
        return self.store

    def __exit__(self, *_: Any) -> None:
        self.store.close()


def _effective_classes(config_path: str | None, store: Any) -> tuple[dict[str, str], set[str]]:
    """Each configured agent's class as the daemon would run it (flags set at run time included),
    and every class the config names (templates' too)."""
    from otpd import flags
    from otpd.cli.otpd_main import DEFAULT_CONFIG
    from otpd.config import load
    from otpd.core.spec import AgentSpec, SupervisorSpec, walk

    config = load(config_path or DEFAULT_CONFIG)
    stored = store.get_meta("flags") or {}
    current = {**config.features, **{k: float(v) for k, v in stored.items() if k in config.features}}
    classes = {n.id: n.agent for n in walk(flags.resolve(config.root, current)) if isinstance(n, AgentSpec)}
    allowed = set(config.agent_classes())
    for node in walk(config.root):
        spec = node.template if isinstance(node, SupervisorSpec) else node
        if isinstance(spec, AgentSpec) and spec.agent_next:
            allowed.add(spec.agent_next)
    return classes, allowed


def _refuse_running(c: Ctx, ids: list[str] | None) -> None:
    """Writing under a running agent would fork its memory from its disk: refuse.
    ``ids`` None means every agent."""
    try:
        with Client(c.socket_path, timeout=10) as client:
            children = client.request("ps")["children"]
    except Unreachable:
        return  # no daemon: nothing runs
    busy = [ch["id"] for ch in children if (ids is None or ch["id"] in ids) and ch["type"] == "agent"
            and ch["state"] in ("starting", "running", "stopping")]
    if busy:
        raise OtpdError("bad_request", f"{', '.join(busy)} running: stop it first (otpctl stop ID)")



# -- the built-in agents: task / workflow / health -------------------------------------


@main.group()
def task() -> None:
    """A TaskAgent's queue: add, stats, list, retry, pause, resume."""


def _show_task(c: Ctx, agent_id: str, result: Any, human: Callable[[dict[str, Any]], str], **needs: type) -> None:
    """A TaskAgent's reply, in words if it is a map with the ``needs`` (key=type) the words take.
    task.* goes to whatever agent ID names, so another agent's reply is printed as it came, exit 1;
    with --json any reply is printed as it is."""
    if c.as_json:
        c.show(result)
    elif isinstance(result, dict) and all(k in result and isinstance(result[k], t) for k, t in needs.items()):
        c.show(result, human(result))
    else:
        c.show(result)
        _die(f"the reply of {agent_id!r} is not a TaskAgent's (printed as it came)", EXIT_DAEMON_ERROR)


@task.command("add")
@click.argument("agent_id", metavar="ID")
@click.argument("payload_json", metavar="PAYLOAD_JSON")
@click.option("--task-id", default=None, help="Idempotency key (default: a new id).")
@click.option("--task-timeout", type=float, default=None,
              help="Seconds one attempt may run (default: the agent's timeout_s; 0: no limit).")
@pass_ctx
def task_add(c: Ctx, agent_id: str, payload_json: str, task_id: str | None, task_timeout: float | None) -> None:
    """Queue a task; answered once it is durable."""
    args = {"id": agent_id, "payload": _json_arg(payload_json, "PAYLOAD_JSON")}
    if task_id is not None:
        args["task_id"] = task_id
    if task_timeout is not None:
        args["timeout_s"] = task_timeout
    result = c.request("task.add", args)
    _show_task(c, agent_id, result, lambda r: f"queued {r['task_id']}", task_id=object)


@task.command("stats")
@click.argument("agent_id", metavar="ID")
@pass_ctx
def task_stats(c: Ctx, agent_id: str) -> None:
    """Counts of queued, running, delayed, completed, failed and dead tasks."""
    result = c.request("task.stats", {"id": agent_id})
    _show_task(c, agent_id, result, lambda r: "\n".join(f"{k}: {v}" for k, v in r.items()))


@task.command("list")
@click.argument("agent_id", metavar="ID")
@click.option("--dead", is_flag=True, help="The dead-letter list instead of the queue.")
@click.option("--limit", type=int, default=100, show_default=True)
@pass_ctx
def task_list(c: Ctx, agent_id: str, dead: bool, limit: int) -> None:
    """Running, queued and delayed (waiting out a retry delay) tasks, or the dead letters."""
    result = c.request("task.list", {"id": agent_id, "dead": dead, "limit": limit})
    _show_task(c, agent_id, result, lambda r: "\n".join(json.dumps(t) for t in r["tasks"]) or "(none)", tasks=list)


@task.command("retry")
@click.argument("agent_id", metavar="ID")
@click.argument("task_id")
@pass_ctx
def task_retry(c: Ctx, agent_id: str, task_id: str) -> None:
    """Move a dead task back to the queue."""
    result = c.request("task.retry", {"id": agent_id, "task_id": task_id})
    c.show(result, f"{task_id} queued again")


def _task_switch(verb: str) -> None:
    @task.command(verb, help=f"{verb.capitalize()} starting new tasks.")
    @click.argument("agent_id", metavar="ID")
    @pass_ctx
    def command(c: Ctx, agent_id: str) -> None:
        result = c.request(f"task.{verb}", {"id": agent_id})
        _show_task(c, agent_id, result, lambda r: f"{agent_id}: {r.get('status', verb)}")


_task_switch("pause")
_task_switch("resume")


@main.group()
def workflow() -> None:
    """Workflows, through the config's CoordinatorAgent."""


@workflow.command("start")
@click.argument("definition", metavar="DEF_JSON|@FILE")
@click.option("--id", "workflow_id", default=None, help="Idempotency key: starting it again starts nothing new.")
@pass_ctx
def workflow_start(c: Ctx, definition: str, workflow_id: str | None) -> None:
    """Start a workflow; prints its id."""
    if definition.startswith("@"):
        try:
            with open(definition[1:], encoding="utf-8") as fh:
                definition = fh.read()
        except OSError as exc:
            raise click.UsageError(f"cannot read {definition[1:]}: {exc}") from None
    args = {"definition": _json_arg(definition, "DEF_JSON")}
    if workflow_id is not None:
        args["workflow_id"] = workflow_id
    result = c.request("workflow.start", args)
    c.show(result, result["workflow_id"])


@workflow.command("status")
@click.argument("workflow_id", metavar="WF_ID")
@pass_ctx
def workflow_status(c: Ctx, workflow_id: str) -> None:
    """A workflow's status, current step and results."""
    result = c.request("workflow.status", {"workflow_id": workflow_id})
    c.show(result, f"{workflow_id}: {result['status']} at step {result['current_step']}/{result['steps']}"
                   + (f" ({result['parked_reason']})" if result.get("parked_reason") else ""))


@workflow.command("list")
@click.option("--state", default=None, help="running, completed, parked or cancelled.")
@pass_ctx
def workflow_list(c: Ctx, state: str | None) -> None:
    """Workflows and the coordinator's counts."""
    result = c.request("workflow.list", {"state": state})
    lines = [f"{w['workflow_id']}  {w['status']}" for w in result["workflows"]]
    lines.append(f"completed {result['completed_count']}, failed {result['failed_count']}, "
                 f"cancelled {result['cancelled_count']}")
    c.show(result, "\n".join(lines))


def _workflow_verb(verb: str, doc: str) -> None:
    @workflow.command(verb, help=doc)
    @click.argument("workflow_id", metavar="WF_ID")
    @pass_ctx
    def command(c: Ctx, workflow_id: str) -> None:
        result = c.request(f"workflow.{verb}", {"workflow_id": workflow_id})
        c.show(result, f"{workflow_id}: {result['status']}")


_workflow_verb("cancel", "Stop a running workflow for good.")
_workflow_verb("retry", "Run a parked workflow's failing step again.")
_workflow_verb("skip", "Skip a parked workflow's failing step (its result is null).")


@main.command()
@click.argument("agent_id", metavar="ID", required=False)
@pass_ctx
def health(c: Ctx, agent_id: str | None) -> None:
    """Health of every agent (or one) from the MonitorAgent."""
    result = c.request("health", {"id": agent_id} if agent_id else {})
    rows = result.get("agents") if isinstance(result, dict) else None
    if not isinstance(rows, list) or (rows and not isinstance(rows[0], dict)):
        c.show(result)
        return
    keys = [k for k in ("id", "state", "pid", "rss_mb", "cpu_percent", "fds", "restarts", "uptime_s", "alerts")
            if any(k in r for r in rows)]
    table = [keys] + [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    c.show(result, "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                             for row in table))



@main.group()
def flags() -> None:
    """Feature flags: list them, or set one (on, off, a percentage, or default)."""


@flags.command("list")
@pass_ctx
def flags_list(c: Ctx) -> None:
    """Every flag of [features], its value and where the value comes from."""
    result = c.request("flags.list")
    c.show(result, "\n".join(f"{name}  {f['value']}  ({f['source']}; config: {f['config']})"
                             for name, f in result["flags"].items()) or "(no features)")


@flags.command("set")
@click.argument("name")
@click.argument("value", metavar="on|off|PERCENT|default")
@pass_ctx
def flags_set(c: Ctx, name: str, value: str) -> None:
    """Set a flag; it is saved and survives restarts. Switched agents restart on their new class."""
    result = c.request("flags.set", {"name": name, "value": value})
    restarted = f"; restarted {', '.join(result['restarted'])}" if result["restarted"] else ""
    c.show(result, f"{name} = {result['value']}{restarted}")


if __name__ == "__main__":
    main()
