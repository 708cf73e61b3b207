"""A from-scratch double of D2F's vLLM-style engine `d2f_vllm`: the public structure the RCD
adapter relies on, not the engine's code (no paged K/V, no Triton, no CUDA, no processes).

Reproduced:
- `Config` flags: model_name, model_type, mask_token_id, diffusion_block_size, the three D2F
  thresholds, max_num_seqs, max_model_len, tensor/data parallel sizes, enforce_eager, eos.
- Sequences (`seq_id` from a process-wide counter, `token_ids`, `len()`, `cached_num_tokens`,
  `is_finished`) decoding several diffusion blocks at once: prefill holds the prompt block plus
  a new all-mask block; a new block is appended (all masks) once the last one is
  `add_new_block_threshold` complete; a complete block is "to cache" for one step and then
  "in cache" (leaves the batch).
- `ModelRunner`: `call(name, *args)`, `run(seqs, is_prefill)` = prepare (flat ids and
  positions, `token_ids[cached_num_tokens:]` per sequence in scheduling order) ->
  `run_model(input_ids, positions, is_prefill)` (inference mode; `model.compute_logits(
  model(input_ids, positions))` with logits for every token) -> `sampler(logits, temps)`.
  With enforce_eager=False, decode batches of <= 512 tokens go through a "graph replay" that
  embeds with `F.embedding` directly, as a captured graph would: module hooks do not run.
- Dream's sampler: logits split per sequence, shifted by one inside each slice, the first row
  replaced by a constant (the engine broadcasts an int); greedy confidence, threshold accept,
  top-1 fallback when the previous block is complete, first mask accepted at prefill.
- Scheduler: prefill of waiting requests first (all of them, up to max_num_seqs), else decode
  of the first max_num_seqs running ones; a request finishes after the step whose commits made
  it meet EOS / max_tokens with its last block complete.
- The model: `model.model.embed_tokens` (a plain embedding), one attention layer over learned
  absolute positions, block-causal inside the batch slice plus the sequence's cached K/V (kept
  per seq_id, appended when a "to cache" block runs), an LM head. Every call is recorded.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum, auto
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

_CONTEXT: dict[str, Any] = {}
_SEQ_IDS = itertools.count()


@dataclass
class Config:
    model_name: str = "dream"
    model_type: str = "diffusion_lm"
    mask_token_id: int = 47
    diffusion_block_size: int = 4
    accept_threshold: float = 0.5
    complete_threshold: float = 0.95
    add_new_block_threshold: float = 0.25
    max_num_seqs: int = 8
    max_model_len: int = 40
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    eos: int = 2
    vocab_size: int = 48
    hidden_size: int = 16


@dataclass
class SamplingParams:
    temperature: float = 0.0
    max_tokens: int = 16
    ignore_eos: bool = False


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class BlockState(Enum):
    ACTIVE = auto()
    TO_CACHE = auto()
    IN_CACHE = auto()


@dataclass
class Block:
    start: int
    size: int
    state: BlockState = BlockState.ACTIVE


@dataclass
class Sequence:
    token_ids: list[int]
    params: SamplingParams
    config: Config
    seq_id: int = field(default_factory=lambda: next(_SEQ_IDS))
    status: Status = Status.WAITING
    blocks: list[Block] = field(default_factory=list)
    prompt_length: int = 0
    meet_eos: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        self.prompt_length = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def cached_num_tokens(self) -> int:
        return sum(b.size for b in self.blocks if b.state == BlockState.IN_CACHE)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_length:]

    def complete(self, block: Block) -> float:
        tokens = self.token_ids[block.start:block.start + block.size]
        return sum(t != self.config.mask_token_id for t in tokens) / block.size

    def next_step(self, is_prefill: bool) -> None:
        """Start a step: the prompt block at prefill, and a new all-mask block when due."""
        if is_prefill:
            self.blocks.append(Block(0, len(self), BlockState.TO_CACHE))
        room = self.config.max_model_len - len(self)
        if (self.complete(self.blocks[-1]) >= self.config.add_new_block_threshold
                and not self.meet_eos and room > 0):
            size = min(self.config.diffusion_block_size, room)
            self.blocks.append(Block(len(self), size))
            self.token_ids += [self.config.mask_token_id] * size

    def post_process(self) -> None:
        """End of step: "to cache" blocks are cached, complete active blocks (in order) go to
        "to cache"."""
        for block in self.blocks:
            if block.state == BlockState.TO_CACHE:
                block.state = BlockState.IN_CACHE
            elif block.state == BlockState.ACTIVE:
                if self.complete(block) < 1.0:
                    break
                block.state = BlockState.TO_CACHE


class TinyDiffusionModel(nn.Module):
    """Embedding, one attention layer (block-causal within the slice, over cached K/V of the
    same sequence), LM head. Random fixed weights; records every forward."""

    def __init__(self, config: Config, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        dim = config.hidden_size
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, dim)
        self.wpe = nn.Embedding(config.max_model_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lm_head = nn.Linear(dim, config.vocab_size, bias=False)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
            parameter.requires_grad_(False)
        self.lm_head.weight.data *= 0.1  # soft beliefs: several steps per block, real residuals
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls: list[dict[str, Any]] = []
        self.graph_replay = False  # set by the runner around a "captured graph" forward

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [N] flat -> hidden [N, D]."""
        if self.graph_replay:
            embeds = F.embedding(input_ids, self.model.embed_tokens.weight)
        else:
            embeds = self.model.embed_tokens(input_ids)
        hidden = embeds + self.wpe(positions)
        q, k, v = self.qkv(hidden).chunk(3, -1)
        out = torch.empty_like(hidden)
        offset = 0
        for seq, length in zip(_CONTEXT["seqs"], _CONTEXT["seq_lens"], strict=True):
            part = slice(offset, offset + length)
            past_k, past_v = self.kv.get(seq.seq_id, (k[:0], v[:0]))
            keys, values = torch.cat([past_k, k[part]]), torch.cat([past_v, v[part]])
            block = _CONTEXT["block_ids"][part]
            allowed = torch.cat([torch.ones(length, past_k.shape[0], dtype=torch.bool),
                                 block[None, :] <= block[:, None]], 1)
            scores = (q[part] @ keys.T) / keys.shape[-1] ** 0.5
            out[part] = scores.masked_fill(~allowed, -torch.inf).softmax(-1) @ values
            stored = _CONTEXT["to_cache"][part]
            if bool(stored.any()):
                self.kv[seq.seq_id] = (torch.cat([past_k, k[part][stored]]),
                                       torch.cat([past_v, v[part][stored]]))
            offset += length
        self.calls.append({"input_ids": input_ids.clone(), "positions": positions.clone(),
                           "embeds": embeds.clone(), "seq_ids": [s.seq_id for s in
                                                                 _CONTEXT["seqs"]],
                           "seq_lens": list(_CONTEXT["seq_lens"]),
                           "block_ids": _CONTEXT["block_ids"].clone(),
                           "is_prefill": _CONTEXT["is_prefill"]})
        return hidden + out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, V] (every token: the diffusion head keeps all rows)."""
        logits = self.lm_head(hidden)
        self.calls[-1]["logits"] = logits.clone()
        return logits


class DreamSampler(nn.Module):
    """Dream-style sampler over the flat logits; returns {seq_id: [(position, token)]}."""

    def _shift_logits(self, logits: torch.Tensor, last: int) -> torch.Tensor:
        shifted = torch.zeros_like(logits)
        shifted[1:] = logits[:-1]
        shifted[0] = last  # the engine broadcasts an int here: constant logits
        return shifted

    def score(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        return self._shift_logits(logits, seq.cached_num_tokens - 1)

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor) -> dict[int, list]:
        accepted: dict[int, list[tuple[int, int]]] = {}
        offset = 0
        for seq, length in zip(_CONTEXT["seqs"], _CONTEXT["seq_lens"], strict=True):
            scores = self.score(seq, logits[offset:offset + length])
            base = seq.cached_num_tokens
            commits = []
            for index, block in enumerate(seq.blocks):
                tokens = seq.token_ids[block.start:block.start + block.size]
                local = [i for i, t in enumerate(tokens) if t == seq.config.mask_token_id]
                if block.state != BlockState.ACTIVE or not local:
                    continue
                rows = torch.tensor([block.start + i - base for i in local])
                probs = scores[rows].float().softmax(-1)
                probs[:, seq.config.mask_token_id] = 0.0  # never "commit" the mask
                confidence, token = probs.max(-1)
                if _CONTEXT["is_prefill"]:
                    chosen = [0]
                else:
                    chosen = (confidence >= seq.config.accept_threshold).nonzero()[:, 0].tolist()
                    previous = seq.blocks[index - 1]
                    if not chosen and seq.complete(previous) >= seq.config.complete_threshold:
                        chosen = [int(confidence.argmax())]
                commits += [(block.start + local[i], int(token[i])) for i in chosen]
            accepted[seq.seq_id] = commits
            offset += length
        return accepted


class PlainSampler(DreamSampler):
    """A sampler without the shift (token i scored by row i), as a LLaDA-style sampler."""

    _shift_logits = None  # type: ignore[assignment]

    def score(self, seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        return logits


class ModelRunner:
    """The diffusion model runner: flat batches, eager or "graph" forward, the sampler."""

    def __init__(self, config: Config, sampler: nn.Module | None = None, seed: int = 0):
        self.config = config
        self.model_type = config.model_type
        self.enforce_eager = config.enforce_eager
        self.world_size = config.tensor_parallel_size
        self.rank = 0
        self.mask_token_id = config.mask_token_id
        self.diffusion_block_size = config.diffusion_block_size
        self.model = TinyDiffusionModel(config, seed)
        self.sampler = sampler if sampler is not None else DreamSampler()

    def call(self, method_name: str, *args: Any) -> Any:
        return getattr(self, method_name)(*args)

    def _prepare(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
        ids, positions, lens, block_ids, to_cache = [], [], [], [], []
        for seq in seqs:
            seq.next_step(is_prefill)
            begin = seq.cached_num_tokens
            ids += seq.token_ids[begin:]
            positions += range(begin, len(seq))
            lens.append(len(seq) - begin)
            for number, block in enumerate(seq.blocks):
                if block.state != BlockState.IN_CACHE:
                    block_ids += [number] * block.size
                    to_cache += [block.state == BlockState.TO_CACHE] * block.size
        _CONTEXT.update(seqs=seqs, seq_lens=lens, is_prefill=is_prefill,
                        block_ids=torch.tensor(block_ids), to_cache=torch.tensor(to_cache))
        return torch.tensor(ids), torch.tensor(positions)

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prepare(seqs, True)

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prepare(seqs, False)

    def prepare_sample(self, seqs: list[Sequence]) -> torch.Tensor:
        return torch.tensor([seq.params.temperature for seq in seqs])

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  is_prefill: bool) -> torch.Tensor:
        if is_prefill or self.enforce_eager or input_ids.size(0) > 512:
            return self.model.compute_logits(self.model(input_ids, positions))
        self.model.graph_replay = True
        try:
            return self.model.compute_logits(self.model(input_ids, positions))
        finally:
            self.model.graph_replay = False

    def run(self, seqs: list[Sequence], is_prefill: bool) -> dict[int, list]:
        input_ids, positions = (self.prepare_prefill(seqs) if is_prefill
                                else self.prepare_decode(seqs))
        temperatures = self.prepare_sample(seqs)
        logits = self.run_model(input_ids, positions, is_prefill)
        output = self.sampler(logits, temperatures)
        _CONTEXT.clear()
        return output


class Scheduler:
    def __init__(self, config: Config):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        scheduled: list[Sequence] = []
        while self.waiting and len(scheduled) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
        if scheduled:
            return scheduled, True
        return list(self.running)[:self.config.max_num_seqs], False

    def postprocess(self, seqs: list[Sequence], output: dict[int, list]) -> None:
        for seq in seqs:
            for position, token in output.get(seq.seq_id, []):
                assert seq.token_ids[position] == self.config.mask_token_id
                seq.token_ids[position] = token
                if ((not seq.params.ignore_eos and token == self.config.eos)
                        or len(seq) - seq.prompt_length >= seq.params.max_tokens):
                    seq.meet_eos = True
            if seq.meet_eos and seq.complete(seq.blocks[-1]) == 1.0:
                seq.status = Status.FINISHED
                self.running.remove(seq)
            seq.post_process()


class LLMEngine:
    """`LLM(...)` with data_parallel_size == 1: `model_runner`, `scheduler`, `add_request`,
    `step`, `is_finished`, `generate`."""

    def __init__(self, config: Config | None = None, sampler: nn.Module | None = None,
                 seed: int = 0):
        self.config = config or Config()
        self.model_runner = ModelRunner(self.config, sampler, seed)
        self.scheduler = Scheduler(self.config)

    def add_request(self, prompt: list[int], params: SamplingParams | None = None) -> int:
        seq = Sequence(prompt, params or SamplingParams(), self.config)
        self.scheduler.add(seq)
        return seq.seq_id

    def step(self) -> list[tuple[int, list[int]]]:
        seqs, is_prefill = self.scheduler.schedule()
        output = self.model_runner.call("run", seqs, is_prefill)
        self.scheduler.postprocess(seqs, output)
        return [(seq.seq_id, seq.completion_token_ids) for seq in seqs if seq.is_finished]

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        order = {self.add_request(p, sp): i
                 for i, (p, sp) in enumerate(zip(prompts, params, strict=True))}
        outputs: list[list[int] | None] = [None] * len(prompts)
        while not self.is_finished():
            for seq_id, tokens in self.step():
                outputs[order[seq_id]] = tokens
        return outputs  # type: ignore[return-value]


class DPEngine:
    """data_parallel_size > 1: replicas live in child processes (here: only the handles)."""

    def __init__(self, config: Config):
        self.config = replace(config)
        self.dp_size = config.data_parallel_size
        self.conns: list[Any] = []
