"""`rcd_ext.generate`: RCD (or, with `rcd=False`, plain SeqD) decoding of a prompt batch.

The loop is a plain sampler (`rcd_ext.decoding.loops`); RCD is switched on by handing it the
model wrapped by `rcd_ext.wrap`, so the residual logic exists once.

Prompts of different lengths are left-padded (`batch_layout`): the loops and the wrapper work
on absolute columns of the padded batch, the adapter adds the attention mask and position ids
to every forward, and `LeftPaddedModel` gives the model each row's own positions. A batch with
prompts of one length is decoded exactly as before (no mask, no position ids).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from rcd_ext.decoding.loops import (
    LoopCounters,
    Sampling,
    block_diffusion,
    semi_autoregressive,
)
from rcd_ext.models.adapters import LeftPaddedModel, LeftPadding, ModelAdapter, get_adapter
from rcd_ext.options import CACHE_MODES, DecodingConfig, ResidualConfig, build, split_flat
from rcd_ext.seeding import DIRICHLET_STREAM, seeded_generator
from rcd_ext.wrapper import RCDModel

__all__ = ["CACHE_MODES", "BatchLayout", "DecodeStats", "GenerationResult", "StepTrace",
           "batch_layout", "generate"]


@dataclass
class DecodeStats:
    """What decoding cost. Counts are for the whole batch; rates are per sequence."""

    batch_size: int
    forward_passes: int  # target forwards: steps, cache prefill/commit, init "self"
    reference_forwards: int  # forwards of the reference model (init "reference")
    denoising_steps: int
    tokens: int  # generated tokens committed by denoising steps, all rows
    blocks: int
    wall_time_s: float

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(1, self.denoising_steps * self.batch_size)

    @property
    def tokens_per_forward(self) -> float:
        forwards = self.forward_passes + self.reference_forwards
        return self.tokens / max(1, forwards * self.batch_size)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.wall_time_s, 1e-9)

    def summary(self) -> str:
        """One line: the numbers people compare RCD and SeqD on."""
        return (f"{self.tokens} tokens in {self.wall_time_s:.2f}s ({self.tokens_per_second:.1f} "
                f"tok/s) | {self.denoising_steps} steps, {self.forward_passes} forwards + "
                f"{self.reference_forwards} reference | {self.tokens_per_step:.2f} tok/step, "
                f"{self.tokens_per_forward:.2f} tok/forward")

    def as_dict(self) -> dict[str, float]:
        data = dict(self.__dict__)
        data.update(tokens_per_step=self.tokens_per_step,
                    tokens_per_forward=self.tokens_per_forward,
                    tokens_per_second=self.tokens_per_second)
        return data


@dataclass
class StepTrace:
    """One denoising step of one block (for `--show-steps`). Tensors are [B, n] on the CPU.

    tokens: the block after the step (mask id where still masked); committed: positions
    committed by this step; alpha_in: residual weight each masked position was given as input
    to this step (the init strategy's at a block's first step; 0 without RCD); alpha: the
    weight each still-masked position carries into the next step.
    """

    block: int
    step: int
    start: int  # absolute position of the block's first token
    tokens: torch.Tensor
    committed: torch.Tensor
    alpha_in: torch.Tensor
    alpha: torch.Tensor


@dataclass
class GenerationResult:
    """tokens [B, gen_length]; sequences [B, prompt_length + gen_length]: each prompt and its
    tokens, left-padded with the pad id to the longest prompt (as Hugging Face's generate
    returns them: row b starts at column prompt_length - prompt_lengths[b]); text when a
    tokenizer was given (cut at the first EOS, no padding); stats; trace (list of StepTrace)
    when asked for; prompt_length (the longest prompt) and prompt_lengths (each row's)."""

    tokens: torch.Tensor
    sequences: torch.Tensor
    stats: DecodeStats
    text: list[str] | None = None
    trace: list[StepTrace] = field(default_factory=list)
    prompt_length: int = 0
    prompt_lengths: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class BatchLayout:
    """Where the rows of a batch sit in the decoded sequence x [B, total].

    Attributes:
        gen_starts: [B] column where each row's generation starts.
        offsets: [B] padding columns in front of each row (its prompt is
            x[b, offsets[b]:gen_starts[b]]).
        total: columns of x.
    """

    gen_starts: list[int]
    offsets: list[int]
    total: int

    @property
    def padded(self) -> bool:
        return any(self.offsets)


def batch_layout(lengths: Sequence[int], gen_length: int, block_length: int,
                 block_diffusion: bool) -> BatchLayout:
    """How `generate` lays out prompts of `lengths` tokens.

    Semi-AR loop: every prompt is left-padded to the longest, P; generation fills P..P+gen-1
    (the blocks start at the prompt's end, so all rows share them). Block diffusion: blocks
    are aligned to absolute multiples of block_length and membership is by slot, so a row is
    padded by whole blocks only (its blocks stay those it has alone) and ends in the last block
    of the longest prompt or the one before; rows then start generating at different columns
    and total = the longest row's alone.
    """
    longest = max(lengths)
    if block_diffusion:
        offsets = [(longest - n) // block_length * block_length for n in lengths]
        total = -(-(longest + gen_length) // block_length) * block_length
    else:
        offsets = [longest - n for n in lengths]
        total = longest + gen_length
    return BatchLayout(gen_starts=[o + n for o, n in zip(offsets, lengths, strict=True)],
                       offsets=offsets, total=total)


def _prompt_ids(prompt: Any, tokenizer: Any, chat_template: bool) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            prompt = prompt[None]
        if prompt.dim() != 2:
            raise ValueError(f"prompt tensor must be [P] or [B, P], got {tuple(prompt.shape)}")
        return prompt.tolist()
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (pass tokenizer=...)")
        rows = []
        for text in prompt:
            if chat_template:
                rows.append(list(tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True,
                    tokenize=True)))
            else:
                rows.append(list(tokenizer(text)["input_ids"]))
        unk_id = getattr(tokenizer, "unk_token_id", None)
        if unk_id is not None and any(unk_id in row for row in rows):
            # the prompt silently loses words otherwise; naming them costs a second tokenisation,
            # paid only when an unknown token is there
            from rcd_ext.models.tiny_tokenizer import check_known_words

            check_known_words(tokenizer, prompt)
        return rows
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, Sequence) for p in prompt):
        return [list(p) for p in prompt]
    raise ValueError(f"prompt must be text, a list of texts, token ids or a [B, P] tensor; "
                     f"got {type(prompt).__name__}")


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def generate(
    model: nn.Module,
    prompt: Any,
    *,
    tokenizer: Any = None,
    residual: ResidualConfig | None = None,
    decoding: DecodingConfig | None = None,
    rcd: bool = True,
    ref_model: nn.Module | None = None,
    ref_tokenizer: Any = None,
    seed: int | None = None,
    mask_id: int | None = None,
    chat_template: bool = False,
    trace: bool = False,
    progress: bool = False,
    adapter: ModelAdapter | None = None,
    pad_id: int | None = None,
    **options: Any,
) -> GenerationResult:
    """Decode `gen_length` tokens after each prompt with RCD (`rcd=False`: plain SeqD).

    Args:
        model: a supported dLLM (LLaDA, Dream, SDAR, the tiny dLLM, or a generic HF masked LM
            that accepts inputs_embeds).
        prompt: text or list of texts (with `tokenizer`), token ids [P], [B, P] tensor or list
            of id lists. Prompts of different lengths are left-padded (models whose adapter
            `supports_padding`: the tiny dLLM, Dream; others raise ValueError); each row then
            decodes as it would alone.
        residual: residual options (`rcd_ext.options.ResidualConfig`; used when rcd).
        decoding: decoding-loop options (`rcd_ext.options.DecodingConfig`: gen_length,
            block_length, steps, remasking, threshold, temperature, top_p, top_k, cache,
            stop_at_eos). steps above gen_length are refused (each step commits a token).
        **options: the same options as flat keywords (`gen_length=8, t_res=0.92`), with the
            dataclasses' defaults. A flat option of a concern whose config is also given is
            refused (ValueError): pass `dataclasses.replace(config, name=value)` instead.
        ref_model, ref_tokenizer: the frozen reference model of init "reference".
        seed: seeds sampling and the Dirichlet init (`rcd_ext.seeding`).
        trace: record every step (`GenerationResult.trace`).
        pad_id: padding token for prompts of different lengths (default: the tokenizer's or
            config's pad id, else EOS). Padding is never attended, masked or committed.

    Returns:
        GenerationResult with tokens [B, gen_length], sequences (left-padded prompts and tokens),
        text, stats and trace.
    """
    residual, decoding = resolve_options(residual, decoding, options)
    adapter = adapter or get_adapter(model, tokenizer, mask_id=mask_id, require_embeddings=rcd)
    if adapter.padding is not None:  # a caller's adapter padded for another batch
        adapter = replace(adapter, padding=None)
    rows = _prompt_ids(prompt, tokenizer, chat_template)
    check_loop_options(adapter, decoding)
    batch = lay_out_batch(rows, adapter, decoding, pad_id, _device_of(model))
    runner, wrapper = build_runner(model, batch, residual if rcd else None, decoding,
                                   ref_model=ref_model, ref_tokenizer=ref_tokenizer,
                                   tokenizer=tokenizer, seed=seed, trace=trace)
    recorder = StepRecorder(batch, wrapper, trace=trace,
                            progress_blocks=decoding.num_blocks if progress else None)
    sampling = Sampling(policy=decoding.remasking, threshold=decoding.threshold,
                        temperature=decoding.temperature, top_p=decoding.top_p,
                        top_k=decoding.top_k,
                        generator=seeded_generator(seed, device=batch.x.device))
    began = time.perf_counter()
    with torch.no_grad():
        counters = run_loop(runner, batch, decoding, sampling, recorder)
    wall = time.perf_counter() - began
    recorder.close()
    return assemble_result(batch, decoding, counters, wall, wrapper, recorder.records,
                           tokenizer)


