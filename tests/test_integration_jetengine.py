"""RCD in JetEngine (`rcd_ext.integrations.jetengine`) on the CPU double of its engine.

The reference below is written independently of the hook and of `ResidualState`: it replays
every forward the double's model recorded, keyed by (request id, absolute position), and says
which input embedding each token should have received.
"""

from __future__ import annotations

import gc

import pytest
import torch

from rcd_ext.integrations.jetengine import patch_jetengine
from rcd_ext.ops import residual_context
from tests.engine_doubles.jetengine import (
    LLM,
    Config,
    RunType,
    SamplingParams,
    SequenceStatus,
    TinyBlockModel,
)

MASK = 63
BLOCK = 4
T_RES = 0.9
# prompts shorter than, equal to and longer than a block: DENOISE-only, PREFILL + fresh block,
# PREFILL + a block holding the prompt's tail
PROMPTS = [[5, 9, 2], [7, 1, 4, 8, 3], [11, 12, 13, 14], [21, 22], [30, 31, 32, 33, 34, 35, 36],
           [40]]
PARAMS = [SamplingParams(max_tokens=n, block_length=BLOCK, denoising_steps=3,
                         dynamic_threshold=0.3) for n in (8, 4, 12, 8, 4, 8)]


def reverse_every_other(batch, step):
    return batch[::-1] if step % 2 else batch


def make_engine(*, eager: bool = True, tp: int = 1, max_num_seqs: int = 3, order=None,
                seed: int = 0) -> LLM:
    config = Config(mask_token_id=MASK, block_length=BLOCK, max_num_seqs=max_num_seqs,
                    tensor_parallel_size=tp, enforce_eager=eager)
    return LLM(TinyBlockModel(seed=seed), config, order=order)


@torch.no_grad()
def check_against_reference(engine: LLM, t_res: float = T_RES, atol: float = 1e-5) -> int:
    """Assert every recorded forward got the embeddings RCD prescribes; returns how many
    masked tokens received a residual."""
    runs, calls = engine.model_runner.records, engine.model.calls
    assert len(runs) == len(calls)
    table = engine.model.model.embed_tokens.weight
    stored: dict[tuple[int, int], torch.Tensor] = {}
    injected = 0
    for number, (run, call) in enumerate(zip(runs, calls, strict=True)):
        owners = [seq_id for seq_id, n in zip(run.seq_ids, run.lengths, strict=True)
                  for _ in range(n)]
        assert len(owners) == call.input_ids.numel()
        expected = table[call.input_ids].clone()
        keys = [(owner, int(p)) for owner, p in zip(owners, call.positions, strict=True)]
        masked = [int(t) == MASK for t in call.input_ids]
        if run.run_type == RunType.DENOISE:
            for n, key in enumerate(keys):
                if masked[n] and key in stored:
                    expected[n] = stored[key]
                    injected += 1
        difference = (call.embeds - expected).abs().amax(-1)
        assert torch.allclose(call.embeds, expected, atol=atol), (
            f"forward {number} ({run.run_type.name}, requests {run.seq_ids}): embeddings differ "
            f"at tokens {difference.nonzero().flatten().tolist()}")
        if run.run_type == RunType.DENOISE:
            for n, key in enumerate(keys):
                if not masked[n]:
                    stored.pop(key, None)
                else:
                    residual, _ = residual_context(call.logits[n][None].float(), table,
                                                   table[MASK], t_res=t_res)
                    stored[key] = residual[0]
    return injected


def all_logits(engine: LLM) -> list[torch.Tensor]:
    return [call.logits for call in engine.model.calls]


def test_flag_off_is_bit_identical_to_the_unpatched_engine():
    for eager in (True, False):  # rcd=False refuses nothing: CUDA graphs stay usable
        plain = make_engine(eager=eager, order=reverse_every_other)
        expected = plain.generate(PROMPTS, PARAMS, max_active=3)
        engine = make_engine(eager=eager, order=reverse_every_other)
        patch = patch_jetengine(engine, rcd=False)
        assert patch.hook is None and not engine.model.model.embed_tokens._forward_hooks
        assert engine.generate(PROMPTS, PARAMS, max_active=3) == expected
        ours, theirs = all_logits(engine), all_logits(plain)
        assert len(ours) == len(theirs)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert engine.model_runner.run.__rcd_original__.__func__ is type(
            engine.model_runner).run


