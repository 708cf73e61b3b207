"""Synthetic tasks for training and evaluating tiny dLLMs (exact match, held-out test split).

``get_task(name, **kwargs)`` builds a task; ``task_names()`` lists them:

* ``pointer_chasing``: follow a permutation k times (one correct answer, beliefs near one-hot).
* ``coupled_choices``: copy one of R candidate rows per segment (R**segments correct answers;
  beliefs exactly 1/R until one position of a segment is committed, then one-hot).
* ``switching_chase``: a 16-token walk through two permutations, switched per step by the
  prompt (each token one lookup from the one before it: a long chain of dependent tokens).
* ``branching_walk``: a walk on a random out-degree-d graph (d**k correct answers, soft and
  multi-modal beliefs that sharpen as neighbours are committed).

Every task implements :class:`Task`: ``symbols``, ``prompt_length``, ``answer_length``,
``sample_train(batch_size, generator)``, ``test_set(n, seed)``, ``is_correct``/``score`` (a
verifier over the prompt, so any valid answer counts), text forms and ``to_jsonl``.
"""

from rcd_ext.tasks.branching_walk import BranchingWalk
from rcd_ext.tasks.coupled_choices import CoupledChoices
from rcd_ext.tasks.pointer_chasing import PointerChasing
from rcd_ext.tasks.registry import get_task, register_task, task_names
from rcd_ext.tasks.switching_chase import SwitchingChase
from rcd_ext.tasks.task import Task

__all__ = [
    "BranchingWalk",
    "CoupledChoices",
    "PointerChasing",
    "SwitchingChase",
    "Task",
    "get_task",
    "register_task",
    "task_names",
]
