"""Switching chase: a long answer whose every token is one lookup away from the one before it.

Prompt (2N + 1 + k tokens): two permutations f = f(0) .. f(N-1) and g = g(0) .. g(N-1) of the N
symbols, a start s, then k switches c_1 .. c_k (each the symbol "0" or "1"). Answer (k tokens,
16 by default): a_j = f(a_{j-1}) where c_j is "0" and g(a_{j-1}) where it is "1", a_0 = s. The
answer is unique.

Why it is here: every token depends on the one before it through a lookup in the prompt, and the
chain is as long as the answer, so a decoder must either commit left to right (one lookup per
step, which the tiny model learns) or guess: a_j with nothing committed needs j lookups in one
forward. Unlike pointer chasing, the switches make the walk aperiodic (pointer chasing with more
hops than symbols repeats itself), and every position's table depends on its own switch, so
the most parallel settings fail and the slowest need a long run of correct steps: the long
self-loop in which residual drift would show.

Measured: the default tiny model (d=64, 2 layers) did not learn it in 1000 steps of the usual
recipe (the loss stayed at log 8, exact match .000 at every step count): looking a value up in
one of two tables chosen by a third token is harder for it than pointer chasing's one lookup.
It is a stress task for bigger models or longer runs (docs/tiny-model-and-tasks.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from rcd_ext.tasks.registry import register_task
from rcd_ext.tasks.task import Task, check_positive, symbol_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SwitchingChase"]


@register_task
class SwitchingChase(Task):
    """A ``hops``-token walk through two permutations of ``num_symbols`` symbols, switched per
    step by the prompt; see the module docstring."""

    name = "switching_chase"

    def __init__(
        self,
        num_symbols: int = 8,
        hops: int = 16,
        vocab: Mapping[str, int] | PreTrainedTokenizerBase | None = None,
        holdout_modulus: int = 16,
        split_salt: int = 0,
    ) -> None:
        self.num_symbols = check_positive("num_symbols", num_symbols, minimum=2)
        self.hops = check_positive("hops", hops)
        super().__init__(vocab=vocab, holdout_modulus=holdout_modulus, split_salt=split_salt)

    @property
    def symbols(self) -> list[str]:
        return symbol_names(self.num_symbols)

    @property
    def prompt_length(self) -> int:
        return 2 * self.num_symbols + 1 + self.hops

    @property
    def answer_length(self) -> int:
        return self.hops

    def _split(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompt [n, P] -> tables [n, 2, N], start [n], switches [n, k] (0 or 1, clamped)."""
        n = self.num_symbols
        tables = prompt[:, :2 * n].reshape(-1, 2, n)
        return tables, prompt[:, 2 * n], prompt[:, 2 * n + 1:].clamp(max=1)

    def _walk(self, prompt: torch.Tensor) -> torch.Tensor:
        """[n, P] -> [n, k]: the answer of each prompt."""
        tables, current, switches = self._split(prompt)
        rows = torch.arange(prompt.shape[0])
        steps = []
        for j in range(self.hops):
            current = tables[rows, switches[:, j], current]
            steps.append(current)
        return torch.stack(steps, dim=1)

    def _sample_problems(
        self, n: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tables = torch.rand(n, 2, self.num_symbols, generator=generator).argsort(dim=2)
        start = torch.randint(self.num_symbols, (n, 1), generator=generator)
        switches = torch.randint(2, (n, self.hops), generator=generator)
        prompt = torch.cat([tables.reshape(n, -1), start, switches], dim=1)
        return prompt, self._walk(prompt)

    def valid_answers(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The one correct answer to a prompt [P]: token ids [1, A]."""
        return self.to_ids(self._walk(self._one_prompt_index(prompt_ids)))

    def _is_correct(self, prompt_index: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
        return (self._walk(prompt_index) == answer_index).all(dim=1)
