"""Coupled choices: copy a path through R candidate rows, switching rows only where they agree.

Prompt (R * k tokens): R candidate rows of k symbols each, row after row. At every column the
rows either all hold the same symbol (a *junction*, probability ``junction_probability``) or
differ. Answer (k tokens): any a_1 .. a_k such that every adjacent pair (a_j, a_{j+1}) appears
at columns (j, j+1) of one row (and each a_j in column j of some row). Equivalently: junctions cut
the columns into segments, and a correct answer copies one row per segment. There are
R**(segments) correct answers; training answers pick each segment's row uniformly, i.e. are
uniform over the correct answers.

Alphabets: with ``alphabet="per_row"`` (default) row r writes symbols "<letter r><i>" ("a3",
"b0", ...) and junctions write "=<i>", so a committed symbol names its row and the task is
learned by the default tiny model in about 1000 steps. With ``alphabet="shared"`` all rows and
junctions use "0" .. "N-1" (R distinct symbols per non-junction column, rows in a canonical
order); the model must then compare a committed symbol with the rows, which 1000 steps did not
teach it.

Why the beliefs are soft: with nothing committed, every non-junction position is exactly 1/R
on each of its R candidates (junctions are one-hot). Committing one position decides its whole
segment (every belief in it becomes one-hot) and leaves the other segments at 1/R, so the first
committed token of a segment determines the rest of it.
Why parallel decoding fails: in a segment with m non-junction positions, sampling each position
from its own marginal gives a single row with probability R**(1 - m); committing one position
per segment first always succeeds. Caveat (per_row): a model that broke every tie the same way
("always the a-row") would decode in one step; measured with the tiny model (2 layers, 1000
steps, top-confidence commits) it did not: exact match .37 with 1 step, .81 with 2, 1.0 with 8.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from rcd_ext.tasks.registry import register_task
from rcd_ext.tasks.task import Task, check_positive, symbol_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["CoupledChoices"]

_MAX_ENUMERATED_ANSWERS = 1 << 16


@register_task
class CoupledChoices(Task):
    """Copy one of ``num_rows`` rows per segment; see the module docstring."""

    name = "coupled_choices"

    def __init__(
        self,
        num_symbols: int = 8,
        num_rows: int = 2,
        length: int = 8,
        junction_probability: float = 0.25,
        alphabet: str = "per_row",
        vocab: Mapping[str, int] | PreTrainedTokenizerBase | None = None,
        holdout_modulus: int = 16,
        split_salt: int = 0,
    ) -> None:
        self.num_symbols = check_positive("num_symbols", num_symbols, minimum=2)
        self.num_rows = check_positive("num_rows", num_rows, minimum=2)
        if num_rows > num_symbols:
            raise ValueError(f"num_rows={num_rows} exceeds num_symbols={num_symbols}")
        self.length = check_positive("length", length)
        if not 0.0 <= junction_probability < 1.0:
            raise ValueError(
                f"junction_probability={junction_probability!r}: expected 0 <= p < 1"
            )
        self.junction_probability = float(junction_probability)
        if alphabet not in ("per_row", "shared"):
            raise ValueError(f"alphabet={alphabet!r}: expected 'per_row' or 'shared'")
        self.alphabet = alphabet
        super().__init__(vocab=vocab, holdout_modulus=holdout_modulus, split_salt=split_salt)

    @property
    def symbols(self) -> list[str]:
        if self.alphabet == "shared":
            return symbol_names(self.num_symbols)
        # Row r writes "<letter r><i>", junctions write "=<i>".
        letters = [chr(ord("a") + r) for r in range(self.num_rows)] + ["="]
        return [f"{letter}{i}" for letter in letters for i in range(self.num_symbols)]

    @property
    def prompt_length(self) -> int:
        return self.num_rows * self.length

    @property
    def answer_length(self) -> int:
        return self.length

    def _rows(self, prompt_index: torch.Tensor) -> torch.Tensor:
        """prompt [n, R * k] -> candidate rows [n, R, k]."""
        return prompt_index.reshape(-1, self.num_rows, self.length)

    def _sample_problems(
        self, n: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows_count, length, symbols = self.num_rows, self.length, self.num_symbols
        junction = torch.rand(n, length, generator=generator) < self.junction_probability
        if self.alphabet == "per_row":
            # [n, k, R]: row r draws from its own alphabet (indices r*N .. r*N+N-1), junctions
            # from the shared one after them; the alphabets already fix the row order.
            columns = torch.randint(symbols, (n, length, rows_count), generator=generator)
            columns = columns + symbols * torch.arange(rows_count)
            shared = rows_count * symbols + torch.randint(symbols, (n, length), generator=generator)
            columns = torch.where(junction[:, :, None], shared[:, :, None], columns)
        else:
            # R distinct symbols per column (a random permutation's first R entries).
            columns = torch.rand(n, length, symbols, generator=generator).argsort(dim=2)
            columns = columns[:, :, :rows_count]
            columns = torch.where(junction[:, :, None], columns[:, :, :1], columns)
            # Canonical row order: ascending symbol at the first non-junction column.
            first_free = (~junction).float().argmax(dim=1)
            order = columns[torch.arange(n), first_free].argsort(dim=1)  # [n, R]
            columns = columns.gather(2, order[:, None, :].expand(n, length, rows_count))
        # One row per segment; a junction starts a new segment (its symbol is shared anyway).
        segment = junction.long().cumsum(dim=1)
        segment_row = torch.randint(rows_count, (n, length + 1), generator=generator)
        row = segment_row.gather(1, segment)
        answer = columns.gather(2, row[:, :, None]).squeeze(2)
        return columns.transpose(1, 2).reshape(n, -1), answer

    def _is_correct(self, prompt_index: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
        rows = self._rows(prompt_index)
        matches = rows == answer_index[:, None, :]  # [n, R, k]: row r holds a_j at column j
        each_position = matches.any(dim=1).all(dim=1)
        each_pair = (matches[:, :, :-1] & matches[:, :, 1:]).any(dim=1).all(dim=1)
        return each_position & each_pair

    def valid_answers(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Every correct answer to one prompt [P]: distinct token-id rows [M, A]."""
        rows = self._rows(self._one_prompt_index(prompt_ids))[0].tolist()
        answers = [[symbol] for symbol in sorted({row[0] for row in rows})]
        for column in range(1, self.length):
            extended = []
            for answer in answers:
                nexts = {row[column] for row in rows if row[column - 1] == answer[-1]}
                extended.extend(answer + [symbol] for symbol in sorted(nexts))
            answers = extended
            if len(answers) > _MAX_ENUMERATED_ANSWERS:
                raise ValueError(f"more than {_MAX_ENUMERATED_ANSWERS} answers to enumerate")
        return self.to_ids(torch.tensor(answers, dtype=torch.long))
