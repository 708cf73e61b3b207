"""The common interface of the synthetic tasks, and the hash split shared by all of them.

A task generates fixed-length problems: a prompt of ``prompt_length`` tokens and an answer of
``answer_length`` tokens, all drawn from ``task.symbols``. Problems are generated in *symbol
index* space (0 .. len(symbols)-1) by the subclass and mapped to token ids through the task's
vocabulary, which defaults to the layout of :func:`rcd_ext.models.build_tiny_tokenizer` (special
tokens 0..4, then the symbols) and can be any token -> id mapping or tokenizer.

Held-out split: a problem belongs to the test split iff a hash of its prompt (in symbol-index
space, so independent of the vocabulary) is 0 modulo ``holdout_modulus``. ``sample_train``
rejects and redraws such prompts, so test problems are never generated for training, whatever
the seed; ``test_set`` draws only from the test split.

Scoring: a task's verifier decides from the prompt whether an answer is correct, so tasks with
many valid answers accept every one of them; ``score`` is the exact-match accuracy under that
verifier. Answers containing any id that is not one of the task's symbols (e.g. a [MASK] left
in place) are wrong.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from rcd_ext.atomic_files import write_text_atomic
from rcd_ext.models.tiny_tokenizer import build_tiny_tokenizer, tiny_vocab

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["Task"]

# 2**31 - 1 is prime, and products of two values below it fit in int64 without overflow.
_HASH_PRIME = 2_147_483_647
_HASH_BASE = 1_000_003


def prompt_hash(prompt_index: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Deterministic hash of each row of ``prompt_index`` [N, P] (symbol indices) -> [N] int64."""
    value = torch.full((prompt_index.shape[0],), salt % _HASH_PRIME, dtype=torch.long)
    for column in prompt_index.long().unbind(dim=1):
        value = (value * _HASH_BASE + column + 1) % _HASH_PRIME
    # A final multiply-xorshift-multiply so that the low residues used for the split do not
    # simply track the last prompt token.
    value = (value * 48_271) % _HASH_PRIME
    value = value ^ (value >> 16)
    return (value * 69_621) % _HASH_PRIME


