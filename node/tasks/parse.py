"""Task files (core): a decoded task file, or a task file's text, into validated tasks.

A task file is a list of task mappings or ``{tasks: [...]}`` (YAML, JSON) or
an array of tables ``[[tasks]]`` (TOML). Every error of the file is collected
and a file with any error yields no tasks (node/tasks/validate.py has the
rules of one task). Reading the file is node/tasks/files_shell.py, which hands
its text to :func:`parse_task_text`.
"""

from __future__ import annotations

import tomllib
from pathlib import PurePath
from typing import Any

from node.tasks.decoding import DecodeError, check_tree, format_path, loads_json, loads_yaml
from node.tasks.model import MAX_TASKS_PER_FILE, Task, TaskError, valid_id

__all__ = [
    "TASK_FILE_SUFFIXES",
    "decode_error_message",
    "parse_task_text",
    "parse_tasks",
    "task_file_suffix",
]


def parse_tasks(data: Any, source: str) -> list[Task]:
    """Validate already-decoded task-file data.

    Args:
        data: a list of task mappings, or ``{"tasks": [...]}``.
        source: name used in error messages (usually the file name).

    Returns:
        The tasks, in file order.

    Raises:
        TaskError: every error in the file; no tasks are returned then.
    """
    if isinstance(data, dict):
        extra = sorted(str(k) for k in data if k != "tasks")
        if extra or "tasks" not in data:
            raise TaskError([f"{source}: expected a list of tasks or a mapping with only 'tasks'"
                             + (f" (unknown keys: {', '.join(extra)})" if extra else "")])
        data = data["tasks"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise TaskError([f"{source}: expected a list of tasks or a mapping with 'tasks'"])
    if len(data) > MAX_TASKS_PER_FILE:
        raise TaskError([f"{source}: more than {MAX_TASKS_PER_FILE} tasks"])
    errors: list[str] = []
    tasks: list[Task] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(data):
        try:
            task = Task.from_dict(item, source=source, index=i)
        except TaskError as exc:
            errors.extend(exc.errors)
            task = None
        tid = item.get("id") if isinstance(item, dict) else None
        if isinstance(tid, str):
            if tid in first_index:
                errors.append(f"{source}: task {tid!r}: id: duplicate (also task #{first_index[tid] + 1})")
            else:
                first_index[tid] = i
        if task is not None:
            tasks.append(task)
    if errors:
        raise TaskError(errors)
    return tasks


def decode_error_message(data: Any, exc: DecodeError, source: str) -> str:
    """Name the file, the task and the field of a decoding error.

    Args:
        data: the decoded document (None if it could not be decoded at all).
        exc: the error, whose ``path`` starts at the document's root.
        source: the file name (or ``request``).
    """
    path = exc.path
    items = data
    if isinstance(data, dict) and path[:1] == ("tasks",):
        items, path = data.get("tasks"), path[1:]
    if isinstance(items, list) and path and isinstance(path[0], int) and path[0] < len(items):
        item = items[path[0]]
        tid = item.get("id") if isinstance(item, dict) else None
        named = valid_id(tid) and path[1:2] != ("id",)  # a doubled id names the task by position
        who = f"task {tid!r}" if named else f"task #{path[0] + 1}"
        field = format_path(path[1:])
        return f"{source}: {who}: {field + ': ' if field else ''}{exc.reason}"
    where = format_path(exc.path)
    return f"{source}: {where + ': ' if where else ''}{exc.reason}"


#: Task-file name endings: YAML, JSON and TOML.
TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


def task_file_suffix(source: str) -> str:
    """The ending of a task file's name, lower case.

    Raises:
        TaskError: not one of :data:`TASK_FILE_SUFFIXES`.
    """
    suffix = PurePath(source).suffix.lower()
    if suffix not in TASK_FILE_SUFFIXES:
        raise TaskError([f"{source}: unknown file type (use .yaml, .yml, .json or .toml)"])
    return suffix


def parse_task_text(text: str, source: str) -> list[Task]:
    """Decode and validate the text of a YAML (.yaml/.yml), JSON (.json) or
    TOML (.toml) task file; the format is read from the name ``source``.

    TOML files hold a top-level array of tables ``[[tasks]]``; YAML and JSON
    hold a list or ``{tasks: [...]}``.

    Raises:
        TaskError: unknown file type, undecodable or invalid; messages start
            with ``source``.
    """
    suffix = task_file_suffix(source)
    kind = {".json": "JSON", ".toml": "TOML"}.get(suffix, "YAML")
    data = None
    try:
        if suffix == ".json":
            data = loads_json(text, check=False)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = loads_yaml(text, check=False)
        check_tree(data)
    except DecodeError as exc:
        raise TaskError([decode_error_message(data, exc, source)]) from None
    except Exception as exc:  # tomllib's errors, or its recursion on deep nesting
        msg = " ".join(str(exc).split())
        raise TaskError([f"{source}: not valid {kind}: {msg}"]) from None
    return parse_tasks(data, source)
