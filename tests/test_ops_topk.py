"""The sparse (top-k) residual: its plain-torch specification, the fast path, and the wiring."""

from __future__ import annotations

import math
import re

import pytest
import torch

from rcd_ext import ops
from rcd_ext.op_reference import residual_context_reference, residual_context_top_k_reference
from rcd_ext.residual import ResidualConfig, ResidualState

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# the top-k path computes in float32 throughout; half tables only round the output once
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def make_inputs(n, vocab, dim, *, pad_rows=0, logit_dtype=torch.float32,
                embed_dtype=torch.float32, logit_scale=3.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * logit_scale
    embed = torch.randn(vocab + pad_rows, dim, generator=g)
    mask = torch.randn(dim, generator=g)
    return (logits.to(device, logit_dtype), embed.to(device, embed_dtype),
            mask.to(device, embed_dtype))


def assert_close_scaled(got, want, dtype):
    scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype] * scale, rtol=0)


def relative_error(logits, embed, mask, k, **kwargs):
    """||e_k - e|| / ||e - m|| per row (the exact op for e)."""
    exact, _ = ops.residual_context(logits, embed, mask, **kwargs)
    sparse, _ = ops.residual_context(logits, embed, mask, residual_top_k=k, **kwargs)
    return ((sparse.float() - exact.float()).norm(dim=-1)
            / (exact.float() - mask.float()).norm(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,vocab,dim,pad_rows,k", [
    (1, 2, 3, 0, 1),
    (5, 17, 8, 3, 4),
    (33, 300, 16, 0, 1),
    (33, 300, 16, 12, 37),
    (70, 1000, 24, 0, 999),
    (9, 4099, 5, 1, 256),
])
@pytest.mark.parametrize("logit_dtype,embed_dtype", [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),  # bf16 logits: many equal values at the k-th place
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16),
])
def test_top_k_matches_reference(device, n, vocab, dim, pad_rows, k, logit_dtype, embed_dtype):
    logits, embed, mask = make_inputs(n, vocab, dim, pad_rows=pad_rows, logit_dtype=logit_dtype,
                                      embed_dtype=embed_dtype, device=device)
    got, got_alpha = ops.residual_context(logits, embed, mask, t_res=0.8, residual_top_k=k)
    want, want_alpha = residual_context_top_k_reference(logits, embed, mask, t_res=0.8,
                                                        residual_top_k=k)
    assert got.dtype == embed.dtype and got.shape == (n, dim) and got.device == embed.device
    assert got_alpha.dtype == torch.float32 and got_alpha.shape == (n,)
    assert_close_scaled(got, want, embed_dtype)
    torch.testing.assert_close(got_alpha, want_alpha, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [
    {"t_res": 1.0},
    {"t_res": 0.6},
    {"t_res": 1.7, "temper_delta": True},
    {"t_res": 0.6, "temper_delta": True},
    {"strategy": "confidence", "t_res": 0.9},
    {"strategy": "fixed", "alpha_scale": 0.35},
    {"strategy": "entropy", "alpha_scale": 0.5, "t_res": 2.0, "temper_delta": True},
])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_top_k_options_match_reference(kwargs, k):
    logits, embed, mask = make_inputs(20, 211, 12, pad_rows=5, seed=3)
    got, got_alpha = ops.residual_context(logits, embed, mask, residual_top_k=k, **kwargs)
    want, want_alpha = residual_context_top_k_reference(logits, embed, mask, residual_top_k=k,
                                                        **kwargs)
    assert_close_scaled(got, want, torch.float32)
    torch.testing.assert_close(got_alpha, want_alpha, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"strategy": "confidence", "t_res": 0.7},
                                    {"t_res": 0.5, "temper_delta": True}])
