"""A user's JSONL test file as the demo's held-out problems.

The built-in tasks have fixed prompt and answer lengths and decode as one batch; a user's rows
do not. `JsonlTestSet` groups the rows by (prompt length, response length): each group is one
batch of equal-length rows, decoded without padding, with the model writing the response and
its EOS (`answer_length` = response tokens + 1), the shape every training row had. A group
quacks like a `Task` for `rcd_ext.demo.evaluate.decode_record`: `answer_length`, `name`,
`score` (exact match of the response tokens) and `token_accuracy` (share of response tokens
right, position by position). `merge_records` turns the groups' records into one per setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rcd_ext.training.data import prompt_ids_of
from rcd_ext.training.jsonl_rows import DataError, TextRow

Problem = tuple[torch.Tensor, torch.Tensor]  # (prompt ids [P], response ids + EOS [A])


@dataclass
class RowGroup:
    """Test rows with one prompt length and one response length, in file order."""

    name: str
    answer_length: int  # response tokens + EOS: what the model decodes
    problems: list[Problem] = field(default_factory=list)

    def _response(self, predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gold = torch.stack([answer for _, answer in self.problems])[:, :-1]
        return predicted[:, :gold.shape[1]].cpu(), gold

    def score(self, predicted: torch.Tensor, prompt_ids: torch.Tensor) -> float:
        """Exact match of the response tokens of `predicted` [N, A] (rows in problem order)."""
        got, gold = self._response(predicted)
        return float((got == gold).all(1).float().mean())

    def token_accuracy(self, predicted: torch.Tensor) -> float:
        """Share of response tokens of `predicted` [N, A] equal to the gold token there."""
        got, gold = self._response(predicted)
        return float((got == gold).float().mean())


@dataclass
class JsonlTestSet:
    """The groups of a test file and the file's name (for titles and results.json)."""

    name: str
    groups: list[RowGroup]

    @property
    def size(self) -> int:
        return sum(len(group.problems) for group in self.groups)


def build_test_set(rows: Sequence[TextRow], tokenizer: Any, name: str,
                   max_length: int | None = None) -> JsonlTestSet:
    """Tokenise the test rows (EOS after each response) and group them by lengths.

    DataError `file:line` for a row longer than `max_length` (the model's context).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model's tokenizer has no EOS token: the demo decodes each "
                         "response followed by EOS, as training wrote it")
    groups: dict[tuple[int, int], RowGroup] = {}
    for row in rows:
        prompt = prompt_ids_of(row, tokenizer)
        answer = tokenizer(row.response, add_special_tokens=False)["input_ids"] + [eos]
        if max_length is not None and len(prompt) + len(answer) > max_length:
            raise DataError(f"{row.where}: {len(prompt) + len(answer)} tokens (prompt "
                            f"{len(prompt)} + response {len(answer) - 1} + EOS) > the model's "
                            f"context of {max_length} (shorten the row, or use a model with a "
                            "longer context)")
        key = (len(prompt), len(answer))
        group = groups.setdefault(key, RowGroup(f"{name} [{key[0]}+{key[1]}]", key[1]))
        group.problems.append((torch.tensor(prompt), torch.tensor(answer)))
    return JsonlTestSet(name=name, groups=[groups[key] for key in sorted(groups)])


def merge_records(parts: Sequence[tuple[RowGroup, dict[str, Any]]], steps: int | None
                  ) -> dict[str, Any]:
    """One record from the records of every group at one setting (`steps`: the asked budget).

    Means are over problems (accuracy, forwards), over response tokens (token_accuracy), and
    tokens per step is all decoded tokens over all steps taken.
    """
    n = sum(record["n"] for _, record in parts)
    response_tokens = sum(record["n"] * (group.answer_length - 1) for group, record in parts)
    decoded = sum(record["n"] * group.answer_length for group, record in parts)
    steps_taken = sum(record["n"] * group.answer_length / record["tokens_per_step"]
                      for group, record in parts)
    first = parts[0][1]
    return {
        "method": first["method"], "init": first["init"], "steps": steps,
        "threshold": first["threshold"], "tokens_per_step": decoded / steps_taken,
        "forwards": sum(record["forwards"] * record["n"] for _, record in parts) / n,
        "accuracy": sum(record["accuracy"] * record["n"] for _, record in parts) / n,
        "token_accuracy": sum(record["token_accuracy"] * record["n"]
                              * (group.answer_length - 1) for group, record in parts)
        / response_tokens,
        "n": n,
    }
