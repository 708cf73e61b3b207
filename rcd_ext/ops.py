"""Python front of the fused residual-context op (`torch.ops.rcd_ext.residual_context`).

Kernels live in csrc/ (CPU: statistics pass + BLAS GEMM in vocabulary chunks; CUDA: statistics
kernel + tensor-core GEMM in chunks), registered with torch.library under one schema; the fake
implementation below lets the op run under torch.compile(fullgraph=True) and torch.export.
The plain-torch specification is `rcd_ext.op_reference.residual_context_reference`.

`residual_top_k=k` (1 <= k < V) runs the sparse op `torch.ops.rcd_ext.residual_context_top_k`
instead (csrc/residual_context_top_k_cpu.cpp; CUDA for k <= CUDA_TOP_K_MAX): one pass over each
row's logits gives the statistics and the top k together; alpha from the exact full-vocabulary
entropy, delta from the k rows of the largest logits plus the tail's probability mass times the
mean of the other rows, derived from the table's row sum (computed once per table, cached, and
passed in through the op `rcd_ext::table_row_sum`). Without a kernel for the device a plain-torch
version runs. Specification: `rcd_ext.op_reference.residual_context_top_k_reference`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Literal

import torch

from rcd_ext import _extension, kernel_self_check
from rcd_ext.alpha_strategies import STRATEGIES, get_alpha_strategy
from rcd_ext.op_checks import check_logit_values, check_residual_context_args
from rcd_ext.op_reference import residual_context_reference, residual_context_top_k_reference
from rcd_ext.table_cache import TableCache

__all__ = ["STRATEGIES", "backend", "check_residual_top_k", "clear_table_mean_cache",
           "has_top_k_kernel", "residual_context", "residual_context_reference",
           "residual_context_top_k_reference", "table_mean", "table_row_sum"]

Backend = Literal["cpu-kernel", "cuda-kernel", "reference"]


def backend(device: str | torch.device = "cpu") -> Backend:
    """Which implementation `residual_context` runs for inputs on `device`."""
    device_type = torch.device(device).type
    if kernel_self_check.failed("residual_context", device):
        return "reference"
    if device_type == "cpu" and _extension.cpu_loaded:
        return "cpu-kernel"
    if device_type == "cuda" and _extension.cuda_loaded:
        return "cuda-kernel"
    return "reference"


def load_errors() -> dict[str, str | None]:
    """Why a compiled module did not load (None where it loaded or was not built)."""
    return {"cpu": _extension.cpu_error, "cuda": _extension.cuda_error}


def residual_context(
    logits: torch.Tensor,
    embed_weight: torch.Tensor,
    mask_embed: torch.Tensor,
    *,
    t_res: float = 1.0,
    temper_delta: bool = False,
    strategy: str = "entropy",
    alpha_scale: float = 1.0,
    residual_top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual input embeddings for the positions that stay masked.

    Args:
        logits: [N, V] float32/bfloat16/float16 logits of the N still-masked positions.
        embed_weight: [V', D] the model's input embedding table, V' >= V (padding rows unused).
        mask_embed: [D] embedding of the mask token, same dtype as embed_weight.
        t_res: residual temperature for alpha (and for delta when temper_delta).
        temper_delta: use softmax(z / t_res) for delta instead of softmax(z).
        strategy: a registered alpha strategy (`rcd_ext.alpha_strategies`): "entropy"
            (alpha = H / log V), "confidence" (1 - H / log V), "fixed", or one of your own (a
            strategy without a kernel code runs the plain-torch path, unfused).
        alpha_scale: multiplies alpha for every strategy (the alpha itself for "fixed").
        residual_top_k: None (default): the exact fused op. An int k >= 1: delta from the k
            largest logits' rows, p_j E_j with the exact full-vocabulary p, plus the rest of
            the mass times the mean of the other rows (a uniform tail; see
            `residual_context_top_k_reference`); alpha stays exact. Reads k rows of E per
            position instead of all V (plus the table's mean row, once per table). k >= V is
            the exact op.

    Returns:
        embeds [N, D] in embed_weight's dtype, alpha [N] float32.

    The outputs carry no gradient: RCD treats the residual as an input, never backpropagating
    through the denoising loop. Raises ValueError on NaN or +inf logits and on rows whose
    logits are all -inf.
    """
    check_residual_context_args(logits, embed_weight, mask_embed, t_res, strategy, alpha_scale)
    if residual_top_k is not None:
        top_k = check_residual_top_k(residual_top_k)
        if top_k < logits.shape[1]:
            return _sparse_residual_context(logits, embed_weight, mask_embed, float(t_res),
                                            bool(temper_delta), strategy, float(alpha_scale),
                                            top_k)
    args = (logits.detach(), embed_weight.detach(), mask_embed.detach(),
            float(t_res), bool(temper_delta), strategy, float(alpha_scale))
    if backend(logits.device) == "reference" or not _fused(strategy) \
            or not kernel_self_check.kernel_usable("residual_context", logits.device):
        check_logit_values(args[0])
        return residual_context_reference(*args)
    return _exact_kernel(*args)


