"""Which `checkpoint-N` directories can be resumed from, and a marker that says a save finished.

A process killed mid-save, or a disk that fills up, leaves the last checkpoint torn: a truncated
model.safetensors, an optimizer.pt cut short, trainer_state.json missing. The stock Trainer's
`resume_from_checkpoint=True` takes the highest N regardless and fails inside
safetensors/torch.load, or worse, loads what is there and silently skips the rest (a missing
optimizer.pt is skipped without a word). Here a checkpoint is complete when

- it has trainer_state.json (the Trainer writes it last) that parses, a weights file, and
  the optimizer, scheduler and RNG state an exact resume needs;
- every safetensors file's header parses and the file is as long as the header says;
- every torch-saved file (.pt, .pth, .bin) is a whole zip archive (torch.save's format since
  torch 1.6; truncation destroys the zip's central directory at the end);
- if `COMPLETE_MARKER` is present (`DiffusionTrainer` writes it after fsyncing the finished
  checkpoint), every file it lists has the listed size.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import zipfile
from pathlib import Path

COMPLETE_MARKER = "rcd_checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` directory name, else None."""
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` directories of `output_dir`, highest N first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [(step, path) for path in directory.iterdir()
             if (step := checkpoint_step(path)) is not None]
    return [path for _, path in sorted(found, reverse=True)]


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` cannot be resumed from exactly ("model.safetensors truncated: ..."),
    or None when it is complete."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        return "not a directory"
    for check in (_marker_problem, _required_problem, _state_problem):
        problem = check(directory)
        if problem:
            return problem
    for path in sorted(directory.rglob("*")):
        problem = _file_problem(path) if path.is_file() else None
        if problem:
            return f"{path.relative_to(directory)} {problem}"
    return None


def _marker_problem(directory: Path) -> str | None:
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return None  # stock Trainer or killed after the last file: the other checks decide
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is unreadable"
    for name, size in sorted(sizes.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were saved"
    return None


def _required_problem(directory: Path) -> str | None:
    if not (directory / TRAINER_STATE).is_file():
        return f"{TRAINER_STATE} is missing (the save did not finish)"
    names = {path.name for path in directory.iterdir()}
    if any(name.startswith(("pytorch_model_fsdp", "optimizer_", "global_step"))
           for name in names):
        return None  # FSDP / DeepSpeed layouts: their own files, checked by the file rules only
    if not any((directory / name).is_file() for name in _WEIGHTS):
        return "no model weights file"
    for needed in ("optimizer.pt", "scheduler.pt"):
        if needed not in names:
            return f"{needed} is missing"
    if not any(name.startswith("rng_state") for name in names):
        return "rng_state.pth is missing"
    return None


def _state_problem(directory: Path) -> str | None:
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
    except ValueError:
        return f"{TRAINER_STATE} is truncated"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE} has no global_step"
    return None


def _file_problem(path: Path) -> str | None:
    if path.name.endswith(".safetensors"):
        return _safetensors_problem(path)
    if path.name.endswith(".index.json"):
        return _index_problem(path)
    if path.suffix in _TORCH_SUFFIXES:
        return None if zipfile.is_zipfile(path) else "is truncated (not a whole zip archive)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, a JSON header, then the tensor data,
    whose extent the header states: a shorter file is torn."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"is truncated ({size} bytes)"
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            return f"is truncated ({size} bytes, header alone needs {header_length + 8})"
        try:
            header = json.loads(handle.read(header_length))
        except ValueError:
            return "has an unreadable header"
    data_end = max((entry["data_offsets"][1] for key, entry in header.items()
                    if key != "__metadata__"), default=0)
    expected = 8 + header_length + data_end
    if size < expected:
        return f"is truncated ({size} of {expected} bytes)"
    return None


def _index_problem(path: Path) -> str | None:
    try:
        shards = set(json.loads(path.read_text())["weight_map"].values())
    except (ValueError, KeyError, AttributeError):
        return "is truncated"
    missing = sorted(shard for shard in shards if not (path.parent / shard).is_file())
    return f"names missing shards {missing}" if missing else None


def resumable_checkpoint(output_dir: str | os.PathLike
                         ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest complete checkpoint or None, [(newer torn checkpoint, why)])."""
    torn = []
    for checkpoint in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, torn
        torn.append((checkpoint, problem))
    return None, torn


def write_complete_marker(checkpoint: str | os.PathLike) -> Path:
    """Fsync every file of a finished checkpoint, then record their sizes in `COMPLETE_MARKER`
    (atomically, so the marker itself is never torn)."""
    from rcd_ext.atomic_files import write_json_atomic

    directory = Path(checkpoint)
    sizes = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER and not path.name.startswith("."):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            sizes[str(path.relative_to(directory))] = path.stat().st_size
    return write_json_atomic(directory / COMPLETE_MARKER, {"files": sizes})


def resolve_resume(resume: str | bool | None, output_dir: str | os.PathLike,
                   say: bool = True) -> str | None:
    """The checkpoint to hand `Trainer.train(resume_from_checkpoint=...)`.

    True: the newest complete `checkpoint-N` of `output_dir`; each newer torn one is named in
    one "warning:" line on stderr (when `say`). A path: itself, if complete. Raises ValueError
    (one line) when there is nothing complete to resume from.
    """
    if resume is None or resume is False:
        return None
    if resume is not True:
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"resume checkpoint {resume} is incomplete: {problem} (pass an "
                             "earlier checkpoint-N, or plain --resume for the last complete one)")
        return str(resume)
    chosen, torn = resumable_checkpoint(output_dir)
    if chosen is None:
        found = "; ".join(f"{path.name}: {why}" for path, why in torn)
        raise ValueError(f"no complete checkpoint to resume from in {output_dir}"
                         + (f" ({found})" if found else " (no checkpoint-N directory)")
                         + "; start over without --resume, or check --output-dir")
    for path, why in torn if say else ():
        print(f"warning: {path} is incomplete ({why}); resuming from {chosen.name} instead",
              file=sys.stderr, flush=True)
    return str(chosen)