def test_alpha_is_the_exact_ops_alpha(kwargs):
    logits, embed, mask = make_inputs(40, 3000, 8, logit_dtype=torch.bfloat16, seed=4)
    _, exact_alpha = ops.residual_context(logits, embed, mask, **kwargs)
    _, sparse_alpha = ops.residual_context(logits, embed, mask, residual_top_k=2, **kwargs)
    torch.testing.assert_close(sparse_alpha, exact_alpha, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_over", [0, 1, 1000])
def test_k_at_least_vocab_is_the_exact_op(dtype, k_over):
    logits, embed, mask = make_inputs(16, 64, 8, pad_rows=4, logit_dtype=dtype, embed_dtype=dtype)
    exact = ops.residual_context(logits, embed, mask, t_res=0.9)
    sparse = ops.residual_context(logits, embed, mask, t_res=0.9, residual_top_k=64 + k_over)
    assert torch.equal(sparse[0], exact[0]) and torch.equal(sparse[1], exact[1])


def test_reference_at_k_equal_vocab_is_the_exact_reference():
    # the top-k formula itself (head + tail term) collapses to the exact residual at k = V
    logits, embed, mask = make_inputs(12, 90, 7, pad_rows=2, seed=5)
    for kwargs in ({}, {"t_res": 0.5, "temper_delta": True}, {"strategy": "confidence"}):
        want, want_alpha = residual_context_reference(logits, embed, mask, **kwargs)
        got, got_alpha = residual_context_top_k_reference(logits, embed, mask, residual_top_k=90,
                                                          **kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.equal(got_alpha, want_alpha)


def test_error_shrinks_as_k_grows_on_a_peaked_distribution():
    vocab, dim = 4096, 32
    g = torch.Generator().manual_seed(6)
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(16)]) + 1
    logits = -1.3 * torch.log(ranks.float())  # Zipf-like, exponent 1.3, shuffled per row
    embed = torch.randn(vocab, dim, generator=g)
    mask = torch.randn(dim, generator=g)
    errors = [relative_error(logits, embed, mask, k).mean().item()
              for k in (1, 4, 16, 64, 256, 1024, 4095)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-3, errors
    assert relative_error(logits, embed, mask, vocab).max().item() == 0.0


@pytest.mark.parametrize("k", [1, 7, 100, 511])
def test_uniform_logits_are_exact_for_any_k(k):
    vocab, dim = 512, 16
    g = torch.Generator().manual_seed(7)
    embed = torch.randn(vocab, dim, generator=g) + 3.0  # a shared offset, as real tables have
    embed[:k] += 5.0  # the top k (lowest ids win the tie) are far from the mean row
    mask = torch.randn(dim, generator=g)
    logits = torch.full((3, vocab), 0.25)
    exact, _ = ops.residual_context(logits, embed, mask)
    sparse, alpha = ops.residual_context(logits, embed, mask, residual_top_k=k)
    assert torch.allclose(alpha, torch.ones(3))
    torch.testing.assert_close(sparse, exact, atol=2e-5, rtol=0)
    # not vacuous: spreading the tail's mass on the mean of *all* rows instead would be off
    mean_all = embed.mean(0)
    naive = k / vocab * embed[:k].mean(0) + (1 - k / vocab) * mean_all
    assert (naive - exact[0]).abs().max().item() > 1e-3


def test_padding_rows_are_never_read():
    logits, embed, mask = make_inputs(6, 50, 4, pad_rows=7, seed=8)
    embed[50:] = float("nan")  # padding past the logits' vocabulary
    got, _ = ops.residual_context(logits, embed, mask, residual_top_k=5)
    want, _ = residual_context_top_k_reference(logits, embed[:50], mask, residual_top_k=5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_banned_tokens_and_ties_at_the_boundary():
    vocab = 40
    logits, embed, mask = make_inputs(4, vocab, 6, seed=9)
    logits[0, 3:] = -math.inf  # fewer finite logits than k
    logits[1, :] = 0.0
    logits[1, [5, 9, 30]] = 2.0  # two of the zeros make the top 5: ids 0 and 1
    logits[2, ::2] = -math.inf
    got, alpha = ops.residual_context(logits, embed, mask, residual_top_k=5)
    want, want_alpha = residual_context_top_k_reference(logits, embed, mask, residual_top_k=5)
    assert torch.isfinite(got).all() and torch.isfinite(alpha).all()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    torch.testing.assert_close(alpha, want_alpha, atol=2e-5, rtol=0)


@pytest.mark.parametrize("vocab,k", [(40, 3), (500, 100), (5000, 100), (5000, 1)])
def test_ties_at_the_kth_place_take_the_lower_ids(vocab, k):
    # logits from four values: the k-th place is shared by many columns, whose probability is
    # large, so which of them count as the top k shows in the result
    g = torch.Generator().manual_seed(vocab + k)
    logits = torch.randint(0, 4, (6, vocab), generator=g).float()
    embed = torch.randn(vocab, 8, generator=g)
    mask = torch.randn(8, generator=g)
    got, _ = ops.residual_context(logits, embed, mask, residual_top_k=k)
    want, _ = residual_context_top_k_reference(logits, embed, mask, residual_top_k=k)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # the same logits with the columns reversed pick other rows: ids, not positions, decide
    flipped, _ = ops.residual_context(logits.flip(1), embed.flip(0), mask, residual_top_k=k)
    assert (flipped - got).abs().max().item() > 1e-4


def test_table_mean_is_cached_and_invalidated_by_in_place_changes(monkeypatch):
    ops.clear_table_mean_cache()
    logits, embed, mask = make_inputs(8, 300, 8, seed=10, logit_scale=0.3)  # flat: big tail
    first, _ = ops.residual_context(logits, embed, mask, residual_top_k=3)
    reads = []
    mean_row = ops._mean_row

    def counting_mean_row(rows):
        reads.append(tuple(rows.shape))
        return mean_row(rows)

    monkeypatch.setattr(ops, "_mean_row", counting_mean_row)
    again, _ = ops.residual_context(logits, embed, mask, residual_top_k=3)
    assert torch.equal(again, first) and reads == []  # cache hit: no table read
    with torch.no_grad():
        embed.add_(2.0)  # in place, through the tensor the cache was keyed on
    changed, _ = ops.residual_context(logits, embed, mask, residual_top_k=3)
    assert reads, "the table's mean row was not recomputed after an in-place change"
    want, _ = residual_context_top_k_reference(logits, embed, mask, residual_top_k=3)
    torch.testing.assert_close(changed, want, atol=2e-5, rtol=0)
    assert (changed - first).abs().max().item() > 0.5
    reads.clear()
    embed[5:10].mul_(-1.0)  # through a view: the version counter is shared
    viewed, _ = ops.residual_context(logits, embed, mask, residual_top_k=3)
    assert reads
    want, _ = residual_context_top_k_reference(logits, embed, mask, residual_top_k=3)
    torch.testing.assert_close(viewed, want, atol=2e-5, rtol=0)


def test_a_new_table_at_a_reused_address_is_not_served_a_stale_mean():
    ops.clear_table_mean_cache()
    logits, _, mask = make_inputs(4, 64, 8, seed=11, logit_scale=0.3)
    for offset in range(6):  # freed and reallocated: the allocator tends to reuse the address
        embed = torch.randn(64, 8, generator=torch.Generator().manual_seed(offset)) + offset
        got, _ = ops.residual_context(logits, embed, mask, residual_top_k=2)
        want, _ = residual_context_top_k_reference(logits, embed, mask, residual_top_k=2)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        del embed, got


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                       ("8", TypeError), (True, TypeError)])
def test_bad_k_is_refused(bad, error):
    logits, embed, mask = make_inputs(2, 10, 4)
    with pytest.raises(error, match="residual_top_k"):
        ops.residual_context(logits, embed, mask, residual_top_k=bad)
    with pytest.raises(error, match="residual_top_k"):
        ResidualConfig(residual_top_k=bad)


