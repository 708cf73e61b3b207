"""The input-embedding hook (engines that take no inputs_embeds: Fast-dLLM v2, the D2F vLLM
engine, JetEngine) on flat token batches of several requests, and the request-to-row slots of
continuously batched engines."""

from __future__ import annotations

import pytest
import torch

from rcd_ext.integrations.embedding_hook import EmbeddingHookRCD, SequenceSlots
from rcd_ext.integrations.engine_patching import RCDOptions
from rcd_ext.op_reference import residual_context_reference
from rcd_ext.ops import residual_context
from tests.engine_doubles.models import LLaDADouble

MASK = 47


def residual_of(logits, table):
    """The residual embedding of each logits row, from the op's plain spec."""
    return residual_context_reference(logits, table, table[MASK])[0]


def test_hook_injects_stored_residuals_per_request_and_absolute_position():
    embedding = LLaDADouble().get_input_embeddings()
    table = embedding.weight
    hook = EmbeddingHookRCD(embedding, MASK)
    hook.reset(2)
    ids = torch.tensor([5, MASK, MASK, MASK])
    positions = torch.tensor([10, 11, 12, 11])  # the last token: request 1, position 11
    rows = torch.tensor([0, 0, 0, 1])
    hook.prepare(ids, positions, rows)
    assert torch.equal(embedding(ids), table[ids])  # nothing stored yet: plain
    logits = torch.randn(4, table.shape[0], generator=torch.Generator().manual_seed(0))
    hook.update(logits)
    expected, _ = residual_context(logits, table, table[MASK])
    committed = torch.tensor([5, 9, MASK, MASK])  # request 0 committed position 11
    hook.prepare(committed, positions, rows)
    out = embedding(committed)
    assert torch.equal(out[:2], table[committed[:2]])
    assert torch.allclose(out[2:], expected[2:], atol=1e-6)
    hook.update(logits)
    hook.prepare(ids, positions, rows)  # position 11 masked again: its residual is gone
    assert torch.equal(embedding(ids)[1], table[MASK])
    hook.remove()
    assert torch.equal(embedding(ids), table[ids])


