"""Offline lm-eval task YAMLs shipped with rcd-ext; pass `tasks_dir()` to `--include_path`.

Tasks: rcd_gsm8k_cot, rcd_minerva_math500, rcd_minerva_math (group of the seven
rcd_minerva_math_* subjects), rcd_aime (your JSONL), rcd_pointer_chasing, rcd_branching_walk,
rcd_coupled_choices.
Data loading and scoring live in `rcd_tasks` (see its docstring for where files are found).
"""

from pathlib import Path


def tasks_dir() -> Path:
    """The folder holding the task YAMLs (the value for lm-eval's --include_path)."""
    return Path(__file__).resolve().parent