@pytest.mark.parametrize("value,message", [(float("nan"), "row 2 contains NaN"),
                                           (math.inf, r"row 2 contains \+inf"),
                                           (-math.inf, "row 2 has no finite logit")])
def test_bad_logit_rows_are_refused(value, message):
    logits, embed, mask = make_inputs(4, 30, 4)
    if value == -math.inf:
        logits[2, :] = value
    else:
        logits[2, 7] = value
    with pytest.raises(ValueError, match=message):
        ops.residual_context(logits, embed, mask, residual_top_k=3)


@pytest.mark.parametrize("bad_rows,message", [
    ({1: "dead", 2: "+inf", 4: "both"}, "logits row 1 has no finite logit (every entry is -inf)"),
    ({2: "+inf", 4: "both"}, "logits row 2 contains +inf"),
    ({3: "both", 5: "dead"}, "logits row 3 contains NaN"),
])
def test_bad_rows_are_reported_as_the_exact_op_reports_them(bad_rows, message):
    # the first bad row, and within a row NaN before +inf (the kernels' statistics pass)
    logits, embed, mask = make_inputs(6, 30, 4, logit_dtype=torch.bfloat16,
                                      embed_dtype=torch.bfloat16)
    for row, kind in bad_rows.items():
        if kind == "dead":
            logits[row, :] = -math.inf
        else:
            logits[row, 4] = math.inf
            if kind == "both":
                logits[row, 11] = float("nan")
    for top_k in (None, 3):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            ops.residual_context(logits, embed, mask, residual_top_k=top_k)


