"""Residual state across denoising steps: the one place RCD's bookkeeping lives.

A `ResidualState` keeps, per batch row and per **absolute** sequence position, the residual input
embedding `(1 - alpha) E[M] + alpha delta` computed from the logits of the last step that saw the
position masked, plus alpha itself (for tracing). It knows nothing about any model, sampler or
engine: tensors in, embeddings out. The model wrapper (`rcd_ext.wrapper`) and through it
`rcd_ext.generate` are its only users, so there is one implementation of the residual logic.

Rules (rcd-method.md, Algorithm 2):
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

from dataclasses import dataclass

import torch

from rcd_ext.ops import STRATEGIES, residual_context

INIT_STRATEGIES = ("cold", "reference", "self", "dirichlet")
SCOPES = ("block", "all")


@dataclass(frozen=True)
class ResidualConfig:
    """Residual options (defaults: the paper's printed algorithm).

    t_res: temperature of the entropy that gives alpha (and delta when temper_delta).
    temper_delta: take delta from softmax(z / t_res) instead of softmax(z).
    strategy: "entropy" (alpha = H / log V), "confidence" (1 - H / log V) or "fixed".
    alpha_scale: multiplies alpha; with strategy "fixed" it is alpha. 0 turns residuals off.
    init: what a masked position gets before it has logits of its own: cold | reference | self |
        dirichlet.
    dirichlet_concentration: c of the symmetric Dirichlet used by init "dirichlet".
    scope: "block" injects only inside the block being decoded (positions of later blocks keep
        plain [M]: the same inputs in every cache mode, and N rows of work per step instead of
        the whole tail); "all" injects at every masked position that has logits.
    """

    t_res: float = 1.0
    temper_delta: bool = False
    strategy: str = "entropy"
    alpha_scale: float = 1.0
    init: str = "cold"
    dirichlet_concentration: float = 1.0
    scope: str = "block"

    def __post_init__(self) -> None:
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f"init must be one of {INIT_STRATEGIES}, got {self.init!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not self.t_res > 0:
            raise ValueError(f"t_res must be > 0, got {self.t_res!r}")
        if not 0.0 <= self.alpha_scale <= 1.0:
            raise ValueError(f"alpha_scale must be in [0, 1], got {self.alpha_scale!r}")
        if not self.dirichlet_concentration > 0:
            raise ValueError(
                f"dirichlet_concentration must be > 0, got {self.dirichlet_concentration!r}"
            )


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

    Storage grows with the largest absolute position seen: embeds [B, L, D] (table dtype),
    alpha [B, L] float32, valid [B, L] bool.
    """

    def __init__(self, embed_weight: torch.Tensor, mask_id: int, config: ResidualConfig):
        if not 0 <= mask_id < embed_weight.shape[0]:
            raise ValueError(
                f"mask id {mask_id} is outside the embedding table ({embed_weight.shape[0]} rows)"
            )
        self.embed_weight = embed_weight
        self.mask_id = int(mask_id)
        self.config = config
        self.batch_size = 0
        self.embeds = embed_weight.new_zeros((0, 0, embed_weight.shape[1]))
        self.alpha = torch.zeros((0, 0), dtype=torch.float32, device=embed_weight.device)
        self.valid = torch.zeros((0, 0), dtype=torch.bool, device=embed_weight.device)

    @property
    def mask_embed(self) -> torch.Tensor:
        """[D] embedding of the mask token."""
        return self.embed_weight[self.mask_id]

    def reset(self, batch_size: int = 0) -> None:
        """Forget every residual (new prompt batch)."""
        self.batch_size = batch_size
        device, dim = self.embed_weight.device, self.embed_weight.shape[1]
        # engines call in from torch.inference_mode(); storage made there would refuse the
        # in-place updates made outside it later, so it is always made as normal tensors
        with torch.inference_mode(False):
            self.embeds = self.embed_weight.new_zeros((batch_size, 0, dim))
            self.alpha = torch.zeros((batch_size, 0), dtype=torch.float32, device=device)
            self.valid = torch.zeros((batch_size, 0), dtype=torch.bool, device=device)

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
        rows, have = self.valid.shape
        if batch_size <= rows and length <= have:
            return
        new_rows, new_length = max(batch_size, rows), max(length, have)
        if new_length > have:
            new_length = max(new_length, 2 * have)  # amortise growth over many steps
        dim = self.embed_weight.shape[1]
        with torch.inference_mode(False):  # normal tensors, as in `reset`
            embeds = self.embeds.new_zeros((new_rows, new_length, dim))
            alpha = self.alpha.new_zeros((new_rows, new_length))
            valid = self.valid.new_zeros((new_rows, new_length))
            embeds[:rows, :have] = self.embeds
            alpha[:rows, :have] = self.alpha
            valid[:rows, :have] = self.valid
        self.embeds, self.alpha, self.valid = embeds, alpha, valid
        self.batch_size = new_rows

    # Flat (row, position) pairs: engines that pack several requests into one token batch.

    def stored(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N] bool: whether a residual is stored at the pairs (`rows`[N], `positions`[N])."""
        if positions.numel() == 0:
            return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        self.grow(int(rows.max()) + 1, int(positions.max()) + 1)
        return self.valid[rows, positions]

    def residuals_at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[N, D] stored residual embeddings at the pairs (rows [N], positions [N]); rows
        where none is stored hold garbage: select with `stored` first."""
        return self.embeds[rows, positions]

    def forget(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Drop the residuals at the pairs (rows [N], positions [N]) (committed tokens)."""
        if positions.numel():
            self.grow(int(rows.max()) + 1, int(positions.max()) + 1)
            self.valid[rows, positions] = False

    def clear_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Drop every residual of the given rows (a finished request's slot is reused)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        rows = rows[rows < self.valid.shape[0]]
        self.valid[rows] = False

    def has_residual(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, l] bool: whether a residual is stored at the absolute `positions` [B, l]."""
        self._ensure(positions.shape[0], int(positions.max()) + 1 if positions.numel() else 0)
        return torch.gather(self.valid, 1, positions)

    def alpha_at(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, l] float32 alpha stored at `positions` (0 where none is stored)."""
        valid = self.has_residual(positions)
        return torch.gather(self.alpha, 1, positions) * valid

    def inputs_embeds(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        scope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings [B, l, D] for tokens `input_ids` [B, l] at absolute `positions` [B, l].

        Plain E(token) everywhere except masked positions (inside `scope` [B, l] bool when
        given) that hold a residual.
        """
        plain = torch.nn.functional.embedding(input_ids, self.embed_weight)
        return self.inject(plain, input_ids, positions, scope)

    def inject(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        scope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`embeds` [B, l, D] (token embeddings of `input_ids`) with the stored residuals put at
        masked positions that have one. Returns `embeds` itself when nothing changes, else a
        copy (the input is never modified)."""
        use = (input_ids == self.mask_id) & self.has_residual(positions)
        if scope is not None:
            use &= scope
        if not bool(use.any()):
            return embeds
        rows, cols = use.nonzero(as_tuple=True)
        embeds = embeds.clone()
        embeds[rows, cols] = self.embeds[rows, positions[rows, cols]].to(embeds.dtype)
        return embeds

    def update(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        scope: torch.Tensor | None = None,
    ) -> int:
        """Store residuals from `logits` [B, l, V] for the masked positions of `input_ids` [B, l].

        Positions holding a real token are forgotten; masked positions (inside `scope` [B, l]
        when given) are overwritten. Returns the number of rows written.
        """
        self._ensure(input_ids.shape[0], int(positions.max()) + 1 if positions.numel() else 0)
        masked = input_ids == self.mask_id
        # a committed token's position never needs its old residual again
        self.valid.scatter_(1, positions, torch.gather(self.valid, 1, positions) & masked)
        write = masked if scope is None else masked & scope
        if not bool(write.any()):
            return 0
        rows, cols = write.nonzero(as_tuple=True)
        self.write(rows, positions[rows, cols], logits[rows, cols])
        return int(rows.numel())

    def write(self, batch_index: torch.Tensor, positions: torch.Tensor,
              logits: torch.Tensor) -> None:
        """Overwrite the residuals of N (row, absolute position) pairs from logits [N, V].

        batch_index, positions: [N] long. The rows must be positions that are masked now.
        """
        if batch_index.numel() == 0:
            return
        self.grow(int(batch_index.max()) + 1, int(positions.max()) + 1)
        # logits wider than the table (padded LM heads) have columns with no embedding row;
        # the op refuses them, so keep the columns that pair with real rows
        vocab = min(logits.shape[-1], self.embed_weight.shape[0])
        cfg = self.config
        embeds, alpha = residual_context(
            logits[:, :vocab], self.embed_weight, self.mask_embed,
            t_res=cfg.t_res, temper_delta=cfg.temper_delta, strategy=cfg.strategy,
            alpha_scale=cfg.alpha_scale,
        )
        self.embeds[batch_index, positions] = embeds
        self.alpha[batch_index, positions] = alpha
        self.valid[batch_index, positions] = True
