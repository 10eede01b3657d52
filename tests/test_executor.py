"""Retries (node.run.executor_shell.execute_with_retries): timing under MockClock with a
fake execute, and a real-process retry with a counter file."""

import random
import time

import pytest
import trio

from node.run.attempt import RunContext, RunResult, parse_retries
from node.run.executor_shell import execute_with_retries
from node.run.retry import MAX_RETRIES, RetryPolicy, backoff_delay_s

SEED = 1234


def ctx_factory(**kw):
    def make(attempt: int) -> RunContext:
        d = dict(task_id="t", slot=1795734000, run_id=f"run-{attempt}", attempt=attempt, node="n1",
                 fencing_token=attempt * 10, env={}, cwd=None, timeout_s=20.0)
        d.update(kw)
        return RunContext(**d)

    return make


def result(status: str) -> RunResult:
    now = time.time()
    return RunResult(status=status, exit_code=0 if status == "succeeded" else 1, started=now,
                     finished=now, output="", error=None if status == "succeeded" else status)


class FakeExecute:
    """Returns the scripted statuses in order and records when it was called."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.calls = []  # (trio time, ctx)

    async def __call__(self, command, ctx):
        self.calls.append((trio.current_time(), ctx))
        return result(self.statuses.pop(0))


async def test_fails_twice_then_succeeds_with_computed_backoffs(autojump_clock):
    fake = FakeExecute(["failed", "timeout", "succeeded"])
    reported = []

    async def on_attempt(ctx, res):  # async callback is awaited
        await trio.sleep(0)
        reported.append((ctx.attempt, res.status))

    retries = {"max": 5, "backoff_s": 2.0, "max_backoff_s": 60.0, "multiplier": 3.0}
    final = await execute_with_retries({"type": "shell", "run": "x"}, ctx_factory(), retries,
                                       random.Random(SEED), on_attempt, execute_fn=fake)
    assert final.status == "succeeded"
    assert reported == [(1, "failed"), (2, "timeout"), (3, "succeeded")]
    assert [c.attempt for _, c in fake.calls] == [1, 2, 3]
    assert [c.run_id for _, c in fake.calls] == ["run-1", "run-2", "run-3"]
    # the sleeps are exactly retry.py's delays for retries 1 and 2, same rng stream
    rng = random.Random(SEED)
    expected = [backoff_delay_s(i, base_s=2.0, multiplier=3.0, max_s=60.0, rng=rng) for i in (1, 2)]
    times = [t for t, _ in fake.calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx(expected, abs=1e-9), f"seed={SEED}"
    assert 1.0 <= gaps[0] <= 2.0 and 3.0 <= gaps[1] <= 6.0  # equal jitter: at least half the ceiling


async def test_gives_up_after_max_retries(autojump_clock):
    fake = FakeExecute(["failed"] * 10)
    reported = []
    final = await execute_with_retries({}, ctx_factory(), {"max": 3, "backoff_s": 1.0, "max_backoff_s": 4.0,
                                                           "multiplier": 2.0},
                                       random.Random(1), lambda c, r: reported.append(c.attempt),
                                       execute_fn=fake)
    assert final.status == "failed"
    assert reported == [1, 2, 3, 4]
    assert len(fake.statuses) == 6  # no more attempts than 1 + max


async def test_errors_are_not_retried_and_no_retries_by_default(autojump_clock):
    fake = FakeExecute(["error", "succeeded"])
    final = await execute_with_retries({}, ctx_factory(), {"max": 3}, random.Random(1), execute_fn=fake)
    assert final.status == "error" and len(fake.calls) == 1
    fake = FakeExecute(["failed", "succeeded"])
    final = await execute_with_retries({}, ctx_factory(), None, random.Random(1), execute_fn=fake)
    assert final.status == "failed" and len(fake.calls) == 1


async def test_bad_retries_is_one_reported_error(autojump_clock):
    fake = FakeExecute(["succeeded"])
    reported = []
    final = await execute_with_retries({}, ctx_factory(), {"max": -1}, random.Random(1),
                                       lambda c, r: reported.append(r), execute_fn=fake)
    assert final.status == "error" and "retries.max" in final.error
    assert reported == [final] and fake.calls == []


async def test_cancel_during_backoff_stops_retrying(autojump_clock):
    fake = FakeExecute(["failed"] * 5)
    with trio.move_on_after(5.0):  # backoff is 100 s, so this cancels the first sleep
        await execute_with_retries({}, ctx_factory(), {"max": 4, "backoff_s": 100.0, "max_backoff_s": 100.0,
                                                       "multiplier": 1.0, "jitter": "equal"},
                                   random.Random(1), execute_fn=fake)
    assert len(fake.calls) == 1


async def test_on_start_precedes_each_attempt(autojump_clock):
    fake = FakeExecute(["failed", "succeeded"])
    events = []

    async def on_start(ctx):
        events.append(("start", ctx.attempt, len(fake.calls)))

    await execute_with_retries({}, ctx_factory(), {"max": 2, "backoff_s": 1.0}, random.Random(1),
                               lambda c, r: events.append(("done", c.attempt, r.status)),
                               on_start=on_start, execute_fn=fake)
    assert events == [("start", 1, 0), ("done", 1, "failed"), ("start", 2, 1), ("done", 2, "succeeded")]


class TaskRetryPolicy:  # duck-typed like node.run.retry.RetryPolicy
    max, backoff_s, max_backoff_s, multiplier = 3, 0.5, 8.0, 3.0


class TaskCommand:  # like node.tasks.commands command classes
    def to_dict(self):
        return {"type": "shell", "run": "echo from-to-dict"}


async def test_accepts_task_model_objects_and_spellings():
    r = await execute_with_retries(TaskCommand(), ctx_factory(), {"max": 0}, random.Random(1))
    assert (r.status, r.output) == ("succeeded", "from-to-dict\n")


@pytest.mark.parametrize(
    ("raw", "policy"),
    [
        (None, RetryPolicy()),
        ({"max": 2, "backoff": 3, "max_backoff": 9, "multiplier": 1.5},
         RetryPolicy(max=2, backoff_s=3.0, max_backoff_s=9.0, multiplier=1.5)),
        (TaskRetryPolicy(), RetryPolicy(max=3, backoff_s=0.5, max_backoff_s=8.0, multiplier=3.0)),
        ({"max": 2}, RetryPolicy(max=2)),
        ({"max": 1, "backoff_s": 0, "max_backoff_s": 0.5, "multiplier": 1, "jitter": "equal"},
         RetryPolicy(max=1, backoff_s=0.0, max_backoff_s=0.5, multiplier=1.0, jitter="equal")),
    ],
)
def test_parse_retries(raw, policy):
    assert parse_retries(raw) == policy


@pytest.mark.parametrize(
    "raw",
    [{"max": MAX_RETRIES + 1}, {"max": True}, {"max": 1.5}, {"backoff_s": -1}, {"multiplier": 0.5},
     {"max_backoff_s": float("inf")}, {"jitter": "none"}, {"backoff_ms": 1}, {"backoff": 1, "backoff_s": 2},
     [1, 2]],
)
def test_parse_retries_rejects(raw):
    with pytest.raises(ValueError):
        parse_retries(raw)


async def test_real_process_fails_twice_then_succeeds(tmp_path):
    counter = tmp_path / "count"
    seen = tmp_path / "seen"
    run = (f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; '
           f'echo "$PEERD_ATTEMPT $PEERD_RUN_ID $PEERD_FENCING_TOKEN" >> {seen}; '
           f'echo "attempt $n"; [ "$n" -ge 3 ]')
    records = []
    final = await execute_with_retries(
        {"type": "shell", "run": run}, ctx_factory(), {"max": 5, "backoff_s": 0.01, "max_backoff_s": 0.05,
                                                       "multiplier": 2.0},
        random.Random(SEED), lambda c, r: records.append((c.attempt, r.status, r.exit_code, r.output)))
    assert final.status == "succeeded"
    assert records == [(1, "failed", 1, "attempt 1\n"), (2, "failed", 1, "attempt 2\n"),
                       (3, "succeeded", 0, "attempt 3\n")]
    assert seen.read_text().splitlines() == ["1 run-1 10", "2 run-2 20", "3 run-3 30"]