def test_the_exact_ops_argument_checks_apply():
    logits, embed, mask = make_inputs(3, 12, 4)
    with pytest.raises(ValueError, match="only 11 rows"):
        ops.residual_context(logits, embed[:11], mask, residual_top_k=2)
    with pytest.raises(ValueError, match="t_res"):
        ops.residual_context(logits, embed, mask, t_res=0.0, residual_top_k=2)
    with pytest.raises(TypeError, match="mask_embed dtype"):
        ops.residual_context(logits, embed, mask.double(), residual_top_k=2)


def test_empty_batch():
    logits, embed, mask = make_inputs(0, 12, 4, embed_dtype=torch.bfloat16)
    embeds, alpha = ops.residual_context(logits, embed, mask, residual_top_k=2)
    assert embeds.shape == (0, 4) and embeds.dtype == torch.bfloat16 and alpha.shape == (0,)


def test_residual_state_uses_the_configured_top_k():
    vocab, dim, mask_id = 40, 6, 1
    table = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(12))
    logits = torch.randn(1, 3, vocab, generator=torch.Generator().manual_seed(13))
    ids = torch.full((1, 3), mask_id)
    positions = torch.arange(3)[None]
    stored = {}
    for k in (None, 2):
        state = ResidualState(table, mask_id, ResidualConfig(residual_top_k=k))
        state.update(logits, ids, positions)
        stored[k] = state.inputs_embeds(ids, positions)[0]
    want, _ = residual_context_top_k_reference(logits[0], table, table[mask_id],
                                               residual_top_k=2)
    torch.testing.assert_close(stored[2], want, atol=2e-5, rtol=0)
    assert (stored[2] - stored[None]).abs().max().item() > 1e-3


def test_generate_threads_the_option():
    from rcd_ext.decoding import generate
    from rcd_ext.demo.checkpoints import SHIPPED, load_checkpoints, shipped_available

    if not shipped_available(SHIPPED):
        pytest.skip("the shipped demo checkpoints are not installed")
    from rcd_ext.tasks import get_task

    model = load_checkpoints()["rcd"]
    vocab = model.get_input_embeddings().weight.shape[0]
    task = get_task("coupled_choices")
    prompt = torch.stack([p for p, _ in task.test_set(8, seed=0)])
    length = task.answer_length
    common = {"gen_length": length, "block_length": length, "steps": 4, "stop_at_eos": False,
              "trace": True}
    exact = generate(model, prompt, **common)
    full = generate(model, prompt, residual_top_k=vocab, **common)
    sparse = generate(model, prompt, residual_top_k=1, **common)
    assert torch.equal(full.tokens, exact.tokens)
    # alpha is exact either way; the residual (and so later steps' logits) differ
    torch.testing.assert_close(sparse.trace[0].alpha, exact.trace[0].alpha)
    with pytest.raises(ValueError, match="residual_top_k"):
        generate(model, prompt, residual_top_k=0, **common)


