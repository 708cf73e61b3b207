"""CUDA-only cases of the exact op (skipped without a GPU; no GPU has run them yet).

What CI cannot see: bad rows reported by the CUDA statistics kernel, several vocabulary chunks
at the CUDA chunk budget (2^22 values), a second GPU, capture into a CUDA graph (the host-side
row check is deferred there: bad rows come out NaN), TF32 left on globally, column slices read in
place, and the first-call self-check on real hardware.
"""

from __future__ import annotations

import math

import pytest
import torch

from rcd_ext import kernel_self_check, ops
from rcd_ext.op_reference import residual_context_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def random_inputs(n, vocab, dim, dtype, device="cuda", seed=0, pad_rows=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=generator) * 3
    table = torch.randn(vocab + pad_rows, dim, generator=generator)
    return logits.to(device, dtype), table.to(device, dtype), table[0].to(device, dtype)


def assert_close_to_reference(logits, table, mask, **kwargs):
    embeds, alpha = ops.residual_context(logits, table, mask, **kwargs)
    want_embeds, want_alpha = residual_context_reference(
        logits, table, mask, **({"t_res": 1.0} | kwargs))
    scale = max(1.0, want_embeds.float().abs().max().item())
    torch.testing.assert_close(embeds.float(), want_embeds.float(),
                               atol=TOLERANCE[table.dtype] * scale, rtol=0)
    torch.testing.assert_close(alpha, want_alpha, atol=1e-4, rtol=0)


def test_the_kernel_passes_its_self_check_here():
    kernel_self_check.forget_results()
    result = kernel_self_check.run_self_check("residual_context", "cuda")
    assert result.passed, result.detail
    assert ops.backend("cuda") == "cuda-kernel"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_several_cuda_vocabulary_chunks(dtype):
    # 80 x 120000 > 2^22: three chunks at the CUDA budget
    logits, table, mask = random_inputs(80, 120000, 32, dtype, pad_rows=7)
    assert_close_to_reference(logits, table, mask, t_res=0.92)


@pytest.mark.parametrize("bad,message", [(math.nan, "contains NaN"), (math.inf, "contains +inf")])
def test_bad_rows_are_reported_by_the_cuda_kernel(bad, message):
    logits, table, mask = random_inputs(5, 1000, 8, torch.float32)
    logits[3, 17] = bad
    with pytest.raises(ValueError, match=f"logits row 3 {message.replace('+', '[+]')}"):
        ops.residual_context(logits, table, mask)
    logits[3] = -math.inf
    with pytest.raises(ValueError, match="logits row 3 has no finite logit"):
        ops.residual_context(logits, table, mask)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_second_gpu_uses_its_own_device_and_stream():
    logits, table, mask = random_inputs(7, 5000, 16, torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):  # the current device differs from the inputs' device
        embeds, alpha = ops.residual_context(logits, table, mask, t_res=0.9)
    assert embeds.device == torch.device("cuda:1") and alpha.device == torch.device("cuda:1")
    assert_close_to_reference(logits, table, mask, t_res=0.9)


def test_fp32_sums_ignore_a_global_tf32_setting(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    logits, table, mask = random_inputs(16, 30000, 64, torch.float32)
    embeds, _ = ops.residual_context(logits, table, mask)
    exact = residual_context_reference(logits.double(), table.double(), mask.double())[0]
    assert (embeds.double() - exact).abs().max().item() < 1e-5  # TF32 errs by ~1e-3


def test_column_slice_is_read_in_place_on_cuda():
    wide, table, mask = random_inputs(6, 1200, 16, torch.bfloat16)
    sliced = wide[:, :1000]
    embeds, alpha = ops.residual_context(sliced, table, mask, t_res=0.8)
    want_embeds, want_alpha = ops.residual_context(sliced.contiguous(), table, mask, t_res=0.8)
    assert torch.equal(embeds, want_embeds) and torch.equal(alpha, want_alpha)


def test_the_op_can_be_captured_in_a_cuda_graph():
    logits, table, mask = random_inputs(8, 4000, 16, torch.bfloat16)
    static_logits = logits.clone()
    ops.residual_context(static_logits, table, mask, t_res=0.9)  # warm-up (and self-check)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        static_embeds, static_alpha = ops.residual_context(static_logits, table, mask, t_res=0.9)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2):
        fresh, _, _ = random_inputs(8, 4000, 16, torch.bfloat16, seed=seed)
        static_logits.copy_(fresh)
        graph.replay()
        want_embeds, want_alpha = ops.residual_context(fresh, table, mask, t_res=0.9)
        # cuBLAS may pick another algorithm under capture: equal up to bf16 rounding
        torch.testing.assert_close(static_embeds.float(), want_embeds.float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(static_alpha, want_alpha, atol=1e-6, rtol=0)
    # inside the graph the host cannot check rows: a bad row comes out NaN, the others intact
    static_logits[5, 9] = math.nan
    graph.replay()
    assert torch.isnan(static_embeds[5].float()).all()
    assert torch.isfinite(static_embeds[torch.arange(8, device="cuda") != 5].float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_split_over_blocks_match_the_reference(dtype):
    # few rows, large vocabulary: each row's statistics come from many blocks, merged; one row
    # has a whole slice of -inf, another its maximum in its last slice
    logits, table, mask = random_inputs(3, 151936, 16, dtype)
    logits[0, :60000] = -math.inf
    logits[1, -5] = 40.0
    for temper_delta in (False, True):
        assert_close_to_reference(logits, table, mask, t_res=0.7, temper_delta=temper_delta)
    logits[2, 150000] = math.nan  # a NaN in a late slice is still found
    with pytest.raises(ValueError, match="logits row 2 contains NaN"):
        ops.residual_context(logits, table, mask)
