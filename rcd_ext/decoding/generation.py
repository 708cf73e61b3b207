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
from rcd_ext.decoding.remasking import POLICIES
from rcd_ext.models.adapters import LeftPaddedModel, LeftPadding, ModelAdapter, get_adapter
from rcd_ext.residual import ResidualConfig
from rcd_ext.wrapper import RCDModel

CACHE_MODES = ("none", "prefix", "dual")


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
    gen_length: int = 64,
    block_length: int = 32,
    steps: int | None = None,
    remasking: str = "fixed",
    threshold: float | None = 0.9,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    cache: str = "none",
    rcd: bool = True,
    ref_model: nn.Module | None = None,
    ref_tokenizer: Any = None,
    init: str = "cold",
    t_res: float = 1.0,
    temper_delta: bool = False,
    strategy: str = "entropy",
    alpha_scale: float = 1.0,
    scope: str = "block",
    dirichlet_concentration: float = 1.0,
    residual_top_k: int | None = None,
    stop_at_eos: bool = True,
    seed: int | None = None,
    mask_id: int | None = None,
    chat_template: bool = False,
    trace: bool = False,
    progress: bool = False,
    adapter: ModelAdapter | None = None,
    pad_id: int | None = None,
) -> GenerationResult:
    """Decode `gen_length` tokens after each prompt with RCD (`rcd=False`: plain SeqD).

    Args:
        model: a supported dLLM (LLaDA, Dream, SDAR, the tiny dLLM, or a generic HF masked LM
            that accepts inputs_embeds).
        prompt: text or list of texts (with `tokenizer`), token ids [P], [B, P] tensor or list
            of id lists. Prompts of different lengths are left-padded (models whose adapter
            `supports_padding`: the tiny dLLM, Dream; others raise ValueError); each row then
            decodes as it would alone.
        gen_length, block_length: tokens to generate, in blocks of block_length.
        steps: denoising steps for the whole generation (default gen_length); divided evenly
            among the gen_length / block_length blocks.
        remasking: "fixed" (the linear schedule's count per step, most confident first) or
            "threshold" (every candidate above `threshold`, at least the schedule's count).
        temperature, top_p, top_k: sampling of candidate tokens (temperature 0 = greedy).
        cache: semi-AR loop only: "none", "prefix" or "dual" (block-diffusion models always
            use their KV cache).
        rcd, ref_model, init, t_res, temper_delta, strategy, alpha_scale, scope,
            dirichlet_concentration, residual_top_k: residual options
            (`rcd_ext.residual.ResidualConfig`; residual_top_k=k: the sparse top-k residual).
        stop_at_eos: stop after the block in which every row has produced EOS; tokens after a
            row's first EOS become EOS.
        seed: seeds sampling and the Dirichlet init.
        trace: record every step (`GenerationResult.trace`).
        pad_id: padding token for prompts of different lengths (default: the tokenizer's or
            config's pad id, else EOS). Padding is never attended, masked or committed.

    Returns:
        GenerationResult with tokens [B, gen_length], sequences (left-padded prompts and tokens),
        text, stats and trace.
    """
    adapter = adapter or get_adapter(model, tokenizer, mask_id=mask_id, require_embeddings=rcd)
    if adapter.padding is not None:  # a caller's adapter padded for another batch
        adapter = replace(adapter, padding=None)
    rows = _prompt_ids(prompt, tokenizer, chat_template)
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("empty prompt")
    prompt_length = max(lengths)
    if gen_length <= 0 or block_length <= 0:
        raise ValueError(f"gen_length and block_length must be > 0, got {gen_length}, "
                         f"{block_length}")
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length "
                         f"{block_length}")
    num_blocks = gen_length // block_length
    steps = gen_length if steps is None else steps
    if steps <= 0 or steps % num_blocks:
        raise ValueError(f"steps {steps} must be a positive multiple of the number of blocks "
                         f"{num_blocks} (gen_length {gen_length} / block_length {block_length})")
    if remasking not in POLICIES:
        raise ValueError(f"remasking must be one of {POLICIES}, got {remasking!r}")
    if remasking == "threshold" and (threshold is None or not 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1] for remasking 'threshold', "
                         f"got {threshold!r}")
    block_loop = adapter.loop == "block_diffusion"
    if block_loop:
        config_block = getattr(model.config, "block_length", None)
        if adapter.family == "tiny" and config_block != block_length:
            raise ValueError(f"block_length {block_length} != the model's block_length "
                             f"{config_block}: a block-causal model decodes its own blocks")
    else:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache not in adapter.cache_modes:
            raise ValueError(f"cache {cache!r} is not supported for {adapter.family} models "
                             f"(supported: {adapter.cache_modes})")
    layout = batch_layout(lengths, gen_length, block_length, block_loop)
    total = layout.total
    if adapter.max_length is not None and total > adapter.max_length:
        raise ValueError(f"prompt of {prompt_length} tokens + {gen_length} generated = {total} "
                         f"positions exceed the model's context of {adapter.max_length}")
    if any(adapter.mask_id in row for row in rows):
        raise ValueError(f"the prompt contains the mask token (id {adapter.mask_id})")

    device = _device_of(model)
    padding = None
    fill = adapter.mask_id
    if layout.padded:
        adapter.check_padding()
        fill = _padding_id(adapter, pad_id)
        padding = LeftPadding.from_offsets(layout.offsets, total, device)
    x = torch.full((len(rows), total), adapter.mask_id, dtype=torch.long, device=device)
    for index, (row, offset) in enumerate(zip(rows, layout.offsets, strict=True)):
        x[index, :offset] = fill
        x[index, offset:offset + len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    # generation starts at one column for every row, except in a block-diffusion batch of
    # prompts that end in different blocks' slots
    gen_starts = torch.tensor(layout.gen_starts, dtype=torch.long, device=device)
    loop_start: int | torch.Tensor = prompt_length
    if len(set(layout.gen_starts)) > 1:
        loop_start = gen_starts
    # target: the model as every forward reaches it (left padding maps columns to positions)
    target: Any = model
    ref_target, ref_adapter = ref_model, None
    if padding is not None:
        adapter = adapter.with_padding(padding)
        target = LeftPaddedModel(model, padding)
        if rcd and init == "reference" and ref_model is not None:
            ref_adapter = get_adapter(ref_model, ref_tokenizer, mask_id=adapter.mask_id)
            ref_adapter = ref_adapter.with_padding(padding)
            ref_target = LeftPaddedModel(ref_model, padding)

    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    sampling = Sampling(policy=remasking, threshold=threshold, temperature=temperature,
                        top_p=top_p, top_k=top_k, generator=generator)
    wrapper = None
    runner: Any
    if rcd:
        config = ResidualConfig(t_res=t_res, temper_delta=temper_delta, strategy=strategy,
                                alpha_scale=alpha_scale, init=init, scope=scope,
                                dirichlet_concentration=dirichlet_concentration,
                                residual_top_k=residual_top_k)
        dirichlet_generator = None if seed is None else torch.Generator().manual_seed(seed + 1)
        wrapper = RCDModel(target, ref_model=ref_target, config=config, adapter=adapter,
                           ref_adapter=ref_adapter, tokenizer=tokenizer,
                           ref_tokenizer=ref_tokenizer,
                           block_length=block_length,
                           block_origin="absolute" if block_loop else "prompt",
                           generator=dirichlet_generator)
        wrapper.reset(gen_start=None if block_loop else prompt_length)
        wrapper.record_inputs = trace
        runner = wrapper
    else:
        def runner(input_ids: torch.Tensor, **kwargs: Any) -> Any:
            return target(input_ids=input_ids, **kwargs)

    records: list[StepTrace] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_blocks, desc="blocks", unit="block", leave=False)

    def on_step(block: int, step: int, start: int, end: int, chosen: torch.Tensor) -> None:
        if bar is not None and not bool((x[:, start:end] == adapter.mask_id).any()):
            bar.update(1)
        if not trace:
            return
        alpha_in = torch.zeros(chosen.shape)
        alpha = torch.zeros(chosen.shape)
        if wrapper is not None:
            wrapper.flush()
            positions = torch.arange(start, end, device=device)[None].expand(x.shape[0], -1)
            alpha = wrapper.state.alpha_at(positions).cpu()
            alpha = alpha * (x[:, start:end] == adapter.mask_id).cpu()
            called_at, called_alpha = wrapper.last_call
            columns = called_at[0] - start
            inside = (columns >= 0) & (columns < end - start)
            alpha_in[:, columns[inside].cpu()] = called_alpha[:, inside].cpu()
        records.append(StepTrace(block=block, step=step, start=start,
                                 tokens=x[:, start:end].cpu().clone(), committed=chosen.cpu(),
                                 alpha_in=alpha_in, alpha=alpha))

    began = time.perf_counter()
    with torch.no_grad():
        if block_loop:
            counters: LoopCounters = block_diffusion(
                runner, adapter, x, loop_start, block_length, steps // num_blocks, sampling,
                stop_at_eos=stop_at_eos, on_step=on_step)
        else:
            counters = semi_autoregressive(
                runner, adapter, x, prompt_length, block_length, steps // num_blocks, sampling,
                cache=cache, stop_at_eos=stop_at_eos, on_step=on_step)
    wall = time.perf_counter() - began
    if bar is not None:
        bar.close()

    columns = gen_starts[:, None] + torch.arange(gen_length, device=device)[None, :]
    tokens = torch.gather(x, 1, columns)
    if stop_at_eos and adapter.eos_id is not None:
        # everything after a row's first EOS is EOS: a batch then equals its single runs
        is_eos = (tokens == adapter.eos_id).long()
        after = (is_eos.cumsum(1) - is_eos) > 0
        tokens[after] = adapter.eos_id
    sequences = torch.full((len(rows), prompt_length), fill, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        sequences[index, prompt_length - len(row):] = torch.tensor(row, device=device)
    sequences = torch.cat([sequences, tokens], 1)
    extra = wrapper.stats if wrapper is not None else None
    stats = DecodeStats(
        batch_size=len(rows),
        forward_passes=counters.forwards + (extra.self_init_forwards if extra else 0),
        reference_forwards=extra.reference_forwards if extra else 0,
        denoising_steps=counters.steps, tokens=counters.committed, blocks=counters.blocks,
        wall_time_s=wall,
    )
    text = None
    if tokenizer is not None:
        text = []
        for row in tokens.tolist():
            if adapter.eos_id is not None and adapter.eos_id in row:
                row = row[:row.index(adapter.eos_id)]
            text.append(tokenizer.decode(row, skip_special_tokens=True))
    return GenerationResult(tokens=tokens, sequences=sequences, stats=stats, text=text,
                            trace=records, prompt_length=prompt_length, prompt_lengths=lengths)


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
