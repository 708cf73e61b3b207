"""The residual-context op for a vocabulary-sharded model (tensor parallelism): partials, merge.

Under tensor parallelism (SGLang's `VocabParallelEmbedding`) rank r holds rows
[vocab_start_r, vocab_start_r + rows_r) of the embedding table E and, when logits stay
vocab-local, the same columns of the logits. Every rank computes its partial of the op
(`rcd_ext.op_reference` gives the formula) and the ranks merge them:

1. per row, the shard's maximum logit (one all-reduce MAX of [N + 1]: the last entry flags NaN or
   +inf on any rank so that every rank raises together instead of one rank hanging the others);
2. per row, relative to the global maximum M: s1 = sum e^(z - M), sT = sum e^(u), wT = sum e^(u) u
   with u = (z - M) / t_res (one all-reduce SUM of [3N + 2]: the vocabulary size and the number of
   ranks owning the mask row ride along), giving H = log sT - wT / sT and alpha;
3. the shard's p @ E_shard times alpha, plus (1 - alpha) E[MASK] on the rank owning the mask row
   (one all-reduce SUM of [N, D] float32), then the embedding table's dtype.

With `residual_top_k` = k < V, step 3 is instead: one all-gather of every rank's [N, k] top
logits and columns, the same global top k chosen on every rank, and one all-reduce SUM of
[2N * D + N + 2D] (head, chosen rows' sum, their mass, the table's row sum, the mask row).

The logits are read a chunk of columns at a time, so no rank ever holds an [N, V] (nor an
[N, V_shard]) float32 tensor: bf16 logits stay bf16 until a chunk is converted. With one rank
(or torch.distributed not initialised) this is exactly `rcd_ext.ops.residual_context`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rcd_ext.alpha_strategies import STRATEGIES, get_alpha_strategy
from rcd_ext.op_checks import FLOAT_DTYPES, check_t_res
from rcd_ext.ops import _top_k_columns, check_residual_top_k, residual_context

__all__ = ["CHUNK_ELEMENTS", "residual_context_vocab_parallel", "shard_bounds", "world_size"]

# float32 values per [N, chunk] intermediate (4 MiB)
CHUNK_ELEMENTS = 1 << 20
_FINITE_FLOOR = torch.finfo(torch.float32).min


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in `group` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def shard_bounds(padded_rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's rows when `padded_rows` (a multiple of `world`) are split evenly, as
    `VocabParallelEmbedding` splits its padded table."""
    if world < 1 or not 0 <= rank < world or padded_rows % world:
        raise ValueError(f"need padded_rows % world == 0 and 0 <= rank < world, got "
                         f"padded_rows={padded_rows}, world={world}, rank={rank}")
    per_rank = padded_rows // world
    return rank * per_rank, (rank + 1) * per_rank


