"""Name -> task class registry: ``get_task("pointer_chasing", hops=6)``."""

from __future__ import annotations

from typing import Any, TypeVar

from rcd_ext.registry import Registry
from rcd_ext.tasks.task import Task

__all__ = ["TASKS", "get_task", "register_task", "task_names"]

TASKS: Registry[type[Task]] = Registry("task")
TaskClass = TypeVar("TaskClass", bound=type[Task])


def register_task(cls: TaskClass) -> TaskClass:
    """Class decorator: make ``cls`` available to :func:`get_task` under ``cls.name``."""
    return TASKS.register(cls.name, cls)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with its keyword arguments."""
    return TASKS.get(name)(**kwargs)


def task_names() -> list[str]:
    """Names accepted by :func:`get_task`, sorted."""
    return sorted(TASKS.names())