def resolve_options(residual: ResidualConfig | None, decoding: DecodingConfig | None,
                    flat: dict[str, Any]) -> tuple[ResidualConfig, DecodingConfig]:
    """The residual and decoding configs of a `generate` call: given, or built from the flat
    keywords (TypeError for an unknown keyword; ValueError for a config plus flat options of
    its own, or for values its dataclass refuses)."""
    residual_flat, decoding_flat = split_flat(flat, ResidualConfig, DecodingConfig)
    residual = build(ResidualConfig, residual, residual_flat, "residual")
    decoding = build(DecodingConfig, decoding, decoding_flat, "decoding")
    decoding.require_gen_length()
    return residual, decoding


def check_loop_options(adapter: ModelAdapter, decoding: DecodingConfig) -> None:
    """ValueError for decoding options the model's loop cannot run (block size, cache)."""
    if adapter.loop == "block_diffusion":
        adapter.check_block_length(decoding.block_length)
        return
    if decoding.cache not in adapter.cache_modes:
        raise ValueError(f"cache {decoding.cache!r} is not supported for {adapter.family} "
                         f"models (supported: {adapter.cache_modes})")


@dataclass
class PromptBatch:
    """The prompts laid out for decoding.

    x: [B, total] the sequence buffer (padding, prompt, mask ids to fill); rows: each prompt's
    ids; layout: where they sit; adapter: the model's adapter (with the padding, if any);
    target: the model as every forward reaches it (`LeftPaddedModel` when padded); fill: the id
    written into padding columns; loop_start: the column (int) or per-row columns [B] where
    generation starts.
    """

    x: torch.Tensor
    rows: list[list[int]]
    layout: BatchLayout
    adapter: ModelAdapter
    target: Any
    padding: LeftPadding | None
    fill: int
    loop_start: int | torch.Tensor

    @property
    def prompt_length(self) -> int:
        return max(len(row) for row in self.rows)

    @property
    def block_loop(self) -> bool:
        return self.adapter.loop == "block_diffusion"


