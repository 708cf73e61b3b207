"""Branching walk: a task whose token beliefs are soft and multi-modal.

Prompt (N * d + 1 tokens): for each node 0 .. N-1 in turn, its d distinct successors in
ascending order, then a start node s. The graph is uniformly random (each node's successor set
is a uniform d-subset of the N nodes, self-loops allowed). Answer (k tokens): a walk
a_1 .. a_k with a_1 in succ(s) and a_{j+1} in succ(a_j). Every one of the d**k walks is
correct; the generator draws each step uniformly, so training targets are uniform over walks.

Why the beliefs are soft: the posterior at a masked position is uniform over the valid walks
that agree with the committed positions. With nothing committed, a_1 is exactly 1/d on each of
succ(s) and a_j (j > 1) is spread over the nodes reachable in j steps. Committing a_j cuts
a_{j+1} to d options and a_{j-1} to the predecessors of a_j reachable from the left, so beliefs
sharpen only as neighbours are committed and a residual has partial information to carry.
Why parallel decoding fails: the positions are coupled pairwise (every adjacent pair must be an
edge), so taking each position's most likely node independently mixes different walks and is
usually not a walk at all; a decoder that commits one position at a time next to committed ones
always succeeds. :meth:`Task.answer_posterior` gives the exact posterior for checking
a model's beliefs. With d = 1 there is a single walk (a functional graph, like pointer chasing).
Hard for the default tiny model: 3000 steps of the usual recipe gave .33 exact match even when
decoding one token per step (see :mod:`coupled_choices` for a soft task it does learn).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from rcd_ext.tasks.registry import register_task
from rcd_ext.tasks.task import Task, check_positive, symbol_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["BranchingWalk"]

_MAX_ENUMERATED_WALKS = 1 << 16


@register_task
class BranchingWalk(Task):
    """Walks of ``walk_length`` steps on a random graph with out-degree ``out_degree``."""

    name = "branching_walk"

    def __init__(
        self,
        num_symbols: int = 8,
        out_degree: int = 2,
        walk_length: int = 6,
        vocab: Mapping[str, int] | PreTrainedTokenizerBase | None = None,
        holdout_modulus: int = 16,
        split_salt: int = 0,
    ) -> None:
        self.num_symbols = check_positive("num_symbols", num_symbols, minimum=2)
        self.out_degree = check_positive("out_degree", out_degree)
        if out_degree > num_symbols:
            raise ValueError(f"out_degree={out_degree} exceeds num_symbols={num_symbols}")
        self.walk_length = check_positive("walk_length", walk_length)
        super().__init__(vocab=vocab, holdout_modulus=holdout_modulus, split_salt=split_salt)

    @property
    def symbols(self) -> list[str]:
        return symbol_names(self.num_symbols)

    @property
    def prompt_length(self) -> int:
        return self.num_symbols * self.out_degree + 1

    @property
    def answer_length(self) -> int:
        return self.walk_length

    def _successors(self, prompt_index: torch.Tensor) -> torch.Tensor:
        """prompt [n, P] -> successor table [n, N, d]."""
        return prompt_index[:, :-1].reshape(-1, self.num_symbols, self.out_degree)

    def _sample_problems(
        self, n: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nodes, degree = self.num_symbols, self.out_degree
        # A uniform d-subset per node: the first d entries of a random permutation, sorted so
        # that each graph has exactly one prompt (the hash split then splits graphs, not
        # spellings of graphs).
        order = torch.rand(n, nodes, nodes, generator=generator).argsort(dim=2)
        successors = order[:, :, :degree].sort(dim=2).values
        start = torch.randint(nodes, (n,), generator=generator)
        choices = torch.randint(degree, (n, self.walk_length), generator=generator)
        steps, current = [], start
        rows = torch.arange(n)
        for j in range(self.walk_length):
            current = successors[rows, current, choices[:, j]]
            steps.append(current)
        prompt = torch.cat([successors.reshape(n, -1), start[:, None]], dim=1)
        return prompt, torch.stack(steps, dim=1)

    def _is_correct(self, prompt_index: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
        successors = self._successors(prompt_index)
        rows = torch.arange(prompt_index.shape[0])
        current = prompt_index[:, -1]
        correct = torch.ones(prompt_index.shape[0], dtype=torch.bool)
        for j in range(self.walk_length):
            step = answer_index[:, j]
            # Non-symbols are -1: clamp for the lookup, they are rejected by Task.is_correct.
            correct &= (successors[rows, current] == step[:, None]).any(dim=1)
            current = step.clamp(min=0)
        return correct

    def valid_answers(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Every walk for one prompt [P]: token ids [d**k, A], all distinct."""
        prompt_index = self._one_prompt_index(prompt_ids)
        if self.out_degree**self.walk_length > _MAX_ENUMERATED_WALKS:
            raise ValueError(
                f"{self.out_degree}**{self.walk_length} walks are too many to enumerate"
            )
        successors = self._successors(prompt_index)[0]
        walks = successors[prompt_index[0, -1]][:, None]  # [d, 1]
        for _ in range(1, self.walk_length):
            nexts = successors[walks[:, -1]]  # [M, d]
            walks = torch.cat(
                [walks.repeat_interleave(self.out_degree, dim=0), nexts.reshape(-1, 1)], dim=1
            )
        return self.to_ids(walks)
