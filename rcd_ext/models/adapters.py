"""One adapter per model family: what the decoding loops and the RCD wrapper need to know.

An adapter answers: where is the input embedding table, which id is the mask, how is the model
called with embeddings, are its logits shifted (Dream predicts token i+1 at position i), how
long is a cache, and how the three cache modes and the block-diffusion loop call it.

Families (chosen from `config.model_type` by the family registry, `FAMILIES`: the first
registered family whose `detect` accepts it, else generic):

| family  | loop            | mask id                       | caches in `generate`          |
|---------|-----------------|-------------------------------|-------------------------------|
| llada   | semi-AR blocks  | 126336                        | none; prefix, dual with the   |
|         |                 |                               | Fast-dLLM modelling code      |
| dream   | semi-AR blocks  | 151666, logits shifted by one | none                          |
| sdar    | block diffusion | tokenizer (151669)            | KV cache (store_kv)           |
| tiny    | by attention    | config.mask_token_id          | none, prefix, dual; KV cache  |
| generic | semi-AR blocks  | tokenizer / config / argument | none                          |

Left padding (prompts of different lengths in one batch): only adapters with
`supports_padding` take it (the tiny dLLM, Dream). `with_padding` gives an adapter whose
forward kwargs carry `attention_mask` [B, C+L] over cached + new slots (Dream: the 4-D bool
mask [B, 1, L, C+L] its attention takes) and `position_ids` holding absolute columns of the
padded batch; `LeftPaddedModel` turns those columns into each row's own positions at the
model's door, so the loops and the RCD wrapper keep keying on columns.

Adding a family: an adapter subclass (its `family_options`, `no_padding_reason`, overridden
cache/loop hooks) and `register_family(ModelFamily(name, detect, AdapterClass))`, in a module
of your own, plus its test; nothing outside the adapter asks which family a model is.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rcd_ext.registry import Registry

LLADA_MASK_ID = 126336
DREAM_MASK_ID = 151666
SDAR_MASK_TOKEN = "<|MASK|>"


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(model.forward).parameters)


def _takes(model: nn.Module, name: str) -> bool:
    return name in _forward_parameters(model)


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _config_id(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)



@dataclass(frozen=True, eq=False)
class LeftPadding:
    """Left padding of a batch decoded as x [B, T].

    Attributes:
        mask: [B, T] long, 1 on real columns (prompt and generation), 0 on padding.
        offsets: [B] long, padding columns in front of each row; a row's real tokens start at
            column offsets[b] and at model position 0.
    """

    mask: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_offsets(cls, offsets: list[int], total: int,
                     device: torch.device | str = "cpu") -> LeftPadding:
        """Padding of `offsets[b]` columns in front of row b of a [B, total] batch."""
        offsets_tensor = torch.tensor(offsets, dtype=torch.long, device=device)
        columns = torch.arange(total, device=device)
        mask = (columns[None, :] >= offsets_tensor[:, None]).long()
        return cls(mask=mask, offsets=offsets_tensor)

    @property
    def total(self) -> int:
        return int(self.mask.shape[1])

    def columns(self, start: int, end: int) -> torch.Tensor:
        """[end - start] absolute columns start..end-1 (on the mask's device)."""
        return torch.arange(start, end, device=self.mask.device)

    def positions(self, columns: torch.Tensor) -> torch.Tensor:
        """Model positions [B, l] of absolute columns [B, l] or [l]: column - offset.

        Padding columns get position 0: they are never attended, so any in-range value works.
        """
        columns = columns.to(self.offsets.device).long()
        if columns.dim() == 1:
            columns = columns[None]
        return (columns - self.offsets[:, None]).clamp_min(0)


class LeftPaddedModel:
    """`model` called through left padding: the loops and the RCD wrapper pass `position_ids`
    as absolute columns of the padded batch (the wrapper keys residuals on them); this object
    hands the model each row's own positions instead (`LeftPadding.positions`), so a row's
    real tokens sit at positions 0.. exactly as when it is decoded alone. Everything else is
    passed through untouched."""

    def __init__(self, model: nn.Module, padding: LeftPadding) -> None:
        self.model = model
        self.padding = padding

    def forward(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """input_ids [B, l] or inputs_embeds [B, l, D]; position_ids [B, l] or [l] absolute
        columns (None: the model's default); other kwargs (attention_mask [B, C+l], caches)
        unchanged. Returns the model's output."""
        if position_ids is not None:
            kwargs["position_ids"] = self.padding.positions(position_ids)
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    __call__ = forward

    @property
    def config(self) -> Any:
        return self.model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()


@dataclass
class ModelAdapter:
    """How rcd-ext talks to one loaded model. Build one with `get_adapter`.

    Attributes:
        model: the torch module.
        mask_id, eos_id, pad_id: token ids (eos/pad may be None).
        loop: "semi_ar" (bidirectional blocks) or "block_diffusion" (block-causal + KV cache).
        shift_logits: logits at i score token i+1 (Dream); residuals are taken after the shift.
        cache_modes: cache modes the semi-AR loop supports for this model.
        padding: left padding of the batch being decoded (set by `with_padding`), else None.
        supports_padding (class attribute): whether the forward kwargs below are right for a
            left-padded batch in every loop and cache mode of this adapter.
        no_padding_reason (class attribute): why not, when it does not (its forward's handling
            of a padding mask is unknown or known to be wrong, and a batch must never decode
            differently from its rows without saying so).
    """

    supports_padding: ClassVar[bool] = False
    no_padding_reason: ClassVar[str] = "the attention_mask semantics of an unknown model are " \
                                       "not known"

    model: nn.Module
    mask_id: int
    eos_id: int | None = None
    pad_id: int | None = None
    family: str = "generic"
    loop: str = "semi_ar"
    shift_logits: bool = False
    cache_modes: tuple[str, ...] = ("none",)
    padding: LeftPadding | None = None

    # ---- what the family's adapter is built with -----------------------------------------------
    @classmethod
    def family_options(cls, model: nn.Module, tokenizer: Any,
                       mask_id: int | None) -> tuple[dict[str, Any], int | None]:
        """(dataclass fields beyond model / eos / pad / family, mask id or None) for `model`:
        `mask_id` (the caller's) first, then the family's own sources. Generic: the
        tokenizer's mask token, then config.mask_token_id."""
        config = getattr(model, "config", None)
        return {}, _first(mask_id, _tokenizer_mask_id(tokenizer),
                          _config_id(config, "mask_token_id"))

    def check_block_length(self, block_length: int) -> None:
        """ValueError when the block-diffusion loop cannot run this model with `block_length`
        (a model whose blocks are fixed by its weights says so here)."""

    # ---- left padding -----------------------------------------------------------------------
    def check_padding(self) -> None:
        """Raise ValueError when this model cannot decode a left-padded batch."""
        if self.supports_padding:
            return
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        name = model_type or type(self.model).__name__
        raise ValueError(f"{name} does not support prompts of different lengths in one batch: "
                         f"decode them separately (or group prompts of equal token length); "
                         f"{self.no_padding_reason}")

    def with_padding(self, padding: LeftPadding | None) -> ModelAdapter:
        """This adapter for a batch with `padding` (a copy; None: no padding, self)."""
        if padding is None:
            return self
        self.check_padding()
        return dataclasses.replace(self, padding=padding)

    def padding_kwargs(self, keys: torch.Tensor, queries: torch.Tensor) -> dict[str, Any]:
        """Padding kwargs of one forward; {} without padding.

        Args:
            keys: [C + L] absolute columns of the key slots in the order the model holds them
                (cached slots first, then the L new ones).
            queries: [L] absolute columns of the new tokens.

        Returns attention_mask [B, C + L] (1 real, 0 padding) and, when the forward takes
        them, position_ids [B, L] as absolute columns (`LeftPaddedModel` maps them to the
        model's positions; the RCD wrapper reads them as the positions it keys on).
        """
        if self.padding is None:
            return {}
        kwargs: dict[str, Any] = {"attention_mask": self.padding.mask[:, keys]}
        if _takes(self.model, "position_ids"):
            kwargs["position_ids"] = queries[None].expand(self.padding.mask.shape[0], -1)
        return kwargs

    def span_padding_kwargs(self, start: int, end: int) -> dict[str, Any]:
        """Padding kwargs of a forward of columns start..end-1 after a cache of 0..start-1."""
        if self.padding is None:
            return {}
        return self.padding_kwargs(self.padding.columns(0, end),
                                   self.padding.columns(start, end))

    # ---- embeddings and calls ------------------------------------------------------------
    @property
    def embed_weight(self) -> torch.Tensor:
        """[V', D] input embedding table."""
        return self.model.get_input_embeddings().weight

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the config's vocab_size, else the embedding rows)."""
        size = getattr(self.model.config, "vocab_size", None)
        return int(size) if size is not None else int(self.embed_weight.shape[0])

    @property
    def max_length(self) -> int | None:
        """Longest sequence the model can take (None when the config does not say)."""
        config = self.model.config
        value = _first(getattr(config, "max_position_embeddings", None),
                       getattr(config, "max_sequence_length", None))
        return None if value is None else int(value)

    def check_accepts_embeddings(self) -> None:
        """Raise TypeError when the model's forward cannot take `inputs_embeds`."""
        params = _forward_parameters(self.model)
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "inputs_embeds" not in params and not takes_kwargs:
            raise TypeError(
                f"{type(self.model).__name__}.forward has no inputs_embeds argument: RCD feeds "
                "residuals through the input embeddings (accepted: "
                f"{', '.join(params)})"
            )

    def logits(self, output: Any) -> torch.Tensor:
        """[B, L, V] logits aligned with the input positions (shifted for Dream-style models)."""
        logits = output.logits if hasattr(output, "logits") else output[0]
        if self.shift_logits:
            # position i is scored by the output at i-1; the first keeps its own row, as the
            # Dream samplers do
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    @staticmethod
    def cache_length(past_key_values: Any) -> int:
        """Positions held by a cache: objects with get_seq_length(), or per-layer (k, v)."""
        if past_key_values is None:
            return 0
        if hasattr(past_key_values, "get_seq_length"):
            return int(past_key_values.get_seq_length())
        first = past_key_values[0]
        key = first[0] if isinstance(first, (tuple, list)) else first
        # (B, H, L, d) for LLaDA and most HF caches; (B, L, H*d) for Dream-style layouts
        return int(key.shape[-2] if key.dim() == 4 else key.shape[1])

    def uncached_kwargs(self, length: int, block_length: int | None,
                        device: torch.device) -> dict[str, Any]:
        """Extra kwargs of a plain forward over positions 0..length-1 (reference warm start)."""
        return self.span_padding_kwargs(0, length)

    # ---- semi-AR loop cache modes -----------------------------------------------------------
    def full_forward_kwargs(self, cache: str) -> dict[str, Any]:
        """Extra kwargs of a full-sequence forward (the block start) in a cache mode."""
        kwargs: dict[str, Any] = {} if cache == "none" else {"use_cache": True}
        if self.padding is not None:
            kwargs.update(self.span_padding_kwargs(0, self.padding.total))
        return kwargs

    def crop_cache(self, past_key_values: Any, length: int) -> Any:
        """The first `length` positions of a cache."""
        if hasattr(past_key_values, "crop") and not isinstance(past_key_values, tuple):
            cropped = past_key_values.crop(length)
            # DynamicCache.crop works in place and returns None; TinyKVCache returns a copy
            return past_key_values if cropped is None else cropped
        return tuple((k[:, :, :length], v[:, :, :length]) for k, v in past_key_values)

    def prefix_step_kwargs(self, prefix_cache: Any) -> dict[str, Any]:
        """Kwargs of a step on x[:, start:] given a cache of the first `start` positions."""
        kwargs: dict[str, Any] = {"past_key_values": prefix_cache, "use_cache": False}
        if self.padding is not None:
            start = self.cache_length(prefix_cache)
            kwargs.update(self.span_padding_kwargs(start, self.padding.total))
        return kwargs

    def dual_step_kwargs(self, full_cache: Any, start: int, end: int, total: int,
                         batch_size: int) -> dict[str, Any]:
        """Kwargs of a step on x[:, start:end] given the cache of the block-start forward."""
        raise ValueError(f"cache='dual' is not supported for {self.family} models")

    # ---- block-diffusion loop ---------------------------------------------------------------
    def prefill(self, runner: Any, input_ids: torch.Tensor, cache: Any,
                block_length: int) -> Any:
        """Commit whole blocks `input_ids` [B, l] (right after the cached positions) to the
        cache with one forward; returns the cache to use next."""
        raise ValueError(f"the block-diffusion loop is not supported for {self.family} models")

    def denoise_kwargs(self, cache: Any, start: int, end: int) -> dict[str, Any]:
        """Kwargs of a denoising step on the block x[:, start:end] given the committed cache."""
        raise ValueError(f"the block-diffusion loop is not supported for {self.family} models")


class TinyAdapter(ModelAdapter):
    """The built-in tiny dLLM (`rcd_ext.models.tiny_dllm`): immutable `TinyKVCache`.

    Its forward takes attention_mask [B, C+L] over cached + new slots and explicit
    position_ids, so left padding is exact in every mode (block-causal block membership is by
    slot: `generate` pads block-causal batches by whole blocks, see `batch_layout`).
    """

    supports_padding: ClassVar[bool] = True

    @classmethod
    def family_options(cls, model, tokenizer, mask_id):
        block_causal = model.config.attention == "block_causal"
        options = {"loop": "block_diffusion" if block_causal else "semi_ar",
                   "cache_modes": ("none",) if block_causal else ("none", "prefix", "dual")}
        return options, _first(mask_id, _config_id(model.config, "mask_token_id"))

    def check_block_length(self, block_length):
        config_block = getattr(self.model.config, "block_length", None)
        if self.loop == "block_diffusion" and config_block != block_length:
            raise ValueError(f"block_length {block_length} != the model's block_length "
                             f"{config_block}: a block-causal model decodes its own blocks")

    def dual_step_kwargs(self, full_cache, start, end, total, batch_size):
        from rcd_ext.models.tiny_dllm import TinyKVCache

        # attention is bidirectional and slot order does not matter: keep prefix + suffix
        # keys, and place the block with explicit position ids
        layers = [(torch.cat([k[:, :, :start], k[:, :, end:]], 2),
                   torch.cat([v[:, :, :start], v[:, :, end:]], 2)) for k, v in full_cache]
        positions = torch.arange(start, end, device=full_cache[0][0].device)
        kwargs: dict[str, Any] = {"past_key_values": TinyKVCache(layers),
                                  "position_ids": positions[None].expand(batch_size, -1)}
        if self.padding is not None:
            columns = self.padding.columns
            keys = torch.cat([columns(0, start), columns(end, total), columns(start, end)])
            kwargs.update(self.padding_kwargs(keys, columns(start, end)))
        return kwargs

    def prefill(self, runner, input_ids, cache, block_length):
        start = self.cache_length(cache)
        padding = self.span_padding_kwargs(start, start + input_ids.shape[1])
        output = runner(input_ids, past_key_values=cache, use_cache=True, **padding)
        return output.past_key_values

    def denoise_kwargs(self, cache, start, end):
        return {"past_key_values": cache, "use_cache": False,
                **self.span_padding_kwargs(start, end)}


class DreamAdapter(ModelAdapter):
    """Dream remote code: logits shifted by one, full forwards only (cache "none").

    Left padding: Dream's SDPA attention hands `attention_mask` to
    `scaled_dot_product_attention` as it is, so the padding mask goes in the 4-D bool format
    Dream's own generation builds, [B, 1, L, C+L] (True = may attend): real queries see the
    real keys. Unlike Dream's generation, a padded query attends to itself instead of to
    nothing: an all-False row is NaN under some torch versions / SDPA kernels, and a NaN in a
    padded row's values leaks into every real row of the next layer (0 * NaN, although the
    key is masked). Position ids go through `LeftPaddedModel` like every padded model's;
    Fast-dLLM's forward ignores them and rebuilds 0..L-1, so there a padded row runs at
    positions shifted by its padding, which leaves its attention scores unchanged up to float
    rounding (as masked padding keys do): Dream's only position signal is RoPE, whose scores
    depend on position differences. The logit shift is right for every row: all prompts end
    at column P - 1, which scores column P.
    Checked on Fast-dLLM's copy of Dream's modelling code (dream/ and v1/dream/): a padded
    batch decodes each row to its tokens alone, no NaN (test_integration_real_dream_padding).
    """

    supports_padding: ClassVar[bool] = True

    @classmethod
    def family_options(cls, model, tokenizer, mask_id):
        config = getattr(model, "config", None)
        return {"shift_logits": True}, _first(mask_id, _config_id(config, "mask_token_id"),
                                              _tokenizer_mask_id(tokenizer), DREAM_MASK_ID)

    def padding_kwargs(self, keys, queries):
        kwargs = super().padding_kwargs(keys, queries)
        if self.padding is None:
            return kwargs
        real_keys = kwargs["attention_mask"].bool()  # [B, C+L]
        real_queries = self.padding.mask[:, queries].bool()  # [B, L]
        own_slot = queries[:, None] == keys[None, :]  # [L, C+L]
        allowed = (real_queries[:, :, None] & real_keys[:, None, :]) | own_slot[None]
        kwargs["attention_mask"] = allowed[:, None]  # [B, 1, L, C+L]
        return kwargs


class LLaDAAdapter(ModelAdapter):
    """LLaDA remote code; the Fast-dLLM variant adds `replace_position` (dual cache)."""

    no_padding_reason: ClassVar[str] = (
        "the published LLaDA modelling code ignores attention_mask (ML-GSAI/LLaDA#89) and "
        "Fast-dLLM's variant turns a padding mask into causal attention")

    @classmethod
    def family_options(cls, model, tokenizer, mask_id):
        modes = ("none", "prefix", "dual") if _takes(model, "replace_position") \
            else ("none", "prefix")
        config = getattr(model, "config", None)
        return {"cache_modes": modes}, _first(mask_id, _config_id(config, "mask_token_id"),
                                              LLADA_MASK_ID)

    def prefix_step_kwargs(self, prefix_cache):
        # Fast-dLLM's LLaDA code expects use_cache=True with a cache; the returned cache is
        # ignored, as in its samplers
        return {"past_key_values": prefix_cache, "use_cache": True}

    def dual_step_kwargs(self, full_cache, start, end, total, batch_size):
        replace = torch.zeros((1, total), dtype=torch.bool, device=full_cache[0][0].device)
        replace[:, start:end] = True
        return {"past_key_values": full_cache, "use_cache": True, "replace_position": replace}


class SDARAdapter(ModelAdapter):
    """SDAR remote code: block-causal, KV written into the cache by a `store_kv=True` pass.

    Like SDAR's own sampler, every call gets an explicit block-causal attention mask
    [1, 1, l, cached + l] (1 = may attend) and absolute position ids.
    """

    no_padding_reason: ClassVar[str] = "SDAR's block-causal masks are built here without padding"

    @classmethod
    def family_options(cls, model, tokenizer, mask_id):
        config = getattr(model, "config", None)
        return {"loop": "block_diffusion"}, _first(mask_id, _tokenizer_mask_id(tokenizer),
                                                   _config_id(config, "mask_token_id"))

    @staticmethod
    def _block_causal(start: int, end: int, block_length: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
        query_block = torch.arange(start, end, device=device) // block_length
        key_block = torch.arange(end, device=device) // block_length
        allowed = (key_block[None, :] <= query_block[:, None]).float()
        return {"attention_mask": allowed[None, None],
                "position_ids": torch.arange(start, end, device=device)[None]}

    def uncached_kwargs(self, length, block_length, device):
        if block_length is None:
            raise ValueError("an SDAR model needs block_length for an uncached forward")
        return self._block_causal(0, length, block_length, device)

    def prefill(self, runner, input_ids, cache, block_length):
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        start = self.cache_length(cache)
        masks = self._block_causal(start, start + input_ids.shape[1], block_length,
                                   input_ids.device)
        runner(input_ids, past_key_values=cache, use_cache=True, store_kv=True, **masks)
        return cache

    def denoise_kwargs(self, cache, start, end):
        # one block attends to everything before it and to itself
        masks = self._block_causal(start, end, end - start, self.embed_weight.device)
        return {"past_key_values": cache, "use_cache": True, "store_kv": False, **masks}


def _tokenizer_mask_id(tokenizer: Any) -> int | None:
    if tokenizer is None:
        return None
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    token_id = tokenizer.convert_tokens_to_ids(SDAR_MASK_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    return None if token_id is None or token_id == unk else int(token_id)


# the transformers Auto classes `load_model` tries for a model of no family, in this order
GENERIC_LOADERS = ("AutoModelForMaskedLM", "AutoModel", "AutoModelForCausalLM")


@dataclass(frozen=True)
class ModelFamily:
    """A model family: `detect(model_type)` (config.model_type, lower case) says whether a model
    belongs to it, `adapter_class` builds its adapter (`family_options`, `no_padding_reason`,
    loop and cache hooks), `loaders` names the transformers Auto classes `load_model` tries."""

    name: str
    detect: Callable[[str], bool]
    adapter_class: type[ModelAdapter]
    loaders: tuple[str, ...] = GENERIC_LOADERS


# tried in registration order; a model no family detects is "generic" (`ModelAdapter`)
FAMILIES: Registry[ModelFamily] = Registry("model family")


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `get_adapter` build `family.adapter_class` for the models `family.detect` accepts."""
    return FAMILIES.register(family.name, family)


register_family(ModelFamily("tiny", lambda model_type: model_type == "rcd-tiny-dllm", TinyAdapter,
                            loaders=("AutoModel",)))
register_family(ModelFamily("llada", lambda model_type: model_type.startswith("llada"),
                            LLaDAAdapter, loaders=("AutoModel",)))
register_family(ModelFamily("dream", lambda model_type: model_type.startswith("dream"),
                            DreamAdapter, loaders=("AutoModel",)))
register_family(ModelFamily("sdar", lambda model_type: model_type.startswith("sdar"),
                            SDARAdapter, loaders=("AutoModelForCausalLM", "AutoModel")))


def family_of_type(model_type: Any) -> str:
    """The name of the first registered family that detects `model_type` (compared in lower
    case; 'tiny', 'llada', 'dream', 'sdar' built in), else 'generic'."""
    model_type = str(model_type).lower()
    for name, family in FAMILIES.items():
        if family.detect(model_type):
            return name
    return "generic"


def family_of(model: nn.Module) -> str:
    """The family of `model` from its config's model_type (see `family_of_type`)."""
    return family_of_type(getattr(getattr(model, "config", None), "model_type", ""))


def get_adapter(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    mask_id: int | None = None,
    shift_logits: bool | None = None,
    require_embeddings: bool = True,
) -> ModelAdapter:
    """The adapter for `model`. `mask_id` / `shift_logits` override the family's defaults.

    Raises ValueError when no mask id can be found, TypeError when the model has no input
    embedding table or (with `require_embeddings`, i.e. for RCD) cannot take `inputs_embeds`.
    """
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(): RCD needs the "
                        "input embedding table")
    config = getattr(model, "config", None)
    family = family_of(model)
    adapter_class = FAMILIES.get(family).adapter_class if family in FAMILIES else ModelAdapter
    eos_id = _first(getattr(tokenizer, "eos_token_id", None), _config_id(config, "eos_token_id"))
    pad_id = _first(getattr(tokenizer, "pad_token_id", None), _config_id(config, "pad_token_id"))
    options, found = adapter_class.family_options(model, tokenizer, mask_id)
    kwargs: dict[str, Any] = {"model": model, "eos_id": eos_id, "pad_id": pad_id,
                              "family": family, **options}
    if shift_logits is not None:
        kwargs["shift_logits"] = shift_logits
    if found is None:
        raise ValueError(
            f"no mask token id for {type(model).__name__} (family {family}): the tokenizer has "
            "no mask_token and the config no mask_token_id; pass mask_id=..."
        )
    adapter = adapter_class(mask_id=int(found), **kwargs)
    rows = adapter.embed_weight.shape[0]
    if not 0 <= adapter.mask_id < rows:
        raise ValueError(f"mask id {adapter.mask_id} is outside the input embedding table "
                         f"({rows} rows) of {type(model).__name__}")
    if require_embeddings:
        adapter.check_accepts_embeddings()
    return adapter


def check_reference(
    target: ModelAdapter,
    reference: ModelAdapter,
    tokenizer: Any = None,
    reference_tokenizer: Any = None,
) -> None:
    """Refuse a reference model that does not share the target's vocabulary and tokenizer."""
    if reference.vocab_size != target.vocab_size:
        raise ValueError(
            f"reference vocab {reference.vocab_size} != target vocab {target.vocab_size}: the "
            "reference must share the target's tokenizer"
        )
    if reference.mask_id != target.mask_id:
        raise ValueError(
            f"reference mask id {reference.mask_id} != target mask id {target.mask_id}: the "
            "reference must share the target's tokenizer"
        )
    if tokenizer is not None and reference_tokenizer is not None:
        if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
            diff = set(tokenizer.get_vocab().items()) ^ set(reference_tokenizer.get_vocab().items())
            example = sorted(diff, key=str)[:3]
            raise ValueError(
                "reference tokenizer differs from the target tokenizer "
                f"({len(diff)} differing token/id pairs, e.g. {example}): the reference must "
                "share the target's tokenizer"
            )


def load_model(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer or None) from a local path or hub name.

    Remote modelling code (LLaDA, Dream, SDAR) runs only with `trust_remote_code=True`.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from rcd_ext.models import register_tiny_dllm

    register_tiny_dllm()

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    family = family_of_type(config.model_type)
    names = FAMILIES.get(family).loaders if family in FAMILIES else GENERIC_LOADERS
    loaders = [getattr(transformers, name) for name in names]
    errors = []
    model = None
    for loader in loaders:
        try:
            model = loader.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                           torch_dtype=torch_dtype)
            break
        except (ValueError, KeyError) as error:  # this Auto class does not know the config
            errors.append(f"{loader.__name__}: {error}")
    if model is None:
        raise ValueError(f"cannot load {name_or_path}: " + "; ".join(errors))
    if device is not None:
        model = model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer
