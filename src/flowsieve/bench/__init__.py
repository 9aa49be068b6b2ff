"""The benchmark: evaluation tasks (and, later, the runner, store and report)."""

from flowsieve.bench.tasks import TASKS, Item, Task, get_task

__all__ = ["TASKS", "Item", "Task", "get_task"]