def _fused(strategy: str) -> bool:
    """Whether the compiled kernels implement `strategy` (else the plain-torch path runs)."""
    return get_alpha_strategy(strategy).kernel_code is not None


def _exact_kernel(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled exact op (one name for the self-check and its tests to replace)."""
    return torch.ops.rcd_ext.residual_context(*args)


# (logits dtype, table dtype, strided logits, temper_delta): each kernel path once
_SELF_CHECK_CASES = ((torch.float32, torch.float32, False, False),
                     (torch.bfloat16, torch.bfloat16, True, True),
                     (torch.float16, torch.float16, False, False),
                     (torch.float32, torch.bfloat16, True, False))
# loose enough for fast-math exp and any summation order, far below what a broken kernel gives
_SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 8e-3}


def _self_check_exact(device: torch.device) -> str | None:
    """Kernel vs reference on a small input per kernel path (vocabulary chunks, -inf entries,
    a column slice of wider logits); None when they agree, else what differed."""
    generator = torch.Generator().manual_seed(0)
    for logit_dtype, table_dtype, strided, temper_delta in _SELF_CHECK_CASES:
        # 9000 columns: the CUDA statistics split a row over several blocks from 8193 on
        wide = torch.randn(5, 9100, generator=generator) * 4
        wide[:, 7::11] = -math.inf
        table = torch.randn(9010, 24, generator=generator)
        logits = wide.to(device, logit_dtype)
        logits = logits[:, :9000] if strided else logits[:, :9000].contiguous()
        table = table.to(device, table_dtype)
        args = (logits, table, table[3], 0.8, temper_delta, "entropy", 1.0)
        failure = _disagreement(_exact_kernel(*args), residual_context_reference(*args),
                                f"{logit_dtype} logits, {table_dtype} table")
        if failure:
            return failure
    return None


def _disagreement(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor],
                  case: str) -> str | None:
    """None when a kernel's (embeds, alpha) match the reference's within the self-check
    tolerance of the table's dtype, else what differed in `case`."""
    (got_embeds, got_alpha), (want_embeds, want_alpha) = got, want
    alpha_error = (got_alpha.float() - want_alpha.float()).abs().max().item()
    embed_error = (got_embeds.float() - want_embeds.float()).abs().max().item()
    scale = max(1.0, want_embeds.float().abs().max().item())
    if alpha_error <= 1e-3 and embed_error <= _SELF_CHECK_TOLERANCE[want_embeds.dtype] * scale:
        return None
    return (f"{case}: max |kernel - reference| {embed_error:.3g} (embeds), "
            f"{alpha_error:.3g} (alpha)")


kernel_self_check.register_self_check("residual_context", _self_check_exact)


# ---- the top-k (sparse) residual -----------------------------------------------------------------

# values per intermediate [rows, V] (statistics) or [rows, k, D] (gathered rows) tensor
TOP_K_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 22}
TABLE_MEAN_CACHE_SIZE = 8
_table_means: TableCache[torch.Tensor] = TableCache(TABLE_MEAN_CACHE_SIZE)


def check_residual_top_k(residual_top_k: object) -> int:
    """The top-k size as an int; TypeError / ValueError unless it is an integer >= 1."""
    if isinstance(residual_top_k, bool) or not isinstance(residual_top_k, numbers.Integral):
        raise TypeError(f"residual_top_k must be an int >= 1 (or None for the exact residual), "
                        f"got {residual_top_k!r} of type {type(residual_top_k).__name__}")
    if residual_top_k < 1:
        raise ValueError(f"residual_top_k must be >= 1 (or None for the exact residual), "
                         f"got {residual_top_k!r}")
    return int(residual_top_k)


def clear_table_mean_cache() -> None:
    """Forget every cached mean row (for tables changed behind the version counter, e.g. through
    `.data`)."""
    _table_means.clear()