def test_wrap_and_engine_options_carry_the_option():
    from rcd_ext.integrations.engine_patching import RCDOptions
    from rcd_ext.wrapper import wrap
    from tests.engine_doubles.models import LLaDADouble

    assert wrap(LLaDADouble(), mask_id=47, residual_top_k=4).residual_config.residual_top_k == 4
    options = RCDOptions().updated({"residual_top_k": 8})
    assert options.residual_config().residual_top_k == 8
    with pytest.raises(ValueError, match="residual_top_k"):
        wrap(LLaDADouble(), mask_id=47, residual_top_k=0)


# ---- the registered op: kernel, fake, opcheck, torch.compile ----------------------------------

needs_kernel = pytest.mark.skipif(not ops.has_top_k_kernel("cpu", 64),
                                  reason="the compiled sparse op did not load")


def table_sum_of(embed, vocab):
    return embed[:vocab].double().sum(0).float()


def test_the_cpu_kernel_is_what_runs():
    # a missing kernel would silently leave the slow plain-torch version in place
    assert ops.has_top_k_kernel("cpu", 64)
    assert hasattr(torch.ops.rcd_ext, "residual_context_top_k")


@needs_kernel
@pytest.mark.parametrize("vocab", [4096 * 3 + 5, 9000])
@pytest.mark.parametrize("order", ["rising", "falling", "peak_last"])
def test_kernel_over_several_tiles_with_the_maximum_moving(vocab, order):
    # the statistics are kept relative to a running maximum and rescaled when it rises: rows
    # whose maximum rises in every tile, sits in the first one, or comes in the last one
    g = torch.Generator().manual_seed(vocab)
    ramp = torch.linspace(-30.0, 30.0, vocab)
    base = {"rising": ramp, "falling": ramp.flip(0), "peak_last": torch.zeros(vocab)}[order]
    logits = base + torch.randn(5, vocab, generator=g)
    if order == "peak_last":
        logits[:, -3:] += 12.0
    embed = torch.randn(vocab, 16, generator=g)
    mask = torch.randn(16, generator=g)
    for kwargs in ({"t_res": 0.7}, {"t_res": 1.5, "temper_delta": True},
                   {"strategy": "confidence"}):
        got, got_alpha = ops.residual_context(logits, embed, mask, residual_top_k=37, **kwargs)
        want, want_alpha = residual_context_top_k_reference(logits, embed, mask,
                                                            residual_top_k=37, **kwargs)
        assert_close_scaled(got, want, torch.float32)
        torch.testing.assert_close(got_alpha, want_alpha, atol=2e-5, rtol=0)


@needs_kernel
def test_kernel_reads_a_column_slice_in_place_and_strided_tables():
    logits, embed, mask = make_inputs(6, 700, 8, pad_rows=9, seed=14)
    wide = torch.cat([logits, torch.full((6, 9), 50.0)], 1)[:, :700]  # the logits[:, :V] slice
    table = embed.t().contiguous().t()  # column-major: the kernel makes rows contiguous
    assert not wide.is_contiguous() and not table.is_contiguous()
    got, _ = ops.residual_context(wide, table, mask, residual_top_k=11)
    want, _ = residual_context_top_k_reference(logits, embed, mask, residual_top_k=11)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@needs_kernel
def test_kernel_matches_the_plain_torch_version():
    logits, embed, mask = make_inputs(30, 5000, 24, logit_dtype=torch.bfloat16,
                                      embed_dtype=torch.bfloat16, seed=15)
    for k in (1, 64, 300):
        got = ops.residual_context(logits, embed, mask, t_res=0.9, residual_top_k=k)
        plain = ops._residual_context_top_k(logits, embed, mask, 0.9, False, "entropy", 1.0, k)
        assert_close_scaled(got[0], plain[0], torch.bfloat16)
        torch.testing.assert_close(got[1], plain[1], atol=2e-5, rtol=0)


