"""Residual state across denoising steps: the one place RCD's bookkeeping lives.

A `ResidualState` keeps, per batch row and per **absolute** sequence position, the residual input
embedding `(1 - alpha) E[M] + alpha delta` computed from the logits of the last step that saw the
position masked, plus alpha itself (for tracing). It knows nothing about any model, sampler or
engine: tensors in, embeddings out. The model wrapper (`rcd_ext.wrapper`) and through it
`rcd_ext.generate` are its only users, so there is one implementation of the residual logic.

Rules (the paper's Algorithm 2; docs/decoding.md):
- only positions whose input token is the mask id receive a residual; every other position gets
  its plain token embedding;
- `update` overwrites the stored residual of every masked position it is given (no
  accumulation) and forgets positions that now hold a real token, so a re-masked position never
  sees a stale residual;
- a masked position with no stored residual gets plain E[M] unless an init strategy primed it:
  cold (nothing), reference (logits of a frozen reference model), self (logits of one extra
  target forward), dirichlet (logits = log p0 with p0 ~ Dirichlet(c * 1)).
"""

from __future__ import annotations

import torch

from rcd_ext.init_strategies import INIT_STRATEGIES  # live view of the registry
from rcd_ext.op_checks import check_table_values
from rcd_ext.ops import residual_context

# the options dataclass lives in the torch-free rcd_ext.options (the CLI builds its flags from
# it); re-exported here, where the residual's users have always imported it
from rcd_ext.options import ResidualConfig

SCOPES = ("block", "all")
__all__ = ["INIT_STRATEGIES", "SCOPES", "ResidualConfig", "ResidualState", "dirichlet_logits"]


