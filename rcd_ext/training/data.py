"""Training data: local JSONL, a local HF dataset, or a built-in synthetic task (endless stream).

Every source yields examples {"input_ids": [L] long, "prompt_length": int}; `DiffusionCollator`
pads them into a batch with the response mask the loss needs.

- JSONL: one object per line, either {"prompt": str, "response": str} or
  {"messages": [{"role": ..., "content": ...}, ...]} whose last message is the assistant's.
  With a tokenizer that has a chat template, the prompt is rendered by it (generation prompt
  added); the response is the plain tokenisation of the answer, then EOS. A bad line raises
  `DataError` (a ValueError) `file:line: what (fix)` (`rcd_ext.training.jsonl_rows`), a row
  longer than the model's context too; tokens outside the vocabulary are warned about with
  counts (`UnknownWordsWarning`), never mapped to the unknown token silently.
- A directory written by `datasets.Dataset.save_to_disk` with the same columns.
- `task:NAME` or `task:NAME:key=value,...`: fresh problems from `rcd_ext.tasks` forever,
  seeded, so a resumed run sees the same stream (Trainer skips the consumed batches).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from rcd_ext.models.tiny_tokenizer import (
    UnknownWordsWarning,
    count_unknown_tokens,
    describe_unknown_counts,
)
from rcd_ext.tasks import Task, get_task
from rcd_ext.training.jsonl_rows import DataError, TextRow, read_text_rows, row_fields

Example = dict[str, Any]


def parse_task_spec(spec: str) -> Task:
    """`task:NAME[:k=v,...]` -> the task (ints parsed as ints, floats as floats)."""
    parts = spec.split(":", 2)
    kwargs: dict[str, Any] = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, _, value = item.partition("=")
            if not _:
                raise ValueError(f"task option {item!r} in {spec!r}: expected key=value")
            for cast in (int, float):
                try:
                    kwargs[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                kwargs[key] = value
    return get_task(parts[1], **kwargs)


class TaskStream(IterableDataset):
    """Endless fresh training problems of a synthetic task (test prompts never appear).

    Problems are drawn in chunks, chunk c from a generator seeded with (seed, c): the stream
    is a pure function of the seed, which is what exact resume needs.
    """

    def __init__(self, task: Task, seed: int = 0, chunk: int = 1024) -> None:
        self.task, self.seed, self.chunk = task, seed, chunk

    def __iter__(self) -> Iterator[Example]:
        chunk_index = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk_index)
            prompts, answers = self.task.sample_train(self.chunk, generator)
            for prompt, answer in zip(prompts, answers, strict=True):
                yield {"input_ids": torch.cat([prompt, answer]),
                       "prompt_length": self.task.prompt_length}
            chunk_index += 1


class TokenizedRows(Dataset):
    """A list of tokenised examples (map-style, so Trainer shuffles and resumes it)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids_of(row: TextRow, tokenizer: Any) -> list[int]:
    """The prompt's ids: the chat template's rendering (generation prompt added) when the
    tokenizer has one, else the plain tokenisation of the context's contents."""
    if _has_chat_template(tokenizer):
        return list(tokenizer.apply_chat_template(row.context, add_generation_prompt=True,
                                                  tokenize=True))
    return tokenizer(row.prompt)["input_ids"]


def tokenize_text_row(row: TextRow, tokenizer: Any, append_eos: bool = True,
                      max_length: int | None = None) -> Example:
    """A checked `TextRow` -> example; DataError naming its file:line when it is too long."""
    prompt_ids = prompt_ids_of(row, tokenizer)
    response_ids = tokenizer(row.response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if append_eos else None
    if eos is not None:
        response_ids = response_ids + [eos]
    ids = prompt_ids + response_ids
    if max_length is not None and len(ids) > max_length:
        parts = (f"prompt {len(prompt_ids)} + response {len(response_ids) - (eos is not None)}"
                 + (" + EOS" if eos is not None else ""))
        raise DataError(f"{row.where}: {len(ids)} tokens ({parts}) > the model's context of "
                        f"{max_length} (shorten the row, or train a model with a longer "
                        "context)")
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "prompt_length": len(prompt_ids)}


def tokenize_row(row: Any, tokenizer: Any, where: str, append_eos: bool = True,
                 max_length: int | None = None) -> Example:
    """One JSON row -> example; ValueError naming `where` (file:line) on a malformed row."""
    return tokenize_text_row(row_fields(row, where), tokenizer, append_eos, max_length)


def warn_unknown_tokens(tokenizer: Any, rows: list[TextRow], source: str) -> Counter[str]:
    """Warn (`UnknownWordsWarning`) with counts when `rows` hold tokens outside the tokenizer's
    vocabulary, instead of letting them become its unknown token silently."""
    texts = [text for row in rows for text in (row.prompt, row.response)]
    counts = count_unknown_tokens(tokenizer, texts)
    if counts:
        warnings.warn(describe_unknown_counts(counts, source), UnknownWordsWarning,
                      stacklevel=2)
    return counts


def load_jsonl(path: str | Path, tokenizer: Any, append_eos: bool = True,
               max_length: int | None = None) -> TokenizedRows:
    """Tokenise a JSONL file (see the module docstring for the row formats)."""
    rows = read_text_rows(path)
    warn_unknown_tokens(tokenizer, rows, str(path))
    return TokenizedRows([tokenize_text_row(row, tokenizer, append_eos, max_length)
                          for row in rows])


def load_hf_dataset(path: str | Path, tokenizer: Any, append_eos: bool = True,
                    max_length: int | None = None) -> TokenizedRows:
    """Tokenise a dataset saved with `save_to_disk` (a DatasetDict uses its "train" split)."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split ({list(data)})")
        data = data["train"]
    return TokenizedRows([tokenize_row(row, tokenizer, f"{path} row {index}", append_eos,
                                       max_length) for index, row in enumerate(data)])


def load_training_data(spec: str, tokenizer: Any = None, seed: int = 0,
                       append_eos: bool = True, max_length: int | None = None) -> Dataset:
    """`task:...`, a .jsonl file or a saved HF dataset directory -> a torch Dataset."""
    if spec.startswith("task:"):
        return TaskStream(parse_task_spec(spec), seed=seed)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"training data {spec!r}: no such file or directory (expected a "
                                ".jsonl file, a saved HF dataset or task:NAME)")
    if tokenizer is None:
        raise ValueError(f"training data {spec!r} needs the model's tokenizer")
    if path.is_dir():
        return load_hf_dataset(path, tokenizer, append_eos, max_length)
    return load_jsonl(path, tokenizer, append_eos, max_length)


class DiffusionCollator:
    """Examples -> {"input_ids" [B, L], "response_mask" [B, L] bool, "attention_mask" [B, L]}.

    Rows are right-padded with `pad_id`; padding is neither attended nor in the loss.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros(len(examples), length, dtype=torch.bool)
        attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
        for row, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            input_ids[row, :len(ids)] = ids
            response_mask[row, example["prompt_length"]:len(ids)] = True
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "response_mask": response_mask,
                "attention_mask": attention_mask}
