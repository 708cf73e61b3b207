"""Differential fuzz of the residual-context op: compiled kernel vs plain-torch reference vs a
float64 oracle, on seeded random cases that include the extremes (logits near the float32 limit,
t_res from its smallest allowed value to 1e30, rows that are mostly -inf, half dtypes).

The default suite runs FUZZ_CASES cases; `RCD_FUZZ_CASES=5000 python -m pytest
tests/test_ops_fuzz.py` runs more (each case is drawn from its own seed, so a failure names the
seed that reproduces it).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from rcd_ext import ops
from rcd_ext.op_checks import MIN_T_RES
from rcd_ext.op_reference import residual_context_reference

FUZZ_CASES = int(os.environ.get("RCD_FUZZ_CASES", "300"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# output tolerance relative to the output scale (half types round p and the result)
EMBED_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
ALPHA_TOLERANCE = 2e-5  # kernel vs reference: both float32 statistics
ORACLE_ALPHA_TOLERANCE = 1e-4  # float32 (z - m) * (1 / t_res) against float64
T_RES_VALUES = (MIN_T_RES, 1e-30, 1e-6, 1e-3, 0.5, 0.92, 1.0, 3.0, 1e3, 1e30)


def float64_oracle(logits: torch.Tensor, table: torch.Tensor, mask: torch.Tensor, t_res: float,
                   temper_delta: bool, strategy: str, alpha_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The op written out in float64 from its definition, one row at a time."""
    vocab = logits.shape[1]
    rows_embeds, rows_alpha = [], []
    for z in logits.double():
        top = z.max()

        def distribution(temperature: float, z=z, top=top) -> torch.Tensor:
            weights = torch.exp((z - top) / temperature)  # exp(-inf) = 0 for banned tokens
            return weights / weights.sum()

        q = distribution(t_res)
        entropy = -sum(float(v) * math.log(float(v)) for v in q if v > 0)
        normalized = min(max(entropy / math.log(vocab), 0.0), 1.0)
        alpha = {"entropy": alpha_scale * normalized,
                 "confidence": alpha_scale * (1.0 - normalized),
                 "fixed": alpha_scale}[strategy]
        p = distribution(t_res if temper_delta else 1.0)
        delta = p @ table[:vocab].double()
        rows_embeds.append((1.0 - alpha) * mask.double() + alpha * delta)
        rows_alpha.append(alpha)
    dim = table.shape[1]
    embeds = torch.stack(rows_embeds) if rows_embeds else torch.zeros(0, dim, dtype=torch.float64)
    return embeds, torch.tensor(rows_alpha, dtype=torch.float64)


