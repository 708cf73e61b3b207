"""RCD's tensor-parallel branch: `_bind` on a vocab-sharded embedding stand-in (the attributes of
SGLang's VocabParallelEmbedding it reads) and `residual_embeddings` over gloo, against the
same algorithm on the unsharded table (exact and top-k residuals)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.dllm.algorithm")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from sglang_standin import dllm_config  # noqa: E402

from rcd_ext.integrations.sglang.algorithm import RCD  # noqa: E402

VOCAB, ROWS, DIM, MASK, CUT = 40, 48, 8, 30, 17  # mask row on rank 1; rank 1 holds padding rows
OPTIONS = [{"t_res": 0.8, "strategy": "confidence", "alpha_scale": 0.7},
           {"t_res": 1.2, "residual_top_k": 5, "temper_delta": True}]


def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(6, VOCAB, generator=generator) * 2, torch.randn(ROWS, DIM,
                                                                      generator=generator)


def _runner(weight: torch.Tensor, start: int, end: int, tp_size: int):
    embed = SimpleNamespace(weight=weight, tp_size=tp_size,
                            shard_indices=SimpleNamespace(org_vocab_start_index=start,
                                                          org_vocab_end_index=end),
                            tp_group=SimpleNamespace(device_group=dist.group.WORLD
                                                     if tp_size > 1 else None))
    return SimpleNamespace(model=SimpleNamespace(get_input_embeddings=lambda: embed))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        logits, table = _tensors()
        start, end = (0, CUT) if rank == 0 else (CUT, VOCAB)
        padded_end = CUT if rank == 0 else ROWS  # the shard's weight includes padding rows
        results = []
        for options in OPTIONS:
            algorithm = RCD(dllm_config("RCD", options, fdfo=False))
            algorithm.mask_id = MASK
            algorithm._bind(_runner(table[start:padded_end], start, end, 2))
            results.append(algorithm.residual_embeddings(logits))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tp2_residuals_equal_tp1(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    logits, table = _tensors()
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for index, options in enumerate(OPTIONS):
        algorithm = RCD(dllm_config("RCD", options, fdfo=False))
        algorithm.mask_id = MASK
        algorithm._bind(_runner(table, 0, ROWS, 1))
        assert algorithm.shard.group is None
        expected_embeds, expected_alpha = algorithm.residual_embeddings(logits)
        for results in per_rank:
            embeds, alpha = results[index]
            torch.testing.assert_close(embeds, expected_embeds, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alpha, expected_alpha, rtol=1e-5, atol=1e-6)
