"""A tiny masked-diffusion language model (dLLM) for tests, demos and CPU experiments.

The model is an ordinary pre-LN transformer encoder with learned absolute position embeddings
and an untied LM head (``tie_word_embeddings=True`` in the config ties it to the input table).
It is registered with the Hugging Face Auto classes (model type ``"rcd-tiny-dllm"``) when
this module is imported (`rcd_ext.models.register_tiny_dllm()`), so
``AutoModel.from_pretrained(path)`` and ``AutoModelForMaskedLM.from_pretrained(path)`` load a
saved checkpoint without ``auto_map``.

Contract used by the decoding loops and the trainer
---------------------------------------------------
``TinyDLLMModel.forward(input_ids=None, inputs_embeds=None, attention_mask=None,
position_ids=None, past_key_values=None, use_cache=False, return_dict=True)``

* Exactly one of ``input_ids`` [B, L] (long) and ``inputs_embeds`` [B, L, D] is given.
  ``inputs_embeds`` replaces only the token-embedding lookup: position embeddings are added to
  it exactly as to ``get_input_embeddings()(input_ids)``, so
  ``forward(inputs_embeds=embed(ids)) == forward(input_ids=ids)`` bit for bit. This is where the
  RCD residual is injected.
* ``past_key_values`` is ``None`` or a :class:`TinyKVCache` holding C earlier positions. The L
  new tokens occupy sequence slots C .. C+L-1 and attend to every cached key plus the new keys:
  all of them for ``attention="bidirectional"``; for ``attention="block_causal"`` query slot i
  may attend key slot j iff ``j // block_length <= i // block_length``. Block membership uses
  sequence slots, not ``position_ids``.
* ``position_ids`` [B, L] or [L] default to C .. C+L-1. They are never derived from
  ``attention_mask``: pass them explicitly if left-padded rows should start at position 0.
* ``attention_mask`` [B, C+L] of 1 (real) / 0 (padding) covers cached and new slots. Padded keys
  are never attended. A query with no admissible key (a padded query) attends to everything
  instead, so its output is finite but meaningless.
* ``use_cache=True`` returns in ``.past_key_values`` a NEW cache: the old keys/values followed
  by the new tokens'. The cache passed in is never mutated, so the caller decides what to keep
  (a block-diffusion loop commits a finished block by re-running it with its token ids and
  ``use_cache=True``, and throws away the caches of the intermediate denoising steps).
* Returns :class:`TinyDLLMOutput` with ``.logits`` [B, L, V] in float32 and
  ``.past_key_values`` (``None`` unless ``use_cache``); ``return_dict=False`` gives the tuple
  ``(logits,)`` or ``(logits, past_key_values)``.

What a prefix cache means under each attention rule
---------------------------------------------------
* ``block_causal``: keys of whole earlier blocks never depend on later slots, so a cache built
  from whole blocks is exact: ``forward(prefix, use_cache=True)`` then ``forward(x,
  past_key_values=cache)`` equals the last L rows of ``forward([prefix; x])``.
* ``bidirectional``: in a full forward the prefix also attends to x, so its keys/values change
  when x changes. A cache built from the prefix alone holds the prefix as if nothing followed
  it; the second call then equals a full forward in which the prefix queries were restricted to
  the prefix keys. That is the approximation Fast-dLLM's prefix cache makes (exact only in the
  limit where the prefix's hidden states do not depend on the suffix).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

__all__ = [
    "ATTENTION_KINDS",
    "TinyDLLMConfig",
    "TinyDLLMModel",
    "TinyDLLMOutput",
    "TinyKVCache",
]

ATTENTION_KINDS = ("bidirectional", "block_causal")


class TinyDLLMConfig(PretrainedConfig):
    """Configuration of :class:`TinyDLLMModel`.

    ``vocab_size`` and ``mask_token_id`` are required; every field is checked at construction
    and a bad value raises ``ValueError`` naming the field, the value and what was expected.
    ``block_length`` matters only for ``attention="block_causal"``.
    """

    model_type = "rcd-tiny-dllm"
    # transformers' to_diff_dict() would otherwise build a default instance, which cannot
    # exist because the vocabulary and the mask id have no sensible defaults.
    has_no_defaults_at_init = True

    def __init__(
        self,
        vocab_size: int | None = None,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 256,
        max_position_embeddings: int = 64,
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        attention: str = "bidirectional",
        block_length: int | None = None,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.mask_token_id = mask_token_id
        self.attention = attention
        self.block_length = block_length
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if any field is out of range or inconsistent."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TinyDLLMConfig.{name}={value!r}: expected a positive int")

        if self.vocab_size is None:
            raise ValueError("TinyDLLMConfig.vocab_size is required (the tokenizer's len())")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            positive_int(name)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"TinyDLLMConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.mask_token_id is None:
            raise ValueError(
                "TinyDLLMConfig.mask_token_id is required: a masked-diffusion model needs the "
                "id of its [MASK] token (tokenizer.mask_token_id)"
            )
        for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is None and name != "mask_token_id":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TinyDLLMConfig.{name}={value!r}: expected an int token id")
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"TinyDLLMConfig.{name}={value} is outside the vocabulary "
                    f"[0, {self.vocab_size})"
                )
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"TinyDLLMConfig.attention={self.attention!r}: expected one of {ATTENTION_KINDS}"
            )
        if self.attention == "block_causal":
            if self.block_length is None:
                raise ValueError("TinyDLLMConfig.block_length is required for block_causal")
            positive_int("block_length")
        elif self.block_length is not None:
            positive_int("block_length")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"TinyDLLMConfig.dropout={self.dropout!r}: expected 0 <= p < 1")


class TinyKVCache:
    """Keys and values of earlier positions, one ``(k, v)`` pair per layer.

    Each tensor is [B, H, C, head_dim] with C = :meth:`get_seq_length`. The object is treated
    as immutable: :class:`TinyDLLMModel` returns a new cache rather than appending in place.
    ``TinyKVCache()`` (no layers) is an empty cache, equivalent to passing ``None``.
    """

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        self.layers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = tuple(
            (k, v) for k, v in layers
        )
        for index, (k, v) in enumerate(self.layers):
            if k.dim() != 4 or k.shape != v.shape:
                raise ValueError(
                    f"TinyKVCache layer {index}: k {tuple(k.shape)} and v {tuple(v.shape)} "
                    "must both be [B, H, C, head_dim]"
                )
            if k.shape[2] != self.layers[0][0].shape[2]:
                raise ValueError(
                    f"TinyKVCache layer {index} holds {k.shape[2]} positions, layer 0 holds "
                    f"{self.layers[0][0].shape[2]}"
                )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions C (0 for an empty cache)."""
        if not self.layers:
            return 0
        return int(self.layers[layer_idx][0].shape[2])

    @property
    def batch_size(self) -> int | None:
        """B of the cached tensors, or ``None`` for an empty cache."""
        return int(self.layers[0][0].shape[0]) if self.layers else None

    def crop(self, length: int) -> TinyKVCache:
        """A new cache holding only the first ``length`` positions (views, no copy)."""
        if not 0 <= length <= self.get_seq_length():
            raise ValueError(
                f"crop length {length} outside [0, {self.get_seq_length()}] cached positions"
            )
        return TinyKVCache([(k[:, :, :length], v[:, :, :length]) for k, v in self.layers])

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.layers)

    def __repr__(self) -> str:
        return f"TinyKVCache(layers={len(self)}, length={self.get_seq_length()})"


