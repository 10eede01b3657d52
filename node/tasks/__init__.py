"""Tasks: the Task value and its command kinds, validation of task files and API
bodies under bounded decoders, and what applying a file would change; reading
a task file from disk is the shell ``files_shell``.

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.tasks.commands.<function>``):
    commands       Command kinds of a task (core): shell, exec, python and http
    decoding       Bounded decoders for input from outside: JSON bodies and tas
    diff           What applying a task file would change (sans-IO): ``apply --
    model          Task model (core): the :class:`Task` value, its fields, thei
    parse          Task files (core): a decoded task file, or a task file's tex
    validate       Task validation (core): one task mapping into a :class:`~nod

Shells (I/O; import them by their full path, e.g. ``node.tasks.files_shell``):
    files_shell    Task files on disk (shell): read a YAML, JSON or TOML task f
"""
from node.tasks.commands import (
    COMMAND_TYPES, Command, CommandChecks, ExecCommand, HttpCommand, PythonCommand,
    ShellCommand,
)
from node.tasks.decoding import (
    DecodeError, MAX_DEPTH, MAX_INT_DIGITS, MAX_NODES,
)
from node.tasks.model import (
    SecretError, CHAIN_ON, NOTIFY_EVENTS, MISFIRE_POLICIES, OVERLAP_POLICIES,
    OWNER_LOSS_POLICIES, Task, TaskError,
)
from node.tasks.parse import (
    TASK_FILE_SUFFIXES,
)

__all__ = [
    'COMMAND_TYPES', 'Command', 'CommandChecks', 'ExecCommand', 'HttpCommand',
    'PythonCommand', 'ShellCommand', 'DecodeError', 'MAX_DEPTH', 'MAX_INT_DIGITS',
    'MAX_NODES', 'SecretError', 'CHAIN_ON', 'NOTIFY_EVENTS', 'MISFIRE_POLICIES',
    'OVERLAP_POLICIES', 'OWNER_LOSS_POLICIES', 'Task', 'TaskError', 'TASK_FILE_SUFFIXES',
]
