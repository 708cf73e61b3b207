"""Name -> task class registry: ``get_task("pointer_chasing", hops=6)``."""

from __future__ import annotations

from typing import Any, TypeVar

from rcd_ext.tasks.task import Task

__all__ = ["get_task", "register_task", "task_names"]

_TASKS: dict[str, type[Task]] = {}
TaskClass = TypeVar("TaskClass", bound=type[Task])


def register_task(cls: TaskClass) -> TaskClass:
    """Class decorator: make ``cls`` available to :func:`get_task` under ``cls.name``."""
    existing = _TASKS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"task name {cls.name!r} is already used by {existing.__name__}")
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with its keyword arguments."""
    try:
        cls = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {task_names()}") from None
    return cls(**kwargs)


def task_names() -> list[str]:
    """Names accepted by :func:`get_task`, sorted."""
    return sorted(_TASKS)
