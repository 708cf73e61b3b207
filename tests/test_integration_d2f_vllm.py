"""D2F's vLLM-style engine (`d2f_vllm`): `patch_d2f_vllm` on a from-scratch double of the
engine (flat batches of several blocks in flight per request, continuous batching, Dream's
shifted sampler), checked against a plainly written account of where residuals belong."""

from __future__ import annotations

import math

import pytest
import torch

from rcd_ext.integrations.d2f_vllm import patch_d2f_vllm
from rcd_ext.integrations.embedding_hook import EmbeddingHookRCD, SequenceSlots
from tests.engine_doubles.d2f_vllm import (
    Config,
    DPEngine,
    LLMEngine,
    ModelRunner,
    PlainSampler,
    SamplingParams,
)

MASK = 47
T_RES = 0.92
PROMPTS = [[3, 9, 14, 5], [5, 1, 30, 8, 11], [7, 7, 7]]
PARAMS = SamplingParams(max_tokens=16)


def generate(engine: LLMEngine) -> list[list[int]]:
    return engine.generate([list(p) for p in PROMPTS], PARAMS)


def untouched(engine: LLMEngine) -> bool:
    runner = engine.model_runner
    embedding = runner.model.model.embed_tokens
    return not ({"run", "run_model", "run_verbose"} & set(vars(runner))) and \
        not embedding._forward_hooks


def slices(call: dict) -> list[tuple[int, int, int]]:
    """(seq_id, start, end) of each request's tokens in a recorded flat call."""
    out, start = [], 0
    for seq_id, length in zip(call["seq_ids"], call["seq_lens"], strict=True):
        out.append((seq_id, start, start + length))
        start += length
    return out