def lay_out_batch(rows: list[list[int]], adapter: ModelAdapter, decoding: DecodingConfig,
                  pad_id: int | None, device: torch.device) -> PromptBatch:
    """Prompts -> the [B, total] buffer, left-padded where lengths differ (see `batch_layout`);
    ValueError for an empty prompt, one holding the mask id, or one that leaves no room."""
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("empty prompt")
    gen_length = decoding.require_gen_length()
    layout = batch_layout(lengths, gen_length, decoding.block_length,
                          adapter.loop == "block_diffusion")
    if adapter.max_length is not None and layout.total > adapter.max_length:
        raise ValueError(f"prompt of {max(lengths)} tokens + {gen_length} generated = "
                         f"{layout.total} positions exceed the model's context of "
                         f"{adapter.max_length}")
    if any(adapter.mask_id in row for row in rows):
        raise ValueError(f"the prompt contains the mask token (id {adapter.mask_id})")
    padding, fill = None, adapter.mask_id
    if layout.padded:
        adapter.check_padding()
        fill = _padding_id(adapter, pad_id)
        padding = LeftPadding.from_offsets(layout.offsets, layout.total, device)
    x = torch.full((len(rows), layout.total), adapter.mask_id, dtype=torch.long, device=device)
    for index, (row, offset) in enumerate(zip(rows, layout.offsets, strict=True)):
        x[index, :offset] = fill
        x[index, offset:offset + len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    # generation starts at one column for every row, except in a block-diffusion batch of
    # prompts that end in different blocks' slots
    loop_start: int | torch.Tensor = max(lengths)
    if len(set(layout.gen_starts)) > 1:
        loop_start = torch.tensor(layout.gen_starts, dtype=torch.long, device=device)
    return PromptBatch(x=x, rows=rows, layout=layout, adapter=adapter, target=None,
                       padding=padding, fill=fill, loop_start=loop_start)


def build_runner(model: nn.Module, batch: PromptBatch, residual: ResidualConfig | None,
                 decoding: DecodingConfig, *, ref_model: nn.Module | None, ref_tokenizer: Any,
                 tokenizer: Any, seed: int | None,
                 trace: bool) -> tuple[Any, RCDModel | None]:
    """What the loop calls for logits: the RCD wrapper (residual given) or the plain model;
    returns (runner, wrapper or None). Left padding reaches every forward through the adapter
    and `LeftPaddedModel`; `batch.adapter` and `batch.target` are set here."""
    target: Any = model
    ref_target, ref_adapter = ref_model, None
    if batch.padding is not None:
        batch.adapter = batch.adapter.with_padding(batch.padding)
        target = LeftPaddedModel(model, batch.padding)
        if residual is not None and residual.init == "reference" and ref_model is not None:
            ref_adapter = get_adapter(ref_model, ref_tokenizer, mask_id=batch.adapter.mask_id)
            ref_adapter = ref_adapter.with_padding(batch.padding)
            ref_target = LeftPaddedModel(ref_model, batch.padding)
    batch.target = target
    if residual is None:
        def runner(input_ids: torch.Tensor, **kwargs: Any) -> Any:
            return target(input_ids=input_ids, **kwargs)

        return runner, None
    wrapper = RCDModel(target, ref_model=ref_target, config=residual, adapter=batch.adapter,
                       ref_adapter=ref_adapter, tokenizer=tokenizer, ref_tokenizer=ref_tokenizer,
                       block_length=decoding.block_length,
                       block_origin="absolute" if batch.block_loop else "prompt",
                       generator=seeded_generator(seed, stream=DIRICHLET_STREAM))
    wrapper.reset(gen_start=None if batch.block_loop else batch.prompt_length)
    wrapper.record_inputs = trace
    return wrapper, wrapper


class StepRecorder:
    """The loops' `on_step` callback: advances the progress bar over blocks and, when tracing,
    records each step as a StepTrace (tokens, committed positions, alpha in and out)."""

    def __init__(self, batch: PromptBatch, wrapper: RCDModel | None, *, trace: bool,
                 progress_blocks: int | None = None) -> None:
        self.batch = batch
        self.wrapper = wrapper
        self.trace = trace
        self.records: list[StepTrace] = []
        self.bar = None
        if progress_blocks is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=progress_blocks, desc="blocks", unit="block", leave=False)

    def __call__(self, block: int, step: int, start: int, end: int,
                 chosen: torch.Tensor) -> None:
        x, mask_id = self.batch.x, self.batch.adapter.mask_id
        if self.bar is not None and not bool((x[:, start:end] == mask_id).any()):
            self.bar.update(1)
        if self.trace:
            alpha_in, alpha = self._alphas(start, end, chosen.shape)
            self.records.append(StepTrace(block=block, step=step, start=start,
                                          tokens=x[:, start:end].cpu().clone(),
                                          committed=chosen.cpu(), alpha_in=alpha_in,
                                          alpha=alpha))

    def _alphas(self, start: int, end: int,
                shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n] the alpha each position was given as input, and the one it carries on."""
        alpha_in, alpha = torch.zeros(shape), torch.zeros(shape)
        wrapper, x = self.wrapper, self.batch.x
        if wrapper is None:
            return alpha_in, alpha
        wrapper.flush()
        positions = torch.arange(start, end, device=x.device)[None].expand(x.shape[0], -1)
        alpha = wrapper.state.alpha_at(positions).cpu()
        alpha = alpha * (x[:, start:end] == self.batch.adapter.mask_id).cpu()
        called_at, called_alpha = wrapper.last_call
        columns = called_at[0] - start
        inside = (columns >= 0) & (columns < end - start)
        alpha_in[:, columns[inside].cpu()] = called_alpha[:, inside].cpu()
        return alpha_in, alpha

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_loop(runner: Any, batch: PromptBatch, decoding: DecodingConfig, sampling: Sampling,
             recorder: StepRecorder) -> LoopCounters:
    """Run the model's loop (block diffusion, or semi-AR with its cache) over `batch.x`."""
    if batch.block_loop:
        return block_diffusion(runner, batch.adapter, batch.x, batch.loop_start,
                               decoding.block_length, decoding.steps_per_block, sampling,
                               stop_at_eos=decoding.stop_at_eos, on_step=recorder)
    return semi_autoregressive(runner, batch.adapter, batch.x, batch.prompt_length,
                               decoding.block_length, decoding.steps_per_block, sampling,
                               cache=decoding.cache, stop_at_eos=decoding.stop_at_eos,
                               on_step=recorder)


