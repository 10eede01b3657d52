"""`peerd demo`'s task file: the example one-shot is moved a minute into the
future, so a newcomer sees it fire instead of a skip of a date long past."""
from __future__ import annotations

import time

from node.cli.demo import demo_tasks_file, example_tasks_path
from node.tasks.files_shell import load_task_file


def test_demo_one_shot_fires_within_the_first_minutes(tmp_path):
    now = time.time()
    tasks = {t.id: t for t in load_task_file(demo_tasks_file(example_tasks_path(), tmp_path, now))}
    example = {t.id: t for t in load_task_file(example_tasks_path())}
    assert set(tasks) == set(example)
    from datetime import datetime
    when = datetime.fromisoformat(tasks["one-shot"].schedule[len("once:"):].replace("Z", "+00:00")).timestamp()
    assert now + 30 <= when <= now + 90
    assert all(tasks[i].schedule == example[i].schedule for i in tasks if i != "one-shot")
