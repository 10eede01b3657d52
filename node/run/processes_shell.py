"""Child processes for task runs: own process group, timeout, bounded output.

Theory of operation
-------------------
Rule 1 - a run is a process group. Every child starts with
``start_new_session=True``, so it leads a new session and process group whose
id is its pid. Everything it forks (``sleep 1000 &``) stays in that group
unless it calls ``setsid``/``setpgid`` itself, which we cannot prevent
without cgroups.

Rule 2 - termination is SIGTERM to the group, then SIGKILL to the group after
``kill_grace_s``. It happens when the timeout expires, when the caller is
cancelled (trio cancellation: cleanup runs shielded, then ``Cancelled`` is
re-raised), and when the leader exits normally but left members behind in
its group (like systemd's ``KillMode=control-group``: a run does not leak
daemons).

Rule 3 - no zombies of ours. The leader is always waited for (``Process.wait``
reaps it). Grandchildren are not our children: when orphaned they are
reparented to init (or a subreaper), whose job is to reap them. A group
member in state ``Z`` is dead and counts as gone.

Rule 4 - output is bounded. stdout and stderr share one pipe (merged in the
order the child wrote them), read continuously by a trio task so the child
never blocks on a full pipe, and only the last ``output_limit_bytes`` are
kept (:class:`OutputTail`). After the leader exits, the pipe is drained for
at most ``DRAIN_S`` seconds: a writer that escaped the group cannot hold the
run open.

Each wait is bounded: the timeout, the grace period, ``REAP_AFTER_KILL_S``
after SIGKILL, and ``DRAIN_S`` for the pipe.

A caveat on pids: the group is signalled by its number. Linux does not hand
a pid out again while a process group of that number has members, and we only
signal a group after checking that it still has members, so the window for
hitting an unrelated group is the few microseconds between the check and the
signal after the last member died.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

__all__ = [
    "DRAIN_S",
    "GROUP_POLL_S",
    "REAP_AFTER_KILL_S",
    "OutputTail",
    "ProcessOutcome",
    "group_alive",
    "run_child",
    "signal_name",
]

#: How long to keep reading the output pipe after the process group is gone.
DRAIN_S = 1.0
#: How long to wait for the leader after SIGKILL (a process in uninterruptible
#: sleep can outlive SIGKILL for a while; we give up rather than hang).
REAP_AFTER_KILL_S = 10.0
#: Poll interval while waiting for a process group to empty.
GROUP_POLL_S = 0.02
#: Read size for the output pipe.
_READ_CHUNK_BYTES = 65536


class OutputTail:
    """Keeps the last ``limit_bytes`` of a byte stream (a ring buffer).

    ``bytearray`` deletion from the front is amortised O(1) in CPython, so
    ``feed`` costs O(len(chunk)) and memory stays below ``limit + chunk``.
    """

    __slots__ = ("_buf", "limit_bytes", "total_bytes")

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.total_bytes = 0
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Append ``data``, dropping the oldest bytes beyond the limit."""
        self.total_bytes += len(data)
        if len(data) >= self.limit_bytes:
            self._buf[:] = data[len(data) - self.limit_bytes :] if self.limit_bytes else b""
            return
        self._buf += data
        excess = len(self._buf) - self.limit_bytes
        if excess > 0:
            del self._buf[:excess]

    @property
    def truncated_bytes(self) -> int:
        """How many bytes were dropped from the front."""
        return self.total_bytes - len(self._buf)

    def tail(self) -> bytes:
        """The kept bytes."""
        return bytes(self._buf)

    def render(self) -> str:
        """The kept bytes as UTF-8 text (invalid bytes replaced), prefixed with
        ``[... N bytes truncated]`` when the front was cut."""
        text = self._buf.decode("utf-8", errors="replace")
        if self.truncated_bytes:
            return f"[... {self.truncated_bytes} bytes truncated]\n{text}"
        return text


@dataclass(frozen=True, slots=True)
class ProcessOutcome:
    """What happened to one child process.

    ``returncode`` follows ``subprocess``: >= 0 is an exit status, -N means
    killed by signal N. ``timed_out`` says the timeout expired (the group was
    then terminated). ``sigkill_sent`` says SIGTERM was not enough within the
    grace period. ``stragglers`` says the leader exited but left live members
    in its group, which were terminated. ``reaped`` is False only if the
    leader survived even SIGKILL for ``REAP_AFTER_KILL_S``.
    """

    pid: int
    returncode: int | None
    timed_out: bool
    sigkill_sent: bool
    stragglers: bool
    reaped: bool
    output: OutputTail


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, ``signal 99`` for unknown numbers."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        # macOS reports EPERM for a group made only of zombies.
        pass