def assemble_result(batch: PromptBatch, decoding: DecodingConfig, counters: LoopCounters,
                    wall: float, wrapper: RCDModel | None, records: list[StepTrace],
                    tokenizer: Any) -> GenerationResult:
    """Generated tokens (EOS-filled after a row's first EOS when stop_at_eos), the left-padded
    sequences, the stats and the decoded text."""
    x, adapter, prompt_length = batch.x, batch.adapter, batch.prompt_length
    gen_starts = torch.tensor(batch.layout.gen_starts, dtype=torch.long, device=x.device)
    columns = gen_starts[:, None] + torch.arange(decoding.gen_length, device=x.device)[None, :]
    tokens = torch.gather(x, 1, columns)
    if decoding.stop_at_eos and adapter.eos_id is not None:
        # everything after a row's first EOS is EOS: a batch then equals its single runs
        is_eos = (tokens == adapter.eos_id).long()
        after = (is_eos.cumsum(1) - is_eos) > 0
        tokens[after] = adapter.eos_id
    sequences = torch.full((len(batch.rows), prompt_length), batch.fill, dtype=torch.long,
                           device=x.device)
    for index, row in enumerate(batch.rows):
        sequences[index, prompt_length - len(row):] = torch.tensor(row, device=x.device)
    extra = wrapper.stats if wrapper is not None else None
    stats = DecodeStats(
        batch_size=len(batch.rows),
        forward_passes=counters.forwards + (extra.self_init_forwards if extra else 0),
        reference_forwards=extra.reference_forwards if extra else 0,
        denoising_steps=counters.steps, tokens=counters.committed, blocks=counters.blocks,
        wall_time_s=wall,
    )
    return GenerationResult(tokens=tokens, sequences=torch.cat([sequences, tokens], 1),
                            stats=stats, text=_texts(tokens, adapter.eos_id, tokenizer),
                            trace=records, prompt_length=prompt_length,
                            prompt_lengths=[len(row) for row in batch.rows])


def _texts(tokens: torch.Tensor, eos_id: int | None, tokenizer: Any) -> list[str] | None:
    """Each row decoded up to its first EOS (None without a tokenizer)."""
    if tokenizer is None:
        return None
    texts = []
    for row in tokens.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def _padding_id(adapter: ModelAdapter, pad_id: int | None) -> int:
    """The token written into padding columns: `pad_id`, else the model's pad id, else EOS."""
    chosen = pad_id
    for candidate in (adapter.pad_id, adapter.eos_id):
        if chosen is None:
            chosen = candidate
    if chosen is None:
        raise ValueError("prompts of different lengths are left-padded, but neither the "
                         "tokenizer nor the model config defines a pad_token_id or "
                         "eos_token_id: pass pad_id=<a token id> to generate()")
    rows = adapter.embed_weight.shape[0]
    if chosen == adapter.mask_id or not 0 <= chosen < rows:
        raise ValueError(f"pad_id {chosen} must be a token of the embedding table (0..{rows - 1}) "
                         f"other than the mask id {adapter.mask_id}")
    return int(chosen)