def _chunk_elements(device: torch.device) -> int:
    return TOP_K_CHUNK_ELEMENTS.get(device.type, TOP_K_CHUNK_ELEMENTS["cuda"])


def table_mean(embed_weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """Mean row of embed_weight[:vocab] as float32 [D] (summed in float64), cached while the
    table is unchanged (`rcd_ext.table_cache`); call `clear_table_mean_cache()` after changing
    a table through `.data`."""
    mean, cached = _table_means.get(embed_weight, int(vocab),
                                    lambda table: _mean_row(table[:vocab]))
    if not cached:
        warnings.warn("residual_top_k: the embedding table is an inference tensor (no version "
                      "counter), so its mean row is recomputed on every call (a full table read)",
                      stacklevel=3)
    return mean


def _mean_row(rows: torch.Tensor) -> torch.Tensor:
    """float32 [D] mean of rows [V, D], summed in float64 a chunk at a time (a full table read)."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    step = max(1, _chunk_elements(rows.device) // max(1, rows.shape[1]))
    for chunk in rows.split(step):
        total += chunk.to(torch.float64).sum(0)
    return (total / rows.shape[0]).float()


def _top_k_columns(z: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, k] columns of the k largest values of z [rows, V] (no NaN); among equal values at
    the boundary the lower column wins, so the set does not depend on topk's tie order."""
    values, columns = z.topk(k, dim=1)
    threshold = values[:, -1:]
    tied = (z >= threshold).sum(-1) > k  # rows where equal values straddle the k-th place
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        zt, tt = z[rows], threshold[rows]
        chosen = zt > tt
        room = k - chosen.sum(-1)
        # the tied entries in row-major order; each row keeps its first `room` of them
        tied_row, tied_column = (zt == tt).nonzero(as_tuple=True)
        counts = torch.bincount(tied_row, minlength=rows.numel())
        first = counts.cumsum(0) - counts
        rank = torch.arange(tied_row.numel(), device=z.device) - first[tied_row]
        keep = rank < room[tied_row]
        chosen[tied_row[keep], tied_column[keep]] = True
        columns[rows] = chosen.nonzero()[:, 1].view(-1, k)
    return columns


def _residual_context_top_k(logits: torch.Tensor, embed_weight: torch.Tensor,
                            mask_embed: torch.Tensor, t_res: float, temper_delta: bool,
                            strategy: str, alpha_scale: float, k: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse residual in plain torch, a chunk of rows at a time.

    Per chunk: the top k of the logits (in their own dtype: exact), then float32 exp((z - m) / T)
    once, whose sum and sum of e log e give the entropy and whose top-k entries give p; then the
    k rows of E per position, upcast to float32, in one batched product. Everything is summed in
    float32; the result is rounded to the table's dtype once.
    """
    logits, table = logits.detach(), embed_weight.detach()
    n, vocab = logits.shape
    dim, device = table.shape[1], logits.device
    embeds = torch.empty((n, dim), dtype=table.dtype, device=device)
    alpha = torch.empty((n,), dtype=torch.float32, device=device)
    if n == 0:
        return embeds, alpha
    row_max = check_logit_values(logits).float()[:, None]  # exact in the logits' dtype
    mask = mask_embed.detach().float()
    # the tail's mean row is (V * Ebar - sum of the k chosen rows) / (V - k)
    table_sum = table_mean(table, vocab) * vocab
    budget = _chunk_elements(device)
    rows_per_chunk = max(1, budget // vocab)
    rows_per_gather = max(1, budget // (k * dim))
    log_vocab = math.log(vocab)
    chosen = get_alpha_strategy(strategy)
    finite_floor = torch.finfo(torch.float32).min

    def shifted_logits(z: torch.Tensor, m: torch.Tensor, temperature: float) -> torch.Tensor:
        """(z - m) / temperature in float32, m the row maximum (entries <= 0)."""
        shifted = torch.sub(z, m)  # float32: z is promoted
        return shifted.div_(temperature) if temperature != 1.0 else shifted

    for start in range(0, n, rows_per_chunk):
        z = logits[start:start + rows_per_chunk]
        m = row_max[start:start + rows_per_chunk]
        columns = _top_k_columns(z, k)
        p_top = None
        if not chosen.uses_entropy:
            chunk_alpha = chosen.alpha(torch.zeros(z.shape[0], dtype=torch.float32,
                                                   device=device), alpha_scale)
        else:
            shifted = shifted_logits(z, m, t_res)
            weights = shifted.exp()
            total = weights.sum(-1)
            if temper_delta or t_res == 1.0:  # delta's distribution is the one just normalised
                p_top = weights.gather(1, columns) / total[:, None]
            # H = log S - sum(e d) / S with d = s - max s, e = exp(d), S = sum e; a -inf logit
            # has e = 0 and must add 0, not 0 * -inf (elementwise: no TF32 matmul here)
            weighted = weights.mul_(shifted.clamp_(min=finite_floor)).sum(-1)
            del shifted, weights
            entropy = total.log() - weighted / total
            normalized = entropy.clamp(0.0, log_vocab) / log_vocab
            chunk_alpha = chosen.alpha(normalized, alpha_scale)
        if p_top is None:
            weights = shifted_logits(z, m, t_res if temper_delta else 1.0).exp_()
            p_top = weights.gather(1, columns) / weights.sum(-1, keepdim=True)
            del weights
        # tail mass 1 - P_k, spread uniformly over the rows outside the top k
        tail_mass = (1.0 - p_top.sum(-1, keepdim=True)).clamp_(min=0.0)
        for sub in range(0, z.shape[0], rows_per_gather):
            p_sub = p_top[sub:sub + rows_per_gather]
            rows = table.index_select(0, columns[sub:sub + rows_per_gather].reshape(-1))
            rows = rows.view(p_sub.shape[0], k, dim).float()
            weight = torch.stack([p_sub, torch.ones_like(p_sub)], 1)  # [r, 2, k]
            head, picked = torch.bmm(weight, rows).unbind(1)  # p-weighted sum, plain sum
            tail_mean = (table_sum - picked) / (vocab - k)
            delta = head + tail_mass[sub:sub + rows_per_gather] * tail_mean
            a = chunk_alpha[sub:sub + rows_per_gather, None]
            out = start + sub
            embeds[out:out + p_sub.shape[0]] = ((1.0 - a) * mask + a * delta).to(table.dtype)
        alpha[start:start + z.shape[0]] = chunk_alpha
    return embeds, alpha



# the CUDA kernel keeps 4096 candidates per row in shared memory; larger k run in plain torch
CUDA_TOP_K_MAX = 1024


def _top_k_kernel_devices() -> frozenset[str]:
    """Device types with a compiled `rcd_ext::residual_context_top_k` kernel (read once at import:
    a module constant is what torch.compile can fold)."""
    loaded = {"cpu": _extension.cpu_loaded, "cuda": _extension.cuda_loaded}
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if loaded[device] and hasattr(torch.ops.rcd_ext, "residual_context_top_k")
                     and has_kernel("rcd_ext::residual_context_top_k", key))


TOP_K_KERNEL_DEVICES = _top_k_kernel_devices()


def has_top_k_kernel(device: str | torch.device, k: int) -> bool:
    """Whether `residual_top_k=k` runs the compiled sparse op for inputs on `device`."""
    device_type = torch.device(device).type
    return device_type in TOP_K_KERNEL_DEVICES and (device_type != "cuda" or k <= CUDA_TOP_K_MAX)


@torch.library.custom_op("rcd_ext::table_row_sum", mutates_args=())
def table_row_sum(embed_weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """Sum of embed_weight[:vocab]'s rows, float32 [D], from the cached mean row (one table read
    per table, not per call). An op so that torch.compile calls the cache at run time instead of
    tracing its weak references and version counters."""
    return table_mean(embed_weight, vocab) * vocab


@table_row_sum.register_fake
def _table_row_sum_fake(embed_weight: torch.Tensor, vocab: int) -> torch.Tensor:
    return embed_weight.new_empty((embed_weight.shape[1],), dtype=torch.float32)


def _sparse_residual_context(logits: torch.Tensor, embed_weight: torch.Tensor,
                             mask_embed: torch.Tensor, t_res: float, temper_delta: bool,
                             strategy: str, alpha_scale: float, k: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse residual (1 <= k < V): the registered op where the device has a kernel for k,
    else the plain-torch version. Returns (embeds [N, D] in the table's dtype, alpha [N])."""
    logits, table, mask = logits.detach(), embed_weight.detach(), mask_embed.detach()
    if not has_top_k_kernel(logits.device, k) or not _fused(strategy) \
            or not kernel_self_check.kernel_usable("residual_context_top_k", logits.device):
        return _residual_context_top_k(logits, table, mask, t_res, temper_delta, strategy,
                                       alpha_scale, k)
    table_sum = torch.ops.rcd_ext.table_row_sum(table, logits.shape[1])
    return _top_k_kernel(logits, table, mask, table_sum, t_res, temper_delta, strategy,
                         alpha_scale, k)


def _top_k_kernel(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled sparse op (one name for the self-check and its tests to replace)."""
    return torch.ops.rcd_ext.residual_context_top_k(*args)


# (logits dtype, table dtype, strided logits, temper_delta, k): each kernel path once; 9000
# columns are several CUDA tiles and candidate-buffer cuts, k = 1024 the CUDA kernel's limit
_TOP_K_SELF_CHECK_CASES = ((torch.float32, torch.float32, False, False, 64),
                           (torch.bfloat16, torch.bfloat16, True, True, 1024),
                           (torch.float16, torch.float16, False, False, 7),
                           (torch.float32, torch.bfloat16, True, False, 256))


def _self_check_top_k(device: torch.device) -> str | None:
    """Sparse kernel vs its reference on a small input per kernel path (-inf entries, ties at
    the k-th place, a column slice of wider logits); None when they agree, else what differed."""
    generator = torch.Generator().manual_seed(0)
    for logit_dtype, table_dtype, strided, temper_delta, k in _TOP_K_SELF_CHECK_CASES:
        wide = torch.randn(5, 9100, generator=generator) * 4
        wide[:, 7::11] = -math.inf
        wide[1] = wide[1].round()  # many equal values at the k-th place
        table = torch.randn(9010, 24, generator=generator).to(device, table_dtype)
        logits = wide.to(device, logit_dtype)
        logits = logits[:, :9000] if strided else logits[:, :9000].contiguous()
        table_sum = table[:9000].double().sum(0).float()
        args = (logits, table, table[3], 0.8, temper_delta, "entropy", 1.0)
        failure = _disagreement(_top_k_kernel(*args[:3], table_sum, *args[3:], k),
                                residual_context_top_k_reference(*args, residual_top_k=k),
                                f"{logit_dtype} logits, {table_dtype} table, k={k}")
        if failure:
            return failure
    return None


kernel_self_check.register_self_check("residual_context_top_k", _self_check_top_k)


def check_top_k_op_args(logits: torch.Tensor, embed_weight: torch.Tensor,
                        mask_embed: torch.Tensor, table_sum: torch.Tensor, t_res: float,
                        strategy: str, alpha_scale: float, k: int) -> None:
    """The sparse op's argument checks (the kernels' own, in Python, for the fake): the exact
    op's, k in [1, V), and table_sum a float32 [D] on the logits' device."""
    check_residual_context_args(logits, embed_weight, mask_embed, t_res, strategy, alpha_scale)
    vocab = logits.shape[1]
    if not 1 <= k < vocab:
        raise ValueError(f"residual_top_k must be in [1, V) = [1, {vocab}) for the sparse op "
                         f"(k >= V is the exact op), got {k}")
    if table_sum.dim() != 1 or table_sum.shape[0] != embed_weight.shape[1]:
        raise ValueError(f"table_sum must be [D] with D = embed_weight.shape[1] = "
                         f"{embed_weight.shape[1]}, got shape {tuple(table_sum.shape)}")
    if table_sum.dtype != torch.float32:
        raise TypeError(f"table_sum dtype {table_sum.dtype} must be float32")
    if table_sum.device != logits.device:
        raise ValueError(f"table_sum on {table_sum.device} must be on the logits' device "
                         f"{logits.device}")


if "cpu" in TOP_K_KERNEL_DEVICES:

    @torch.library.register_fake("rcd_ext::residual_context_top_k")
    def _residual_context_top_k_fake(logits, embed_weight, mask_embed, table_sum, t_res,
                                     temper_delta, strategy, alpha_scale, k):
        check_top_k_op_args(logits, embed_weight, mask_embed, table_sum, t_res, strategy,
                            alpha_scale, k)
        n = logits.shape[0]
        embeds = embed_weight.new_empty((n, embed_weight.shape[1]))
        alpha = logits.new_empty((n,), dtype=torch.float32)
        return embeds, alpha

if _extension.cpu_loaded:

    @torch.library.register_fake("rcd_ext::residual_context")
    def _residual_context_fake(logits, embed_weight, mask_embed, t_res, temper_delta, strategy,
                               alpha_scale):
        n = logits.shape[0]
        embeds = embed_weight.new_empty((n, embed_weight.shape[1]))
        alpha = logits.new_empty((n,), dtype=torch.float32)
        return embeds, alpha
