"""A word-level tokenizer for the tiny dLLM and the synthetic tasks.

Layout of the vocabulary (fixed, so that ids are predictable without building a tokenizer):
ids 0..4 are the special tokens ``[PAD] [MASK] [EOS] [BOS] [UNK]`` and id 5 + i is
``symbols[i]``. Text is split on whitespace only, every symbol is one token, encoding adds no
special tokens, and decoding joins tokens with single spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_tiny_tokenizer", "tiny_vocab"]

PAD, MASK, EOS, BOS, UNK = "[PAD]", "[MASK]", "[EOS]", "[BOS]", "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, MASK, EOS, BOS, UNK)


def tiny_vocab(symbols: Sequence[str]) -> dict[str, int]:
    """Token -> id map: the special tokens first (ids 0..4), then ``symbols`` in order.

    Raises ``ValueError`` for empty, whitespace-containing, duplicate or reserved symbols.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in symbols:
        if not isinstance(symbol, str) or not symbol or symbol.split() != [symbol]:
            raise ValueError(
                f"symbol {symbol!r}: expected a non-empty string without whitespace "
                "(the tokenizer splits on whitespace)"
            )
        if symbol in vocab:
            kind = "a special token" if symbol in SPECIAL_TOKENS else "a duplicate"
            raise ValueError(f"symbol {symbol!r} is {kind}")
        vocab[symbol] = len(vocab)
    return vocab


def build_tiny_tokenizer(
    symbols: Sequence[str], model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over ``symbols`` plus the five special tokens.

    ``tokenizer.mask_token_id`` is 1 and ``len(tokenizer)`` is ``5 + len(symbols)``. It saves
    with ``save_pretrained`` and reloads offline with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=tiny_vocab(symbols), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library then joins decoded tokens with single spaces.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        mask_token=MASK,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
