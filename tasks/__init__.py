"""Tasks: the protocol (``base``), the synthetic default task and real benchmarks."""

from tokenbench.tasks.base import Sample, Task, TaskDataError

__all__ = ["Sample", "Task", "TaskDataError"]
