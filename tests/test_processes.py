"""Real child processes: exit codes, process-group termination, bounded output,
environment, python child isolation, cancellation (node/run/processes_shell.py,
node/pyrunner.py through node.run.executor_shell.execute).

"Dead" below means: no such pid, or a zombie. Orphaned grandchildren are
reparented to PID 1, and in some containers PID 1 never reaps, so a killed
grandchild can stay a zombie forever; it has exited all the same. The
run's own leader is our child and must be fully reaped (no zombie at all).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from node import pyrunner
from node.run.attempt import RunContext, slot_iso
from node.run.executor_shell import execute
from node.run.processes_shell import DRAIN_S, OutputTail, group_alive, run_child

SLOT = 1795734000  # 2026-11-26T23:00:00Z


def make_ctx(cwd=None, **kw) -> RunContext:
    d = dict(task_id="backup", slot=SLOT, run_id="run-1", attempt=1, node="n1",
             fencing_token=None, env={}, cwd=str(cwd) if cwd else None, timeout_s=20.0,
             kill_grace_s=1.0)
    d.update(kw)
    return RunContext(**d)


def is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in (b"Z", b"X")


def fully_reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_for_file(path, timeout_s=10.0) -> str:
    with trio.fail_after(timeout_s):
        while True:
            if path.exists():
                text = path.read_text().strip()
                if text:
                    return text
            await trio.sleep(0.01)


# --- exit codes and output -------------------------------------------------


async def test_exit_codes():
    ok = await execute({"type": "shell", "run": "exit 0"}, make_ctx())
    assert (ok.status, ok.exit_code, ok.error) == ("succeeded", 0, None)
    bad = await execute({"type": "shell", "run": "exit 7"}, make_ctx())
    assert (bad.status, bad.exit_code, bad.error) == ("failed", 7, "exit status 7")
    f = await execute({"type": "exec", "argv": ["false"]}, make_ctx())
    assert (f.status, f.exit_code) == ("failed", 1)
    t = await execute({"type": "exec", "argv": ["true"]}, make_ctx())
    assert (t.status, t.exit_code) == ("succeeded", 0)
    assert ok.started <= ok.finished


async def test_exec_does_not_use_a_shell(tmp_path):
    r = await execute({"type": "exec", "argv": ["echo", "$HOME;", "`id`"]}, make_ctx())
    assert r.status == "succeeded"
    assert r.output == "$HOME; `id`\n"


async def test_stdout_and_stderr_are_merged_in_order():
    r = await execute({"type": "shell", "run": "echo a; echo b >&2; echo c"}, make_ctx())
    assert r.output == "a\nb\nc\n"


async def test_killed_by_signal_is_failed_with_negative_code():
    r = await execute({"type": "shell", "run": "kill -USR1 $$"}, make_ctx())
    assert (r.status, r.exit_code) == ("failed", -signal.SIGUSR1)
    assert r.error == "killed by SIGUSR1"


async def test_missing_executable_and_cwd_are_errors(tmp_path):
    r = await execute({"type": "exec", "argv": ["peerd-no-such-program-xyz"]}, make_ctx())
    assert r.status == "error" and r.exit_code is None
    assert r.error == "executable not found: 'peerd-no-such-program-xyz'"
    r = await execute({"type": "exec", "argv": ["true"]}, make_ctx(cwd=tmp_path / "nope"))
    assert r.status == "error" and "does not exist" in r.error and "nope" in r.error
    # inside a shell a missing program is the shell's exit 127
    r = await execute({"type": "shell", "run": "peerd-no-such-program-xyz"}, make_ctx())
    assert (r.status, r.exit_code) == ("failed", 127)
    assert "command not found" in r.error


async def test_cwd_is_used(tmp_path):
    r = await execute({"type": "exec", "argv": ["pwd"]}, make_ctx(cwd=tmp_path))
    assert r.output.strip() == os.path.realpath(tmp_path)


@pytest.mark.parametrize(
    "command",
    [
        None,
        "echo hi",
        {"type": "shell"},
        {"type": "shell", "run": ""},
        {"type": "shell", "run": "echo", "runn": "typo"},
        {"type": "exec", "argv": "date -u"},
        {"type": "exec", "argv": []},
        {"type": "exec", "argv": ["date", 3]},
        {"type": "python", "target": "no_colon"},
        {"type": "python", "target": "m:f", "args": [object()]},
        {"type": "python", "target": "m:f", "kwargs": {"a": float("nan")}},
        {"type": "http", "url": "ftp://x/"},
        {"type": "http", "url": "http://h/", "expect_status": 99},
        {"type": "http", "url": "http://h/", "headers": {"X-A": "a\r\nEvil: 1"}},
        {"type": "warp"},
    ],
)
async def test_bad_command_is_an_error_result_not_an_exception(command):
    r = await execute(command, make_ctx())
    assert r.status == "error"
    assert r.error and r.exit_code is None


async def test_bad_context_is_an_error_result():
    r = await execute({"type": "shell", "run": "true"}, make_ctx(timeout_s=0))
    assert r.status == "error" and "timeout_s" in r.error
    r = await execute({"type": "shell", "run": "true"}, make_ctx(env={"A=B": "x"}))
    assert r.status == "error" and "env" in r.error


# --- environment -------------------------------------------------------------


async def test_env_vars_present_and_correct():
    ctx = make_ctx(fencing_token=42, env={"FOO": "bar", "PEERD_TASK_ID": "spoofed"}, attempt=3,
                   run_id="r-xyz")
    r = await execute({"type": "exec", "argv": [sys.executable, "-c",
                       "import os, json; print(json.dumps({k: v for k, v in os.environ.items()"
                       " if k in ('PEERD_TASK_ID', 'PEERD_SLOT', 'PEERD_RUN_ID', 'PEERD_ATTEMPT', 'PEERD_NODE',"
                       " 'PEERD_FENCING_TOKEN', 'FOO')}))"]}, ctx)
    assert r.status == "succeeded", r
    env = json.loads(r.output)
    assert env == {
        "PEERD_TASK_ID": "backup",
        "PEERD_SLOT": "2026-11-26T23:00:00Z",
        "PEERD_RUN_ID": "r-xyz",
        "PEERD_ATTEMPT": "3",
        "PEERD_NODE": "n1",
        "PEERD_FENCING_TOKEN": "42",
        "FOO": "bar",
    }
    # without fencing the token variable is absent
    r = await execute({"type": "shell", "run": 'echo "${PEERD_FENCING_TOKEN-unset}"'}, make_ctx())
    assert r.output == "unset\n"


def test_slot_iso():
    assert slot_iso(SLOT) == "2026-11-26T23:00:00Z"
    assert slot_iso(0) == "1970-01-01T00:00:00Z"
    assert slot_iso(1.5) == "1970-01-01T00:00:01.500000Z"


# --- timeouts and process groups --------------------------------------------


async def _run_and_capture(command, ctx, pidfile, result_box):
    async def runner():
        result_box.append(await execute(command, ctx))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
        gc_pid = int(await wait_for_file(pidfile))
        assert not is_dead(gc_pid), "grandchild should be running before the timeout"
    return gc_pid


async def test_timeout_kills_the_whole_group_including_grandchildren(tmp_path):
    pidfile = tmp_path / "gc.pid"
    cmd = {"type": "shell", "run": f"sleep 1000 & echo $! > {pidfile}; echo started; sleep 1000"}
    box = []
    t0 = trio.current_time()
    gc_pid = await _run_and_capture(cmd, make_ctx(timeout_s=1.5, kill_grace_s=2.0), pidfile, box)
    (r,) = box
    assert r.status == "timeout"
    assert r.exit_code == -signal.SIGTERM
    assert r.error == "timed out after 1.5s (SIGTERM to the process group)"
    assert "started" in r.output
    assert is_dead(gc_pid)  # gone when execute returns, no polling needed
    assert trio.current_time() - t0 < 10


async def test_timeout_escalates_to_sigkill_for_term_ignoring_grandchild(tmp_path):
    pidfile = tmp_path / "gc.pid"
    # the grandchild ignores SIGTERM (ignored dispositions survive exec); it
    # writes its pid only once the trap is set
    cmd = {"type": "shell",
           "run": f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 1000' & sleep 1000"}
    box = []
    gc_pid = await _run_and_capture(cmd, make_ctx(timeout_s=1.5, kill_grace_s=0.5), pidfile, box)
    (r,) = box
    assert r.status == "timeout"
    assert "SIGKILL after 0.5s grace" in r.error
    assert is_dead(gc_pid)


async def test_timeout_sigkills_a_term_ignoring_leader(tmp_path):
    outcome = await run_child(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
         " print('ready', flush=True); time.sleep(1000)"],
        env=None, cwd=None, timeout_s=1.0, output_limit_bytes=1024, kill_grace_s=0.5)
    assert outcome.timed_out and outcome.sigkill_sent and outcome.reaped
    assert outcome.returncode == -signal.SIGKILL
    assert fully_reaped(outcome.pid)  # the leader is reaped: no zombie of ours
    assert not group_alive(outcome.pid)


async def test_leftover_background_processes_are_terminated_after_normal_exit(tmp_path):
    pidfile = tmp_path / "gc.pid"
    t0 = trio.current_time()
    r = await execute({"type": "shell", "run": f"sleep 1000 & echo $! > {pidfile}; echo done"},
                      make_ctx(kill_grace_s=2.0))
    assert (r.status, r.exit_code) == ("succeeded", 0)
    assert r.output == "done\n"
    assert "terminated" in r.error
    assert is_dead(int(pidfile.read_text()))
    assert trio.current_time() - t0 < 5  # the background job did not hold the run open


async def test_cancellation_kills_the_group_and_reraises(tmp_path):
    pidfile = tmp_path / "gc.pid"
    cmd = {"type": "shell", "run": f"sleep 1000 & echo $! > {pidfile}; echo $$ >> {pidfile}; sleep 1000"}
    cancelled = False
    with trio.move_on_after(30) as outer:
        async with trio.open_nursery() as nursery:
            async def runner():
                nonlocal cancelled
                try:
                    await execute(cmd, make_ctx(timeout_s=100, kill_grace_s=1.0))
                except trio.Cancelled:
                    cancelled = True
                    raise

            nursery.start_soon(runner)
            with trio.fail_after(10):
                while len(pidfile.read_text().split() if pidfile.exists() else []) < 2:
                    await trio.sleep(0.01)
            gc_pid, leader_pid = map(int, pidfile.read_text().split())
            assert not is_dead(gc_pid) and not is_dead(leader_pid)
            nursery.cancel_scope.cancel()
    assert not outer.cancelled_caught
    assert cancelled
    assert is_dead(gc_pid)
    assert fully_reaped(leader_pid)


# --- bounded output -----------------------------------------------------------


async def test_output_is_bounded_and_child_not_blocked():
    # 10 MiB of output then an end marker; a pipe nobody reads would block at 64 KiB
    code = ("import sys; block = b'x' * 1048576\n"
            "for _ in range(10): sys.stdout.buffer.write(block)\n"
            "sys.stdout.buffer.write(b'THE-END'); sys.stdout.flush()")
    r = await execute({"type": "exec", "argv": [sys.executable, "-c", code]}, make_ctx(timeout_s=30))
    assert r.status == "succeeded", r.error
    total = 10 * 1048576 + len("THE-END")
    header = f"[... {total - 65536} bytes truncated]\n"
    assert r.output.startswith(header)
    body = r.output[len(header):]
    assert len(body) == 65536
    assert body.endswith("xTHE-END")


async def test_small_output_limit_and_invalid_utf8():
    r = await execute({"type": "exec", "argv": [sys.executable, "-c",
                       "import sys; sys.stdout.buffer.write(b'0123456789abc\\xff')"]},
                      make_ctx(output_limit_bytes=4))
    assert r.output == "[... 10 bytes truncated]\nabc\ufffd"


@given(chunks=st.lists(st.binary(max_size=50), max_size=30), limit=st.integers(0, 120))
def test_output_tail_keeps_exactly_the_last_bytes(chunks, limit):
    tail = OutputTail(limit)
    for c in chunks:
        tail.feed(c)
    data = b"".join(chunks)
    expected = data[-limit:] if limit else b""
    assert tail.tail() == expected
    assert tail.total_bytes == len(data)
    assert tail.truncated_bytes == len(data) - len(expected)


# --- python tasks ---------------------------------------------------------------

TASKMOD = textwrap.dedent(
    """
    import os, sys, time

    def add(a, b, scale=1):
        print("adding", flush=True)
        return {"sum": (a + b) * scale, "task": os.environ["PEERD_TASK_ID"]}

    def boom():
        raise RuntimeError("kaboom")

    def leave(code):
        sys.exit(code)

    def crash():
        os.abort()

    def hang():
        print("hanging", flush=True)
        time.sleep(1000)

    def odd():
        return {1, 2}

    class Jobs:
        @staticmethod
        def nested():
            return "nested-ok"

    async def coro():
        return 1
    """
)


@pytest.fixture
def taskdir(tmp_path):
    (tmp_path / "peerd_test_taskmod.py").write_text(TASKMOD)
    return tmp_path


def py(func, *args, **kwargs):
    return {"type": "python", "target": f"peerd_test_taskmod:{func}", "args": list(args), "kwargs": kwargs}


async def test_python_return_value(taskdir):
    r = await execute(py("add", 2, 3, scale=10), make_ctx(cwd=taskdir))
    assert (r.status, r.exit_code) == ("succeeded", 0), r.output
    lines = r.output.splitlines()
    assert lines[0] == "adding"
    assert json.loads(lines[1]) == {"sum": 50, "task": "backup"}
    r = await execute(py("odd"), make_ctx(cwd=taskdir))
    assert r.output == "{1, 2}\n"  # repr when not JSON
    r = await execute(py("Jobs.nested"), make_ctx(cwd=taskdir))
    assert r.output == '"nested-ok"\n'


async def test_python_exception_sys_exit_and_bad_target(taskdir):
    r = await execute(py("boom"), make_ctx(cwd=taskdir))
    assert (r.status, r.exit_code) == ("failed", 1)
    assert "Traceback" in r.output and "RuntimeError: kaboom" in r.output
    r = await execute(py("leave", 3), make_ctx(cwd=taskdir))
    assert (r.status, r.exit_code) == ("failed", 3)
    r = await execute(py("missing"), make_ctx(cwd=taskdir))
    assert (r.status, r.exit_code) == ("failed", 2)
    assert "no attribute 'missing'" in r.output
    r = await execute(py("coro"), make_ctx(cwd=taskdir))
    assert r.exit_code == 2 and "not supported" in r.output


async def test_python_crash_is_isolated(taskdir):
    r = await execute(py("crash"), make_ctx(cwd=taskdir))
    assert (r.status, r.exit_code) == ("failed", -signal.SIGABRT)
    assert r.error == "killed by SIGABRT"
    # the node (this process) is fine and keeps running tasks
    r = await execute(py("add", 1, 1), make_ctx(cwd=taskdir))
    assert r.status == "succeeded"


async def test_python_hang_times_out(taskdir):
    r = await execute(py("hang"), make_ctx(cwd=taskdir, timeout_s=2.5, kill_grace_s=0.5))
    assert r.status == "timeout"
    assert "hanging" in r.output  # unbuffered child: output before the kill is kept


def test_pyrunner_argv_spec_and_bad_spec(taskdir):
    env = dict(os.environ, PEERD_TASK_ID="t", PYTHONPATH=os.path.dirname(os.path.dirname(pyrunner.__file__)))
    spec = json.dumps({"target": "peerd_test_taskmod:add", "args": [1, 2]})
    p = subprocess.run([sys.executable, "-m", "node.pyrunner", spec], cwd=taskdir, env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and json.loads(p.stdout.splitlines()[-1])["sum"] == 3
    for bad, why in [("{", "not valid JSON"), ("[]", "JSON object"),
                     ('{"target": "m:f", "extra": 1}', "unknown field"),
                     ('{"target": "m:f", "args": {}}', "args must be a list")]:
        p = subprocess.run([sys.executable, "-m", "node.pyrunner", bad], cwd=taskdir, env=env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == pyrunner.EXIT_BAD_SPEC and why in p.stderr, (bad, p.stderr)


async def test_escaped_writer_cannot_hold_the_run_open(tmp_path):
    # a grandchild that leaves the group (setsid) keeps the output pipe open;
    # the run still ends, after at most DRAIN_S of draining
    pidfile = tmp_path / "escaped.pid"
    run = (f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 1000' & "
           f"while [ ! -s {pidfile} ]; do sleep 0.01; done; echo done")
    t0 = trio.current_time()
    try:
        r = await execute({"type": "shell", "run": run}, make_ctx(kill_grace_s=0.5))
        assert (r.status, r.output) == ("succeeded", "done\n")
        assert trio.current_time() - t0 < DRAIN_S + 5
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def _our_zombies():
    me = str(os.getpid()).encode()
    zombies = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if rest[0] == b"Z" and rest[1] == me:
            zombies.append(int(name))
    return zombies


async def test_no_zombies_left_behind(tmp_path):
    assert _our_zombies() == []
    for i in range(10):
        cmd = {"type": "shell", "run": f"exit {i % 3}"} if i % 2 else {"type": "exec", "argv": ["true"]}
        await execute(cmd, make_ctx())
    await execute({"type": "shell", "run": "sleep 1000"}, make_ctx(timeout_s=0.3, kill_grace_s=0.2))
    assert _our_zombies() == []


async def test_node_settings_in_environment_do_not_leak_into_runs(monkeypatch):
    # an operator may pass the API token as PEERD_API_TOKEN: a task must not see it
    monkeypatch.setenv("PEERD_API_TOKEN", "secret-token")
    monkeypatch.setenv("PEERD_ETCD_PASSWORD", "pw")
    r = await execute({"type": "shell", "run": 'echo "[${PEERD_API_TOKEN-}][${PEERD_ETCD_PASSWORD-}][$PEERD_TASK_ID]"'},
                      make_ctx())
    assert r.output == "[][][backup]\n", r