def logit_limit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def draw_case(seed: int) -> dict:
    """One random case; extremes are drawn often on purpose."""
    rng = random.Random(seed)
    logit_dtype = rng.choice(DTYPES)
    table_dtype = rng.choice(DTYPES)
    n, vocab, dim = rng.randint(0, 6), rng.choice([2, 3, 7, 64, 257]), rng.randint(1, 12)
    scale = rng.choice([0.01, 1.0, 30.0, 1e4, 1e30, "limit"])
    scale = logit_limit(logit_dtype) * 0.99 if scale == "limit" else scale
    scale = min(scale, logit_limit(logit_dtype) * 0.99)
    generator = torch.Generator().manual_seed(seed)
    # uniform in [-scale, scale]: randn * 3e38 would overflow to inf
    logits = (torch.rand(n, vocab, generator=generator, dtype=torch.float64) * 2 - 1) * scale
    if rng.random() < 0.3:  # exact ties at the maximum
        logits[:, : vocab // 2] = logits[:, :1]
    if rng.random() < 0.4:  # banned tokens, keeping one finite logit per row
        banned = torch.rand(n, vocab, generator=generator) < rng.choice([0.3, 0.99])
        banned[:, rng.randrange(vocab)] = False
        logits[banned] = -math.inf
    table = torch.rand(vocab + rng.choice([0, 0, 3]), dim, generator=generator) * 2 - 1
    mask = torch.rand(dim, generator=generator) * 2 - 1
    return {
        "logits": logits.to(logit_dtype), "table": table.to(table_dtype),
        "mask": mask.to(table_dtype), "t_res": rng.choice(T_RES_VALUES),
        "temper_delta": rng.random() < 0.5, "strategy": rng.choice(ops.STRATEGIES),
        "alpha_scale": rng.choice([0.0, 0.4, 1.0]),
    }


def close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> float:
    """Largest absolute difference, asserting both are finite."""
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


@pytest.mark.parametrize("seed", range(FUZZ_CASES))
def test_kernel_reference_and_float64_agree(seed):
    case = draw_case(seed)
    logits, table, mask = case.pop("logits"), case.pop("table"), case.pop("mask")
    kernel_embeds, kernel_alpha = ops.residual_context(logits, table, mask, **case)
    ref_embeds, ref_alpha = residual_context_reference(logits, table, mask, **case)
    oracle_embeds, oracle_alpha = float64_oracle(logits, table, mask, **case)
    scale = max(1.0, oracle_embeds.abs().max().item()) if oracle_embeds.numel() else 1.0
    embed_tolerance = EMBED_TOLERANCE[table.dtype] * scale
    assert close(kernel_alpha, ref_alpha, ALPHA_TOLERANCE) <= ALPHA_TOLERANCE, case
    assert close(kernel_alpha, oracle_alpha, 0) <= ORACLE_ALPHA_TOLERANCE, case
    assert close(ref_alpha, oracle_alpha, 0) <= ORACLE_ALPHA_TOLERANCE, case
    assert close(kernel_embeds, ref_embeds, 0) <= embed_tolerance, case
    assert close(kernel_embeds, oracle_embeds, 0) <= embed_tolerance, case
    assert close(ref_embeds, oracle_embeds, 0) <= embed_tolerance, case


def test_fuzz_covers_the_extremes():
    # the drawn cases must actually reach the values the fuzz exists for
    cases = [draw_case(seed) for seed in range(FUZZ_CASES)]
    assert any(c["t_res"] == MIN_T_RES for c in cases)
    assert any(c["t_res"] == 1e30 for c in cases)
    assert any(c["logits"].numel() and c["logits"].float().abs().max() > 1e38 for c in cases)
    assert any(c["logits"].numel() and torch.isinf(c["logits"]).any() for c in cases)
    assert {c["logits"].dtype for c in cases} == set(DTYPES)


@pytest.mark.parametrize("t_res", [MIN_T_RES / 2, 1e-39, 1e-300, 0.0, -1.0, math.inf, math.nan])
def test_t_res_whose_inverse_overflows_float32_is_refused(t_res):
    logits, table = torch.randn(2, 5), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"t_res must be a finite number >= 2\.94e-39"):
        ops.residual_context(logits, table, table[0], t_res=t_res)


def test_compiled_kernel_refuses_what_the_python_check_refuses():
    # the C++ check is the last line for callers of torch.ops.rcd_ext.residual_context itself
    logits, table = torch.randn(2, 5), torch.randn(5, 3)
    with pytest.raises((ValueError, RuntimeError), match="t_res must be a finite number"):
        torch.ops.rcd_ext.residual_context(logits, table, table[0], 1e-39, False, "entropy", 1.0)
    embeds, _ = torch.ops.rcd_ext.residual_context(logits, table, table[0], MIN_T_RES, False,
                                                   "entropy", 1.0)
    assert torch.isfinite(embeds).all()


def test_reference_is_stable_where_dividing_first_overflowed():
    # z / t_res before subtracting the row max overflowed to inf here: NaN alpha and residual
    logits = torch.tensor([[3.0e38, 2.9e38, -3.0e38], [1e30, 1e30 - 1e24, 0.0]])
    table = torch.eye(3)
    embeds, alpha = residual_context_reference(logits, table, table[0], t_res=0.5)
    oracle_embeds, oracle_alpha = float64_oracle(logits, table, table[0], 0.5, False,
                                                 "entropy", 1.0)
    assert torch.isfinite(embeds).all() and torch.isfinite(alpha).all()
    torch.testing.assert_close(alpha.double(), oracle_alpha, atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds.double(), oracle_embeds, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_slice_of_wider_logits_is_read_in_place(dtype):
    # logits[:, :V] of a head wider than the vocabulary: same result, and no copy of the logits
    from torch.profiler import profile

    wide = (torch.randn(6, 1200, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    # a float32 table: half tables widen the [6, 1000] probabilities, a copy of that shape too
    table = torch.randn(1000, 16, generator=torch.Generator().manual_seed(4))
    sliced = wide[:, :1000]
    assert not sliced.is_contiguous()
    with profile(record_shapes=True) as prof:
        embeds, alpha = ops.residual_context(sliced, table, table[0], t_res=0.8)
    copied = [event.input_shapes for event in prof.events()
              if event.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert not any([6, 1000] in shapes for shapes in copied), copied
    want_embeds, want_alpha = ops.residual_context(sliced.contiguous(), table, table[0], t_res=0.8)
    assert torch.equal(embeds, want_embeds) and torch.equal(alpha, want_alpha)
