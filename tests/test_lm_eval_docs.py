"""Every lm-eval command in the README and docs names models, model_args and tasks that exist,
with values `check_model_args` accepts (the checks a real run makes first, without the run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rcd_ext.integrations.lm_eval_args import CheckpointFacts, check_model_args
from rcd_ext.integrations.lm_eval_tasks import tasks_dir

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
ASSIGNMENT = re.compile(r'^([A-Z_][A-Z0-9_]*)=("[^"]*"|\S*)\s*$')
PROGRAMS = ("lm_eval", "lm-eval", "rcd-lm-eval")


def expand(line: str, variables: dict[str, str]) -> str:
    """$NAME -> its value in `variables`, else "PATH" (a checkpoint the reader downloads)."""
    return re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: variables.get(m.group(1), "PATH"), line)


def lm_eval_commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv) of every lm-eval command line in a ```bash block, continuation lines
    joined, shell variables assigned in the block expanded, `$(rcd eval tasks-dir)` resolved."""
    commands = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            first_line = text.count("\n", 0, block.start()) + 2
            variables = {"TASKS": str(tasks_dir())}
            source = block.group(1).replace("\\\n", " ")
            for offset, line in enumerate(source.splitlines()):
                line = line.split(" #")[0].strip()
                assigned = ASSIGNMENT.match(line)
                if assigned:
                    variables[assigned.group(1)] = assigned.group(2).strip('"')
                    continue
                if line.split()[:1] not in [[program] for program in PROGRAMS]:
                    continue
                line = line.replace("$(rcd eval tasks-dir)", str(tasks_dir()))
                argv = shlex.split(expand(line, variables))
                if argv:
                    label = f"{document.relative_to(ROOT)}:{first_line + offset}"
                    commands.append((label, argv))
    return commands


COMMANDS = lm_eval_commands()
SHIPPED_TASKS = {path.stem for path in tasks_dir().glob("rcd_*.yaml")}


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_docs_show_plain_lm_eval_and_the_wrapper() -> None:
    programs = {argv[0] for _, argv in COMMANDS}
    assert {"lm_eval", "rcd-lm-eval"} <= programs, COMMANDS


@pytest.mark.parametrize("label, argv", COMMANDS, ids=[label for label, _ in COMMANDS])
def test_lm_eval_command_in_the_docs_is_accepted(label, argv) -> None:
    model = option(argv, "--model")
    assert model in ("rcd", "seqd"), f"{label}: --model {model}"
    pairs = dict(item.split("=", 1) for item in option(argv, "--model_args").split(","))
    pretrained = ROOT / pairs["pretrained"]
    facts = None if pretrained.is_dir() else CheckpointFacts()  # a hub model: sizes unknown
    if facts is None:
        pairs["pretrained"] = str(pretrained)
    check_model_args(model, pairs, residuals_default=model == "rcd", facts=facts)
    tasks = option(argv, "--tasks").split(",")
    assert set(tasks) <= SHIPPED_TASKS, f"{label}: unknown tasks {set(tasks) - SHIPPED_TASKS}"
    assert option(argv, "--include_path") == str(tasks_dir()), label