def plain_residual(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """e = (1 - a) E[M] + a softmax(z) @ E, a = H(softmax(z / T_res)) / log V."""
    z = logits.double()
    tempered = torch.softmax(z / T_RES, -1)
    entropy = -(tempered * torch.log(tempered)).nan_to_num().sum()
    alpha = entropy / math.log(z.shape[-1])
    table = table.double()
    return ((1 - alpha) * table[MASK] + alpha * torch.softmax(z, -1) @ table).float()


@torch.no_grad()
def check_flat_injection(calls: list[dict], table: torch.Tensor, shift: bool) -> int:
    """Assert each recorded forward received, at every masked token, the residual of the
    previous forward's logits for the same request and position (Dream: row i - 1 of the
    request's slice; the slice's first token has none), plain E[token] elsewhere. Returns the
    number of injected tokens."""
    stored: dict[tuple[int, int], torch.Tensor] = {}
    injected = 0
    for number, call in enumerate(calls):
        ids, positions = call["input_ids"].tolist(), call["positions"].tolist()
        expected = table[call["input_ids"]].clone()
        for seq_id, start, end in slices(call):
            for i in range(start, end):
                key = (seq_id, positions[i])
                if ids[i] == MASK and key in stored:
                    expected[i] = stored[key]
                    injected += 1
        assert torch.allclose(call["embeds"], expected, atol=1e-5), (
            f"call {number}: embeddings differ at rows "
            f"{(call['embeds'] - expected).abs().amax(-1).nonzero()[:, 0].tolist()}")
        for seq_id, start, end in slices(call):
            for i in range(start, end):
                key = (seq_id, positions[i])
                if ids[i] != MASK or (shift and i == start):
                    stored.pop(key, None)
                else:
                    stored[key] = plain_residual(call["logits"][i - 1 if shift else i], table)
    return injected


def test_flag_off_leaves_the_engine_bit_identical():
    plain = LLMEngine()
    baseline = generate(plain)

    engine = LLMEngine()
    patch = patch_d2f_vllm(engine, rcd=False)
    assert patch.hook is None and untouched(engine)
    assert generate(engine) == baseline
    for ours, theirs in zip(engine.model_runner.model.calls, plain.model_runner.model.calls,
                            strict=True):
        assert torch.equal(ours["logits"], theirs["logits"])

    # the whole RCD path with alpha = 0 feeds E[M] itself: same logits, bit for bit
    engine = LLMEngine()
    patch = patch_d2f_vllm(engine, alpha_scale=0.0)
    assert generate(engine) == baseline
    assert patch.hook.injected > 0
    for ours, theirs in zip(engine.model_runner.model.calls, plain.model_runner.model.calls,
                            strict=True):
        assert torch.equal(ours["logits"], theirs["logits"])


def test_flag_on_injects_the_previous_steps_residuals_at_masked_tokens():
    engine = LLMEngine()
    patch = patch_d2f_vllm(engine, t_res=T_RES)
    assert patch.shift_logits  # Dream's sampler shifts
    generate(engine)
    calls = engine.model_runner.model.calls
    table = engine.model_runner.model.model.embed_tokens.weight
    injected = check_flat_injection(calls, table, shift=True)
    assert injected > 0 and injected == patch.hook.injected

    # the run exercised what the rules are about: several requests per flat batch, several
    # blocks with masks in flight per request, and a slice opening on a masked token
    in_flight = opening_masked = 0
    assert any(len(call["seq_ids"]) > 1 for call in calls)
    for call in calls:
        for _, start, end in slices(call):
            masked = call["input_ids"][start:end] == MASK
            in_flight += len(set(call["block_ids"][start:end][masked].tolist())) >= 2
            opening_masked += (not call["is_prefill"]) and bool(masked[0])
    assert in_flight > 0 and opening_masked > 0
    # reading the logits unshifted is a different account, and the check tells them apart
    with pytest.raises(AssertionError, match="embeddings differ"):
        check_flat_injection(calls, table, shift=False)


def test_a_new_block_starts_without_residual():
    engine = LLMEngine()
    patch_d2f_vllm(engine, t_res=T_RES)
    generate(engine)
    table = engine.model_runner.model.model.embed_tokens.weight
    seen: set[tuple[int, int]] = set()
    fresh = 0
    for call in engine.model_runner.model.calls:
        for seq_id, start, end in slices(call):
            for i in range(start, end):
                key = (seq_id, int(call["positions"][i]))
                if key not in seen:
                    token = int(call["input_ids"][i])
                    assert torch.equal(call["embeds"][i], table[token])
                    fresh += token == MASK and not call["is_prefill"]
                seen.add(key)
    assert fresh > 0  # blocks were appended during decoding


def join_and_leave(engine: LLMEngine) -> None:
    """Requests arrive while others decode; one finishes early and its slot is reused; with
    max_num_seqs=2 some running requests sit out steps."""
    short, long = SamplingParams(max_tokens=4), SamplingParams(max_tokens=20)
    first = engine.add_request([3, 9, 14, 5], short)
    engine.add_request([5, 1, 30, 8], long)
    while first not in [seq_id for seq_id, _ in engine.step()]:
        pass
    assert not engine.is_finished()
    engine.add_request([7, 7, 7, 6], long)
    engine.add_request([4, 4, 8, 9], long)
    while not engine.is_finished():
        engine.step()


def test_requests_joining_and_leaving_never_see_anothers_residuals(monkeypatch):
    rows: dict[int, int] = {}
    rows_for = SequenceSlots.rows_for

    def recording_rows_for(self, request_ids):
        given = rows_for(self, request_ids)
        rows.update(zip(request_ids, given, strict=True))
        return given

    monkeypatch.setattr(SequenceSlots, "rows_for", recording_rows_for)
    engine = LLMEngine(Config(max_num_seqs=2))
    patch_d2f_vllm(engine, t_res=T_RES)
    join_and_leave(engine)
    calls = engine.model_runner.model.calls
    table = engine.model_runner.model.model.embed_tokens.weight
    assert check_flat_injection(calls, table, shift=True) > 0
    assert len(rows) == 4 and len(set(rows.values())) < 4  # a finished request's row reused
    assert all(len(c["seq_ids"]) <= 2 for c in calls)
    # some request sat out a step while others ran (max_num_seqs), and came back
    steps = [set(c["seq_ids"]) for c in calls]
    assert any(seq_id in steps[a] and seq_id not in steps[b] and seq_id in steps[c]
               for a in range(len(steps)) for b in range(a + 1, len(steps))
               for c in range(b + 1, len(steps)) for seq_id in steps[a])

    # the same traffic without forgetting finished requests leaks a residual into the request
    # that takes the freed slot, and the account above catches it
    monkeypatch.setattr(EmbeddingHookRCD, "release", lambda self, rows: None)
    leaky = LLMEngine(Config(max_num_seqs=2))
    patch_d2f_vllm(leaky, t_res=T_RES)
    join_and_leave(leaky)
    with pytest.raises(AssertionError, match="embeddings differ"):
        check_flat_injection(leaky.model_runner.model.calls, table, shift=True)


def test_an_unshifted_sampler_scores_each_token_by_its_own_row():
    engine = LLMEngine(sampler=PlainSampler())
    patch = patch_d2f_vllm(engine, t_res=T_RES)
    assert not patch.shift_logits
    generate(engine)
    calls = engine.model_runner.model.calls
    table = engine.model_runner.model.model.embed_tokens.weight
    assert check_flat_injection(calls, table, shift=False) > 0
    with pytest.raises(AssertionError, match="embeddings differ"):
        check_flat_injection(calls, table, shift=True)


@pytest.mark.parametrize(("make", "options", "named"), [
    (lambda: LLMEngine(Config(tensor_parallel_size=2)), {}, "tensor_parallel_size=2"),
    (lambda: LLMEngine(Config(enforce_eager=False)), {}, "enforce_eager=False"),
    (lambda: LLMEngine(Config(model_type="causal_lm")), {}, "model_type='causal_lm'"),
    (lambda: LLMEngine(), {"init": "reference"}, "init='reference'"),
    (lambda: LLMEngine(), {"ref_model": torch.nn.Linear(1, 1)}, "ref_model"),
])
def test_refusals_name_the_setting_and_change_nothing(make, options, named):
    engine = make()
    with pytest.raises(ValueError, match=named):
        patch_d2f_vllm(engine, **options)
    assert untouched(engine)
    assert patch_d2f_vllm(engine, rcd=False).hook is None  # the baseline always works
    assert untouched(engine)


def test_data_parallel_engine_is_refused():
    with pytest.raises(ValueError, match="data_parallel_size=2"):
        patch_d2f_vllm(DPEngine(Config(data_parallel_size=2)))


def test_patching_twice_is_refused_and_undo_restores_the_engine():
    baseline = generate(LLMEngine())
    engine = LLMEngine()
    runner = engine.model_runner
    patch = patch_d2f_vllm(runner)  # the runner itself is a valid target too
    with pytest.raises(ValueError, match="patched already"):
        patch_d2f_vllm(engine)
    assert patch.originals["run"].__func__ is ModelRunner.run
    patch.undo()
    assert untouched(engine) and runner.run.__func__ is ModelRunner.run
    assert generate(engine) == baseline


class ReorderingRunner(ModelRunner):
    """Packs decode batches in reverse request order (not what the adapter relies on)."""

    def prepare_decode(self, seqs):
        return super().prepare_decode(list(reversed(seqs)))


def test_a_batch_laid_out_otherwise_is_refused_at_run():
    engine = LLMEngine()
    engine.model_runner = ReorderingRunner(engine.config)
    patch_d2f_vllm(engine)
    with pytest.raises(RuntimeError, match="lays batches out differently"):
        generate(engine)
