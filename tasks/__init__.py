"""The task suite: model families x offline datasets, samplers, and a held-out split.

    import tasks
    task = tasks.get_task("mlp_digits")
    model = task.init(seed=0)
    batch = next(task.batches("train", seed=0))
    loss = task.loss(model, batch)

See tasks/README.md for the families and why the held-out split differs.
"""
from .data import DatasetNotFoundError
from .registry import FAMILIES, TRAIN_FAMILIES, get_suite, get_task, list_tasks, sample_task
from .task import Task

__all__ = ["Task", "FAMILIES", "TRAIN_FAMILIES", "get_task", "get_suite", "list_tasks", "sample_task",
           "DatasetNotFoundError"]
