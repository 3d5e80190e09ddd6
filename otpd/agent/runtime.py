"""The child side: what runs in a forked agent process, from fork to exit.

One loop per child, single-threaded: it reads frames from the channel (a
socketpair to the daemon), runs the agent's callbacks and fires its timers.
Liveness costs no messages: the loop stamps when it wakes and when it waits
into the daemon's shared liveness region (``otpd.posix.liveness``).

Channel frames (msgpack maps, ``t`` = type; the two that come once per call are arrays, as a
map with string keys costs several times more to decode):
  daemon -> child: a call ``[ref, request]``, ``{"t": "cast", "msg": x}``, ``{"t": "event", ...}``, ...
  child -> daemon: ``{"t": "ready", "seq": n}``, ``{"t": "seq", "seq": n}``,
                   ``{"t": "start_error", "code": c, "message": s}`` (``"fatal": true``: held failed),
                   and a call's reply ``[ref, true, result]`` or ``[ref, false, {error}]``

Write before the reply, with group commit: everything the channel holds is
read at once, every frame is applied, the state is committed once, and only
then are the replies of that batch sent.  If the commit fails (``store_full``)
the agent is rolled back to its last commit and every reply of the batch
becomes that error.

The process exits with EXIT_NORMAL after ``Agent.stop()``, EXIT_SHUTDOWN after
SIGTERM, EXIT_CRASH when an exception escapes a callback, and at once when
the daemon is gone (channel EOF; PR_SET_PDEATHSIG covers a SIGKILLed daemon).
"""

from __future__ import annotations

import array
import heapq
import importlib
import io
import os
import queue
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import count
from typing import Any, NoReturn

from otpd import codec
from otpd.agent import links
from otpd.agent.base import Agent
from otpd.agent.state import StateKeeper
from otpd.control import protocol
from otpd.core.spec import AgentSpec
from otpd.errors import OtpdError
from otpd.posix import system
from otpd.posix.liveness import Stamp
from otpd.store.lmdb_store import Store, StoreSettings

MAX_FRAME = 64 * 1024 * 1024
MAX_BATCH = 8 * 1024 * 1024
FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)  # an attach brings one; room for a few


class StartFailed(Exception):
    """init or the state load failed; already reported to the daemon."""


def child_main(channel_fd: int, spec: AgentSpec, daemon_pid: int, store: StoreSettings | None,
               flags: dict[str, float] | None = None, stamp: Stamp | None = None, spare: bool = False) -> NoReturn:
    """Entry point right after fork(); never returns.

    A ``spare`` boots as far as it can without the agent's state and waits for the
    daemon's ``{"t": "go", "flags": ...}``; the daemon sends it when the agent must
    restart, so a restart pays neither the fork nor the boot."""
    status = system.EXIT_CRASH
    try:
        status = _boot(channel_fd, spec, daemon_pid, store, flags or {}, stamp or Stamp(None, -1), spare)
    except StartFailed as failed:
        log_line(f"start failed: {failed}")
    except BaseException:  # the process ends here whatever happened; say why first
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        end_helpers()
        for stream in (sys.stdout, sys.stderr):  # os._exit does not flush
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(status)


HELPERS: list[int] = []  # pids of this agent's helper processes (its Syncer), ended with it


def end_helpers() -> None:
    """SIGKILL and reap this agent's helpers, so that none is left for the daemon to reap
    after it has gone (at its shutdown).  A SIGKILLed agent's die by PR_SET_PDEATHSIG."""
    while HELPERS:
        pid = HELPERS.pop()
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