@needs_kernel
def test_op_refuses_bad_k_and_table_sum():
    logits, embed, mask = make_inputs(3, 20, 4)
    table_sum = table_sum_of(embed, 20)
    op = torch.ops.rcd_ext.residual_context_top_k
    for k in (0, 20, 25):
        with pytest.raises(ValueError, match=r"residual_top_k must be in \[1, V\)"):
            op(logits, embed, mask, table_sum, 1.0, False, "entropy", 1.0, k)
    with pytest.raises(ValueError, match="table_sum must be"):
        op(logits, embed, mask, table_sum[:3], 1.0, False, "entropy", 1.0, 2)
    with pytest.raises(TypeError, match="table_sum dtype"):
        op(logits, embed, mask, table_sum.double(), 1.0, False, "entropy", 1.0, 2)


@needs_kernel
def test_fake_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits, embed = torch.empty(7, 50), torch.empty(60, 12, dtype=torch.bfloat16)
        mask, table_sum = torch.empty(12, dtype=torch.bfloat16), torch.empty(12)
        op = torch.ops.rcd_ext.residual_context_top_k
        embeds, alpha = op(logits, embed, mask, table_sum, 1.0, False, "entropy", 1.0, 5)
        assert embeds.shape == (7, 12) and embeds.dtype == torch.bfloat16
        assert alpha.shape == (7,) and alpha.dtype == torch.float32
        with pytest.raises(ValueError, match="table_sum must be"):
            op(logits, embed, mask, torch.empty(11), 1.0, False, "entropy", 1.0, 5)
        with pytest.raises(ValueError, match="only 60 rows"):
            op(torch.empty(7, 61), embed, mask, table_sum, 1.0, False, "entropy", 1.0, 5)
        with pytest.raises(ValueError, match=r"residual_top_k must be in \[1, V\)"):
            op(logits, embed, mask, table_sum, 1.0, False, "entropy", 1.0, 50)
        row_sum = torch.ops.rcd_ext.table_row_sum(embed, 50)
        assert row_sum.shape == (12,) and row_sum.dtype == torch.float32


@needs_kernel
@pytest.mark.slow
def test_opcheck():
    logits, embed, mask = make_inputs(5, 700, 12, pad_rows=4, seed=16)
    half = (logits.bfloat16(), embed.bfloat16(), mask.bfloat16())
    for (z, e, m), options in [((logits, embed, mask), (1.0, False, "entropy", 1.0, 7)),
                               (half, (0.9, True, "confidence", 0.5, 64))]:
        args = (z, e, m, table_sum_of(e, 700), *options)
        torch.library.opcheck(torch.ops.rcd_ext.residual_context_top_k.default, args)
    torch.library.opcheck(torch.ops.rcd_ext.table_row_sum.default, (embed, 700))


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_fullgraph_compile_over_the_sparse_op(dynamic):
    ops.clear_table_mean_cache()
    logits, embed, mask = make_inputs(4, 300, 8, pad_rows=2, logit_dtype=torch.bfloat16,
                                      embed_dtype=torch.bfloat16, seed=17)

    def step(z, table, m):
        embeds, alpha = ops.residual_context(z * 2.0, table, m, t_res=0.9, residual_top_k=16)
        return embeds * 1.0, alpha + 0.0

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    got = compiled(logits, embed, mask)
    want = residual_context_top_k_reference(logits * 2.0, embed, mask, t_res=0.9,
                                            residual_top_k=16)
    assert_close_scaled(got[0], want[0], torch.bfloat16)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=0)
    # the table's sum is looked up at run time, not baked into the graph
    with torch.no_grad():
        embed.add_(1.0)
    changed = compiled(logits, embed, mask)
    want = residual_context_top_k_reference(logits * 2.0, embed, mask, t_res=0.9,
                                            residual_top_k=16)
    assert_close_scaled(changed[0], want[0], torch.bfloat16)
    other = make_inputs(7, 300, 8, pad_rows=2, logit_dtype=torch.bfloat16,
                        embed_dtype=torch.bfloat16, seed=18)
    assert compiled(*other)[0].shape == (7, 8)


