"""`rcd_ext.wrap(model)`: a stateful model wrapper that turns a plain dLLM sampler into RCD.

Samplers only ever call `model(x, ...)` (full sequence) or `model(x_slice, past_key_values=...,
use_cache=..., replace_position=... | position_ids=...)`. On every call the wrapper

1. finds the absolute positions of the tokens it was given: the True columns of
   `replace_position` (dual cache), else `position_ids`, else cache length + 0..l-1;
2. notices a new prompt (batch size changed, or a token it saw committed is now different or
   masked again) and forgets every residual;
3. primes masked positions that have no residual yet with the init strategy (reference model
   on the whole sequence seen so far, one extra target forward, Dirichlet, or nothing);
4. calls the real model with `inputs_embeds` = token embeddings with the stored residuals at
   masked positions;
5. keeps this call's logits and returns the model's output untouched; at the next call (or
   `flush()`) the residuals of the positions the sampler left masked are stored
   (`ResidualState.update`), so rows committed in between cost nothing.

`rcd_ext.generate` drives the same wrapper, so there is one implementation of the residual
logic. With `enabled=False` the wrapper forwards every call unchanged (bit-identical to the
plain model).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rcd_ext.embedding_rewrite import EmbeddingRewrite
from rcd_ext.init_strategies import InitCall, get_init_strategy
from rcd_ext.models.adapters import ModelAdapter, check_reference, get_adapter
from rcd_ext.residual import ResidualConfig, ResidualState

UNKNOWN = -1  # token id recorded for positions the wrapper has not seen
# block index given to columns no block counts (before a row's origin, or no masks left): far
# above any real block, so it never equals the current block
NO_BLOCK = 2**62
INJECTIONS = ("inputs_embeds", "hook")


@dataclass
class WrapperStats:
    """Forward passes made through the wrapper (target calls, extra init calls, reference)."""

    target_forwards: int = 0
    self_init_forwards: int = 0
    reference_forwards: int = 0
    residual_rows: int = 0

    @property
    def total_forwards(self) -> int:
        return self.target_forwards + self.self_init_forwards + self.reference_forwards


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model to call: PEFT's `PeftModel` (whose forward(*args, **kwargs) hides the argument
    names the wrapper reads) gives way to `get_base_model()`, which still runs the LoRA layers
    PEFT injected into it. Any other model is returned as is."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


class RCDModel:
    """RCD wrapper around a dLLM; call it exactly like the model. Build one with `wrap`.

    Attributes:
        model: the wrapped model (every unknown attribute is looked up on it).
        state: the `ResidualState` (per-position residuals, alpha for tracing).
        stats: `WrapperStats`.
        enabled: False makes every call a plain pass-through.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ref_model: nn.Module | None = None,
        config: ResidualConfig | None = None,
        adapter: ModelAdapter | None = None,
        ref_adapter: ModelAdapter | None = None,
        tokenizer: Any = None,
        ref_tokenizer: Any = None,
        mask_id: int | None = None,
        block_length: int | None = None,
        block_origin: str = "prompt",
        generator: torch.Generator | None = None,
        enabled: bool = True,
        injection: str = "inputs_embeds",
    ):
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        model = unwrap_peft(model)
        self.model = model
        self.injection = injection
        self.residual_config = config or ResidualConfig()
        self.adapter = adapter or get_adapter(model, tokenizer, mask_id=mask_id,
                                              require_embeddings=injection == "inputs_embeds")
        if injection == "inputs_embeds":
            self.adapter.check_accepts_embeddings()
        self.ref_model = ref_model
        self.ref_adapter = None
        init = get_init_strategy(self.residual_config.init)
        if init.needs_reference:
            if ref_model is None:
                raise ValueError(f"init={init.name!r} needs ref_model (a frozen reference dLLM "
                                 "with the target's tokenizer)")
            self.ref_adapter = ref_adapter or get_adapter(ref_model, ref_tokenizer,
                                                          mask_id=self.adapter.mask_id)
            check_reference(self.adapter, self.ref_adapter, tokenizer, ref_tokenizer)
        if self.residual_config.scope == "block" and block_length is None:
            # without block boundaries "the current block" is undefined: inject everywhere
            self.residual_config = ResidualConfig(**{**self.residual_config.__dict__,
                                                     "scope": "all"})
        if block_origin not in ("prompt", "absolute"):
            raise ValueError(f"block_origin must be 'prompt' or 'absolute', got {block_origin!r}")
        self.block_length = block_length
        self.block_origin = block_origin
        self.generator = generator
        self.enabled = enabled
        self.state = ResidualState(self.adapter.embed_weight, self.adapter.mask_id,
                                   self.residual_config)
        self.stats = WrapperStats()
        self._signature = inspect.signature(model.forward)
        self._positional_names = [
            name for name, parameter in self._signature.parameters.items()
            if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        # per-call tensors that only change with the call's shape: the last ones built
        self._arange_cache: tuple[tuple, torch.Tensor] | None = None
        # (key, origin, block_of, block_key): see `_blocks`
        self._block_cache: tuple | None = None
        self._deferred: tuple | None = None  # (logits, positions, scope) of the latest call
        # with record_inputs, last_call = (positions [B, l], alpha injected [B, l]) of the
        # latest call (for step traces; off by default: it costs a gather per call)
        self.record_inputs = False
        self.last_call: tuple[torch.Tensor, torch.Tensor] | None = None
        # injection="hook": announced (ids, positions, scope, length) of the forwarded call
        self._hook: EmbeddingRewrite | None = None
        if injection == "hook":
            self._hook = EmbeddingRewrite(model.get_input_embeddings(), self._embedding_hook)
        self.reset()

    # ---- plumbing ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the wrapper lacks: config, device, dtype, generation...
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def remove(self) -> None:
        """Detach the embedding hook (injection='hook'); the wrapper stops injecting."""
        if self._hook is not None:
            self._hook.remove()  # kept: re-enabling then reports "did not fire", as before
        self.enabled = False

    @property
    def mask_id(self) -> int:
        return self.adapter.mask_id

    def reset(self, gen_start: int | None = None) -> None:
        """Forget residuals and the recorded sequence (new prompt). `gen_start`: first
        generated position (origin of the blocks when block_origin='prompt')."""
        self.state.reset(0)
        self._deferred = None
        self.sequence = torch.full((0, 0), UNKNOWN, dtype=torch.long)
        self._given_gen_start = gen_start
        self.gen_start: torch.Tensor | None = None  # [B] once known

    def _forget(self, batch: int) -> None:
        # automatic reset: keep the caller's gen_start, drop everything learnt from inputs
        self._deferred = None
        self.state.reset(batch)
        width = self.sequence.shape[1] if self.sequence.shape[0] == batch else 0
        self.sequence = torch.full((batch, width), UNKNOWN, dtype=torch.long,
                                   device=self.sequence.device)
        self.gen_start = None

    def _positions(self, input_ids: torch.Tensor,
                   arguments: dict[str, Any]) -> tuple[torch.Tensor, int | None]:
        """Absolute positions [B, l] of the call's tokens, and their end (max + 1) when it is
        known without reading the positions back (None otherwise)."""
        batch, length = input_ids.shape
        device = input_ids.device
        replace = arguments.get("replace_position")
        if replace is not None:
            replace = replace.to(device).bool().expand(batch, -1)
            counts = replace.sum(1)
            if not bool((counts == length).all()):
                raise ValueError(f"replace_position selects {counts.tolist()} positions for "
                                 f"an input of length {length}")
            return replace.nonzero()[:, 1].view(batch, length), None
        position_ids = arguments.get("position_ids")
        if position_ids is not None:
            return position_ids.to(device).long().expand(batch, length), None
        start = self.adapter.cache_length(arguments.get("past_key_values"))
        key = (start, length, batch, device)
        if self._arange_cache is None or self._arange_cache[0] != key:
            positions = (start + torch.arange(length, device=device))[None].expand(batch, length)
            self._arange_cache = (key, positions)
        return self._arange_cache[1], start + length

    def _record(self, input_ids: torch.Tensor, positions: torch.Tensor,
                end: int | None) -> None:
        """Overlay this call's tokens on the recorded sequence; reset on a new prompt. `end`:
        max(positions) + 1 when known (else read back)."""
        batch = input_ids.shape[0]
        ids, pos = input_ids, positions
        if self.sequence.device != ids.device:
            self.sequence = self.sequence.to(ids.device)
        if self.sequence.shape[0] != batch:
            self._forget(batch)
        need = int(pos.max()) + 1 if end is None else end
        if need > self.sequence.shape[1]:
            pad = torch.full((batch, need - self.sequence.shape[1]), UNKNOWN, dtype=torch.long,
                             device=ids.device)
            self.sequence = torch.cat([self.sequence, pad], 1)
        seen = torch.gather(self.sequence, 1, pos)
        committed = (seen != UNKNOWN) & (seen != self.mask_id)
        if bool((committed & (ids != seen)).any()):
            # a committed token changed or was masked again: a new prompt, stale residuals
            self._forget(batch)
        self.sequence.scatter_(1, pos, ids)
        if self.gen_start is None:
            if self._given_gen_start is not None:
                self.gen_start = torch.full((batch,), self._given_gen_start, dtype=torch.long,
                                            device=ids.device)
            elif bool((ids == self.mask_id).any()):
                # first masked position per row: the end of the prompt
                masked = self.sequence == self.mask_id
                self.gen_start = torch.where(masked.any(1), masked.float().argmax(1),
                                             torch.zeros_like(masked[:, 0], dtype=torch.long))

    def _scope(self, positions: torch.Tensor) -> torch.Tensor | None:
        """[B, l] bool: positions inside the batch's current block (None: every position).

        The current block is the earliest block (counted from each row's origin) that still
        holds a masked position in any row: samplers move a batch to the next block together,
        so a row that finished early must not collect residuals for the next block meanwhile
        (a batch then decodes exactly like its rows one by one).
        """
        if self.residual_config.scope == "all":
            return None
        block_of, block_key = self._blocks()
        # the earliest block with a masked column after its row's origin (NO_BLOCK: none)
        current = torch.where(self.sequence == self.mask_id, block_key, NO_BLOCK).min()
        return torch.gather(block_of, 1, positions) == current

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block index of every column of the recorded sequence, counted from each row's
        origin: ([B, W] with -1 before the origin, [B, W] with NO_BLOCK there). Both change only
        with the sequence's width and the origin, so the last pair is kept."""
        origin = None
        if self.block_origin == "prompt" and self.gen_start is not None:
            origin = self.gen_start
        key = (self.sequence.shape, self.sequence.device, self.block_length)
        cached = self._block_cache
        # the origin tensor is kept in the cache, so `is` cannot match a new tensor at an old id
        if cached is not None and cached[0] == key and cached[1] is origin:
            return cached[2], cached[3]
        batch, width = self.sequence.shape
        columns = torch.arange(width, device=self.sequence.device)[None].expand(batch, width)
        if origin is not None:
            columns = columns - origin[:, None]
        block_of = torch.div(columns, self.block_length, rounding_mode="floor")
        before = columns < 0
        block_of = block_of.masked_fill(before, -1)
        block_key = block_of.masked_fill(before, NO_BLOCK)
        self._block_cache = (key, origin, block_of, block_key)
        return block_of, block_key

    # ---- the call ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.model(*args, **kwargs)
        bound = self._signature.bind_partial(*args, **kwargs)
        arguments = dict(bound.arguments)
        # the forward's own **kwargs arrive nested: read them as keywords too
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        input_ids = arguments.get("input_ids")
        if input_ids is None and arguments.get("inputs_embeds") is None:
            # e.g. PEFT's forward(*args, **kwargs): passing through would silently drop RCD
            raise TypeError(
                f"rcd_ext.wrap: cannot find input_ids in this call to {type(self.model).__name__} "
                f"(forward{self._signature}); wrap the underlying model instead "
                "(a PEFT-style wrapper without get_base_model())"
            )
        if arguments.get("inputs_embeds") is not None:
            # embeddings chosen by the caller: nothing to inject
            self.stats.target_forwards += 1
            return self.model(*args, **kwargs)
        positions, end = self._positions(input_ids, arguments)
        self._record(input_ids, positions, end)
        # every position seen so far lies inside the recorded sequence: its width bounds them
        length = self.sequence.shape[1]
        self.flush()
        scope = self._scope(positions)
        self._prime(input_ids, positions, scope, arguments, args, kwargs)

        if self.record_inputs:
            # what this call injects, for traces: alpha [B, l] (0 where plain embeddings)
            injected = ((input_ids == self.mask_id)
                        & self.state.has_residual(positions, length=length))
            if scope is not None:
                injected &= scope
            self.last_call = (positions,
                              self.state.alpha_at(positions, length=length) * injected)
        if self.injection == "hook":
            # the model embeds the ids itself; the hook swaps in the residual rows
            self._hook.announce((input_ids, positions, scope, length))
            try:
                output = self.model(*args, **kwargs)
            finally:
                fired = self._hook.pending is None
                self._hook.cancel()
            if not fired:
                raise RuntimeError(
                    f"the input-embedding hook of {type(self.model).__name__} did not fire "
                    "with the call's input_ids: use injection='inputs_embeds'"
                )
        else:
            embeds = self.state.inputs_embeds(input_ids, positions, scope, length=length)
            call_args, call_kwargs = self._call_with_embeds(args, kwargs, embeds)
            output = self.model(*call_args, **call_kwargs)
        self.stats.target_forwards += 1
        # the residuals are computed at the next call, for the positions the sampler left
        # masked: the rows it commits now would never be used
        self._deferred = (self.adapter.logits(output), positions, scope)
        return output

    def flush(self) -> None:
        """Store the residuals of the latest call for the positions still masked now.

        Called at the start of every call; call it yourself before reading `state` between
        calls. Positions are judged by the latest tokens the wrapper has seen.
        """
        if self._deferred is None:
            return
        logits, positions, scope = self._deferred
        self._deferred = None
        current = torch.gather(self.sequence, 1, positions)
        self.stats.residual_rows += self.state.update(logits, current, positions, scope,
                                                      length=self.sequence.shape[1])

    def _embedding_hook(self, pending: tuple, inputs: tuple, output: torch.Tensor) -> Any:
        if not inputs or not torch.equal(inputs[0], pending[0]):
            return output  # not the call being wrapped (e.g. an init or reference forward)
        self._hook.cancel()  # consumed: the forward's own embedding happened
        input_ids, positions, scope, length = pending
        return self.state.inject(output, input_ids, positions, scope, length=length)

    def _call_with_embeds(self, args: tuple, kwargs: dict[str, Any],
                          embeds: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        """The caller's (args, kwargs) with input_ids None and inputs_embeds set, keeping
        positional what was positional (hooks and engines see the call they made)."""
        names = self._positional_names
        args, kwargs = list(args), dict(kwargs)
        for name, value in (("input_ids", None), ("inputs_embeds", embeds)):
            if name in names and names.index(name) < len(args):
                args[names.index(name)] = value
            elif name == "inputs_embeds" or name in kwargs:
                kwargs[name] = value
        return tuple(args), kwargs

    def _prime(self, input_ids: torch.Tensor, positions: torch.Tensor,
               scope: torch.Tensor | None, arguments: dict[str, Any], args: tuple,
               kwargs: dict[str, Any]) -> None:
        """Apply the init strategy (`rcd_ext.init_strategies`) to masked in-scope positions
        that have no residual yet."""
        init = get_init_strategy(self.residual_config.init)
        if init.logits is None:
            return
        missing = ((input_ids == self.mask_id)
                   & ~self.state.has_residual(positions, length=self.sequence.shape[1]))
        if scope is not None:
            missing &= scope
        if not bool(missing.any()):
            return
        rows, cols = missing.nonzero(as_tuple=True)
        logits = init.logits(self, InitCall(input_ids, positions, rows, cols, args, kwargs))
        self.state.write(rows, positions[rows, cols], logits)


def wrap(
    model: nn.Module,
    *,
    ref_model: nn.Module | None = None,
    tokenizer: Any = None,
    ref_tokenizer: Any = None,
    mask_id: int | None = None,
    block_length: int | None = None,
    block_origin: str = "prompt",
    residual: ResidualConfig | None = None,
    seed: int | None = None,
    enabled: bool = True,
    injection: str = "inputs_embeds",
    **options: Any,
) -> RCDModel:
    """Wrap `model` so that any sampler calling it decodes with residual context (RCD).

    Call the result like the model: `out = rcd_model(x)` with x [B, L] token ids, or
    `rcd_model(x[:, s:], past_key_values=..., use_cache=..., replace_position=...)`.
    Residual options: `residual=ResidualConfig(...)`, or the same fields as flat keywords
    (`t_res=0.92, init="dirichlet"`, the dataclass's defaults; both at once: ValueError).
    `block_length` (with `block_origin` 'prompt' for
    LLaDA-style semi-AR blocks after the prompt, 'absolute' for block-diffusion models) limits
    injection to the block being decoded (scope='block'); without it every masked position
    with logits gets a residual. Call `.reset()` between prompts (also detected on its own).
    `injection="hook"` leaves the call untouched and swaps the residual rows into the output of
    the model's input-embedding module (models whose forward takes no inputs_embeds).
    `seed` seeds the Dirichlet init (`rcd_ext.seeding`, stream 0).
    """
    from rcd_ext.options import build, split_flat
    from rcd_ext.seeding import seeded_generator

    (flat,) = split_flat(options, ResidualConfig)
    config = build(ResidualConfig, residual, flat, "residual")
    return RCDModel(model, ref_model=ref_model, config=config, tokenizer=tokenizer,
                    ref_tokenizer=ref_tokenizer, mask_id=mask_id, block_length=block_length,
                    block_origin=block_origin, generator=seeded_generator(seed),
                    enabled=enabled, injection=injection)
