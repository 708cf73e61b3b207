"""A word-level tokenizer for the tiny dLLM and the synthetic tasks.

Layout of the vocabulary (fixed, so that ids are predictable without building a tokenizer):
ids 0..4 are the special tokens ``[PAD] [MASK] [EOS] [BOS] [UNK]`` and id 5 + i is
``symbols[i]``. Text is split on whitespace only, every symbol is one token, encoding adds no
special tokens, and decoding joins tokens with single spaces. A word outside the symbols becomes
``[UNK]``: `unknown_words` finds such words and `check_known_words` warns about them (or refuses);
`count_unknown_tokens` counts them for a data file's report.

`tokenizer_from_texts` builds the vocabulary from a user's training texts instead: whitespace
words (as above) or single characters (``unit="chars"``: every character, the space included,
is one token, and decoding joins tokens with nothing between them).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "TOKEN_UNITS",
    "UnknownWordsWarning",
    "build_tiny_tokenizer",
    "count_unknown_tokens",
    "describe_unknown_counts",
    "check_known_words",
    "describe_unknown_words",
    "tiny_vocab",
    "tokenizer_from_texts",
    "unknown_words",
]

PAD, MASK, EOS, BOS, UNK = "[PAD]", "[MASK]", "[EOS]", "[BOS]", "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, MASK, EOS, BOS, UNK)
TOKEN_UNITS: tuple[str, ...] = ("words", "chars")


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

    backend = Tokenizer(models.WordLevel(vocab=tiny_vocab(symbols), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library then joins decoded tokens with single spaces.
    return _wrap(backend, model_max_length)


def _wrap(backend: Any, model_max_length: int) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

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


class UnknownWordsWarning(UserWarning):
    """Text had words the tokenizer does not know; the model sees its unknown token instead."""


def unknown_words(tokenizer: Any, texts: Iterable[str]) -> list[str]:
    """Distinct pieces of `texts` that `tokenizer` encodes as its unknown token, first seen first.

    Works for any tokenizer with ``unk_token_id``: fast tokenizers map each unknown token back
    to its text through offsets; others are asked word by word (whitespace split).
    """
    return list(count_unknown_tokens(tokenizer, texts))  # a Counter keeps first-seen order


def _unknown_pieces(tokenizer: Any, text: str, unk_id: int) -> list[str]:
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [text[start:end] for token, (start, end)
                in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
                if token == unk_id]
    return [word for word in text.split()
            if unk_id in tokenizer(word, add_special_tokens=False)["input_ids"]]


def check_known_words(tokenizer: Any, texts: Iterable[str], *, refuse: bool = False,
                      shown: int = 5) -> list[str]:
    """Warn once (`UnknownWordsWarning`) about words `tokenizer` does not know, or raise.

    Returns the unknown words (empty when all are known). The message names the first `shown`
    words and how many there are. `refuse=True` raises ``ValueError`` with that message instead
    (as does ``warnings.simplefilter("error", UnknownWordsWarning)``).
    """
    unknown = unknown_words(tokenizer, texts)
    if unknown:
        message = describe_unknown_words(unknown, getattr(tokenizer, "unk_token", None), shown)
        if refuse:
            raise ValueError(message)
        warnings.warn(message, UnknownWordsWarning, stacklevel=2)
    return unknown


def describe_unknown_words(unknown: Sequence[str], unk_token: str | None = UNK,
                           shown: int = 5) -> str:
    """One line: how many words are unknown, the first `shown` of them, what they become."""
    listed = ", ".join(repr(word) for word in unknown[:shown])
    more = f" and {len(unknown) - shown} more" if len(unknown) > shown else ""
    subject = "word is" if len(unknown) == 1 else "words are"
    verb = "becomes" if len(unknown) == 1 else "become"
    return (f"{len(unknown)} {subject} not in the tokenizer's vocabulary and {verb} "
            f"{unk_token or 'the unknown token'}: {listed}{more}")


def _character_tokenizer(characters: Sequence[str], model_max_length: int
                         ) -> PreTrainedTokenizerFast:
    """Every character one token (spaces and newlines too); decoding concatenates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in characters:
        vocab.setdefault(character, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return _wrap(backend, model_max_length)


def tokenizer_from_texts(texts: Iterable[str], unit: str = "words",
                         model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """The tiny tokenizer over every token of `texts`, in sorted order (so ids do not depend
    on the row order): whitespace words (`unit="words"`) or characters (`"chars"`).

    A text token that spells a special token (``[MASK]``) is refused with ValueError.
    """
    if unit not in TOKEN_UNITS:
        raise ValueError(f"unit {unit!r}: expected one of {', '.join(TOKEN_UNITS)}")
    seen: set[str] = set()
    for text in texts:
        seen.update(text.split() if unit == "words" else text)
    reserved = sorted(seen & set(SPECIAL_TOKENS))
    if reserved:
        raise ValueError(f"the data uses {reserved[0]}, one of the tokenizer's special tokens "
                         f"{', '.join(SPECIAL_TOKENS)} (rename it in the data)")
    if unit == "chars":
        return _character_tokenizer(sorted(seen), model_max_length)
    return build_tiny_tokenizer(sorted(seen), model_max_length)


def count_unknown_tokens(tokenizer: Any, texts: Iterable[str]) -> Counter[str]:
    """How often each piece of `texts` is encoded as the unknown token (empty: all known)."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    counts: Counter[str] = Counter()
    if unk_id is None:
        return counts
    for text in texts:
        counts.update(_unknown_pieces(tokenizer, text, unk_id))
    return counts


def describe_unknown_counts(counts: Counter[str], source: str, shown: int = 5) -> str:
    """One line: `source` has N distinct unknown tokens (M occurrences), the commonest first."""
    listed = ", ".join(f"{token!r} x{number}" for token, number in counts.most_common(shown))
    more = f" and {len(counts) - shown} more" if len(counts) > shown else ""
    return (f"{source}: {len(counts)} distinct token{'s' if len(counts) != 1 else ''} "
            f"({sum(counts.values())} occurrences) not in the model's vocabulary, which the "
            f"model reads as {UNK} and can never write: {listed}{more}")
