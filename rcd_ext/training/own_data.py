"""A fresh tiny dLLM for a user's JSONL data: tokenizer from the training rows, context sized
from the longest row.

    rows = read_text_rows("train.jsonl")
    model, tokenizer = tiny_model_for_rows(rows, unit="words", extra_rows=test_rows)

The tokenizer knows every token of the training rows (whitespace words, or characters) and
nothing else: tokens that only a test file holds are reported by `unseen_test_tokens`, never
mapped to the unknown token silently. The context (`max_position_embeddings`) is the longest
row, prompt + response + EOS, over the training rows and `extra_rows` (a test file's rows
are decoded by the same model, so their length counts; their tokens do not).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rcd_ext.models.tiny_tokenizer import (
    count_unknown_tokens,
    describe_unknown_counts,
    tokenizer_from_texts,
)
from rcd_ext.training.jsonl_rows import TextRow

__all__ = ["context_length", "tiny_model_for_rows", "unseen_test_tokens"]


def row_texts(rows: Sequence[TextRow]) -> list[str]:
    """Every prompt and response text of `rows`."""
    return [text for row in rows for text in (row.prompt, row.response)]


def context_length(rows: Sequence[TextRow], tokenizer: Any, append_eos: bool = True) -> int:
    """Tokens of the longest row: prompt + response (+ EOS)."""
    prompts = tokenizer([row.prompt for row in rows])["input_ids"]
    responses = tokenizer([row.response for row in rows], add_special_tokens=False)["input_ids"]
    return max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)) + append_eos


def tiny_model_for_rows(rows: Sequence[TextRow], unit: str = "words", *,
                        extra_rows: Sequence[TextRow] = (), hidden_size: int = 64,
                        layers: int = 2, heads: int = 4, seed: int = 0,
                        append_eos: bool = True) -> tuple[nn.Module, Any]:
    """(fresh tiny dLLM, tokenizer) for `rows`: the vocabulary of the rows (`unit` "words" or
    "chars"), the context of the longest row of `rows` and `extra_rows`."""
    from rcd_ext.models import TinyDLLMConfig, TinyDLLMModel

    tokenizer = tokenizer_from_texts(row_texts(rows), unit)
    context = context_length([*rows, *extra_rows], tokenizer, append_eos)
    tokenizer.model_max_length = context
    config = TinyDLLMConfig(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                            pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, hidden_size=hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden_size, max_position_embeddings=context)
    torch.manual_seed(seed)
    return TinyDLLMModel(config), tokenizer


def unseen_test_tokens(tokenizer: Any, test_rows: Sequence[TextRow], source: str
                       ) -> tuple[Counter[str], str | None]:
    """(counts of test tokens outside the vocabulary, a one-line report or None)."""
    counts = count_unknown_tokens(tokenizer, row_texts(test_rows))
    return counts, describe_unknown_counts(counts, source) if counts else None