# ---- the CUDA kernel (run where a GPU is lent) --------------------------------------------------

needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.has_top_k_kernel("cuda", 64)),
    reason="needs a CUDA device and the compiled CUDA sparse op")


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,k", [(2048 * 5 + 3, 64), (126464, 256), (3000, 1024), (9, 8)])
def test_cuda_kernel_matches_reference_over_many_tiles(dtype, vocab, k):
    # several 2048-value tiles and candidate-buffer cuts; k at the kernel's limit; a tiny row
    logits, embed, mask = make_inputs(7, vocab, 40, pad_rows=3, logit_dtype=dtype,
                                      embed_dtype=dtype, seed=vocab, device="cuda")
    logits[1] = logits[1].round()  # many ties at the k-th place
    for kwargs in ({"t_res": 0.8}, {"t_res": 1.3, "temper_delta": True}, {"strategy": "fixed"}):
        got, got_alpha = ops.residual_context(logits, embed, mask, residual_top_k=k, **kwargs)
        want, want_alpha = residual_context_top_k_reference(logits.cpu(), embed.cpu(),
                                                            mask.cpu(), residual_top_k=k,
                                                            **kwargs)
        assert_close_scaled(got.cpu(), want, dtype)
        torch.testing.assert_close(got_alpha.cpu(), want_alpha, atol=1e-4, rtol=0)


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_kernel_reads_a_column_slice_and_reports_bad_rows():
    logits, embed, mask = make_inputs(6, 5000, 16, pad_rows=8, logit_dtype=torch.bfloat16,
                                      embed_dtype=torch.bfloat16, seed=21, device="cuda")
    wide = torch.cat([logits, torch.full((6, 8), 40.0, device="cuda",
                                         dtype=torch.bfloat16)], 1)[:, :5000]
    got, _ = ops.residual_context(wide, embed, mask, residual_top_k=32)
    want, _ = residual_context_top_k_reference(logits.cpu(), embed.cpu(), mask.cpu(),
                                               residual_top_k=32)
    assert_close_scaled(got.cpu(), want, torch.bfloat16)
    logits[3, 4000] = float("nan")
    logits[2, :] = -math.inf
    with pytest.raises(ValueError, match="^logits row 2 has no finite logit"):
        ops.residual_context(logits, embed, mask, residual_top_k=32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_k_above_the_kernel_limit_runs_plain_torch():
    k = ops.CUDA_TOP_K_MAX + 1
    assert not ops.has_top_k_kernel("cuda", k)
    logits, embed, mask = make_inputs(3, 3000, 8, seed=22, device="cuda")
    got, _ = ops.residual_context(logits, embed, mask, residual_top_k=k)
    want, _ = residual_context_top_k_reference(logits.cpu(), embed.cpu(), mask.cpu(),
                                               residual_top_k=k)
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=0)


@needs_kernel
def test_self_check_passes_the_kernel_and_catches_a_wrong_one(monkeypatch):
    # the first-call self-check CUDA runs, exercised here on the CPU kernel
    assert "residual_context_top_k" in ops.kernel_self_check.registered_ops()
    assert ops._self_check_top_k(torch.device("cpu")) is None

    def wrong_kernel(*args):
        embeds, alpha = torch.ops.rcd_ext.residual_context_top_k(*args)
        return embeds, alpha * 0.9  # a subtly wrong alpha

    monkeypatch.setattr(ops, "_top_k_kernel", wrong_kernel)
    verdict = ops._self_check_top_k(torch.device("cpu"))
    assert verdict is not None and "alpha" in verdict and "k=64" in verdict