def test_alpha_scale_zero_reproduces_the_unpatched_engine():
    # residual = E[M] exactly: every code path of the hook runs and changes nothing
    plain = make_engine(order=reverse_every_other)
    expected = plain.generate(PROMPTS, PARAMS, max_active=3)
    engine = make_engine(order=reverse_every_other)
    patch = patch_jetengine(engine, alpha_scale=0.0)
    assert engine.generate(PROMPTS, PARAMS, max_active=3) == expected
    assert all(torch.equal(a, b) for a, b in zip(all_logits(engine), all_logits(plain),
                                                  strict=True))
    assert patch.hook.injected > 0


def test_injects_the_previous_steps_residual_of_the_same_request_and_position():
    plain = make_engine(order=reverse_every_other)
    seqd = plain.generate(PROMPTS, PARAMS, max_active=3)
    engine = make_engine(order=reverse_every_other)
    patch = patch_jetengine(engine, t_res=T_RES)
    rcd = engine.generate(PROMPTS, PARAMS, max_active=3)
    injected = check_against_reference(engine)
    assert injected > 0 and injected == patch.hook.injected
    # the residuals reach the logits (the double's model mixes the tokens of a request)
    assert any(not torch.equal(a, b) for a, b in zip(all_logits(engine), all_logits(plain),
                                                      strict=False))
    assert [len(t) for t in rcd] == [len(t) for t in seqd]
    # every request finished and gave its row back; rows were reused (3 rows for 6 requests)
    runs = engine.model_runner.records
    assert len({seq_id for run in runs for seq_id in run.seq_ids}) == len(PROMPTS)
    # rows of the requests that finished in the last step are freed at the next run() or here
    assert patch.release_finished() and patch.slots.active == {}
    assert patch.hook.state.valid.shape[0] <= 3


def test_batch_order_does_not_decide_whose_residual_a_token_gets():
    def rotate(batch, step):
        return batch[step % len(batch):] + batch[:step % len(batch)] if batch else batch

    engine = make_engine(order=rotate, max_num_seqs=4)
    patch_jetengine(engine, t_res=T_RES)
    engine.generate(PROMPTS, PARAMS, max_active=4)
    orders = {tuple(run.seq_ids) for run in engine.model_runner.records
              if run.run_type == RunType.DENOISE}
    same_members = {}
    for order in orders:
        same_members.setdefault(frozenset(order), set()).add(order)
    assert any(len(v) > 1 for v in same_members.values())  # the same requests, reordered
    assert check_against_reference(engine) > 0


def test_masks_left_in_a_saved_block_keep_their_residuals_at_their_own_positions():
    # entropy-bounded commits can save a block with masks in it: the SAVING forward still
    # sees them masked (and injects), and residuals outlive the block, so a position that
    # were relative to the block (or not per request) would hand them to the next block
    params = [SamplingParams(max_tokens=12, block_length=BLOCK, denoising_steps=2,
                             dynamic_threshold=0.99, remasking_strategy="entropy_bounded")
              for _ in PROMPTS]
    engine = make_engine(order=reverse_every_other)
    patch = patch_jetengine(engine, t_res=T_RES)
    outputs = engine.generate(PROMPTS, params, max_active=3)
    assert any(MASK in tokens for tokens in outputs)  # the scenario happened
    assert check_against_reference(engine) == patch.hook.injected > 0


def _run_until_holding_residuals(engine: LLM, seq, patch) -> None:
    for _ in range(10):
        engine.step()
        row = patch.slots.active.get(seq.seq_id)
        if row is not None and seq.status == SequenceStatus.DENOISING and bool(
                patch.hook.state.valid[row].any()):
            return
    raise AssertionError("the request never held a residual")


def test_a_new_request_taking_a_freed_row_never_sees_the_old_residuals():
    params = SamplingParams(max_tokens=12, block_length=BLOCK, denoising_steps=4,
                            dynamic_threshold=0.99)
    engine = make_engine(max_num_seqs=2)
    patch = patch_jetengine(engine, t_res=T_RES)
    first = engine.add_request([5, 9], params)
    second = engine.add_request([7, 1, 4], params)
    _run_until_holding_residuals(engine, first, patch)
    row = patch.slots.active[first.seq_id]
    # the request leaves mid-block, holding residuals at the very positions the next one uses
    engine.abort_request(first.seq_id)
    late = engine.add_request([6, 6], params)
    engine.step()
    assert patch.slots.active[late.seq_id] == row
    assert second.seq_id in patch.slots.active
    while not engine.is_finished():
        engine.step()
    check_against_reference(engine)
    # and its first forward got plain E[M] at every masked position
    table = engine.model.model.embed_tokens.weight
    first_late = next(i for i, run in enumerate(engine.model_runner.records)
                      if late.seq_id in run.seq_ids)
    run, call = engine.model_runner.records[first_late], engine.model.calls[first_late]
    start = sum(n for s, n in zip(run.seq_ids, run.lengths, strict=True)
                if run.seq_ids.index(s) < run.seq_ids.index(late.seq_id))
    block = slice(start, start + BLOCK)
    assert torch.equal(call.embeds[block], table[call.input_ids[block]])


