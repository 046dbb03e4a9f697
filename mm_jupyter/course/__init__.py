"""Course tooling: exercises written once with nbgrader's markers, their student versions, and checks.

``python -m mm_jupyter.course release DIR`` writes the student notebooks; ``python -m mm_jupyter.course
check NOTEBOOK`` runs one and reports each task's check. It depends on nbformat and nbclient (the
``jupyter`` extra) and on nothing else of mm_jupyter but its errors, so it sits beside ``jupyter/``
at the top of the package and the core never imports it.
"""
from __future__ import annotations

from .check import CheckReport, TaskResult, assess, check
from .notebook import Task, release, tasks

__all__ = ["CheckReport", "Task", "TaskResult", "assess", "check", "release", "tasks"]