class Task(ABC):
    """A synthetic task with a seeded generator, a held-out test split and a verifier.

    Subclasses define ``name``, ``symbols``, ``prompt_length``, ``answer_length``,
    ``_sample_problems`` and ``_is_correct`` (both in symbol-index space), optionally
    ``valid_answers``, and set their own fields before calling ``Task.__init__`` (which reads
    ``symbols``).

    Args:
        vocab: token -> id mapping, or a tokenizer (its ``get_vocab()`` is used); default
            ``tiny_vocab(self.symbols)``, the ids of ``build_tiny_tokenizer(self.symbols)``.
        holdout_modulus: one prompt in about ``holdout_modulus`` belongs to the test split.
        split_salt: changes which prompts are held out.
    """

    name: ClassVar[str]

    def __init__(
        self,
        vocab: Mapping[str, int] | PreTrainedTokenizerBase | None = None,
        holdout_modulus: int = 16,
        split_salt: int = 0,
    ) -> None:
        if isinstance(holdout_modulus, bool) or not isinstance(holdout_modulus, int):
            raise ValueError(f"holdout_modulus={holdout_modulus!r}: expected an int >= 2")
        if holdout_modulus < 2:
            raise ValueError(f"holdout_modulus={holdout_modulus}: expected an int >= 2")
        self.holdout_modulus = holdout_modulus
        self.split_salt = int(split_salt)
        if vocab is None:
            vocab = tiny_vocab(self.symbols)
        elif hasattr(vocab, "get_vocab"):
            vocab = vocab.get_vocab()
        missing = [symbol for symbol in self.symbols if symbol not in vocab]
        if missing:
            raise ValueError(f"task {self.name!r}: symbols {missing} are not in the vocabulary")
        self.vocab: dict[str, int] = dict(vocab)
        # [S] token id of each symbol, and its inverse (-1 for ids that are not symbols).
        self.symbol_ids = torch.tensor([self.vocab[s] for s in self.symbols], dtype=torch.long)
        self._index_of_id = torch.full((int(self.symbol_ids.max()) + 1,), -1, dtype=torch.long)
        self._index_of_id[self.symbol_ids] = torch.arange(len(self.symbols))

    # --- what a subclass defines -------------------------------------------------------------
    @property
    @abstractmethod
    def symbols(self) -> list[str]:
        """The task's tokens (no special tokens), in a fixed order."""

    @property
    @abstractmethod
    def prompt_length(self) -> int:
        """P, the number of prompt tokens."""

    @property
    @abstractmethod
    def answer_length(self) -> int:
        """A, the number of answer tokens."""

    @abstractmethod
    def _sample_problems(
        self, n: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n fresh problems: prompt [n, P] and one valid answer [n, A], symbol indices."""

    @abstractmethod
    def _is_correct(self, prompt_index: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
        """[n] bool: is answer [n, A] valid for prompt [n, P] (symbol indices)?

        Answer entries may be -1 (not a symbol): such rows are rejected by :meth:`is_correct`
        whatever this returns, so it only has to stay in bounds for them.
        """

    def valid_answers(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Every correct answer to one prompt [P], as distinct rows of token ids [M, A].

        Optional (small answer sets only); it powers :meth:`answer_posterior`.
        """
        raise NotImplementedError(f"task {self.name!r} does not enumerate its answers")

    # --- ids <-> symbol indices ---------------------------------------------------------------
    def to_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Symbol indices (any shape) -> token ids (same shape)."""
        return self.symbol_ids[index]

    def to_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape) -> symbol indices, -1 where an id is not a symbol."""
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        inside = (ids >= 0) & (ids < self._index_of_id.numel())
        looked_up = self._index_of_id[ids.clamp(0, self._index_of_id.numel() - 1)]
        return torch.where(inside, looked_up, torch.full_like(ids, -1))

    # --- split, sampling ---------------------------------------------------------------------
    def in_test_split(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """[N] bool for prompt token ids [N, P]: does the prompt belong to the test split?"""
        return self._index_in_test_split(self.to_index(prompt_ids))

    def _index_in_test_split(self, prompt_index: torch.Tensor) -> torch.Tensor:
        return prompt_hash(prompt_index, self.split_salt) % self.holdout_modulus == 0

    def sample_train(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch drawn outside the test split.

        Returns prompt_ids [batch_size, P] and answer_ids [batch_size, A] (long, CPU). The
        answer is one valid answer drawn from the task's answer distribution.
        """
        prompts, answers = self._sample_problems(batch_size, generator)
        redraw = self._index_in_test_split(prompts)
        while bool(redraw.any()):
            rows = redraw.nonzero().squeeze(1)
            new_prompts, new_answers = self._sample_problems(rows.numel(), generator)
            prompts[rows], answers[rows] = new_prompts, new_answers
            redraw = self._index_in_test_split(prompts)
        return self.to_ids(prompts), self.to_ids(answers)

    def test_set(self, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n distinct test-split problems, the same for the same (task settings, n, seed).

        Returns a list of (prompt_ids [P], answer_ids [A]); the answer is one valid answer.
        """
        generator = torch.Generator().manual_seed(seed)
        seen: set[tuple[int, ...]] = set()
        problems: list[tuple[torch.Tensor, torch.Tensor]] = []
        chunk = max(256, 2 * n * self.holdout_modulus)
        for _ in range(100):
            prompts, answers = self._sample_problems(chunk, generator)
            keep = self._index_in_test_split(prompts)
            for prompt, answer in zip(prompts[keep], answers[keep], strict=True):
                key = tuple(prompt.tolist())
                if key not in seen:
                    seen.add(key)
                    problems.append((self.to_ids(prompt), self.to_ids(answer)))
                    if len(problems) == n:
                        return problems
        raise ValueError(
            f"task {self.name!r}: found only {len(problems)} distinct test problems, asked for "
            f"{n}; lower n or holdout_modulus"
        )

    # --- scoring ------------------------------------------------------------------------------
    def is_correct(self, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """[N] bool: is each answer [N, A] (token ids) valid for its prompt [N, P]?

        1-D inputs are treated as one problem. A wrong answer length raises ``ValueError``.
        """
        prompt_index = _as_rows(self.to_index(prompt_ids), self.prompt_length, "prompt_ids")
        answer_index = _as_rows(self.to_index(answer_ids), self.answer_length, "answer_ids")
        if prompt_index.shape[0] != answer_index.shape[0]:
            raise ValueError(
                f"{prompt_index.shape[0]} prompts but {answer_index.shape[0]} answers"
            )
        valid = (prompt_index >= 0).all(dim=1) & (answer_index >= 0).all(dim=1)
        return valid & self._is_correct(prompt_index.clamp(min=0), answer_index)

    def score(self, pred_answer_ids: torch.Tensor, prompt_ids: torch.Tensor) -> float:
        """Exact-match accuracy of predicted answers [N, A] for prompts [N, P] (token ids).

        Any answer the verifier accepts counts, not only the generated gold answer.
        """
        correct = self.is_correct(prompt_ids, pred_answer_ids)
        return float(correct.float().mean()) if correct.numel() else 0.0

    def answer_posterior(
        self, prompt_ids: torch.Tensor, partial_answer_ids: torch.Tensor
    ) -> torch.Tensor:
        """Exact posterior over symbols at each answer position, given the committed ones.

        Every task here draws its training answers uniformly over the valid answers, so the
        posterior is uniform over the valid answers that agree with the committed positions:
        the beliefs an ideal model would hold, for checking a trained model's.

        Args:
            prompt_ids: [P] one prompt.
            partial_answer_ids: [A] token ids; any id that is not a task symbol (e.g. the mask
                id) marks a position as not yet committed.

        Returns:
            [A, S] probabilities over ``symbols`` (rows sum to 1; one-hot where committed).
            Raises ``ValueError`` if no valid answer agrees with the committed positions.
        """
        answers = self.to_index(self.valid_answers(prompt_ids))  # [M, A]
        committed = self.to_index(partial_answer_ids).reshape(-1)
        if committed.numel() != self.answer_length:
            raise ValueError(
                f"partial_answer_ids has {committed.numel()} tokens, expected {self.answer_length}"
            )
        consistent = ((answers == committed) | (committed < 0)).all(dim=1)
        if not bool(consistent.any()):
            raise ValueError("no valid answer agrees with the committed answer positions")
        kept = answers[consistent].T  # [A, M']
        counts = torch.zeros(self.answer_length, len(self.symbols))
        counts.scatter_add_(1, kept, torch.ones_like(kept, dtype=counts.dtype))
        return counts / kept.shape[1]

    def _one_prompt_index(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """One prompt [P] of token ids -> symbol indices [1, P]; ValueError if it is not one."""
        index = self.to_index(prompt_ids).reshape(1, -1)
        if index.shape[1] != self.prompt_length or bool((index < 0).any()):
            raise ValueError(f"prompt_ids {prompt_ids.tolist()} is not a prompt of {self.name!r}")
        return index

    # --- text forms ---------------------------------------------------------------------------
    def prompt_text(self, prompt_ids: torch.Tensor) -> str:
        """Whitespace-joined tokens of one prompt [P]."""
        return self._text(prompt_ids)

    def answer_text(self, answer_ids: torch.Tensor) -> str:
        """Whitespace-joined tokens of one answer [A]."""
        return self._text(answer_ids)

    def parse_answer(self, text: str) -> torch.Tensor:
        """Answer text -> token ids [A]; unknown tokens become -1 and missing ones -1 too.

        The first A whitespace-separated tokens are read (later ones are ignored), so a
        generation that runs past the answer is still scored on its first A tokens.
        """
        symbols = set(self.symbols)
        tokens = text.split()[: self.answer_length]
        ids = [self.vocab[t] if t in symbols else -1 for t in tokens]
        ids += [-1] * (self.answer_length - len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def _text(self, ids: torch.Tensor) -> str:
        index = self.to_index(ids).reshape(-1)
        if bool((index < 0).any()):
            raise ValueError(f"ids {ids.tolist()} contain tokens that are not task symbols")
        return " ".join(self.symbols[i] for i in index.tolist())

    def to_jsonl(self, path: str | Path, n: int, split: str = "test", seed: int = 0) -> None:
        """Write n problems of ``split`` ("train" or "test") as JSON lines.

        Each line is ``{"prompt": prompt_text, "response": answer_text}``; the test split is
        :meth:`test_set` (n, seed), so the file matches what the Python evaluation uses.
        """
        if split == "test":
            pairs = self.test_set(n, seed)
        elif split == "train":
            prompts, answers = self.sample_train(n, torch.Generator().manual_seed(seed))
            pairs = list(zip(prompts, answers, strict=True))
        else:
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        lines = [json.dumps({"prompt": self.prompt_text(prompt),
                             "response": self.answer_text(answer)}) + "\n"
                 for prompt, answer in pairs]
        write_text_atomic(path, "".join(lines))  # whole or not at all: a full disk keeps the old

    # --- tokenizer ----------------------------------------------------------------------------
    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """``build_tiny_tokenizer(self.symbols)`` with room for prompt + answer positions."""
        return build_tiny_tokenizer(
            self.symbols, model_max_length=self.prompt_length + self.answer_length
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(prompt_length={self.prompt_length}, "
            f"answer_length={self.answer_length}, holdout_modulus={self.holdout_modulus})"
        )


def _as_rows(index: torch.Tensor, length: int, name: str) -> torch.Tensor:
    if index.dim() == 1:
        index = index[None]
    if index.dim() != 2 or index.shape[1] != length:
        raise ValueError(
            f"{name} has shape {tuple(index.shape)}, expected [N, {length}] or [{length}]"
        )
    return index


def symbol_names(count: int) -> list[str]:
    """The decimal strings "0" .. str(count - 1), the symbols of the built-in tasks."""
    return [str(i) for i in range(count)]


def check_positive(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= minimum, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return value

