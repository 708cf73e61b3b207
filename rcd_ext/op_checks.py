"""Input validation for the residual-context op, shared by the kernel front and the reference.

Errors name the offending value and what was expected. Data-dependent problems (NaN or +inf
logits, rows with no finite logit) are found by the kernels' statistics pass, which reports the
first bad row; `check_logit_values` does the same for the reference path.
"""

from __future__ import annotations

import math

import torch

from rcd_ext.alpha_strategies import STRATEGIES
from rcd_ext.table_cache import TableCache

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The kernels compute in float32 with 1 / t_res: below this 1 / t_res is +inf and every sum NaN.
MIN_T_RES = 1.0 / torch.finfo(torch.float32).max


def check_t_res(t_res: object) -> float:
    """t_res as a float; ValueError unless it is finite and 1 / t_res is a finite float32."""
    if isinstance(t_res, bool) or not isinstance(t_res, (int, float)) \
            or not (math.isfinite(t_res) and t_res >= MIN_T_RES):
        raise ValueError(f"t_res must be a finite number >= {MIN_T_RES:.3g} (1 / t_res must be "
                         f"a finite float32), got {t_res!r}")
    return float(t_res)


def check_residual_context_args(
    logits: torch.Tensor,
    embed_weight: torch.Tensor,
    mask_embed: torch.Tensor,
    t_res: float,
    strategy: str,
    alpha_scale: float,
) -> None:
    """Raise ValueError/TypeError for anything the op cannot compute a defined result for."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if embed_weight.dim() != 2:
        raise ValueError(f"embed_weight must be [V', D], got shape {tuple(embed_weight.shape)}")
    if mask_embed.dim() != 1 or mask_embed.shape[0] != embed_weight.shape[1]:
        raise ValueError(
            f"mask_embed must be [D] with D = embed_weight.shape[1] = {embed_weight.shape[1]}, "
            f"got shape {tuple(mask_embed.shape)}"
        )
    for name, tensor in (("logits", logits), ("embed_weight", embed_weight),
                         ("mask_embed", mask_embed)):
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} dtype {tensor.dtype} is not one of float32, bfloat16, float16")
    if mask_embed.dtype != embed_weight.dtype:
        raise TypeError(
            f"mask_embed dtype {mask_embed.dtype} != embed_weight dtype {embed_weight.dtype}"
        )
    if not (logits.device == embed_weight.device == mask_embed.device):
        raise ValueError(
            f"all inputs must be on one device, got logits on {logits.device}, "
            f"embed_weight on {embed_weight.device}, mask_embed on {mask_embed.device}"
        )
    vocab, table_rows = logits.shape[1], embed_weight.shape[0]
    if vocab < 2:
        raise ValueError(f"logits need at least 2 vocabulary columns, got V={vocab}")
    if vocab > table_rows:
        raise ValueError(
            f"logits have V={vocab} columns but embed_weight has only {table_rows} rows: every "
            "logit column needs an embedding row (slice the logits to the table, e.g. "
            f"logits[:, :{table_rows}], after checking those columns are never sampled)"
        )
    check_t_res(t_res)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not (isinstance(alpha_scale, (int, float)) and 0.0 <= alpha_scale <= 1.0):
        raise ValueError(f"alpha_scale must be in [0, 1], got {alpha_scale!r}")


def check_logit_values(logits: torch.Tensor) -> torch.Tensor:
    """Refuse NaN, +inf and all -inf rows as the kernels do: the first bad row is reported
    (NaN before +inf within a row). Returns the row maxima [N] (logits' dtype), from which
    all three are read in one pass: max propagates NaN, is +inf with a +inf entry and -inf
    only for an all -inf row."""
    if logits.numel() == 0:
        return logits.new_empty(logits.shape[:1])
    row_max = logits.amax(-1)
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        value = float(row_max[row])
        what = ("contains NaN" if math.isnan(value) else "contains +inf" if value > 0
                else "has no finite logit (every entry is -inf)")
        raise ValueError(f"logits row {row} {what}")
    return row_max


# tables found finite, kept while unchanged: generate builds a residual state per call, and an
# 8B model's table is a GB to read
_finite_tables: TableCache[bool] = TableCache(8)


def check_table_values(embed_weight: torch.Tensor, name: str = "embedding table") -> None:
    """Refuse a table with NaN or inf entries (it would turn every residual into NaN silently).

    A full read of the table the first time it is seen; a table found finite is not read again
    while it is unchanged (its version counter: `rcd_ext.table_cache`).
    """
    _finite_tables.get(embed_weight, None, lambda table: _check_finite(table, name))


def _check_finite(table: torch.Tensor, name: str) -> bool:
    finite = torch.isfinite(table).all(-1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name} row {row} contains NaN or inf: the residual of every position "
                         "would be NaN (check the checkpoint or the model's dtype)")
    return True
