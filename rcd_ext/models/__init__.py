"""Model families for rcd-ext.

The tiny dLLM's names below load on first use: `rcd_ext.models.adapters` (which the wrapper
and the decoding loops import) must not pull in transformers. Importing the tiny model's module
(`rcd_ext.models.tiny_dllm`: any of its names from here, or `adapters.load_model`) registers it
(model type ``"rcd-tiny-dllm"``) with ``AutoConfig``, ``AutoModel`` and ``AutoModelForMaskedLM``,
so checkpoints saved with ``save_pretrained`` load through the Auto classes without
``trust_remote_code``.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "TinyDLLMConfig": "tiny_dllm",
    "TinyDLLMModel": "tiny_dllm",
    "TinyDLLMOutput": "tiny_dllm",
    "TinyKVCache": "tiny_dllm",
    "SPECIAL_TOKENS": "tiny_tokenizer",
    "build_tiny_tokenizer": "tiny_tokenizer",
    "tiny_vocab": "tiny_tokenizer",
}

__all__ = sorted(_MODULE_OF)


def register_tiny_dllm() -> None:
    """Register the tiny dLLM with the Auto classes (what importing its module does)."""
    importlib.import_module("rcd_ext.models.tiny_dllm")


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'rcd_ext.models' has no attribute {name!r}")
    module = importlib.import_module(f"rcd_ext.models.{_MODULE_OF[name]}")
    return getattr(module, name)
