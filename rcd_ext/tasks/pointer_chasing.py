"""Pointer chasing: follow a permutation k times from a start symbol.

Prompt (N + 1 tokens): f(0) f(1) ... f(N-1) s, where f is a uniformly random permutation of the
N symbols and s a uniformly random start. Answer (k tokens): f(s) f^2(s) ... f^k(s). The answer
is unique, so beliefs of a well-trained model are nearly one-hot once the chain is resolved,
and uninformative before: position j needs j hops, which a parallel decoder cannot do in one
step. This is the task of the tiny-scale RCD study (docs/demo-findings.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from rcd_ext.tasks.registry import register_task
from rcd_ext.tasks.task import Task, check_positive, symbol_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PointerChasing"]


@register_task
class PointerChasing(Task):
    """Pointer chasing over ``num_symbols`` symbols ("0" .. "N-1") with ``hops`` answer tokens."""

    name = "pointer_chasing"

    def __init__(
        self,
        num_symbols: int = 8,
        hops: int = 8,
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
        return self.num_symbols + 1

    @property
    def answer_length(self) -> int:
        return self.hops

    def _sample_problems(
        self, n: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        permutation = torch.rand(n, self.num_symbols, generator=generator).argsort(dim=1)
        start = torch.randint(self.num_symbols, (n,), generator=generator)
        return torch.cat([permutation, start[:, None]], dim=1), self._chase(permutation, start)

    def _chase(self, function: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """function [n, N], start [n] -> [n, hops]: f(s), f(f(s)), ..."""
        steps, current = [], start
        for _ in range(self.hops):
            current = function.gather(1, current[:, None]).squeeze(1)
            steps.append(current)
        return torch.stack(steps, dim=1)

    def valid_answers(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The one correct answer to a prompt [P]: token ids [1, A]."""
        prompt_index = self._one_prompt_index(prompt_ids)
        return self.to_ids(self._chase(prompt_index[:, :-1], prompt_index[:, -1]))

    def _is_correct(self, prompt_index: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
        function, start = prompt_index[:, :-1], prompt_index[:, -1]
        return (self._chase(function, start) == answer_index).all(dim=1)
