"""Task files on disk (shell): read a YAML, JSON or TOML task file and validate its text.

The decoding and the checks are the core's (node/tasks/parse.py); this module
only opens the file, bounds what it reads and decodes UTF-8.
"""

from __future__ import annotations

import os
from pathlib import Path

from node.tasks.model import Task, TaskError
from node.tasks.parse import parse_task_text, task_file_suffix

__all__ = ["MAX_TASK_FILE_BYTES", "load_task_file"]

#: Task files larger than this are refused before they are parsed.
MAX_TASK_FILE_BYTES = 64 << 20


def load_task_file(path: str | os.PathLike) -> list[Task]:
    """Load and validate a YAML (.yaml/.yml), JSON (.json) or TOML (.toml) file.

    TOML files hold a top-level array of tables ``[[tasks]]``; YAML and JSON
    hold a list or ``{tasks: [...]}``.

    Raises:
        TaskError: unreadable, undecodable or invalid; messages start with the
            file name.
    """
    source = str(path)
    task_file_suffix(source)  # an unknown file type is refused before reading
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_TASK_FILE_BYTES + 1)
        if len(raw) > MAX_TASK_FILE_BYTES:
            raise TaskError([f"{source}: larger than {MAX_TASK_FILE_BYTES >> 20} MiB"])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError([f"{source}: cannot read: {exc}"]) from None
    return parse_task_text(text, source)
