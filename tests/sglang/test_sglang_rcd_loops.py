"""RCD through SGLang's real DllmAlgorithm loops (sync and fdfo) on a CPU stand-in model.

Run in the SGLang venv (scripts/make_sglang_venv.sh); skipped where SGLang is not installed.
"""

from __future__ import annotations

import gc
import weakref

import pytest

pytest.importorskip("sglang.srt.dllm.algorithm")

import torch  # noqa: E402
from sglang.srt.dllm.algorithm.low_confidence import LowConfidence  # noqa: E402
from sglang_standin import (  # noqa: E402
    BLOCK,
    MASK_ID,
    TinyRunner,
    decode,
    dllm_config,
    requests,
    tiny_model,
)

from rcd_ext.integrations.sglang.algorithm import RCD, RCDRequestState  # noqa: E402
from rcd_ext.residual import ResidualConfig, ResidualState  # noqa: E402

FDFO = [pytest.param(False, id="sync"), pytest.param(True, id="fdfo")]


def _run(algorithm_cls, options: dict, fdfo: bool, threshold: float = 0.5):
    config = dllm_config(algorithm_cls.__name__, {"threshold": threshold, **options}, fdfo)
    runner = TinyRunner(tiny_model())
    outputs = decode(algorithm_cls(config), runner, requests(), fdfo)
    return outputs, runner


@pytest.mark.parametrize("fdfo", FDFO)
@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_alpha_zero_commits_exactly_what_low_confidence_commits(fdfo: bool, threshold: float):
    expected, baseline = _run(LowConfidence, {}, fdfo, threshold)
    got, runner = _run(RCD, {"alpha_scale": 0.0}, fdfo, threshold)
    assert got == expected
    assert len(runner.calls) == len(baseline.calls)
    # the residual path was taken (embeddings fed), it just equals E[MASK] at alpha 0
    assert any(call.input_embeds is not None for call in runner.calls)
    # and residuals on change what is committed: the comparison can fail
    with_residuals, _ = _run(RCD, {"t_res": 0.5}, fdfo, threshold)
    assert with_residuals != expected


def _expected_embeds(runner: TinyRunner, options: ResidualConfig) -> list[torch.Tensor]:
    """What rcd_ext's own ResidualState feeds at each call, from the previous call's logits of
    the same request and block (plain embeddings on a block's first forward)."""
    table = runner.tiny.embed_tokens.weight.detach()
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # rid -> (ids, logits) last forward
    expected = []
    positions = torch.arange(BLOCK)[None]
    for call in runner.calls:
        rows = []
        for index, rid in enumerate(call.rids):
            ids = call.input_ids[index:index + 1]
            state = ResidualState(table, MASK_ID, options)
            previous = last.get(rid)
            # same block: the previous forward's masked set contains this one's
            if previous is not None and bool(((ids == MASK_ID) <= (previous[0] == MASK_ID)).all()) \
                    and bool((ids == MASK_ID).any()) and not bool((ids == previous[0]).all()):
                state.update(previous[1][None], ids, positions)
            rows.append(state.inputs_embeds(ids, positions)[0])
            last[rid] = (ids[0], call.logits[index])
        expected.append(torch.stack(rows))
    return expected


@pytest.mark.parametrize("fdfo", FDFO)
def test_fed_embeddings_equal_rcd_ext_residual_state(fdfo: bool):
    options = {"t_res": 0.7, "strategy": "entropy", "alpha_scale": 0.9, "temper_delta": True}
    _, runner = _run(RCD, options, fdfo)
    expected = _expected_embeds(runner, ResidualConfig(**options))
    fed = 0
    for call, want in zip(runner.calls, expected, strict=True):
        torch.testing.assert_close(call.seen_embeds, want, rtol=1e-5, atol=1e-6)
        fed += call.input_embeds is not None
    assert fed > len(runner.calls) // 3  # most forwards carried residuals


def test_fdfo_carries_state_across_rounds_and_drops_it_when_the_block_is_done():
    config = dllm_config("RCD", {"threshold": 0.99}, fdfo=True)
    algorithm, runner = RCD(config), TinyRunner(tiny_model())
    seen: list[tuple[int, str, object]] = []
    held: list[bool] = []  # whether each carried state held residuals when it was carried

    def on_round(round_index, active):
        for request in active:
            seen.append((round_index, request.rid, request.state))
            if request.state is not None:
                held.append(request.state.residual is not None)
        return active

    batch = requests()
    decode(algorithm, runner, batch, fdfo=True, on_round=on_round)
    carried = [state for _, _, state in seen if state is not None]
    assert carried and all(isinstance(s, RCDRequestState) for s in carried)
    # mid-block states carry residuals into the next round; at the block's end they are freed
    assert any(held)
    assert all(s.residual is None for s in carried)
    # a state carried into round k+1 is the same object SGLang hands back (no copy, no registry)
    by_request: dict[str, list] = {}
    for _, rid, state in seen:
        by_request.setdefault(rid, []).append(state)
    assert any(a is b and a is not None for states in by_request.values()
               for a, b in zip(states, states[1:], strict=False))
    assert all(request.state is None for request in batch)  # finished: nothing carried
    assert not any(isinstance(v, (RCDRequestState, list, dict)) for v in vars(algorithm).values())


def test_aborted_request_state_is_freed_with_the_request():
    config = dllm_config("RCD", {"threshold": 0.99}, fdfo=True)
    algorithm, runner = RCD(config), TinyRunner(tiny_model())
    refs = []

    def abort_b(round_index, active):
        if round_index == 1:
            victim = next(r for r in active if r.rid == "b")
            assert victim.state is not None  # mid-block: holds residuals
            refs.append(weakref.ref(victim.state))
            victim.state = None  # the scheduler drops the Req on abort
            return [r for r in active if r.rid != "b"]
        return active

    batch = requests()
    decode(algorithm, runner, batch, fdfo=True, on_round=abort_b)
    del batch
    gc.collect()
    assert refs and refs[0]() is None


def test_sync_states_live_for_one_block():
    config = dllm_config("RCD", {"threshold": 0.99}, fdfo=False)
    algorithm, runner = RCD(config), TinyRunner(tiny_model())
    created = []
    original = algorithm.init_step_state

    def recording(forward_batch):
        states = original(forward_batch)
        created.extend(weakref.ref(s) for s in states)
        return states

    algorithm.init_step_state = recording
    decode(algorithm, runner, requests(), fdfo=False)
    gc.collect()
    assert created and all(ref() is None for ref in created)
    # one init per block and round: 3 + 2 + 3 blocks over rounds of the live requests
    assert len(created) == 3 + 3 + 2


def test_dirichlet_init_primes_the_first_forward_reproducibly():
    runs = [_run(RCD, {"init": "dirichlet", "dirichlet_concentration": 0.5}, False)
            for _ in range(2)]
    first = runs[0][1].calls[0]
    assert first.input_embeds is not None  # primed before any logits exist
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a.seen_embeds, b.seen_embeds)
               for a, b in zip(runs[0][1].calls, runs[1][1].calls, strict=True))