def test_hook_refuses_warm_inits_and_mismatched_batches():
    embedding = LLaDADouble().get_input_embeddings()
    with pytest.raises(ValueError, match="init='cold'"):
        EmbeddingHookRCD(embedding, MASK, RCDOptions().updated({"init": "self"}))
    hook = EmbeddingHookRCD(embedding, MASK)
    hook.prepare(torch.tensor([MASK, MASK]), torch.tensor([0, 1]))
    hook.update(torch.zeros(2, embedding.weight.shape[0]))
    hook.prepare(torch.tensor([MASK, MASK]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="announced 2 tokens"):
        embedding(torch.tensor([MASK, MASK, MASK]))


def test_a_new_request_row_keeps_the_residuals_of_requests_in_flight():
    # continuous batching: request 1 joins after request 0 has residuals stored
    embedding = LLaDADouble().get_input_embeddings()
    table = embedding.weight
    hook = EmbeddingHookRCD(embedding, MASK)
    logits = torch.randn(2, table.shape[0], generator=torch.Generator().manual_seed(1))
    hook.prepare(torch.tensor([MASK, MASK]), torch.tensor([4, 5]), torch.tensor([0, 0]))
    embedding(torch.tensor([MASK, MASK]))
    hook.update(logits)
    ids = torch.tensor([MASK, MASK, MASK])
    hook.prepare(ids, torch.tensor([4, 5, 4]), torch.tensor([0, 0, 3]))
    out = embedding(ids)
    assert torch.allclose(out[:2], residual_of(logits, table), atol=1e-5)
    assert torch.equal(out[2], table[MASK])  # the newcomer has nothing yet
    assert hook.injected == 2


def test_update_from_a_subset_of_the_announced_tokens():
    embedding = LLaDADouble().get_input_embeddings()
    table = embedding.weight
    hook = EmbeddingHookRCD(embedding, MASK)
    ids = torch.tensor([MASK, 7, MASK, MASK])
    positions = torch.tensor([0, 1, 2, 3])
    hook.prepare(ids, positions)
    embedding(ids)
    logits = torch.randn(2, table.shape[0], generator=torch.Generator().manual_seed(2))
    hook.update(logits, token_index=torch.tensor([1, 3]))  # the head kept tokens 1 and 3
    assert hook.state.stored(torch.zeros(4, dtype=torch.long), positions).tolist() == \
        [False, False, False, True]
    hook.prepare(ids, positions)
    assert torch.allclose(embedding(ids)[3], residual_of(logits[1:], table)[0], atol=1e-5)
    hook.update(logits[:1], token_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="token_index"):
        hook.prepare(ids, positions)
        hook.update(logits)


def test_released_rows_forget_their_residuals_and_slots_are_reused():
    embedding = LLaDADouble().get_input_embeddings()
    table = embedding.weight
    hook = EmbeddingHookRCD(embedding, MASK)
    slots = SequenceSlots()
    assert slots.rows_for(["a", "b", "c"]) == [0, 1, 2]
    ids = torch.full((3,), MASK)
    rows = torch.tensor(slots.rows_for(["c", "a", "b"]))  # order changes, rows do not
    assert rows.tolist() == [2, 0, 1]
    hook.prepare(ids, torch.tensor([9, 9, 9]), rows)
    embedding(ids)
    hook.update(torch.randn(3, table.shape[0]))
    freed = slots.release("b")
    assert freed == 1 and slots.release("b") is None
    hook.release([freed])
    assert slots.rows_for(["d"]) == [1]  # the newcomer takes the freed row, empty
    hook.prepare(ids, torch.tensor([9, 9, 9]), torch.tensor([2, 0, 1]))
    out = embedding(ids)
    assert torch.equal(out[2], table[MASK])
    assert not torch.equal(out[0], table[MASK]) and not torch.equal(out[1], table[MASK])
    assert sorted([slots.release("a"), slots.release("c")]) == [0, 2]
    assert slots.active == {"d": 1}


def test_hook_refuses_modules_without_an_embedding_table_and_bad_shapes():
    with pytest.raises(TypeError, match="weight"):
        EmbeddingHookRCD(torch.nn.Identity(), MASK)
    hook = EmbeddingHookRCD(LLaDADouble().get_input_embeddings(), MASK)
    with pytest.raises(ValueError, match="same shape"):
        hook.prepare(torch.tensor([MASK, MASK]), torch.tensor([0]))
    with pytest.raises(ValueError, match="rows"):
        hook.prepare(torch.tensor([MASK, MASK]), torch.tensor([0, 1]), torch.tensor([0]))


def test_state_grown_under_inference_mode_accepts_updates_outside_it():
    # serving engines run their forward under torch.inference_mode(); the adapter's bookkeeping
    # (release, forget, the next write) may run outside it
    embedding = LLaDADouble().get_input_embeddings()
    hook = EmbeddingHookRCD(embedding, MASK)
    ids = torch.tensor([MASK, MASK])
    with torch.inference_mode():
        hook.prepare(ids, torch.tensor([3, 4]), torch.tensor([0, 2]))
        embedding(ids)
        hook.update(torch.randn(2, embedding.weight.shape[0]))
    hook.forget(torch.tensor([0]), torch.tensor([3]))
    hook.release([2])
    hook.prepare(ids, torch.tensor([3, 4]), torch.tensor([0, 1]))
    with torch.no_grad():
        embedding(ids)
    hook.update(torch.randn(2, embedding.weight.shape[0]))
    assert hook.state.stored(torch.tensor([0, 1, 2]), torch.tensor([3, 4, 4])).tolist() == \
        [True, True, False]


def test_serving_runner_checks_name_the_setting_and_the_engines_fix():
    from types import SimpleNamespace

    from rcd_ext.integrations.embedding_hook import input_embedding, refuse_unhookable_runner

    fixes = {"tensor_parallel_fix": "use TP 1", "eager_fix": "use eager"}
    sharded = SimpleNamespace(config=SimpleNamespace(tensor_parallel_size=1), world_size=1,
                              enforce_eager=True)
    with pytest.raises(ValueError, match="tensor_parallel_size=4: .*use TP 1"):
        refuse_unhookable_runner(sharded, SimpleNamespace(tp_size=4), **fixes)
    graphed = SimpleNamespace(config=SimpleNamespace(enforce_eager=False))
    with pytest.raises(ValueError, match="enforce_eager=False: .*use eager"):
        refuse_unhookable_runner(graphed, **fixes)
    refuse_unhookable_runner(SimpleNamespace(config=SimpleNamespace(enforce_eager=True)), **fixes)
    model = LLaDADouble()
    assert input_embedding(model) is model.get_input_embeddings()
    with pytest.raises(TypeError, match="model.embed_tokens nor get_input_embeddings"):
        input_embedding(torch.nn.Linear(2, 2))


def test_tracked_sequences_free_their_rows_when_finished_or_dropped():
    class Seq:
        def __init__(self, seq_id):
            self.seq_id, self.is_finished = seq_id, False

    slots = SequenceSlots()
    a, b, c = Seq("a"), Seq("b"), Seq("c")
    assert slots.track([a, b, c]) == [0, 1, 2]
    assert slots.release_finished() == []  # all still running
    b.is_finished = True
    del c  # the engine dropped it without finishing
    assert sorted(slots.release_finished()) == [1, 2]
    assert slots.active == {"a": 0}
    assert slots.track([Seq("d"), a]) == [1, 0]  # freed rows are reused; a keeps its own