def residual_context_vocab_parallel(
    logits_shard: torch.Tensor,
    embed_shard: torch.Tensor,
    *,
    vocab_start: int,
    mask_id: int,
    t_res: float = 1.0,
    temper_delta: bool = False,
    strategy: str = "entropy",
    alpha_scale: float = 1.0,
    residual_top_k: int | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual embeddings of N masked positions from this rank's vocabulary shard.

    Args:
        logits_shard: [N, W] logits of global columns [vocab_start, vocab_start + W): this rank's
            columns of the real vocabulary (W = 0 where the shard is all padding). N must be the
            same on every rank; the ranks' columns must tile [0, V) without overlap.
        embed_shard: [R, D] rows [vocab_start, vocab_start + R) of the table, R >= W (rows past
            the real vocabulary are padding and never read).
        vocab_start: global index of this shard's first row.
        mask_id: global row of the mask token; exactly one rank must own it.
        t_res, temper_delta, strategy, alpha_scale, residual_top_k: as
            `rcd_ext.ops.residual_context`. With residual_top_k = k < V each rank offers its k
            largest logits (one all-gather of [N, k] values and columns), every rank picks the
            same global top k (ties: the lower column), and the head, the chosen rows' sum, their
            probability mass and the table's row sum merge in the final all-reduce.
        group: the tensor-parallel process group (None: the default group).
        chunk_elements: float32 values per [N, chunk] intermediate.

    Returns:
        embeds [N, D] in embed_shard's dtype (identical on every rank), alpha [N] float32.
    """
    _check_args(logits_shard, embed_shard, vocab_start, mask_id, t_res, strategy, alpha_scale)
    top_k = None if residual_top_k is None else check_residual_top_k(residual_top_k)
    owns_mask = vocab_start <= mask_id < vocab_start + embed_shard.shape[0]
    if world_size(group) == 1:
        if vocab_start != 0 or not owns_mask:
            raise ValueError(f"with one rank the shard is the whole table: need vocab_start 0 and "
                             f"mask_id < {embed_shard.shape[0]}, got vocab_start={vocab_start}, "
                             f"mask_id={mask_id}")
        return residual_context(logits_shard, embed_shard, embed_shard[mask_id], t_res=t_res,
                                temper_delta=temper_delta, strategy=strategy,
                                alpha_scale=alpha_scale, residual_top_k=top_k)
    n, dim = logits_shard.shape[0], embed_shard.shape[1]
    device = logits_shard.device
    if n == 0:  # N is the same on every rank, so every rank skips the collectives
        return (torch.empty((0, dim), dtype=embed_shard.dtype, device=device),
                torch.empty((0,), dtype=torch.float32, device=device))
    logits, table = logits_shard.detach(), embed_shard.detach()
    step = max(1, chunk_elements // n)
    row_max = _global_row_max(logits, step, group)
    stats, numerator = _shard_partials(logits, table, row_max, float(t_res), temper_delta,
                                       strategy, step, with_numerator=top_k is None)
    stats = torch.cat([stats.flatten(),
                       stats.new_tensor([logits.shape[1], float(owns_mask)])])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    vocab, owners = int(round(float(stats[-2]))), int(round(float(stats[-1])))
    if owners != 1:
        raise ValueError(f"mask_id {mask_id} must lie in exactly one rank's shard, found {owners}")
    s1, s_t, w_t = stats[:-2].view(3, n)
    alpha = _alpha(s_t, w_t, vocab, strategy, float(alpha_scale), n, device)
    normalizer = s_t if temper_delta else s1
    if top_k is not None and top_k < vocab:
        return _top_k_merge(logits, table, vocab_start, mask_id if owns_mask else None, row_max,
                            normalizer, alpha, vocab, top_k, float(t_res) if temper_delta else 1.0,
                            group)
    if numerator is None:  # top_k >= V: the exact residual after all
        _, numerator = _shard_partials(logits, table, row_max, float(t_res), temper_delta,
                                       "fixed", step)
    merged = numerator.mul_((alpha / normalizer)[:, None])
    if owns_mask:
        merged += (1.0 - alpha)[:, None] * table[mask_id - vocab_start].float()[None, :]
    dist.all_reduce(merged, op=dist.ReduceOp.SUM, group=group)
    return merged.to(table.dtype), alpha


def _check_args(logits: torch.Tensor, table: torch.Tensor, vocab_start: int, mask_id: int,
                t_res: float, strategy: str, alpha_scale: float) -> None:
    if logits.dim() != 2 or table.dim() != 2:
        raise ValueError(f"logits_shard must be [N, W] and embed_shard [R, D], got shapes "
                         f"{tuple(logits.shape)} and {tuple(table.shape)}")
    if logits.shape[1] > table.shape[0]:
        raise ValueError(f"logits_shard has {logits.shape[1]} columns but embed_shard only "
                         f"{table.shape[0]} rows (every logit column needs its embedding row)")
    for name, tensor in (("logits_shard", logits), ("embed_shard", table)):
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} dtype {tensor.dtype} is not one of float32, bfloat16, float16")
    if logits.device != table.device:
        raise ValueError(f"logits_shard on {logits.device} but embed_shard on {table.device}")
    if vocab_start < 0 or mask_id < 0:
        raise ValueError(f"vocab_start and mask_id must be >= 0, got {vocab_start}, {mask_id}")
    check_t_res(t_res)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not (isinstance(alpha_scale, (int, float)) and 0.0 <= alpha_scale <= 1.0):
        raise ValueError(f"alpha_scale must be in [0, 1], got {alpha_scale!r}")


def _global_row_max(logits: torch.Tensor, step: int, group) -> torch.Tensor:
    """[N, 1] float32 maximum over every rank's columns; ValueError on every rank for NaN, +inf or
    a row that is -inf everywhere (the last entry of the MAX all-reduce flags NaN / +inf)."""
    n = logits.shape[0]
    local = torch.full((n + 1,), -math.inf, dtype=torch.float32, device=logits.device)
    local[n] = 0.0
    for start in range(0, logits.shape[1], step):  # a shard of only padding has no columns
        chunk_max = logits[:, start:start + step].amax(-1).float()  # exact in the logits' own dtype
        # NaN compares false both ways; +inf is the only other value above every finite float
        bad = torch.isnan(chunk_max) | (chunk_max == math.inf)
        local[:n] = torch.maximum(local[:n], torch.where(bad, -math.inf, chunk_max))
        local[n] = torch.maximum(local[n], bad.any().float())
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    if float(local[n]) > 0:
        raise ValueError("logits contain NaN or +inf (on some rank's vocabulary shard)")
    empty = local[:n] == -math.inf
    if bool(empty.any()):
        raise ValueError(f"logits row {int(empty.nonzero()[0, 0])} has no finite logit "
                         "(every entry is -inf on every rank)")
    return local[:n, None]


def _shard_partials(logits: torch.Tensor, table: torch.Tensor, row_max: torch.Tensor,
                    t_res: float, temper_delta: bool, strategy: str, step: int,
                    with_numerator: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This shard's sums relative to the global maximum, chunk by chunk.

    Returns stats [3, N] (s1 = sum e^(z - M), sT = sum e^u, wT = sum e^u u with u = (z - M) / t_res)
    and numerator [N, D] = sum over the shard of e^(z - M) E_v (e^u E_v when temper_delta; None
    unless with_numerator).
    """
    n, dim = logits.shape[0], table.shape[1]
    stats = torch.zeros((3, n), dtype=torch.float32, device=logits.device)
    numerator = torch.zeros((n, dim), dtype=torch.float32, device=logits.device) \
        if with_numerator else None
    uses_entropy = get_alpha_strategy(strategy).uses_entropy
    need_tempered = t_res != 1.0 and (temper_delta or uses_entropy)
    for start in range(0, logits.shape[1], step):
        shifted = torch.sub(logits[:, start:start + step], row_max)  # float32 [N, chunk], <= 0
        weights = shifted.exp()
        stats[0] += weights.sum(-1)
        if need_tempered:
            shifted.mul_(1.0 / t_res)
            tempered = shifted.exp()
        else:
            tempered = weights
        stats[1] += tempered.sum(-1)
        if uses_entropy:
            # a -inf logit has e^u = 0 and must add 0, not 0 * -inf
            stats[2] += (tempered * shifted.clamp_(min=_FINITE_FLOOR)).sum(-1)
        if numerator is not None:
            rows = table[start:start + shifted.shape[1]].float()
            numerator.addmm_(tempered if temper_delta else weights, rows)
    return stats, numerator


def _alpha(s_t: torch.Tensor, w_t: torch.Tensor, vocab: int, strategy: str, alpha_scale: float,
           n: int, device: torch.device) -> torch.Tensor:
    """alpha [N] from the merged tempered sums (as `rcd_ext.op_reference`)."""
    if vocab < 2:
        raise ValueError(f"logits need at least 2 vocabulary columns in all, got V={vocab}")
    chosen = get_alpha_strategy(strategy)
    if not chosen.uses_entropy:
        return chosen.alpha(torch.zeros(n, dtype=torch.float32, device=device), alpha_scale)
    log_vocab = math.log(vocab)
    entropy = (s_t.log() - w_t / s_t).clamp(0.0, log_vocab)
    return chosen.alpha(entropy / log_vocab, alpha_scale)


def _global_top_k(logits: torch.Tensor, vocab_start: int, k: int, group) -> torch.Tensor:
    """[N, k] global columns of the k largest logits over every rank (ties: the lower column),
    identical on every rank: each rank offers its own top min(k, W), padded with -inf at
    columns past every real one, and one all-gather brings all offers to every rank."""
    n, width = logits.shape
    values = torch.full((n, k), -math.inf, dtype=torch.float32, device=logits.device)
    columns = torch.full((n, k), torch.iinfo(torch.int64).max, dtype=torch.int64,
                         device=logits.device)
    offered = min(k, width)
    if offered:
        local = _top_k_columns(logits, offered)
        values[:, :offered] = logits.gather(1, local).float()  # exact: a widening cast
        columns[:, :offered] = local + vocab_start
    world = dist.get_world_size(group)
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_columns = [torch.empty_like(columns) for _ in range(world)]
    dist.all_gather(all_values, values, group=group)
    dist.all_gather(all_columns, columns, group=group)
    values, columns = torch.cat(all_values, 1), torch.cat(all_columns, 1)
    # order by column, then (stably) by value descending: equal values keep the lower column first
    by_column = columns.argsort(dim=1, stable=True)
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return columns.gather(1, by_value)


def _top_k_merge(logits: torch.Tensor, table: torch.Tensor, vocab_start: int,
                 mask_id: int | None, row_max: torch.Tensor, normalizer: torch.Tensor,
                 alpha: torch.Tensor, vocab: int, k: int, delta_temperature: float,
                 group) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k residual from shard partials: this rank's chosen rows give p-weighted and plain
    row sums and their probability mass; with the table's row sum over [0, V) and the mask row
    they merge in one all-reduce of [2N * D + N + 2D]."""
    n, width = logits.shape
    dim = table.shape[1]
    chosen = _global_top_k(logits, vocab_start, k, group)
    mine = (chosen >= vocab_start) & (chosen < vocab_start + width)
    local = (chosen - vocab_start).clamp(0, max(width - 1, 0)) * mine
    if width:
        z = logits.gather(1, local).float()
        p = ((z - row_max) / delta_temperature).exp() / normalizer[:, None] * mine
        rows = table.index_select(0, local.reshape(-1)).view(n, k, dim).float()
        rows = rows * mine[..., None]
        head = torch.bmm(p[:, None, :], rows)[:, 0]
        picked = rows.sum(1)
        table_sum = table[:width].to(torch.float64).sum(0).float()
    else:
        p = torch.zeros((n, k), dtype=torch.float32, device=logits.device)
        head = picked = torch.zeros((n, dim), dtype=torch.float32, device=logits.device)
        table_sum = torch.zeros(dim, dtype=torch.float32, device=logits.device)
    mask_row = table[mask_id - vocab_start].float() if mask_id is not None \
        else torch.zeros(dim, dtype=torch.float32, device=logits.device)
    merged = torch.cat([head.flatten(), picked.flatten(), p.sum(1), table_sum, mask_row])
    dist.all_reduce(merged, op=dist.ReduceOp.SUM, group=group)
    head, picked = merged[:2 * n * dim].view(2, n, dim)
    mass = merged[2 * n * dim:2 * n * dim + n]
    table_sum, mask_row = merged[2 * n * dim + n:].view(2, dim)
    tail_mass = (1.0 - mass).clamp(min=0.0)[:, None]
    delta = head + tail_mass * (table_sum - picked) / (vocab - k)
    embeds = (1.0 - alpha)[:, None] * mask_row + alpha[:, None] * delta
    return embeds.to(table.dtype), alpha
