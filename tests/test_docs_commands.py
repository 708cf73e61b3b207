"""The README's and docs' code runs as written, as far as this machine can run it.

- Every ```python block compiles, and every rcd_ext name it imports or reaches through an imported
  rcd_ext module exists (renamed APIs break here, not in a user's hands).
- Blocks that need nothing but this package run for real (RUNNABLE, with the names they assume
  from the surrounding prose bound by a preamble).
- Every `rcd ...` command line in a ```bash block parses with the real `rcd` parser.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from rcd_ext.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(label, source) of every fenced block in `language`, labelled file:line."""
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                blocks.append((f"{document.relative_to(ROOT)}:{line}", match.group(2)))
    return blocks


PYTHON_BLOCKS = code_blocks("python")
BASH_BLOCKS = code_blocks("bash")

# Blocks that run here, keyed by their first line; the value binds what the prose around the
# block assumes (a model's logits, a checkpoint) from the shipped tiny demo checkpoints.
TINY_PREAMBLE = """
import torch
from importlib.resources import files
from rcd_ext.models.adapters import load_model
_path = str(files("rcd_ext.demo") / "checkpoints" / "rcd")
model, tokenizer = load_model(_path)
_ids = torch.full((1, 8), model.config.mask_token_id)
model_logits = model(input_ids=_ids).logits[0]
masked = torch.ones(8, dtype=torch.bool)
mask_id = model.config.mask_token_id
"""
RUNNABLE = {  # a line that identifies the block -> its preamble
    "model = TinyDLLMModel(config)": "",  # docs/tiny-model-and-tasks.md: builds its own model
    "embeds, alpha = ops.residual_context(": TINY_PREAMBLE,  # README: the fused op
}


def resolve_rcd_names(tree: ast.AST) -> list[str]:
    """Every `rcd_ext...` name the code imports or reads through an imported rcd_ext module;
    returns those that do not exist."""
    missing, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rcd_ext"):
                    importlib.import_module(alias.name)
                    modules[(alias.asname or alias.name).split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rcd_ext"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name}")
                        continue
                value = getattr(module, alias.name, None) or importlib.import_module(
                    f"{node.module}.{alias.name}")
                if hasattr(value, "__path__") or type(value).__name__ == "module":
                    modules[alias.asname or alias.name] = value.__name__
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            module = importlib.import_module(modules[node.value.id])
            if not hasattr(module, node.attr):
                missing.append(f"{module.__name__}.{node.attr}")
    return missing


@pytest.mark.parametrize("label,source", PYTHON_BLOCKS, ids=[b[0] for b in PYTHON_BLOCKS])
def test_python_block_compiles_and_its_rcd_names_exist(label, source):
    tree = ast.parse(source, filename=label)
    assert resolve_rcd_names(tree) == [], label


def runnable_blocks() -> list[tuple[str, str, str]]:
    return [(label, source, preamble) for label, source in PYTHON_BLOCKS
            for key, preamble in RUNNABLE.items() if key in source]


def test_every_runnable_block_is_found_once():
    assert sorted(key for _, source in PYTHON_BLOCKS for key in RUNNABLE
                  if key in source) == sorted(RUNNABLE)


@pytest.mark.parametrize("label,source,preamble", runnable_blocks(),
                         ids=[b[0] for b in runnable_blocks()])
def test_runnable_block_runs(label, source, preamble):
    namespace: dict = {}
    exec(compile(preamble, "<preamble>", "exec"), namespace)
    exec(compile(source, label, "exec"), namespace)


def rcd_command_lines() -> list[tuple[str, list[str]]]:
    """(label, argv after `rcd`) of each `rcd ...` command in the bash blocks, except those
    whose options are elided (`rcd train ... --resume`)."""
    commands = []
    for label, source in BASH_BLOCKS:
        joined = source.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in re.split(r"&&|;", line):
                words = shlex.split(part) if part.strip() else []
                if words[:1] == ["rcd"] and words[2:3] != ["..."]:
                    commands.append((label, words[1:]))
    return commands


RCD_COMMANDS = rcd_command_lines()


def test_docs_show_rcd_commands():
    assert {argv[0] for _, argv in RCD_COMMANDS} >= {"demo", "generate", "train"}


@pytest.mark.parametrize("label,argv", RCD_COMMANDS,
                         ids=[f"{label}:{' '.join(argv)[:40]}" for label, argv in RCD_COMMANDS])
def test_rcd_command_line_parses(label, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as error:  # argparse's way of refusing
        pytest.fail(f"{label}: `rcd {' '.join(argv)}` does not parse (exit {error.code})")