@dataclass
class TinyDLLMOutput(ModelOutput):
    """Output of :class:`TinyDLLMModel`.

    logits: [B, L, V] float32 scores over the vocabulary for the L input positions.
    past_key_values: a new :class:`TinyKVCache` (old + new positions) when ``use_cache=True``.
    """

    logits: torch.FloatTensor | None = None
    past_key_values: TinyKVCache | None = None


class TinyDLLMAttention(nn.Module):
    """Multi-head self-attention over cached + new positions (SDPA, boolean mask)."""

    def __init__(self, config: TinyDLLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.dropout

    def forward(
        self,
        hidden: torch.Tensor,
        allowed: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden [B, L, D]; allowed [B or 1, 1, L, C+L] bool or None (all allowed).

        Returns the attention output [B, L, D] and (k, v) [B, H, C+L, head_dim].
        """
        batch, length, _ = hidden.shape
        q, k, v = (
            self.qkv(hidden)
            .view(batch, length, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        attended = attended.transpose(1, 2).reshape(batch, length, -1)
        return self.out(attended), (k, v)


class TinyDLLMBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TinyDLLMConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = TinyDLLMAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        allowed: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden [B, L, D] -> ([B, L, D], (k, v) [B, H, C+L, head_dim])."""
        attended, present = self.attention(self.attention_norm(hidden), allowed, past)
        hidden = hidden + self.dropout(attended)
        hidden = hidden + self.dropout(self.mlp(self.mlp_norm(hidden)))
        return hidden, present


class TinyDLLMModel(PreTrainedModel):
    """Tiny bidirectional / block-causal masked-diffusion LM; see the module docstring."""

    config_class = TinyDLLMConfig
    base_model_prefix = "tiny_dllm"
    main_input_name = "input_ids"
    _no_split_modules = ["TinyDLLMBlock"]
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: TinyDLLMConfig) -> None:
        config.validate()
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TinyDLLMBlock(config) for _ in range(config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Small normal init (GPT-2 style); deterministic given torch.manual_seed.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # Token and position tables at unit scale (PyTorch's default), not `std`: with
            # std 0.02 they are swamped in the residual stream and a 2-layer model does not
            # even learn the first pointer-chasing hop in 600 steps (chance, vs 1.0 at std 1).
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _attention_allowed(
        self,
        cache_length: int,
        length: int,
        attention_mask: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Boolean [B or 1, 1, L, C+L] mask of admissible keys, or None when all are."""
        allowed = None
        if self.config.attention == "block_causal":
            block = self.config.block_length
            query_block = torch.arange(cache_length, cache_length + length, device=device) // block
            key_block = torch.arange(cache_length + length, device=device) // block
            allowed = (key_block[None, :] <= query_block[:, None])[None, None]
        if attention_mask is not None:
            keys = attention_mask.to(device=device).bool()[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
            # A padded query (or a query that sees only padding) would softmax over nothing and
            # give NaN; let it see every key so it stays finite. Its output is never used.
            empty = ~allowed.any(dim=-1, keepdim=True)
            allowed = allowed | empty
        return allowed

    def _input_embeddings(self, input_ids: torch.Tensor | None,
                          inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B, L, D] token embeddings from exactly one of input_ids [B, L], inputs_embeds."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "TinyDLLMModel.forward takes exactly one of input_ids [B, L] and "
                f"inputs_embeds [B, L, D]; got input_ids={_shape(input_ids)}, "
                f"inputs_embeds={_shape(inputs_embeds)}"
            )
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
            return self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [B, L, {self.config.hidden_size}], "
                f"got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    def _checked_cache(self, past_key_values: TinyKVCache | None, batch: int) -> TinyKVCache:
        cache = past_key_values if past_key_values is not None else TinyKVCache()
        if not isinstance(cache, TinyKVCache):
            raise ValueError(
                f"past_key_values must be None or a TinyKVCache, got {type(cache).__name__}"
            )
        if len(cache) not in (0, self.config.num_hidden_layers):
            raise ValueError(
                f"past_key_values has {len(cache)} layers, the model has "
                f"{self.config.num_hidden_layers}"
            )
        if cache.batch_size not in (None, batch):
            raise ValueError(
                f"past_key_values holds batch {cache.batch_size}, the input has batch {batch}"
            )
        return cache

    def _checked_positions(self, position_ids: torch.Tensor | None, cache_length: int,
                           length: int, device: torch.device) -> torch.Tensor:
        """position_ids [B, L] or [L], default C .. C+L-1, all inside the position table."""
        limit = self.config.max_position_embeddings
        if position_ids is None:
            if cache_length + length > limit:
                raise ValueError(
                    f"{cache_length} cached + {length} new positions exceed "
                    f"max_position_embeddings={limit}"
                )
            return torch.arange(cache_length, cache_length + length, device=device)[None]
        if position_ids.shape[-1] != length:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} must be [B, {length}] or [{length}]"
            )
        if position_ids.numel() and (
            int(position_ids.min()) < 0 or int(position_ids.max()) >= limit
        ):
            raise ValueError(f"position_ids must lie in [0, max_position_embeddings={limit})")
        return position_ids

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: TinyKVCache | None = None,
        use_cache: bool = False,
        return_dict: bool = True,
    ) -> TinyDLLMOutput | tuple:
        """Score L new positions given C cached ones.

        Args:
            input_ids: [B, L] token ids, or
            inputs_embeds: [B, L, D] token embeddings (position embeddings are added here).
            attention_mask: [B, C+L] 1 for real slots, 0 for padding (cached slots included).
            position_ids: [B, L] or [L]; default C .. C+L-1.
            past_key_values: ``None`` or a :class:`TinyKVCache` of C positions (not mutated).
            use_cache: return a new cache holding the C + L positions.
            return_dict: return :class:`TinyDLLMOutput` (default) or a tuple.

        Returns:
            ``.logits`` [B, L, V] float32 and ``.past_key_values`` (new cache or ``None``).
        """
        inputs_embeds = self._input_embeddings(input_ids, inputs_embeds)
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        cache = self._checked_cache(past_key_values, batch)
        cache_length = cache.get_seq_length()
        total = cache_length + length
        position_ids = self._checked_positions(position_ids, cache_length, length, device)
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must be [B, C+L] = "
                f"[{batch}, {total}] (C={cache_length} cached slots + L={length} new ones)"
            )

        hidden = self.embed_dropout(inputs_embeds + self.embed_positions(position_ids))
        allowed = self._attention_allowed(cache_length, length, attention_mask, device)
        presents = []
        for index, layer in enumerate(self.layers):
            past = cache[index] if cache_length else None
            hidden, present = layer(hidden, allowed, past)
            presents.append(present)
        logits = self.lm_head(self.final_norm(hidden)).float()

        new_cache = TinyKVCache(presents) if use_cache else None
        if not return_dict:
            return (logits,) if new_cache is None else (logits, new_cache)
        return TinyDLLMOutput(logits=logits, past_key_values=new_cache)


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


def _register_with_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    # exist_ok: a second registration of the same classes (e.g. importlib.reload) is harmless.
    AutoConfig.register(TinyDLLMConfig.model_type, TinyDLLMConfig, exist_ok=True)
    AutoModel.register(TinyDLLMConfig, TinyDLLMModel, exist_ok=True)
    AutoModelForMaskedLM.register(TinyDLLMConfig, TinyDLLMModel, exist_ok=True)


_register_with_auto_classes()