def _linux_group_has_live_member(pgid: int) -> bool | None:
    """Scan /proc for a non-zombie member of ``pgid``; None if /proc is unusable."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    seen_any = False
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # exited while we looked
        seen_any = True
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and ')'.
        rest = raw[raw.rfind(b")") + 2 :].split()
        if len(rest) < 3:
            continue
        state, pgrp = rest[0], rest[2]
        if pgrp == str(pgid).encode() and state not in (b"Z", b"X"):
            return True
    return False if seen_any else None


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a live (non-zombie) member.

    ``killpg(pgid, 0)`` answers "no members" cheaply; members that are zombies
    (dead, waiting for init to reap them) still count for ``killpg``, so on
    Linux /proc is consulted to ignore them. Elsewhere a zombie counts as alive
    (conservative: it only costs the grace period).
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    live = _linux_group_has_live_member(pgid)
    return True if live is None else live


async def _wait_group_gone(pgid: int) -> None:
    while group_alive(pgid):
        await trio.sleep(GROUP_POLL_S)


async def _terminate_group(proc: trio.Process, kill_grace_s: float) -> tuple[bool, bool]:
    """SIGTERM the group, wait up to ``kill_grace_s``, then SIGKILL it.

    Returns:
        (sigkill_sent, reaped).
    """
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(kill_grace_s):
        await proc.wait()
        await _wait_group_gone(pgid)
    sigkill_sent = False
    if proc.returncode is None or group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
        sigkill_sent = True
    with trio.move_on_after(REAP_AFTER_KILL_S):
        await proc.wait()
        if sigkill_sent:
            # SIGKILL is delivered asynchronously: wait (bounded) until every
            # member of the group is really gone, so "returned" means "dead"
            await _wait_group_gone(pgid)
    return sigkill_sent, proc.returncode is not None


async def _pump(stream: trio.abc.ReceiveStream, tail: OutputTail, done: trio.Event,
                on_output: Callable[[bytes], None] | None = None) -> None:
    try:
        while True:
            data = await stream.receive_some(_READ_CHUNK_BYTES)
            if not data:
                break
            tail.feed(data)
            if on_output is not None:
                on_output(data)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        done.set()


async def _feed_stdin(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # child exited or closed stdin without reading it all
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


def _only_cancelled(exc: BaseException) -> trio.Cancelled | None:
    """The first ``Cancelled`` if ``exc`` is one or a group made only of them."""
    if isinstance(exc, trio.Cancelled):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_only_cancelled(e) for e in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


async def run_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout_s: float,
    output_limit_bytes: int,
    kill_grace_s: float,
    stdin_data: bytes | None = None,
    on_output: Callable[[bytes], None] | None = None,
) -> ProcessOutcome:
    """Run ``argv`` in a new session and wait for it, bounded by ``timeout_s``.

    Args:
        argv: program and arguments (no shell; argv[0] searched in env PATH).
        env: the complete child environment (None inherits ours).
        cwd: working directory (None: ours).
        timeout_s: seconds before the group is terminated (``math.inf``: never).
        output_limit_bytes: how much of the merged stdout+stderr tail to keep.
        kill_grace_s: seconds between SIGTERM and SIGKILL.
        stdin_data: bytes written to the child's stdin, which is then closed;
            None gives the child /dev/null.
        on_output: called with every chunk read from the output pipe, as it
            arrives (live output; must not block).

    Returns:
        A :class:`ProcessOutcome`.

    Raises:
        OSError: the child could not be started (``FileNotFoundError`` for a
            missing executable or cwd, ``PermissionError``, ...).
        trio.Cancelled: the caller was cancelled; the group was terminated
            (shielded, at most ``kill_grace_s`` + ``REAP_AFTER_KILL_S``) first.
    """
    tail = OutputTail(output_limit_bytes)
    proc = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
    )
    timed_out = False
    sigkill_sent = False
    stragglers = False
    reaped = True
    try:
        async with trio.open_nursery() as nursery:
            reader_done = trio.Event()
            assert proc.stdout is not None
            nursery.start_soon(_pump, proc.stdout, tail, reader_done, on_output)
            if stdin_data is not None:
                assert proc.stdin is not None
                nursery.start_soon(_feed_stdin, proc.stdin, stdin_data)
            deadline_s = timeout_s if math.isfinite(timeout_s) else math.inf
            with trio.move_on_after(deadline_s) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                timed_out = True
                sigkill_sent, reaped = await _terminate_group(proc, kill_grace_s)
            elif group_alive(proc.pid):
                stragglers = True
                sigkill_sent, reaped = await _terminate_group(proc, kill_grace_s)
            with trio.move_on_after(DRAIN_S):
                await reader_done.wait()
            nursery.cancel_scope.cancel()
    except BaseException as exc:
        # Cancelled from outside (or a bug): never leave the group running.
        with trio.CancelScope(shield=True):
            if proc.returncode is None or group_alive(proc.pid):
                await _terminate_group(proc, kill_grace_s)
        cancelled = _only_cancelled(exc)
        if cancelled is not None and cancelled is not exc:
            # The nursery wraps the Cancelled of each of its tasks in a group;
            # hand the caller one plain Cancelled (trio matches it by scope).
            raise cancelled from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            for stream in (proc.stdout, proc.stdin):
                if stream is not None:
                    await trio.aclose_forcefully(stream)
    return ProcessOutcome(
        pid=proc.pid,
        returncode=proc.returncode,
        timed_out=timed_out,
        sigkill_sent=sigkill_sent,
        stragglers=stragglers,
        reaped=reaped,
        output=tail,
    )