def dirichlet_logits(
    rows: int,
    vocab_size: int,
    concentration: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits log p0 of `rows` draws p0 ~ Dirichlet(concentration * 1_V). Returns [rows, V] fp32.

    Sampled through normalised Gamma draws (torch.distributions cannot take a generator), so a
    seeded generator makes the warm start reproducible.
    """
    shape = (rows, vocab_size)
    if concentration == 1.0:
        # Dirichlet(1) = normalised Exp(1) draws, and Exp(1) = -log U needs only torch.rand
        uniform = torch.rand(shape, generator=generator, device=device).clamp_min(1e-30)
        gamma = -torch.log(uniform)
    else:
        if generator is not None:
            # _standard_gamma has no generator argument: seed a fork of the global RNG from it.
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                gamma = torch._standard_gamma(torch.full(shape, float(concentration)))
        else:
            gamma = torch._standard_gamma(torch.full(shape, float(concentration)))
        gamma = gamma.to(device).clamp_min(1e-30)
    return torch.log(gamma / gamma.sum(-1, keepdim=True))


class ResidualState:
    """Per-position residual embeddings of one batch being decoded.

    Args:
        embed_weight: [V', D] the target's input embedding table (delta uses this table).
        mask_id: id of the mask token.
        config: residual options.

    Storage is a pool with one row per residual in flight, not a dense [B, L, D] tensor:
    `slot` [B, L] long maps each (batch row, absolute position) to its pool row (-1: none);
    `pool_embeds` [P, D] (table dtype) and `pool_alpha` [P] float32 hold the residuals. A
    position gives its pool row back when its token is committed or its batch row is cleared,
    so P follows the masked positions that have logits (a block, or the blocks in flight),
    not the longest sequence: a server with 128 requests of 4096 tokens and D = 3584 keeps
    4 MiB of slots plus P x D instead of 3.5 GiB.

    Pool row 0 is a sentinel that is never handed out: "no residual" (-1) clamps to it, so
    lookups, injections and releases are fixed-shape tensor ops with no host read; `update`
    reads two numbers back (the rows to write, how many of them need a pool row), and the free
    rows when some do (a block's first step).
    `length` (the [B, l] methods): an upper bound of the positions that the caller knows
    (the wrapper does), which saves reading `positions.max()` back to the host.
    """

    def __init__(self, embed_weight: torch.Tensor, mask_id: int, config: ResidualConfig):
        if not 0 <= mask_id < embed_weight.shape[0]:
            raise ValueError(
                f"mask id {mask_id} is outside the embedding table ({embed_weight.shape[0]} rows)"
            )
        # a NaN row would otherwise turn every residual (and so every later step's logits)
        # into NaN with no error pointing at the table; read once per unchanged table
        check_table_values(embed_weight.detach(), "input embedding table")
        self.embed_weight = embed_weight
        self.mask_id = int(mask_id)
        self.config = config
        device, dim = embed_weight.device, embed_weight.shape[1]
        with torch.inference_mode(False):  # see `reset`
            self.pool_embeds = embed_weight.new_zeros((1, dim))
            self.pool_alpha = torch.zeros(1, dtype=torch.float32, device=device)
            self.pool_used = torch.ones(1, dtype=torch.bool, device=device)  # the sentinel
        # an upper bound of the pool rows in use (sentinel excluded), kept on the host so that
        # allocating reads the pool back only when the bound says it may be full
        self._held_bound = 0
        self.reset(0)

    @property
    def mask_embed(self) -> torch.Tensor:
        """[D] embedding of the mask token."""
        return self.embed_weight[self.mask_id]

    @property
    def batch_size(self) -> int:
        """Batch rows the state has room for."""
        return self.slot.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """[B, L] bool: which (row, position) pairs hold a residual (a new tensor)."""
        return self.slot >= 0

    @property
    def residuals_held(self) -> int:
        """Pool rows in use (residuals in flight); one host read."""
        return int(self.pool_used.sum()) - 1  # the sentinel is no residual

    def reset(self, batch_size: int = 0) -> None:
        """Forget every residual (new prompt batch); the pool keeps its capacity."""
        # engines call in from torch.inference_mode(); storage made there would refuse the
        # in-place updates made outside it later, so it is always made as normal tensors
        with torch.inference_mode(False):
            self.slot = torch.full((batch_size, 0), -1, dtype=torch.long,
                                   device=self.embed_weight.device)
            self.pool_used.zero_()
            self.pool_used[0] = True
        self._held_bound = 0

    def _ensure(self, batch_size: int, length: int) -> None:
        # the [B, l] methods take a different batch size as a new batch (generate's calls)
        if batch_size != self.batch_size:
            self.reset(batch_size)
        self.grow(batch_size, length)

    def grow(self, batch_size: int, length: int) -> None:
        """Make room for `batch_size` rows and `length` positions, keeping what is stored.

        Engines that batch requests continuously add rows as requests arrive; growing never
        forgets the residuals of the requests already in flight (unlike `reset`).
        """
        rows, have = self.slot.shape
        if batch_size <= rows and length <= have:
            return
        new_rows, new_length = max(batch_size, rows), max(length, have)
        if new_length > have:
            new_length = max(new_length, 2 * have)  # amortise growth over many steps
        with torch.inference_mode(False):  # normal tensors, as in `reset`
            slot = self.slot.new_full((new_rows, new_length), -1)
            slot[:rows, :have] = self.slot
        self.slot = slot

    def _allocate(self, count: int) -> torch.Tensor:
        """[count] long: free pool rows, now marked used (the pool doubles when full)."""
        capacity = self.pool_used.shape[0]
        if capacity - 1 - self._held_bound < count:
            # the bound counts releases as if nothing were freed: count exactly
            held = self._held_bound = self.residuals_held
            if capacity - 1 - held < count:
                new_capacity = max(2 * capacity, held + 1 + count, 16)
                with torch.inference_mode(False):
                    embeds = self.pool_embeds.new_zeros((new_capacity, self.pool_embeds.shape[1]))
                    alpha = self.pool_alpha.new_zeros(new_capacity)
                    used = self.pool_used.new_zeros(new_capacity)
                    embeds[:capacity] = self.pool_embeds
                    alpha[:capacity] = self.pool_alpha
                    used[:capacity] = self.pool_used
                self.pool_embeds, self.pool_alpha, self.pool_used = embeds, alpha, used
        # only steps that bring new masked positions get here (a block's first step)
        chosen = (~self.pool_used).nonzero().squeeze(1)[:count]
        self.pool_used[chosen] = True
        self._held_bound += count
        return chosen

    def _release(self, slots: torch.Tensor) -> None:
        # -1 ("none") lands on the sentinel and writes back its True; a real row gets False
        self.pool_used[slots.clamp_min(0)] = slots < 0

    # Flat (row, position) pairs: engines that pack several requests into one token batch.

    def stored(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N] bool: whether a residual is stored at the pairs (`rows`[N], `positions`[N])."""
        if positions.numel() == 0:
            return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        self.grow(int(rows.max()) + 1, int(positions.max()) + 1)
        return self.slot[rows, positions] >= 0

    def residuals_at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N, D] stored residual embeddings at the pairs (rows [N], positions [N]); rows
        where none is stored hold garbage: select with `stored` first."""
        return self.pool_embeds[self.slot[rows, positions].clamp_min(0)]

    def forget(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Drop the residuals at the pairs (rows [N], positions [N]) (committed tokens)."""
        if positions.numel():
            self.grow(int(rows.max()) + 1, int(positions.max()) + 1)
            self._release(self.slot[rows, positions])
            self.slot[rows, positions] = -1

    def clear_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Drop every residual of the given rows (a finished request's slot is reused)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.slot.device)
        rows = rows[rows < self.slot.shape[0]]
        self._release(self.slot[rows].reshape(-1))
        self.slot[rows] = -1

    def _fit(self, positions: torch.Tensor, length: int | None) -> None:
        """Room for the [B, l] `positions` (a new batch size resets, as `generate` expects)."""
        if length is None:
            length = int(positions.max()) + 1 if positions.numel() else 0
        self._ensure(positions.shape[0], length)

    def has_residual(self, positions: torch.Tensor, *, length: int | None = None) -> torch.Tensor:
        """[B, l] bool: whether a residual is stored at the absolute `positions` [B, l]."""
        self._fit(positions, length)
        return torch.gather(self.slot, 1, positions) >= 0

    def alpha_at(self, positions: torch.Tensor, *, length: int | None = None) -> torch.Tensor:
        """[B, l] float32 alpha stored at `positions` (0 where none is stored)."""
        self._fit(positions, length)
        slots = torch.gather(self.slot, 1, positions)
        return self.pool_alpha[slots.clamp_min(0)] * (slots >= 0)

    def inputs_embeds(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        scope: torch.Tensor | None = None,
        *,
        length: int | None = None,
    ) -> torch.Tensor:
        """Input embeddings [B, l, D] for tokens `input_ids` [B, l] at absolute `positions` [B, l].

        Plain E(token) everywhere except masked positions (inside `scope` [B, l] bool when
        given) that hold a residual.
        """
        plain = torch.nn.functional.embedding(input_ids, self.embed_weight)
        return self.inject(plain, input_ids, positions, scope, length=length)

    def inject(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        scope: torch.Tensor | None = None,
        *,
        length: int | None = None,
    ) -> torch.Tensor:
        """`embeds` [B, l, D] (token embeddings of `input_ids`) with the stored residuals put at
        masked positions that have one: a new tensor (the input is never modified)."""
        self._fit(positions, length)
        slots = torch.gather(self.slot, 1, positions)
        use = (input_ids == self.mask_id) & (slots >= 0)
        if scope is not None:
            use &= scope
        # every position reads a pool row (the sentinel where none is stored) and `use` picks:
        # a fixed-shape select instead of reading the chosen rows' count back to the host
        residuals = self.pool_embeds[slots.clamp_min(0)].to(embeds.dtype)
        return torch.where(use.unsqueeze(-1), residuals, embeds)

    def update(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        scope: torch.Tensor | None = None,
        *,
        length: int | None = None,
    ) -> int:
        """Store residuals from `logits` [B, l, V] for the masked positions of `input_ids` [B, l].

        Positions holding a real token are forgotten; masked positions (inside `scope` [B, l]
        when given) are overwritten. Returns the number of rows written.
        """
        self._fit(positions, length)
        masked = input_ids == self.mask_id
        slots = torch.gather(self.slot, 1, positions)
        # a committed token's position never needs its old residual again
        self._release(slots.masked_fill(masked, -1))
        slots = slots.masked_fill(~masked, -1)
        self.slot.scatter_(1, positions, slots)
        write = masked if scope is None else masked & scope
        rows, cols = write.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return 0
        slots = slots[rows, cols]
        self._store(rows, positions[rows, cols], slots, logits[rows, cols])
        return int(rows.numel())

    def write(self, batch_index: torch.Tensor, positions: torch.Tensor,
              logits: torch.Tensor) -> None:
        """Overwrite the residuals of N (row, absolute position) pairs from logits [N, V].

        batch_index, positions: [N] long. The rows must be positions that are masked now.
        """
        if batch_index.numel() == 0:
            return
        top_row, top_position = torch.stack([batch_index.max(), positions.max()]).tolist()
        self.grow(top_row + 1, top_position + 1)
        self._store(batch_index, positions, self.slot[batch_index, positions], logits)

    def _store(self, batch_index: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               logits: torch.Tensor) -> None:
        """Compute the residuals of logits [N, V] and put them at the N pairs, whose current
        pool rows are `slots` [N] (-1: none yet)."""
        # logits wider than the table (padded LM heads) have columns with no embedding row;
        # the op refuses them, so keep the columns that pair with real rows
        vocab = min(logits.shape[-1], self.embed_weight.shape[0])
        cfg = self.config
        embeds, alpha = residual_context(
            logits[:, :vocab], self.embed_weight, self.mask_embed,
            t_res=cfg.t_res, temper_delta=cfg.temper_delta, strategy=cfg.strategy,
            alpha_scale=cfg.alpha_scale, residual_top_k=cfg.residual_top_k,
        )
        new = slots < 0
        count = int(new.sum())
        if count:
            # the k-th new pair takes the k-th allocated row
            chosen = self._allocate(count)
            slots = torch.where(new, chosen[(new.cumsum(0) - 1).clamp_min(0)], slots)
            self.slot[batch_index, positions] = slots
            # a pair given twice got two pool rows; the slot table kept one of them
            kept = self.slot[batch_index, positions]
            self._release(slots.masked_fill(slots == kept, -1))
            slots = kept
        self.pool_embeds[slots] = embeds.to(self.pool_embeds.dtype)
        self.pool_alpha[slots] = alpha
