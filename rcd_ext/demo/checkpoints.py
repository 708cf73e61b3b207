"""The demo's three models: the shipped small checkpoints, or the same recipe trained fresh.

Recipe (coupled choices, 2 rows of 8 symbols; tiny dLLM d=64, 2 layers, ~100k parameters):
stage 1 SeqD for `stage1` steps -> `reference`; from it, `stage2` more steps of SeqD -> `seqd`
(the equal-budget baseline) and of RCD (previous-step residuals) -> `rcd`. The shipped
checkpoints were made with `rcd demo --train --save-checkpoints rcd_ext/demo/checkpoints`,
which runs exactly these `rcd train` commands (see docs/training.md):

    rcd train --stage seqd --model tiny --data task:coupled_choices --max-steps 1000 \
              --output-dir reference
    rcd train --stage seqd --model reference --data task:coupled_choices --max-steps 500 \
              --seed 1 --output-dir seqd
    rcd train --stage rcd --reference reference --data task:coupled_choices --max-steps 500 \
              --seed 1 --output-dir rcd
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from torch import nn

SHIPPED = Path(__file__).parent / "checkpoints"
NAMES = ("reference", "seqd", "rcd")


def shipped_available(directory: Path = SHIPPED) -> bool:
    """Whether all three checkpoints are present under `directory`."""
    return all((directory / name / "config.json").is_file() for name in NAMES)


def load_checkpoints(directory: Path = SHIPPED) -> dict[str, nn.Module]:
    """{"reference", "seqd", "rcd"} -> model in eval mode."""
    from rcd_ext.models.adapters import load_model

    return {name: load_model(str(directory / name))[0] for name in NAMES}


def train_checkpoints(directory: Path, task: str = "task:coupled_choices", stage1: int = 1000,
                      stage2: int = 500, batch_size: int = 128, quiet: bool = True,
                      seed: int = 0, tiny_options: tuple[str, ...] = (),
                      threads: int | None = None) -> None:
    """Run the recipe's three `rcd train` commands into `directory`/{reference,seqd,rcd}.

    task: `--data` (task:NAME or a .jsonl file).
    seed: stage 1's seed; stage 2 uses seed + 1 (the shipped checkpoints: seed 0).
    tiny_options: more `rcd train` options for the fresh reference (sizes, --tokenize, --test).
    threads: `--threads` of every command (default: this process's torch threads, which the
        demo set; the commands run in this process)."""
    import torch

    from rcd_ext.cli import main

    common = ["--data", task, "--batch-size", str(batch_size), "--save-steps", "1000000",
              "--logging-steps", str(max(1, stage1 // 4) if not quiet else 10**9)]
    common += ["--threads", str(threads or torch.get_num_threads())]
    commands = {
        "reference": ["--stage", "seqd", "--model", "tiny", "--max-steps", str(stage1),
                      "--seed", str(seed), *tiny_options],
        "seqd": ["--stage", "seqd", "--model", str(directory / "reference"),
                 "--max-steps", str(stage2), "--seed", str(seed + 1)],
        "rcd": ["--stage", "rcd", "--reference", str(directory / "reference"),
                "--max-steps", str(stage2), "--seed", str(seed + 1)],
    }
    for name, arguments in commands.items():
        began = time.perf_counter()
        command = ["train", *arguments, *common, "--output-dir", str(directory / name)]
        if main(command) != 0:  # the CLI reports its own error and returns 2
            raise RuntimeError(f"training the demo's {name} model failed: rcd {' '.join(command)}")
        for resumable in (directory / name).glob("checkpoint-*"):
            # Trainer's end-of-run checkpoint (weights + optimizer): the demo needs the weights
            shutil.rmtree(resumable)
        print(f"  trained {name} ({time.perf_counter() - began:.0f}s)", flush=True)
