"""The vocabulary-parallel residual op against the single-process op, over gloo on CPU.

Each world size spawns its processes once and runs every case there (spawning costs seconds);
the expected values come from `rcd_ext.ops.residual_context` on the unsharded tensors in this
process. Shards are cut at arbitrary rows, the mask row sits on a non-zero rank, the table is
wider than the logits (padding rows, one rank holding only padding), and the allocation check
records every float32 tensor the op creates on a rank
(bf16 logits, small chunks). `residual_top_k` cases compare with the op's own top-k path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from rcd_ext.op_reference import residual_context_reference
from rcd_ext.ops import residual_context
from rcd_ext.vocab_parallel import residual_context_vocab_parallel, shard_bounds, world_size


@dataclass
class Case:
    """One op call: full tensors, where the shards are cut, and the op's options."""

    name: str
    logits: torch.Tensor  # [N, V]
    table: torch.Tensor  # [V', D]
    mask_id: int
    cuts: list[int]  # shard r holds rows [cuts[r], cuts[r + 1]) of the table
    options: dict = field(default_factory=dict)
    chunk_elements: int = 1 << 20

    def shard(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        start, end = self.cuts[rank], self.cuts[rank + 1]
        vocab = self.logits.shape[1]
        columns = self.logits[:, min(start, vocab):min(end, vocab)]
        return columns, self.table[start:end], start


class Float32Recorder(TorchDispatchMode):
    """Largest float32 tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def _worker(rank: int, world: int, init_file: str, cases: list[Case], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    results = {}
    try:
        for case in cases:
            logits, table, start = case.shard(rank)
            recorder = Float32Recorder()
            try:
                with recorder:
                    embeds, alpha = residual_context_vocab_parallel(
                        logits, table, vocab_start=start, mask_id=case.mask_id,
                        chunk_elements=case.chunk_elements, **case.options)
                results[case.name] = (embeds, alpha, recorder.largest)
            except ValueError as exc:
                results[case.name] = str(exc)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(world: int, cases: list[Case], tmp_path: Path) -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), cases, str(tmp_path)), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _random_case(name: str, n: int, vocab: int, rows: int, dim: int, cuts: list[int],
                 mask_id: int, seed: int, dtype=torch.float32, table_dtype=torch.float32,
                 **options) -> Case:
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=generator) * 3).to(dtype)
    table = torch.randn(rows, dim, generator=generator).to(table_dtype)
    return Case(name, logits, table, mask_id, cuts, options)


def _cases(world: int) -> list[Case]:
    """Cases whose cuts suit `world` ranks (rows 0 .. V' split at arbitrary places)."""
    if world == 2:
        uneven, padded, even = [0, 29, 64], [0, 50, 64], [0, 32, 64]
    else:
        uneven, padded, even = [0, 5, 31, 47, 64], [0, 16, 32, 48, 64], [0, 16, 32, 48, 64]
    mask_id = 40  # on a non-zero rank in every layout
    cases = [
        _random_case("entropy", 6, 64, 64, 12, even, mask_id, 1),
        _random_case("uneven_tempered", 5, 64, 64, 12, uneven, mask_id, 2, t_res=0.7,
                     temper_delta=True, strategy="confidence", alpha_scale=0.6),
        _random_case("bf16", 4, 64, 64, 16, uneven, mask_id, 3, dtype=torch.bfloat16,
                     table_dtype=torch.bfloat16, t_res=1.3),
        _random_case("fp16_fixed", 4, 64, 64, 8, uneven, mask_id, 4, dtype=torch.float16,
                     strategy="fixed", alpha_scale=0.35),
        # logits cover 45 of 64 rows: the rest is padding, and with 4 ranks one rank holds only
        # padding (no logit columns at all)
        _random_case("padded_vocab", 5, 45, 64, 12, padded, mask_id, 5, t_res=0.9),
    ]
    # top-k: a rank with fewer columns than k (uneven cuts), ties that the lower column must win
    # (integer logits), tempered delta, and k >= V (the exact residual)
    cases.append(_random_case("top_k", 5, 64, 64, 12, uneven, mask_id, 10, residual_top_k=7,
                              t_res=0.7))
    ties = _random_case("top_k_ties", 6, 64, 64, 12, uneven, mask_id, 11, residual_top_k=6,
                        temper_delta=True, t_res=1.4)
    ties.logits = ties.logits.round().clamp(-2, 2)
    cases.append(ties)
    cases.append(_random_case("top_k_padded", 5, 45, 64, 12, padded, mask_id, 12,
                              residual_top_k=9, strategy="confidence", dtype=torch.bfloat16))
    cases.append(_random_case("top_k_whole", 4, 64, 64, 12, uneven, mask_id, 13,
                              residual_top_k=100))
    neg_inf = _random_case("neg_inf", 4, 64, 64, 12, uneven, mask_id, 6, t_res=0.8)
    neg_inf.logits[0, :40] = -math.inf  # row 0: -inf on whole shards
    neg_inf.logits[1, ::3] = -math.inf
    cases.append(neg_inf)
    big = _random_case("allocation", 8, 512, 512, 16, [0, 200, 512] if world == 2 else
                       [0, 100, 250, 300, 512], 260, 7, dtype=torch.bfloat16,
                       table_dtype=torch.bfloat16)
    big.chunk_elements = 64  # 8 columns per chunk
    cases.append(big)
    nan = _random_case("nan", 3, 64, 64, 8, uneven, mask_id, 8)
    nan.logits[2, 60] = math.nan  # on the last rank only: every rank must raise, none hang
    cases.append(nan)
    all_neg_inf = _random_case("all_neg_inf", 3, 64, 64, 8, uneven, mask_id, 9)
    all_neg_inf.logits[1] = -math.inf
    cases.append(all_neg_inf)
    return cases


def _expected(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_context(case.logits, case.table, case.table[case.mask_id], **case.options)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_single_process_op(world: int, tmp_path: Path) -> None:
    cases = _cases(world)
    per_rank = _run(world, cases, tmp_path)
    for case in cases:
        results = [ranks[case.name] for ranks in per_rank]
        if case.name == "nan":
            assert all("NaN or +inf" in r for r in results), results
            continue
        if case.name == "all_neg_inf":
            assert all("row 1 has no finite logit" in r for r in results), results
            continue
        expected_embeds, expected_alpha = _expected(case)
        for embeds, alpha, largest in results:
            if case.name == "allocation":
                _check_allocation(case, largest)
            assert embeds.dtype == case.table.dtype
            torch.testing.assert_close(alpha, expected_alpha, rtol=1e-5, atol=1e-6)
            if case.table.dtype == torch.float32:
                torch.testing.assert_close(embeds, expected_embeds, rtol=1e-5, atol=1e-5)
            else:  # rounded once to bf16 from float32 sums taken in another order: one ulp
                torch.testing.assert_close(embeds.float(), expected_embeds.float(),
                                           rtol=2 ** -7, atol=1e-3)
        assert all(torch.equal(results[0][0], r[0]) for r in results), "ranks disagree"


def _check_allocation(case: Case, largest: int) -> None:
    """The float32 tensors a rank made are chunk-sized: [N, chunk] exponentials, [chunk, D] table
    rows, [N, D] sums, never [N, V] (nor [N, V_shard])."""
    n, vocab = case.logits.shape
    chunk = case.chunk_elements // n
    bound = max(n * chunk, chunk * case.table.shape[1], n * case.table.shape[1])
    assert largest <= bound < n * (vocab // 4)


def test_allocation_recorder_sees_a_vocab_wide_float32_tensor() -> None:
    """The control for `_check_allocation`: the plain reference does make [N, V] float32."""
    case = next(c for c in _cases(2) if c.name == "allocation")
    with Float32Recorder() as recorder:
        residual_context_reference(case.logits, case.table, case.table[case.mask_id])
    assert recorder.largest >= case.logits.numel()


def test_one_rank_is_the_plain_op() -> None:
    assert world_size() == 1
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=generator)
    table = torch.randn(48, 8, generator=generator)
    options = {"t_res": 0.8, "strategy": "confidence", "alpha_scale": 0.7}
    embeds, alpha = residual_context_vocab_parallel(logits, table, vocab_start=0, mask_id=44,
                                                    **options)
    expected_embeds, expected_alpha = residual_context(logits, table, table[44], **options)
    assert torch.equal(embeds, expected_embeds) and torch.equal(alpha, expected_alpha)
    with pytest.raises(ValueError, match="vocab_start 0"):
        residual_context_vocab_parallel(logits, table, vocab_start=3, mask_id=44)


def test_argument_errors_name_the_value() -> None:
    logits, table = torch.randn(2, 10), torch.randn(8, 4)
    with pytest.raises(ValueError, match="10 columns but embed_shard only 8 rows"):
        residual_context_vocab_parallel(logits, table, vocab_start=0, mask_id=1)
    with pytest.raises(ValueError, match="strategy"):
        residual_context_vocab_parallel(logits[:, :8], table, vocab_start=0, mask_id=1,
                                        strategy="max")
    with pytest.raises(ValueError, match="padded_rows % world"):
        shard_bounds(10, 4, 0)
    assert shard_bounds(64, 4, 2) == (32, 48)
