"""A node's run output (shell): a running attempt's live output, its output
file on disk, and the logs API read from them or from the run record.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path


from node.core_effects import claim_run_id
from node.api.messages import HTTPError
from node.tasks.model import Task


log = logging.getLogger("peerd.node")

#: Live output kept per running attempt (the oldest bytes are dropped).
LIVE_OUTPUT_BYTES = 1 << 20
#: Most output one logs call returns.
LOGS_CHUNK_BYTES = 256 * 1024


class OutputFile:
    """A run's whole output on disk, up to ``max_bytes`` (plain writes of
    the chunks the pipe gives; the file is the node's own)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.left = max_bytes
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        if self.fd is None or self.left <= 0:
            return
        chunk = data[: self.left]
        try:
            os.write(self.fd, chunk)
            self.left -= len(chunk)
            if self.left <= 0:
                os.write(self.fd, b"\n[peerd: output file limit reached; the rest is in the record's tail]\n")
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LiveOutput:
    """A running attempt's output: the last ``LIVE_OUTPUT_BYTES`` with their
    byte offsets, and the output file when the task keeps one."""

    __slots__ = ("buf", "base", "file")

    def __init__(self, file: OutputFile | None = None) -> None:
        self.buf = bytearray()
        self.base = 0
        self.file = file

    def feed(self, data: bytes) -> None:
        self.buf += data
        excess = len(self.buf) - LIVE_OUTPUT_BYTES
        if excess > 0:
            del self.buf[:excess]
            self.base += excess
        if self.file is not None:
            self.file.write(data)

    def read(self, offset: int) -> tuple[bytes, int, int]:
        """``(data, its start offset, next offset)`` from ``offset`` (or
        from the oldest byte kept)."""
        start = max(offset, self.base)
        i = start - self.base
        data = bytes(self.buf[i:i + LOGS_CHUNK_BYTES])
        return data, start, start + len(data)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _logs_from_record(rec: dict, offset: int, node: str) -> dict:
    raw = (rec.get("output") or "").encode("utf-8", "replace")
    data = raw[max(0, offset):][:LOGS_CHUNK_BYTES]
    return {"run_id": rec.get("run_id"), "node": node, "running": rec.get("status") == "running",
            "offset": offset, "next_offset": offset + len(data), "skipped": 0,
            "data": data.decode("utf-8", "replace"), "source": "record"}


class RunOutputMixin:
    """Run output and logs: a mixin of :class:`node.shell.Node`, whose
    constructor holds the state it uses."""

    # ------------------------------------------------------------ run output
    def _output_file(self, task: Task, attempt_id: str) -> OutputFile | None:
        """``output: {keep: file}``: the run's whole output (up to max_bytes)
        in ``<data_dir>/output/<task>/<run id>.log``; the task's newest
        ``history`` files are kept."""
        if not task.output or task.output.get("keep") != "file":
            return None
        path = self._output_path(task.id, attempt_id)
        d = path.parent
        try:
            d.mkdir(parents=True, exist_ok=True)
            old = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
            for f in old[: max(0, len(old) - task.history + 1)]:
                f.unlink(missing_ok=True)
            return OutputFile(path, int(task.output["max_bytes"]))
        except OSError as e:
            log.warning("cannot keep the run's output in a file: %s", e,
                        extra={"task_id": task.id, "run_id": attempt_id})
            return None

    def _output_path(self, task_id: str, attempt_id: str) -> Path:
        """Where ``output: {keep: file}`` keeps one attempt's output."""
        return self.cfg.data_path() / "output" / task_id / (attempt_id.replace("/", "_") + ".log")

    def _find_run(self, run_id: str) -> dict | None:
        """A run record this node holds, by attempt run id or, for a claim
        run id, its latest attempt."""
        store = self.store
        for tid in store.run_tasks():
            rec = store.run_record(tid, run_id)
            if rec is not None:
                return rec
        attempts = [r for tid in store.run_tasks() for r in store.runs(tid) if claim_run_id(r) == run_id]
        return max(attempts, key=lambda r: r.get("attempt") or 0, default=None)

    async def run_logs(self, run_id: str, offset: int) -> dict:
        """A run's output from byte ``offset``: live from the node that runs
        it, then its output file (``output: {keep: file}``) or its record's
        tail."""
        if run_id in self._live or run_id in self._live_by_claim:
            return self._logs_local(run_id, offset)
        runner, rec = self._runner_of(run_id)
        if runner is None:
            raise HTTPError(404, f"run {run_id[:80]!r}: no such run known here")
        if runner == self.name:
            return self._logs_local(run_id, offset)
        if self._member_state(runner) in (None, "dead", "left"):
            if rec is None:
                raise HTTPError(404, f"run {run_id}: its node {runner} is not reachable and no record is here")
            return _logs_from_record(self.store.with_output(rec), offset, self.name)
        rep = await self._request(runner, {"t": "logs", "run_id": run_id, "offset": offset})
        return rep.get("body") or {}

    def _logs_local(self, run_id: str, offset: int) -> dict:
        aid = self._live_by_claim.get(run_id, run_id)
        live = self._live.get(aid)
        if live is not None:
            data, start, nxt = live.read(offset)
            return {"run_id": aid, "node": self.name, "running": True, "offset": start, "next_offset": nxt,
                    "skipped": max(0, start - offset), "data": data.decode("utf-8", "replace")}
        rec = self._find_run(run_id)
        if rec is None:
            raise HTTPError(404, f"run {run_id[:80]!r}: no such run on {self.name}")
        task = self.core.tasks.get(rec.get("task_id"))
        if task is not None and task.output and task.output.get("keep") == "file":
            path = self._output_path(task.id, str(rec["run_id"]))
            try:
                with open(path, "rb") as fh:
                    fh.seek(max(0, offset))
                    data = fh.read(LOGS_CHUNK_BYTES)
                return {"run_id": rec["run_id"], "node": self.name, "running": rec.get("status") == "running",
                        "offset": offset, "next_offset": offset + len(data), "skipped": 0,
                        "data": data.decode("utf-8", "replace"), "source": "file"}
            except OSError:
                pass
        return _logs_from_record(self.store.with_output(rec), offset, self.name)
