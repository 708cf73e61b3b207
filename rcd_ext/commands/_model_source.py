"""Where a `--model`-like argument loads from, decided before anything loads.

    resolve_model_source("--model", "/ckpt/llada")   # a local checkpoint directory
    resolve_model_source("--model", "GSAI-ML/LLaDA-8B-Instruct")   # a Hugging Face hub id

A value that looks like a path (absolute, ./, ../, ~, more than one "/", or an existing path)
must be a directory with a config.json. Anything else is a hub id: with HF_HUB_OFFLINE set it
must be in the local cache; otherwise one short request asks the hub whether it exists. When
the hub cannot be reached, a cached copy is used by its local folder (transformers would
otherwise retry the network for half a minute) and an uncached id is refused at once.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from rcd_ext.commands._usage import UsageError

__all__ = ["HUB_TIMEOUT_S", "looks_like_path", "resolve_model_source"]

HUB_TIMEOUT_S = 5.0  # one metadata request; a reachable hub answers in well under a second
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def looks_like_path(value: str) -> bool:
    """Whether `value` can only be meant as a local path (not a hub id)."""
    return (value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..")
            or os.sep in value.replace("/", "", 1) or "\\" in value
            or not _HUB_ID.match(value) or ".." in value or "--" in value)


def resolve_model_source(option: str, value: str) -> str:
    """The string to pass to `from_pretrained` for `value`, or UsageError naming `option`."""
    local = Path(value).expanduser()
    if local.exists() or looks_like_path(value):
        return str(_check_checkpoint_dir(option, value, local))
    return _resolve_hub_id(option, value)


def _check_checkpoint_dir(option: str, value: str, directory: Path) -> Path:
    if not directory.exists():
        raise UsageError(f"{option} {value}: no such directory (give a checkpoint directory "
                         "saved with save_pretrained, or a hub id such as org/name)")
    if not directory.is_dir():
        raise UsageError(f"{option} {value}: is a file (give the checkpoint's directory)")
    if not (directory / "config.json").is_file():
        raise UsageError(f"{option} {value}: no config.json in this directory (give a "
                         "directory saved with save_pretrained)")
    return directory


def _cached_snapshot(repo_id: str) -> str | None:
    """The local folder of a cached hub model (its config.json present), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (Path(folder) / "config.json").is_file() else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _probe_hub(repo_id: str) -> None:
    """Raise what the hub says about `repo_id` (not found, unreachable); None if it exists."""
    from huggingface_hub import model_info

    model_info(repo_id, timeout=HUB_TIMEOUT_S)


def _resolve_hub_id(option: str, repo_id: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    cached = _cached_snapshot(repo_id)
    if _hub_offline():
        if cached is None:
            raise UsageError(f"{option} {repo_id}: not in the local Hugging Face cache and "
                             "HF_HUB_OFFLINE is set (unset it to download, or give a local "
                             "checkpoint directory)")
        return repo_id
    try:
        _probe_hub(repo_id)
    except RepositoryNotFoundError:
        raise UsageError(f"{option} {repo_id}: no such model on the Hugging Face hub, nor a "
                         "local directory (check the name; for a private model run "
                         "`huggingface-cli login`)") from None
    except HfHubHTTPError:
        return repo_id  # gated, rate-limited, server error: let the download say what it is
    except OSError as error:  # requests' ConnectionError and Timeout are OSErrors
        if cached is None:
            raise UsageError(f"{option} {repo_id}: no such local directory, and as a hub id: "
                             f"the Hugging Face hub cannot be reached ({type(error).__name__}) "
                             "and the model is not cached (check the path, or download the "
                             "model where the hub is reachable)") from None
        print(f"rcd: the Hugging Face hub cannot be reached; {option} {repo_id} loads from the "
              f"cache at {cached}", file=sys.stderr)
        return cached
    return repo_id