def log_line(line: str) -> None:
    """One line on stderr, which the daemon reads and logs with the agent's id; never raises."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except BaseException:
        pass


def _boot(channel_fd: int, spec: AgentSpec, daemon_pid: int, store: StoreSettings | None,
          flags: dict[str, float], stamp: Stamp, spare: bool) -> int:
    if not system.die_with_parent(daemon_pid):
        return system.EXIT_CRASH  # the daemon died before we could arm PDEATHSIG
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C in a terminal reaches the whole group; the daemon stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The daemon forked us with its signals blocked; what came meanwhile is ours now.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    system.close_inherited_fds(channel_fd)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # a line reaches the daemon's log as it is printed
    system.set_title(f"otpd: {'spare' if spare else 'agent'} {spec.id}")
    runtime = Runtime(socket.socket(fileno=channel_fd), spec, store)
    runtime.flags = flags
    runtime.stamp = stamp
    if spare:
        if not runtime.await_go():
            return system.EXIT_NORMAL  # the daemon let the spare go (or is gone)
        runtime.title = f"otpd: agent {spec.id}"  # set once it is ready: not on the restart's path
    return runtime.run()


def load_class(ref: str) -> type[Agent]:
    module_name, _, class_name = ref.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise TypeError(f"{ref} is not an Agent")
    return cls


class Syncer:
    """Under fsync durability, the log's ``fdatasync`` in a helper process: the loop reads and
    applies the next batch while the last one syncs (group commit, pipelined).  A batch's
    replies wait for the sync that covers its entry, and every later batch's replies, reads
    too, wait behind them: nothing is answered that a power cut could take back.

    A process, not a thread: a thread waking from its sync must take the GIL back from a
    loop that is busy, which cost more than the overlap gained (BENCHMARKS.md).  The helper
    is forked from the agent, keeps only the log's fd and its socket, dies with the agent
    (PR_SET_PDEATHSIG) and is reaped by the daemon (a subreaper).  If it is gone (killed),
    the agent syncs inline again: slower, as safe."""

    def __init__(self, log_fd: int, agent_id: str, auto: bool = True) -> None:
        self.log_fd = log_fd
        self.auto = auto  # sync inline when nothing waits to be applied meanwhile ("auto"; else "always")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the helper: os calls only (the agent's threads, locks and loop are not here)
            status = 1
            try:
                signal.set_wakeup_fd(-1)  # the agent's: a signal here must not look like one to it
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                if system.die_with_parent(parent):
                    system.close_inherited_fds(theirs.fileno(), log_fd)
                    system.set_title(f"otpd: sync {agent_id}")
                    fd = theirs.fileno()
                    while os.read(fd, 64):  # one byte per sync asked for; EOF: the agent is gone
                        try:
                            os.fdatasync(log_fd)
                        except OSError:
                            os.write(fd, b"E")
                        else:
                            os.write(fd, b"!")
                    status = 0
            finally:
                os._exit(status)
        theirs.close()
        HELPERS.append(pid)
        self.pid = pid
        self.sock = ours
        self.r = ours.fileno()
        os.set_blocking(self.r, False)

    def start(self) -> bool:
        """Ask for a sync of the log; False if the helper is gone."""
        try:
            os.write(self.r, b"s")
        except OSError:
            return False
        return True

    def finished(self, block: bool) -> bool | None:
        """True once the sync asked for is done; False: not yet; None: the helper is gone.
        Raises if the sync failed (EIO: the agent ends, answering nothing more)."""
        if block:
            select.select([self.r], [], [])
        try:
            data = os.read(self.r, 64)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            return None
        if b"E" in data:
            raise OSError(f"fdatasync of the log failed (in the sync helper, pid {self.pid})")
        return True

    def close(self) -> None:
        self.sock.close()


class Runtime:
    def __init__(self, channel: socket.socket, spec: AgentSpec, store: StoreSettings | None = None) -> None:
        self.channel = channel
        self.spec = spec
        self.store_settings = store
        self.keeper: StateKeeper | None = None
        self.sync_s = store.sync_interval_ms / 1000.0 if store and store.durability == "process" else None
        self.next_sync = float("inf")
        self.checkpoint_s = store.checkpoint_ms / 1000.0 if store else 0.0
        self.next_checkpoint = float("inf")
        self.unpacker = codec.unpacker(MAX_FRAME)
        self.timers: list[tuple[float, int]] = []
        self.timer_info: dict[int, tuple[Any, float | None]] = {}
        self.refs = count(1)
        self.stopping: str | None = None  # "normal" or "shutdown" once decided
        self.stamp = Stamp(None, -1)  # where the loop says it works or waits (set after fork)
        self.agent: Agent | None = None
        self.backlog: list[dict[str, Any]] = []  # frames that came while a system call waited
        self.after: list[Callable[[], None]] = []  # run once the next commit is on disk
        self.ending: int | None = None  # exit with this status once the batch's commit was tried
        self.selector = selectors.DefaultSelector()
        self.pool: ThreadPoolExecutor | None = None
        self.done: queue.SimpleQueue[tuple[Future[Any], Callable[[Any, BaseException | None], None]]] = \
            queue.SimpleQueue()
        self.done_r = self.done_w = -1
        self.flags: dict[str, float] = {}  # feature flags as percentages, pushed by the daemon
        self.cls: type[Agent] | None = None
        self.store: Store | None = None
        self.title: str | None = None  # a process title to set once ready
        self.fds: deque[int] = deque()  # clients passed with "attach" frames (SCM_RIGHTS), in order
        self.answering: set[links.Link] = set()  # links with replies in the batch being applied
        self.links: list[links.Link] = []  # the links attached (closed ones dropped at the next attach)
        self.woke_at = time.monotonic()  # when the loop last woke to work (liveness rule 1 counts from it)
        self.stop_at: float | None = None  # when SIGTERM came (the daemon's shutdown_ms counts from about then)
        self.syncer: Syncer | None = None  # fsync durability: the log synced in a helper process
        self.written = 0  # the seq of the last commit, ...
        self.synced = 0  # ... of the last one known durable, ...
        self.syncing = 0  # ... and of the one the sync in flight covers (0: none)
        self.sync_by = float("inf")  # when the sync in flight counts as hung
        self.held: deque[tuple[int, bytes, list[tuple[links.Link, bytes, int]]]] = deque()  # replies waiting for it
        self.deferred: list[Any] = []  # replies of batches applied while a sync ran, not committed yet

    # -- timers ---------------------------------------------------------------

    def add_timer(self, delay_s: float, message: Any, interval: float | None) -> int:
        ref = next(self.refs)
        self.timer_info[ref] = (message, interval)
        heapq.heappush(self.timers, (time.monotonic() + max(0.0, delay_s), ref))
        return ref

    def cancel_timer(self, ref: int) -> None:
        self.timer_info.pop(ref, None)  # the heap entry is skipped when it comes up

    def _fire_timers(self, agent: Agent) -> None:
        """Deliver the timers due now.  Those set meanwhile, even with no delay, wait for the
        next turn of the loop, after the commit of this one (what ``send_after(0, ...)`` is for):
        so the due ones are taken first, not looked for while they fire (with a coarse clock a
        new one would be due in the same pass)."""
        now = time.monotonic()
        due = []
        while self.timers and self.timers[0][0] <= now:
            due.append(heapq.heappop(self.timers))
        for i, (at, ref) in enumerate(due):
            if self.stopping is not None:  # the rest stay for after the stop's terminate
                for entry in due[i:]:
                    heapq.heappush(self.timers, entry)
                return
            info = self.timer_info.get(ref)
            if info is None:
                continue
            message, interval = info
            if interval is None:
                del self.timer_info[ref]
            else:  # after a stall, the next tick is one interval from now: missed ticks are not replayed
                heapq.heappush(self.timers, (max(at + interval, now + interval * 0.5), ref))
            agent.handle_info(message)

    # -- the loop -------------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        self.channel.sendall(codec.pack(frame))

    # -- agent -> daemon ----------------------------------------------------------

    def system(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        """A request to the daemon, as otpctl makes them; blocks until its reply.

        Frames that arrive meanwhile (calls, casts, events) wait in the backlog
        and are handled, in order, once the current callback has returned."""
        ref = next(self.refs)
        self.send({"t": "sys", "ref": ref, "op": op, "args": args})
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.unpacker:
                if type(frame) is dict and frame.get("t") == "sysreply" and frame.get("ref") == ref:
                    # Frames that came in the same read stay in the decoder, where the loop
                    # would not see them until more input arrived: they join the backlog.
                    self.backlog.extend(self.unpacker)
                    if frame.get("ok"):
                        return frame.get("result")
                    raise OtpdError.from_wire(frame.get("error"))
                self.backlog.append(frame)
            left = deadline - time.monotonic()
            if left <= 0:
                raise OtpdError("timeout", f"no answer from the daemon to {op!r} in {timeout}s")
            ready, _, _ = select.select([self.channel], [], [], left)
            if ready:
                data = self._recv(codec.READ_SIZE)
                if not data:
                    raise OtpdError("shutting_down", "the daemon is gone")
                self.unpacker.feed(data)

    def run_in_worker(self, fn: Callable[..., Any], args: tuple[Any, ...],
                      done: Callable[[Any, BaseException | None], None], workers: int) -> None:
        """Run ``fn(*args)`` on a worker thread; ``done(result, error)`` runs later on the loop."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otpd-worker")
            self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.selector.register(self.done_r, selectors.EVENT_READ, "work")
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda f: self._work_finished(f, done))

    def _work_finished(self, future: Future[Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """On the worker thread: hand the result to the loop (the only place agent code runs)."""
        self.done.put((future, done))
        try:
            os.write(self.done_w, b"!")
        except BlockingIOError:
            pass  # the loop has a wake-up pending already

    def _on_work_done(self) -> None:
        try:
            os.read(self.done_r, 4096)
        except BlockingIOError:
            pass
        while not self.done.empty():
            future, done = self.done.get()
            error = future.exception()
            done(None if error is not None else future.result(), error)

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGTERM, self._on_sigterm)  # and the wake-up fd wakes the loop for it
        agent, keeper = self._start()
        self.agent = agent
        self.send({"t": "ready", "seq": keeper.seq})
        if self.title is not None:
            system.set_title(self.title)
        self._commit_then_send([])  # after_commit work that init asked for
        selector = self.selector
        selector.register(self.channel, selectors.EVENT_READ, "channel")
        selector.register(rfd, selectors.EVENT_READ, "signal")
        settings = self.store_settings
        if self.store is not None and self.store.fsync and self.store.own is not None and settings is not None \
                and settings.sync_helper != "never":
            self.syncer = Syncer(self.store.own.fd, self.spec.id, settings.sync_helper == "auto")
            self.written = self.synced = keeper.seq
            self.store.defer_log_sync()
            selector.register(self.syncer.r, selectors.EVENT_READ, "synced")
        while self.stopping is None:
            if self.backlog:
                backlog, self.backlog = self.backlog, []
                self._apply(agent, backlog)
                continue
            timeout = self._timeout()
            self.stamp.waiting()
            events = selector.select(timeout)
            now = self.woke_at = time.monotonic()
            self.stamp.working(now)
            frames: list[Any] = []
            calls: list[tuple[links.Link, list[Any]]] = []  # what the links brought
            gone = False
            for key, mask in events:
                source = key.data
                if source == "channel":
                    gone = not self._on_channel(frames)
                elif source == "synced":
                    self._on_synced(block=False)
                elif source == "signal":
                    self._on_signals(os.read(rfd, 64))
                elif source == "work":
                    self._on_work_done()
                    self._commit_then_send([])
                else:  # an attached link
                    if mask & selectors.EVENT_WRITE:
                        source.flush()
                    if mask & selectors.EVENT_READ and not source.closed:
                        got = source.read()
                        if got:
                            calls.append((source, got))
            if frames or calls:  # one batch, one commit, whichever sockets it came from
                self._apply(agent, frames, calls)
            if gone:
                return system.EXIT_NORMAL  # the daemon is gone: nothing to answer
            if self.timers:
                self._fire_timers(agent)
                self._commit_then_send([])
            if now >= self.next_checkpoint:
                self._checkpoint()
            if now >= self.next_sync:
                self._sync()
            if now >= self.sync_by and self.syncing:
                # The helper hangs in its sync (a dead disk): as an agent hung in its own sync
                # would be killed by the daemon (liveness rule 1), this one ends, unanswered.
                raise RuntimeError(f"the log's sync has not finished in {self.spec.heartbeat_timeout_ms} ms "
                                   f"(sync helper pid {self.syncer.pid if self.syncer else '?'})")
        agent.terminate(self.stopping)
        self._commit_then_send([])
        self._settle()
        self._drain_links()  # (every reply is durable now; the log is replayed if we die past here)
        self._checkpoint()
        self._sync()
        return system.EXIT_SHUTDOWN if self.stopping == "shutdown" else system.EXIT_NORMAL

    def _drain_links(self) -> None:
        """The links' queued replies, sent before the process ends, for 5 s at most, and within
        half of what is left of the daemon's limits: its liveness limit for a loop that does not
        come back (heartbeat_timeout_ms, from when this iteration woke) and, when stopped, its
        shutdown_ms (from the SIGTERM): the rest is for the checkpoint and the exit."""
        now = time.monotonic()
        budget = 5.0
        if self.spec.heartbeat_timeout_ms:
            budget = min(budget, (self.spec.heartbeat_timeout_ms / 1000 - (now - self.woke_at)) / 2)
        if self.stop_at is not None and self.spec.shutdown_ms is not None:
            budget = min(budget, (self.spec.shutdown_ms / 1000 - (now - self.stop_at)) / 2)
        if budget > 0:
            links.drain(self.links, budget)

    def prepare(self) -> type[Agent]:
        """What a start needs before the state is read: the class, and the store opened."""
        if self.cls is None:
            cls = load_class(self.spec.agent)
            settings = self.store_settings
            if settings is not None and settings.durability != "none" and cls.persists():
                self.store = Store(settings.path, settings.map_size_mb, settings.map_size_max_mb, settings.durability)
                self.store.warm_up()
            self.cls = cls
        return self.cls

    def await_go(self) -> bool:
        """A spare: prepare, then sleep until the daemon says go (True) or lets us go (EOF: False)."""
        self.prepare()
        self.stamp.waiting()
        go = False
        while not go:
            try:
                data = self._recv(codec.READ_SIZE)
            except InterruptedError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                return False
            self.unpacker.feed(data)
            for frame in self.unpacker:
                if not go and type(frame) is dict and frame.get("t") == "go":
                    self.flags = dict(frame.get("flags") or {})
                    go = True
                else:
                    self.backlog.append(frame)  # handled once the agent runs
        # Its wait is over: the limits counted from a wake-up (the links' drain) count from
        # this one, not from the fork, which may be hours ago.
        now = self.woke_at = time.monotonic()
        self.stamp.working(now)
        return True

    def _start(self) -> tuple[Agent, StateKeeper]:
        """Build the agent, load its state, run init; report a failure to the daemon."""
        try:
            cls = self.prepare()
            agent = cls(self.spec.id, dict(self.spec.args), self)
            keeper = self.keeper = StateKeeper(agent, self.store, self.spec.agent)
            keeper.switched = self.spec.switch is not None
            keeper.load()
            agent.init()
            try:
                keeper.commit()
            except OtpdError as err:  # store_full: rolled back to what is on disk (on_rollback told)
                if err.code != "store_full":
                    raise
                # Run on the last committed state, as an agent whose store filled up runs on:
                # its changes are answered store_full until there is room. Failing the start
                # instead would restart it until its supervisor gave up, and the tree with it.
                log_line(f"start: {err.message}; running on the last committed state")
                self.after.clear()  # what init asked for once its change was saved: it was not
                self.ending = None
        except OtpdError as err:
            frame: dict[str, Any] = {"t": "start_error", "code": err.code, "message": err.message}
            if err.code == "store_corrupt" or err.details.get("switch"):
                frame["fatal"] = True  # a restart cannot fix it: held failed (a passing store_full can)
            self.send(frame)
            raise StartFailed(f"{err.code}: {err.message}") from None
        except Exception as exc:
            self.send({"t": "start_error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
            raise
        return agent, keeper

    def _checkpoint(self) -> None:
        """Apply the agent's log to LMDB (after the replies: never on a caller's path)."""
        self.next_checkpoint = float("inf")
        store = self.store
        if store is None or not store.pending_log():
            return
        was_full = store.full
        try:
            store.checkpoint()
        except OtpdError as err:  # the log keeps every acknowledged change; commits answer store_full
            if not was_full:
                log_line(f"checkpoint: {err}")

    def _sync(self) -> None:
        keeper = self.keeper
        if keeper is not None and keeper.store is not None and keeper.unsynced:
            keeper.store.sync()
            keeper.unsynced = False
        self.next_sync = float("inf")

    def _commit_then_send(self, replies: list[Any]) -> None:
        if self.syncing and not self.after and self.ending is None and self.stopping is None:
            # A sync is running: what came meanwhile is applied, and committed as one entry
            # when it is done (_on_synced), not as many small ones.
            self.deferred.extend(replies)
            return
        if self.deferred:
            replies, self.deferred = self.deferred + replies, []
        keeper = self.keeper
        assert keeper is not None
        error = None
        try:
            wrote = keeper.commit()
        except OtpdError as err:  # store_full: the agent is back at its last commit
            error = err.to_wire()
            replies = [[r[0], False, error] for r in replies]
            wrote = False
            self.after.clear()  # what they were waiting for was not saved
        if wrote:  # the daemon learns the seq of what it is about to acknowledge
            self.stamp.committed(keeper.seq)  # (for the links' calls: liveness.py)
            if replies and type(replies[-1]) is list:
                replies[-1].append(keeper.seq)  # on the batch's last reply: [ref, ok, result, seq]
            elif not self.answering or self.stamp.seq is None:  # (links' calls: the stamp tells, no wake-up)
                replies.append({"t": "seq", "seq": keeper.seq})
            if self.sync_s is not None and self.next_sync == float("inf"):
                self.next_sync = time.monotonic() + self.sync_s
        data = _pack_replies(replies) if replies else b""
        to_links = []
        if self.answering:
            answering, self.answering = self.answering, set()
            for link in answering:
                out, link.replies = link.replies, []
                if error is not None:
                    out = [[r[0], False, error] for r in out]
                if out:
                    to_links.append((link, _pack_replies(out), len(out)))
        if wrote:
            self.written = keeper.seq
            if self.syncer is None:
                self.synced = self.written  # (synced by the commit itself, or not meant to be)
        if self.written > self.synced and (data or to_links):  # (only under fsync: see Syncer)
            if self.after or self.ending is not None:
                self._settle()  # what waits for this commit runs once it is durable: now
            else:
                self.held.append((self.written, data, to_links))
                data, to_links = b"", []
                if not self.syncing:
                    self._start_sync()
        elif self.written > self.synced and not self.syncing:
            self._start_sync()  # (a commit with nothing to answer, a timer's)
        if data:
            self.channel.sendall(data)
        for link, out_data, n in to_links:
            link.send(out_data, n)
        if self.ending is not None:  # committed or not (store_full drops the after-commit callbacks)
            self._settle()  # replies held for earlier commits' sync, even if this batch had none
            self._drain_links()
            for stream in (sys.stdout, sys.stderr):  # os._exit does not flush
                stream.flush()
            end_helpers()
            os._exit(self.ending)
        if wrote:
            store = keeper.store
            assert store is not None
            if store.checkpoint_due():
                self._checkpoint()
            elif self.next_checkpoint == float("inf"):
                self.next_checkpoint = time.monotonic() + self.checkpoint_s
        if self.after:
            callbacks, self.after = self.after, []
            for callback in callbacks:
                callback()
            self._commit_then_send([])  # what the callbacks changed

    def _start_sync(self) -> None:
        assert self.syncer is not None and self.store is not None
        fd = self.store.log_to_sync()
        # None: nothing in the log to sync (those commits went to LMDB, synced there).  And when
        # nothing came to apply while it syncs, the overlap would gain nothing and the helper's
        # two wake-ups would delay the replies (calls through the daemon arrive as one batch,
        # and then nothing until they are answered): sync here.
        if fd is None or (self.syncer.auto and not self.selector.select(0)):
            self._sync_here(fd)
            return
        if fd != self.syncer.log_fd or not self.syncer.start():
            self._inline_syncs()  # the helper is gone: the sync it would have done, here
            self._sync_here(fd)
            return
        self.syncing = self.written
        if self.spec.heartbeat_timeout_ms:  # (0: no liveness limit, for the sync neither)
            self.sync_by = time.monotonic() + self.spec.heartbeat_timeout_ms / 1000

    def _inline_syncs(self) -> None:
        """The helper is gone: every commit syncs the log itself again, as without one."""
        assert self.syncer is not None and self.store is not None
        log_line(f"the sync helper (pid {self.syncer.pid}) is gone; syncing the log inline")
        self.selector.unregister(self.syncer.r)
        self.syncer.close()
        HELPERS.remove(self.syncer.pid)
        try:  # our child: reaped here (its pid is not free for reuse until then)
            os.kill(self.syncer.pid, signal.SIGKILL)
            os.waitpid(self.syncer.pid, 0)
        except OSError:
            pass
        self.syncer = None
        self.store.defer_log_sync(False)

    def _sync_here(self, fd: int | None) -> None:
        """Sync the log in this process (``fd`` None: nothing to sync), then send what waited for it."""
        if fd is not None:
            os.fdatasync(fd)
        self.synced = self.written
        self._release()

    def _on_synced(self, block: bool, then_commit: bool = True) -> None:
        assert self.syncer is not None and self.store is not None
        done = self.syncer.finished(block)
        if done is False:
            return
        if done is None:  # the helper is gone, mid-sync or idle: sync here what it may not have
            assert self.store.own is not None
            os.fdatasync(self.store.own.fd)
            self._inline_syncs()
            self.synced = self.written
        else:
            self.synced = self.syncing
        self.syncing = 0
        self.sync_by = float("inf")
        self._release()
        if then_commit:
            self._commit_then_send([])  # what came meanwhile: one commit, its sync started

    def _release(self) -> None:
        """Send the replies whose commits are durable now (and those held behind them)."""
        held = self.held
        while held and held[0][0] <= self.synced:
            _seq, data, to_links = held.popleft()
            if data:
                self.channel.sendall(data)
            for link, out_data, n in to_links:
                link.send(out_data, n)

    def _settle(self) -> None:
        """Make every commit durable now, and send every reply held for it."""
        if self.syncer is None:
            return
        while self.syncing and self.syncer is not None:
            # (not committing what came meanwhile: the caller is in a commit, which has it)
            self._on_synced(block=True, then_commit=False)
        if self.written > self.synced:  # this batch's commit: no sync started for it yet
            assert self.store is not None
            self._sync_here(self.store.log_to_sync())
        else:
            self._release()

    def _timeout(self) -> float | None:
        """Seconds until the loop has something of its own to do; None: nothing (wait for input)."""
        wake = min(self.next_sync, self.next_checkpoint, self.sync_by)
        if self.timers:
            wake = min(wake, self.timers[0][0])
        if wake == float("inf"):
            return None
        return max(0.0, wake - time.monotonic())

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        """When the stop came: the daemon's shutdown_ms counts from its SIGTERM, not from when a
        loop busy in a long call gets round to reading the wake-up fd."""
        if self.stop_at is None:
            self.stop_at = time.monotonic()

    def _on_signals(self, data: bytes) -> None:
        if signal.SIGTERM in data:
            self.stopping = "shutdown"
            if self.stop_at is None:
                self.stop_at = time.monotonic()

    def _recv(self, size: int, flags: int = 0) -> bytes:
        """Read the channel, taking the fds that come with "attach" frames."""
        data, ancillary, msg_flags, _addr = self.channel.recvmsg(size, FD_SPACE, flags | socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if msg_flags & socket.MSG_CTRUNC and not ancillary:
            # The kernel dropped the fd (this process is at RLIMIT_NOFILE): its place is kept,
            # so that the next attach still gets its own client, not this one's.
            self.fds.append(-1)
        return data

    def _on_channel(self, frames: list[Any]) -> bool:
        """Read everything the channel holds into ``frames``; False at EOF (the daemon is gone)."""
        chunks: list[bytes] = []
        size = 0
        eof = False
        while size < MAX_BATCH:
            try:
                data = self._recv(codec.READ_SIZE, socket.MSG_DONTWAIT if chunks else 0)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                data = b""
            if not data:
                eof = True
                break
            chunks.append(data)
            size += len(data)
            if len(data) < codec.READ_SIZE:
                break  # the channel was empty: asking again would only cost a syscall that says so
        if chunks:
            self.unpacker.feed(b"".join(chunks))
            frames.extend(self.unpacker)
        return not eof

    def _apply(self, agent: Agent, frames: list[Any], calls: list[tuple[links.Link, list[Any]]] | None = None) -> None:
        """One batch: apply every frame, commit once, then send the replies."""
        replies: list[Any] = []
        for frame in frames:
            self._dispatch(agent, frame, replies)
            if self.stopping is not None:
                break
        for link, link_frames in calls or ():
            if self.stopping is not None:
                break
            self._on_link(agent, link, link_frames)
        self._commit_then_send(replies)

    def _on_link(self, agent: Agent, link: links.Link, frames: list[Any]) -> None:
        self.answering.add(link)
        out = link.replies
        for frame in frames:
            if links.is_call(frame):  # [id, request]: what the channel's calls look like too
                self._dispatch(agent, frame, out)
            else:  # never a channel frame: a client does not send casts, flags or attaches
                out.append(links.bad_shape(frame))
            if self.stopping is not None:
                return

    def _attach(self, agent: Agent, frame: dict[str, Any]) -> None:
        """A client the daemon handed over: answer its ``attach``, then what it sent after it."""
        fd = self.fds.popleft() if self.fds else -1
        if fd < 0:
            log_line("attach: its descriptor was dropped (this agent is out of fds); the client sees its "
                     "connection close")
            return
        self.links = [other for other in self.links if not other.closed]
        limit = links.max_links()
        if len(self.links) >= limit:  # refused while the agent still has fds of its own to work with
            with socket.socket(fileno=fd) as refused:
                refused.setblocking(False)
                try:
                    refused.send(codec.pack(protocol.fail(frame.get("id"), OtpdError(
                        "internal", f"agent {self.spec.id!r} has {len(self.links)} links, its limit (half "
                        "its RLIMIT_NOFILE): call through the daemon, or close a link",
                        {"id": self.spec.id, "links": len(self.links), "limit": limit}).to_wire())))
                except OSError:
                    pass
            return
        link = links.Link(socket.socket(fileno=fd), self.selector, self._count_links)
        self.links.append(link)
        self._count_links()
        link.send(codec.pack(protocol.ok(frame.get("id"), {"id": self.spec.id, "pid": os.getpid()})))
        self.answering.add(link)
        pending = frame.get("pending")
        if type(pending) is bytes and pending:  # what the client sent before the daemon let go
            self._on_link(agent, link, link.feed(pending))

    def _count_links(self) -> None:
        """The links open, for ``status`` (the liveness page; a store per attach or close)."""
        self.stamp.linked(sum(1 for link in self.links if not link.closed))

    def _dispatch(self, agent: Agent, frame: Any, replies: list[Any]) -> None:
        if type(frame) is list:  # a call: [ref, request]
            ref, request = frame
            try:
                result = agent.handle_call(request)
            except OtpdError as err:
                replies.append([ref, False, err.to_wire()])
            else:
                replies.append([ref, True, result])
            return
        kind = frame.get("t")
        if kind == "cast":
            agent.handle_cast(frame.get("msg"))
        elif kind == "event":
            agent.handle_event(frame.get("e") or {})
        elif kind == "flags":
            self.flags = dict(frame.get("flags") or {})
        elif kind == "attach":
            self._attach(agent, frame)
        # a "sysreply" here is the late answer to a system call that timed out: dropped


def _pack_replies(replies: list[Any]) -> bytes:
    try:
        if len(replies) == 1:
            return codec.pack(replies[0])
        return b"".join([codec.pack(r) for r in replies])
    except (TypeError, ValueError, OverflowError):  # a result msgpack cannot encode: find it
        return b"".join([_pack_reply(r) for r in replies])


def _pack_reply(reply: list[Any]) -> bytes:
    try:
        return codec.pack(reply)
    except (TypeError, ValueError, OverflowError) as exc:
        error = OtpdError("internal", f"the agent's reply cannot be encoded: {exc}")
        return codec.pack([reply[0], False, error.to_wire(), *reply[3:]])
