"""The fused residual-context op against its plain-torch specification, and its error contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcd_ext import ops
from rcd_ext.op_reference import residual_context_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerances relative to the output scale: float32 is exact up to summation order; half types
# round the probabilities (and, on the CPU, each V-chunk's product) to 8 or 11 mantissa bits.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(n, vocab, dim, *, pad_rows=0, logit_dtype=torch.float32,
                embed_dtype=torch.float32, logit_scale=3.0, neg_inf_fraction=0.0, seed=0,
                device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * logit_scale
    if neg_inf_fraction > 0 and vocab > 1:
        banned = torch.rand(n, vocab, generator=g) < neg_inf_fraction
        banned[:, 0] = False  # keep one finite logit per row
        logits[banned] = -math.inf
    embed = torch.randn(vocab + pad_rows, dim, generator=g)
    mask = torch.randn(dim, generator=g)
    return (logits.to(device, logit_dtype), embed.to(device, embed_dtype),
            mask.to(device, embed_dtype))


def assert_matches_reference(logits, embed, mask, **kwargs):
    got_embeds, got_alpha = ops.residual_context(logits, embed, mask, **kwargs)
    ref_kwargs = {"t_res": 1.0, "temper_delta": False, "strategy": "entropy",
                  "alpha_scale": 1.0} | kwargs
    want_embeds, want_alpha = residual_context_reference(logits, embed, mask, **ref_kwargs)
    assert got_embeds.dtype == embed.dtype and got_embeds.shape == want_embeds.shape
    assert got_alpha.dtype == torch.float32 and got_alpha.shape == (logits.shape[0],)
    assert torch.isfinite(got_embeds.float()).all()
    scale = max(1.0, want_embeds.float().abs().max().item()) if want_embeds.numel() else 1.0
    tol = TOLERANCE[embed.dtype] * scale
    torch.testing.assert_close(got_embeds.float(), want_embeds.float(), atol=tol, rtol=0)
    torch.testing.assert_close(got_alpha, want_alpha, atol=2e-5, rtol=0)


def test_compiled_extension_is_loaded():
    # CI builds the extension; a silent fallback to the reference must fail here.
    assert ops.load_errors()["cpu"] is None
    assert ops.backend("cpu") == "cpu-kernel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extension_is_loaded():
    assert ops.load_errors()["cuda"] is None
    assert ops.backend("cuda") == "cuda-kernel"


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 9),
    vocab=st.integers(2, 3000),
    dim=st.integers(1, 48),
    pad_rows=st.sampled_from([0, 0, 1, 37]),
    logit_dtype=st.sampled_from(DTYPES),
    embed_dtype=st.sampled_from(DTYPES),
    logit_scale=st.sampled_from([0.01, 1.0, 8.0, 40.0]),
    neg_inf_fraction=st.sampled_from([0.0, 0.0, 0.3, 0.95]),
    t_res=st.sampled_from([1e-3, 0.5, 0.92, 1.0, 3.0, 1e3]),
    temper_delta=st.booleans(),
    strategy=st.sampled_from(ops.STRATEGIES),
    alpha_scale=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_cpu_kernel_matches_reference(n, vocab, dim, pad_rows, logit_dtype, embed_dtype,
                                      logit_scale, neg_inf_fraction, t_res, temper_delta,
                                      strategy, alpha_scale, seed):
    logits, embed, mask = make_inputs(
        n, vocab, dim, pad_rows=pad_rows, logit_dtype=logit_dtype, embed_dtype=embed_dtype,
        logit_scale=logit_scale, neg_inf_fraction=neg_inf_fraction, seed=seed)
    assert_matches_reference(logits, embed, mask, t_res=t_res, temper_delta=temper_delta,
                             strategy=strategy, alpha_scale=alpha_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_vocabulary_chunks(device, dtype):
    # 40 rows x 60000 columns exceeds the CPU chunk budget (2^20 probabilities): three chunks.
    logits, embed, mask = make_inputs(40, 60000, 24, pad_rows=5, logit_dtype=dtype,
                                      embed_dtype=dtype, device=device)
    assert_matches_reference(logits, embed, mask, t_res=0.92)


@pytest.mark.parametrize("device", DEVICES)
def test_large_realistic_row_bf16(device):
    logits, embed, mask = make_inputs(4, 151936, 64, logit_dtype=torch.bfloat16,
                                      embed_dtype=torch.bfloat16, logit_scale=6.0, seed=3,
                                      device=device)
    assert_matches_reference(logits, embed, mask, t_res=0.98, temper_delta=True)


def test_reference_matches_a_per_row_float64_computation():
    # The reference itself, checked against the formula written out position by position.
    logits, embed, mask = make_inputs(3, 11, 4, pad_rows=2, neg_inf_fraction=0.3, seed=7)
    t_res = 0.7
    embeds, alpha = residual_context_reference(logits, embed, mask, t_res=t_res)
    for i in range(3):
        z = [float(v) for v in logits[i]]
        finite = [v for v in z if v != -math.inf]
        top = max(finite)
        q_norm = sum(math.exp((v - top) / t_res) for v in finite)
        entropy = 0.0
        for v in finite:
            q = math.exp((v - top) / t_res) / q_norm
            if q > 0:
                entropy -= q * math.log(q)
        a = entropy / math.log(11)
        p_norm = sum(math.exp(v - top) for v in finite)
        for d in range(4):
            delta = sum(math.exp(z[v] - top) / p_norm * float(embed[v, d])
                        for v in range(11) if z[v] != -math.inf)
            want = (1 - a) * float(mask[d]) + a * delta
            assert abs(float(embeds[i, d]) - want) < 1e-5
        assert abs(float(alpha[i]) - a) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_limits_of_the_distribution(device):
    vocab, dim = 500, 16
    _, embed, mask = make_inputs(1, vocab, dim, device=device)
    # One logit far above the rest: delta is that token's embedding and the entropy is 0.
    peaked = torch.full((1, vocab), -30.0, device=device)
    peaked[0, 123] = 30.0
    embeds, alpha = ops.residual_context(peaked, embed, mask, strategy="confidence")
    torch.testing.assert_close(embeds[0], embed[123], atol=1e-5, rtol=0)
    assert alpha.item() == pytest.approx(1.0, abs=1e-5)
    # Uniform logits: alpha is 1 and delta the mean embedding.
    uniform = torch.zeros(1, vocab, device=device)
    embeds, alpha = ops.residual_context(uniform, embed, mask)
    assert alpha.item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(embeds[0], embed.mean(0), atol=1e-5, rtol=0)
    # alpha_scale 0 leaves the plain mask embedding, whatever the logits.
    embeds, alpha = ops.residual_context(torch.randn(3, vocab, device=device), embed, mask,
                                         alpha_scale=0.0)
    torch.testing.assert_close(embeds, mask.expand(3, dim), atol=0, rtol=0)
    assert (alpha == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_and_huge_residual_temperature(device):
    logits, embed, mask = make_inputs(5, 2000, 8, device=device)
    _, alpha_cold = ops.residual_context(logits, embed, mask, t_res=1e-4)
    _, alpha_hot = ops.residual_context(logits, embed, mask, t_res=1e4)
    assert (alpha_cold < 1e-3).all()  # argmax is unique: entropy collapses
    assert (alpha_hot > 0.999).all()  # flattened towards uniform
    assert_matches_reference(logits, embed, mask, t_res=1e-4, temper_delta=True)
    assert_matches_reference(logits, embed, mask, t_res=1e4, temper_delta=True)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_rows_of_the_table_are_never_read(device):
    logits, embed, mask = make_inputs(4, 300, 8, pad_rows=20, device=device)
    embed[300:] = float("nan")
    embeds, alpha = ops.residual_context(logits, embed, mask)
    assert torch.isfinite(embeds).all() and torch.isfinite(alpha).all()


@pytest.mark.parametrize("device", DEVICES)
def test_banned_tokens_contribute_nothing(device):
    logits, embed, mask = make_inputs(2, 50, 6, device=device)
    logits[:, 10:] = -math.inf
    embed_changed = embed.clone()
    embed_changed[10:] = 1e6  # would dominate delta if the banned rows had any weight
    a_embeds, a_alpha = ops.residual_context(logits, embed, mask)
    b_embeds, b_alpha = ops.residual_context(logits, embed_changed, mask)
    torch.testing.assert_close(a_embeds, b_embeds, atol=0, rtol=0)
    torch.testing.assert_close(a_alpha, b_alpha, atol=0, rtol=0)


def test_empty_batch_gives_empty_outputs():
    logits, embed, mask = make_inputs(0, 10, 4, embed_dtype=torch.bfloat16)
    embeds, alpha = ops.residual_context(logits, embed, mask)
    assert embeds.shape == (0, 4) and embeds.dtype == torch.bfloat16
    assert alpha.shape == (0,)


def test_non_contiguous_inputs():
    logits, embed, mask = make_inputs(6, 400, 10, pad_rows=3)
    wide = torch.randn(400, 6).t()  # [6, 400] with column-major strides
    table = torch.randn(10, 403).t()
    assert not wide.is_contiguous() and not table.is_contiguous()
    assert_matches_reference(wide, table, mask)


def test_outputs_carry_no_gradient():
    logits, embed, mask = make_inputs(2, 30, 4)
    embed.requires_grad_(True)
    embeds, alpha = ops.residual_context(logits, embed, mask)
    assert not embeds.requires_grad and not alpha.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, embed, mask = make_inputs(5, 700, 12, pad_rows=4, device=device)
    for args in [(logits, embed, mask, 1.0, False, "entropy", 1.0),
                 (logits.bfloat16(), embed.bfloat16(), mask.bfloat16(), 0.9, True,
                  "confidence", 0.5)]:
        torch.library.opcheck(torch.ops.rcd_ext.residual_context.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_fullgraph_compile(device):
    logits, embed, mask = make_inputs(4, 256, 8, pad_rows=2, device=device)

    def step(z, table, m):
        embeds, alpha = ops.residual_context(z * 2.0, table, m, t_res=0.9)
        return embeds * 1.0, alpha + 0.0

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    got = compiled(logits, embed, mask)
    want = step(logits, embed, mask)
    torch.testing.assert_close(got, want)
    got_other_shape = compiled(*make_inputs(7, 256, 8, pad_rows=2, seed=1, device=device))
    assert got_other_shape[0].shape == (7, 8)


BAD_INPUTS = [
    (lambda z, e, m: (z[0], e, m, {}), ValueError, r"logits must be \[N, V\]"),
    (lambda z, e, m: (z, e[0], m, {}), ValueError, r"embed_weight must be \[V', D\]"),
    (lambda z, e, m: (z, e, m[:-1], {}), ValueError, "mask_embed must be"),
    (lambda z, e, m: (z.long(), e, m, {}), TypeError, "logits dtype"),
    (lambda z, e, m: (z, e.double(), m.double(), {}), TypeError, "embed_weight dtype"),
    (lambda z, e, m: (z, e, m.half(), {}), TypeError, "mask_embed dtype"),
    (lambda z, e, m: (z, e[:10], m, {}), ValueError, "only 10 rows"),
    (lambda z, e, m: (z[:, :1], e, m, {}), ValueError, "at least 2"),
    (lambda z, e, m: (z, e, m, {"t_res": 0.0}), ValueError, "t_res"),
    (lambda z, e, m: (z, e, m, {"t_res": -1.0}), ValueError, "t_res"),
    (lambda z, e, m: (z, e, m, {"t_res": math.inf}), ValueError, "t_res"),
    (lambda z, e, m: (z, e, m, {"strategy": "softmask"}), ValueError, "strategy"),
    (lambda z, e, m: (z, e, m, {"alpha_scale": 1.5}), ValueError, "alpha_scale"),
]


@pytest.mark.parametrize("make_bad, error, message", BAD_INPUTS)
def test_bad_arguments_are_refused(make_bad, error, message):
    logits, embed, mask, kwargs = make_bad(*make_inputs(3, 40, 6))
    with pytest.raises(error, match=message):
        ops.residual_context(logits, embed, mask, **kwargs)


@pytest.mark.parametrize("poison, message", [
    (math.nan, "row 1 contains NaN"),
    (math.inf, r"row 1 contains \+inf"),
    ("all-neg-inf", "row 1 has no finite logit"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_logit_values_are_refused(poison, message, dtype):
    logits, embed, mask = make_inputs(3, 40, 6, logit_dtype=dtype)
    if poison == "all-neg-inf":
        logits[1] = -math.inf
    else:
        logits[1, 17] = poison
    with pytest.raises(ValueError, match=message):
        ops.residual_context(logits, embed, mask)
    # The kernel itself refuses too, for callers that go straight to torch.ops.
    with pytest.raises(ValueError, match=message):
        torch.ops.rcd_ext.residual_context(logits, embed, mask, 1.0, False, "entropy", 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_is_refused():
    logits, embed, mask = make_inputs(3, 40, 6)
    with pytest.raises(ValueError, match="one device"):
        ops.residual_context(logits.cuda(), embed, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 70),
    vocab=st.integers(2, 5000),
    dim=st.integers(1, 300),
    logit_dtype=st.sampled_from(DTYPES),
    embed_dtype=st.sampled_from(DTYPES),
    neg_inf_fraction=st.sampled_from([0.0, 0.5]),
    t_res=st.sampled_from([1e-3, 0.92, 1.0, 1e3]),
    temper_delta=st.booleans(),
    strategy=st.sampled_from(ops.STRATEGIES),
    seed=st.integers(0, 2**16),
)
def test_cuda_kernel_matches_reference(n, vocab, dim, logit_dtype, embed_dtype, neg_inf_fraction,
                                       t_res, temper_delta, strategy, seed):
    logits, embed, mask = make_inputs(n, vocab, dim, pad_rows=3, logit_dtype=logit_dtype,
                                      embed_dtype=embed_dtype,
                                      neg_inf_fraction=neg_inf_fraction, seed=seed,
                                      device="cuda")
    assert_matches_reference(logits, embed, mask, t_res=t_res, temper_delta=temper_delta,
                             strategy=strategy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_more_rows_than_one_grid_dimension_holds():
    # grid.y is capped at 65535 in the probabilities kernel; rows beyond it are strided.
    logits, embed, mask = make_inputs(70_000, 300, 4, logit_dtype=torch.bfloat16,
                                      embed_dtype=torch.bfloat16, device="cuda")
    assert_matches_reference(logits, embed, mask)
