"""A CPU stand-in for JetEngine (Labman42/JetEngine), written from scratch from its public
structure: only what `rcd_ext.integrations.jetengine` relies on.

Reproduced: `LLMEngine.step` (schedule, `ModelRunner.run(seqs, run_type)`, then
`Scheduler.postprocess(seqs, logits, run_type)` returning the finished sequences); continuous
batching (`max_num_seqs`, requests admitted from a waiting queue as others finish);
`Sequence` with a global `seq_id` counter, committed `token_ids` (`len(seq)`), the block being
decoded in `intermediate_block_tokens` (the prompt's tail, then masks), the statuses WAITING ->
PREFILLING -> DENOISING -> SAVING -> (DENOISING | FINISHED), the SAVING step being one more
forward of the finished block before it is committed; `prepare_prefill` (whole committed
prompt blocks, positions 0..len-1 per request, `cu_seqlens_q`) and `prepare_denoise` (the
stacked blocks, request-major, positions `len(seq) + arange(block_length)`); `run_model` under
inference mode computing `model.compute_logits(model(input_ids, positions))`; an LM head that
keeps one row per request in PREFILL; `config.enforce_eager` (False, JetEngine's default,
replays a "captured graph" for DENOISE batches: no Python hooks run) and
`config.tensor_parallel_size`.

Not JetEngine: no KV cache (the model sees the block only), greedy commits by a confidence
threshold with a per-step minimum (JetEngine samples; its strategies are reduced to two
minimums), `abort_request` (JetEngine has none; it lets a request leave
in the middle of a block) and the scheduler's `order` (a permutation of each DENOISE batch, to
show that nothing may depend on a request's place in the batch).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

import torch
from torch import nn


class RunType(Enum):
    PREFILL = auto()
    DENOISE = auto()


class SequenceStatus(Enum):
    WAITING = auto()
    PREFILLING = auto()
    DENOISING = auto()
    SAVING = auto()
    FINISHED = auto()


@dataclass
class Config:
    mask_token_id: int
    block_length: int = 4
    max_num_seqs: int = 8
    tensor_parallel_size: int = 1
    enforce_eager: bool = False


@dataclass
class SamplingParams:
    max_tokens: int = 8
    block_length: int = 4
    denoising_steps: int = 4
    dynamic_threshold: float = 0.5
    # "low_confidence_dynamic": at least ceil(block / steps) commits per step, so a block is
    # complete after `denoising_steps`; "entropy_bounded": at least one (as JetEngine's), so a
    # block can reach SAVING with masks left, which are committed as they are
    remasking_strategy: str = "low_confidence_dynamic"


@dataclass
class _Context:
    run_type: RunType | None = None
    cu_seqlens_q: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_length: int = 4


_context = _Context()


def set_context(**values) -> None:
    global _context
    _context = _Context(**values)


def get_context() -> _Context:
    return _context


def reset_context() -> None:
    global _context
    _context = _Context()


class Sequence:
    counter = itertools.count()

    def __init__(self, prompt: list[int], mask_token_id: int, params: SamplingParams):
        self.seq_id = next(Sequence.counter)
        self.block_length = params.block_length
        self.denoising_steps = params.denoising_steps
        self.threshold = params.dynamic_threshold
        self.remasking_strategy = params.remasking_strategy
        self.max_tokens = params.max_tokens
        self.mask_token_id = mask_token_id
        self.num_prompt_tokens = len(prompt)
        whole_blocks = len(prompt) // self.block_length * self.block_length
        self.token_ids = list(prompt[:whole_blocks])
        tail = list(prompt[whole_blocks:])
        self.intermediate_block_tokens = torch.tensor(
            tail + [mask_token_id] * (self.block_length - len(tail)), dtype=torch.long)
        self.current_denoising_step = 0
        self.status = SequenceStatus.WAITING if whole_blocks else SequenceStatus.DENOISING

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_transfer_per_step(self) -> int:
        if self.remasking_strategy == "entropy_bounded":
            return 1
        return -(-self.block_length // self.denoising_steps)

    def commit_block(self) -> None:
        self.token_ids.extend(self.intermediate_block_tokens.tolist())
        if len(self.token_ids) - self.num_prompt_tokens >= self.max_tokens:
            self.status = SequenceStatus.FINISHED

    def start_new_block(self) -> None:
        self.intermediate_block_tokens = torch.full((self.block_length,), self.mask_token_id,
                                                    dtype=torch.long)
        self.current_denoising_step = 0
        self.status = SequenceStatus.DENOISING


@dataclass
class ModelCall:
    """One forward as the model saw it (flat, request-major)."""

    run_type: RunType
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    embeds: torch.Tensor  # [N, D] what embed_tokens returned, hooks included
    logits: torch.Tensor | None = None  # [N, V] DENOISE, [B, V] PREFILL


class _Body(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)


class TinyBlockModel(nn.Module):
    """Embedding + learned absolute positions + one mixing layer shared by the tokens of a
    request (never across requests) + LM head; random fixed weights. Masked positions' logits
    depend on the other tokens' input embeddings, so an injected residual changes them."""

    def __init__(self, vocab: int = 64, dim: int = 16, max_len: int = 256, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.model = _Body(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
            parameter.requires_grad_(False)
        self.calls: list[ModelCall] = []

    def _segments(self, tokens: int) -> torch.Tensor:
        context = get_context()
        if context.run_type == RunType.PREFILL:
            lengths = context.cu_seqlens_q[1:] - context.cu_seqlens_q[:-1]
            return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        return torch.arange(tokens) // context.block_length

    def _body(self, embeds: torch.Tensor, input_ids: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        self.calls.append(ModelCall(get_context().run_type, input_ids.clone(),
                                    positions.clone(), embeds.clone()))
        hidden = embeds + self.positions(positions)
        segments = self._segments(hidden.shape[0])
        mixed = torch.tanh(self.mix(hidden))
        pooled = torch.zeros(int(segments.max()) + 1, hidden.shape[1]).index_add_(0, segments,
                                                                                  mixed)
        return hidden + pooled[segments] / self.mix.in_features

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._body(self.model.embed_tokens(input_ids), input_ids, positions)

    def forward_graph(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What a CUDA-graph replay does: the same kernels, no Python module hooks."""
        embeds = nn.functional.embedding(input_ids, self.model.embed_tokens.weight)
        return self._body(embeds, input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        context = get_context()
        if context.run_type == RunType.PREFILL:
            hidden = hidden[context.cu_seqlens_q[1:] - 1]
        logits = self.lm_head(torch.tanh(hidden))
        self.calls[-1].logits = logits.clone()
        return logits


@dataclass
class RunRecord:
    """One `ModelRunner.run` call: which requests, how many tokens each."""

    run_type: RunType
    seq_ids: list[int]
    lengths: list[int]


class ModelRunner:
    def __init__(self, config: Config, model: nn.Module):
        self.config = config
        self.model = model
        self.enforce_eager = config.enforce_eager
        self.world_size = config.tensor_parallel_size
        self.rank = 0
        self.records: list[RunRecord] = []

    def reinit_model(self, model: nn.Module) -> None:
        """JetEngine's reinit_model builds a fresh model object (reload_from_hf_model)."""
        self.model = model

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(seq) for seq in seqs], dtype=torch.int32)
        input_ids = torch.tensor([t for seq in seqs for t in seq.token_ids], dtype=torch.long)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
        positions = torch.arange(input_ids.numel(), dtype=torch.long) - starts
        set_context(run_type=RunType.PREFILL, cu_seqlens_q=cu_seqlens,
                    block_length=self.config.block_length)
        return input_ids, positions

    def prepare_denoise(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.stack([seq.intermediate_block_tokens for seq in seqs]).view(-1)
        cached = torch.tensor([len(seq) for seq in seqs], dtype=torch.int32)
        offsets = torch.arange(seqs[0].block_length, dtype=torch.long)
        positions = (cached[:, None] + offsets[None]).view(-1)
        set_context(run_type=RunType.DENOISE, context_lens=cached,
                    block_length=self.config.block_length)
        return input_ids, positions

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions))

    @torch.inference_mode()
    def _replay_graph(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.model.forward_graph(input_ids, positions))

    def run(self, seqs: list[Sequence], run_type: RunType) -> torch.Tensor | None:
        if run_type == RunType.PREFILL:
            input_ids, positions = self.prepare_prefill(seqs)
            lengths = [len(seq) for seq in seqs]
        elif run_type == RunType.DENOISE:
            input_ids, positions = self.prepare_denoise(seqs)
            lengths = [seq.block_length for seq in seqs]
        else:
            return None
        self.records.append(RunRecord(run_type, [seq.seq_id for seq in seqs], lengths))
        if run_type == RunType.DENOISE and not self.enforce_eager:
            logits = self._replay_graph(input_ids, positions)
        else:
            logits = self.run_model(input_ids, positions)
        reset_context()
        return logits


class Scheduler:
    def __init__(self, config: Config,
                 order: Callable[[list[Sequence], int], list[Sequence]] | None = None):
        self.config = config
        self.mask_token_id = config.mask_token_id
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.order = order
        self.steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.running and not self.waiting

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        self.running = [seq for seq in self.running if not seq.is_finished]
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            self.running.append(self.waiting.popleft())
        prefill = [seq for seq in self.running if seq.status == SequenceStatus.WAITING]
        for seq in prefill:
            seq.status = SequenceStatus.PREFILLING
        denoise = [seq for seq in self.running
                   if seq.status in (SequenceStatus.DENOISING, SequenceStatus.SAVING)]
        if self.order is not None:
            denoise = self.order(denoise, self.steps)
        self.steps += 1
        return prefill, denoise

    def postprocess(self, seqs: list[Sequence], logits: torch.Tensor,
                    run_type: RunType) -> list[Sequence]:
        if run_type == RunType.PREFILL:
            for seq in seqs:
                seq.status = SequenceStatus.DENOISING
        else:
            block = seqs[0].block_length
            scores = logits.float().view(len(seqs), block, -1).clone()
            scores[..., self.mask_token_id] = -torch.inf  # never "commit" a mask
            confidence, guess = scores.softmax(-1).max(-1)
            for seq, conf, x0 in zip(seqs, confidence, guess, strict=True):
                if seq.status == SequenceStatus.DENOISING:
                    tokens = seq.intermediate_block_tokens
                    masked = tokens == self.mask_token_id
                    take = masked & (conf > seq.threshold)
                    need = min(seq.num_transfer_per_step, int(masked.sum()))
                    if int(take.sum()) < need:
                        best = torch.where(masked, conf, -torch.inf).topk(need).indices
                        take[best] = True
                    seq.intermediate_block_tokens = torch.where(take, x0, tokens)
                    seq.current_denoising_step += 1
                    if (not bool((seq.intermediate_block_tokens == self.mask_token_id).any())
                            or seq.current_denoising_step >= seq.denoising_steps):
                        seq.status = SequenceStatus.SAVING
                elif seq.status == SequenceStatus.SAVING:
                    seq.commit_block()
                    if not seq.is_finished:
                        seq.start_new_block()
        finished = [seq for seq in self.running if seq.is_finished]
        self.running = [seq for seq in self.running if not seq.is_finished]
        return finished


@dataclass
class LLMEngine:
    """`LLM(model_path, ...)` in JetEngine; here built from a model object and a Config."""

    model: nn.Module
    config: Config
    order: Callable[[list[Sequence], int], list[Sequence]] | None = None
    outputs: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_runner = ModelRunner(self.config, self.model)
        self.scheduler = Scheduler(self.config, self.order)

    def add_request(self, prompt: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(prompt, self.config.mask_token_id, params)
        self.scheduler.add(seq)
        return seq

    def abort_request(self, seq_id: int) -> None:
        """Not JetEngine API (it has no abort): the request leaves mid-block."""
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.seq_id == seq_id:
                seq.status = SequenceStatus.FINISHED
        self.scheduler.running = [s for s in self.scheduler.running if s.seq_id != seq_id]
        self.scheduler.waiting = deque(s for s in self.scheduler.waiting if s.seq_id != seq_id)

    def step(self) -> list[tuple[int, list[int]]]:
        prefill, denoise = self.scheduler.schedule()
        finished: list[Sequence] = []
        if prefill:
            logits = self.model_runner.run(prefill, RunType.PREFILL)
            finished += self.scheduler.postprocess(prefill, logits, RunType.PREFILL)
        if denoise:
            logits = self.model_runner.run(denoise, RunType.DENOISE)
            finished += self.scheduler.postprocess(denoise, logits, RunType.DENOISE)
        done = [(seq.seq_id, list(seq.token_ids)) for seq in finished]
        self.outputs.update(done)
        return done

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 max_active: int | None = None) -> list[list[int]]:
        """All prompts, at most `max_active` admitted at a time (JetEngine's
        generate_streaming): requests join as others finish. Token ids per prompt, in order."""
        if not isinstance(params, list):
            params = [params] * len(prompts)
        limit = max_active or len(prompts)
        pending = deque(zip(prompts, params, strict=True))
        ids = []
        while pending or not self.is_finished():
            while pending and len(self.scheduler.running) + len(self.scheduler.waiting) < limit:
                prompt, sp = pending.popleft()
                ids.append(self.add_request(prompt, sp).seq_id)
            self.step()
        return [self.outputs[seq_id] for seq_id in ids]


LLM = LLMEngine