def test_a_request_dropped_without_finishing_frees_its_row():
    params = SamplingParams(max_tokens=12, block_length=BLOCK, denoising_steps=4,
                            dynamic_threshold=0.99)
    engine = make_engine(max_num_seqs=2)
    patch = patch_jetengine(engine, t_res=T_RES)
    first = engine.add_request([5, 9], params)
    engine.add_request([7, 1, 4], params)
    _run_until_holding_residuals(engine, first, patch)
    row, first_id = patch.slots.active[first.seq_id], first.seq_id
    # a replaced scheduler forgets requests without marking them finished
    engine.scheduler.running = [s for s in engine.scheduler.running if s is not first]
    del first
    gc.collect()
    late = engine.add_request([6, 6], params)
    engine.step()
    assert first_id not in patch.slots.active and patch.slots.active[late.seq_id] == row
    while not engine.is_finished():
        engine.step()
    check_against_reference(engine)


def test_refuses_tensor_parallel_and_cuda_graphs():
    engine = make_engine(tp=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        patch_jetengine(engine)
    engine = make_engine(eager=False)
    with pytest.raises(ValueError, match="enforce_eager=False"):
        patch_jetengine(engine)
    # the refusals leave the runner untouched
    assert "run" not in vars(engine.model_runner)
    assert not engine.model.model.embed_tokens._forward_hooks
    # why: a graph replay runs no Python hook on the embedding
    seen = []
    engine.model.model.embed_tokens.register_forward_hook(lambda *args: seen.append(1))
    engine.generate(PROMPTS[:2], PARAMS[:2])
    runs = engine.model_runner.records
    assert len(seen) == sum(run.run_type == RunType.PREFILL for run in runs) < len(runs)
    # flipping enforce_eager after patching is caught at the next DENOISE batch
    engine = make_engine()
    patch_jetengine(engine)
    engine.model_runner.enforce_eager = False
    with pytest.raises(ValueError, match="enforce_eager=False"):
        engine.generate(PROMPTS[:1], PARAMS[:1])


def test_refuses_what_the_hook_cannot_do():
    with pytest.raises(ValueError, match="init="):
        patch_jetengine(make_engine(), init="reference")
    with pytest.raises(TypeError, match="engine instance"):
        patch_jetengine(LLM)
    engine = make_engine()
    engine.config.mask_token_id = -1
    with pytest.raises(ValueError, match="mask_token_id"):
        patch_jetengine(engine)


def test_undo_and_repatching_restore_the_engine():
    plain = make_engine(order=reverse_every_other)
    expected = plain.generate(PROMPTS, PARAMS, max_active=3)
    engine = make_engine(order=reverse_every_other)
    embedding = engine.model.model.embed_tokens
    patch_jetengine(engine)
    patch = patch_jetengine(engine, t_res=T_RES)  # re-patching replaces, never stacks
    assert len(embedding._forward_hooks) == 1
    engine.generate(PROMPTS[:2], PARAMS[:2])
    assert patch.hook.injected > 0
    patch.undo()
    runner = engine.model_runner
    assert "run" not in vars(runner) and "run_model" not in vars(runner)
    assert not embedding._forward_hooks
    fresh = make_engine(order=reverse_every_other)
    fresh.model = engine.model
    fresh.model_runner.model = engine.model
    engine.model.calls.clear()
    assert fresh.generate(PROMPTS, PARAMS, max_active=3) == expected


def test_follows_a_rebuilt_model():
    engine = make_engine()
    patch = patch_jetengine(engine, t_res=T_RES)
    old = engine.model.model.embed_tokens
    engine.generate(PROMPTS[:2], PARAMS[:2])
    new_model = TinyBlockModel(seed=1)
    engine.model_runner.reinit_model(new_model)
    engine.model = new_model
    engine.model_runner.records.clear()
    engine.generate(PROMPTS[2:4], PARAMS[2:4])
    assert not old._forward_hooks and len(new_model.model.embed_tokens._forward_hooks) == 1
    assert patch.hook.state.embed_weight is new_model.model.embed_tokens.weight
    assert check_against_reference(engine) > 0
