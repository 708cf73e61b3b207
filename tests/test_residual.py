"""ResidualState: residuals at masked positions only, overwritten each step, per position."""

from __future__ import annotations

import math

import pytest
import torch

from rcd_ext.residual import ResidualConfig, ResidualState, dirichlet_logits

VOCAB, DIM, MASK = 12, 6, 1


def hand_residual(logits: torch.Tensor, table: torch.Tensor, mask_id: int,
                  t_res: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formula written out: alpha = H(softmax(z/T))/log V, delta = softmax(z) E."""
    q = torch.softmax(logits / t_res, -1)
    alpha = torch.special.entr(q).sum(-1) / math.log(logits.shape[-1])
    delta = torch.softmax(logits, -1) @ table
    return (1 - alpha)[..., None] * table[mask_id] + alpha[..., None] * delta, alpha


@pytest.fixture
def table():
    return torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(0))


def positions(batch: int, start: int, length: int) -> torch.Tensor:
    return (start + torch.arange(length))[None].expand(batch, -1)


def test_masked_positions_get_residual_others_keep_token_embeddings(table):
    state = ResidualState(table, MASK, ResidualConfig())
    ids = torch.tensor([[5, 6, MASK, MASK, 7, MASK]])
    logits = torch.randn(1, 6, VOCAB)
    state.update(logits, ids, positions(1, 0, 6))
    # next step: position 3 was committed
    ids_next = torch.tensor([[5, 6, MASK, 9, 7, MASK]])
    embeds = state.inputs_embeds(ids_next, positions(1, 0, 6))
    expected, _ = hand_residual(logits[0], table, MASK)
    for column in range(6):
        if ids_next[0, column] == MASK:
            torch.testing.assert_close(embeds[0, column], expected[column])
        else:
            assert torch.equal(embeds[0, column], table[ids_next[0, column]])


def test_cold_masked_position_without_residual_is_plain_mask_embedding(table):
    state = ResidualState(table, MASK, ResidualConfig())
    ids = torch.tensor([[5, MASK, MASK]])
    embeds = state.inputs_embeds(ids, positions(1, 0, 3))
    assert torch.equal(embeds, table[ids])


def test_update_overwrites_instead_of_accumulating(table):
    ids = torch.tensor([[MASK, MASK, 4]])
    first, second = torch.randn(1, 3, VOCAB), torch.randn(1, 3, VOCAB)
    state = ResidualState(table, MASK, ResidualConfig())
    state.update(first, ids, positions(1, 0, 3))
    state.update(second, ids, positions(1, 0, 3))
    fresh = ResidualState(table, MASK, ResidualConfig())
    fresh.update(second, ids, positions(1, 0, 3))
    torch.testing.assert_close(state.inputs_embeds(ids, positions(1, 0, 3)),
                               fresh.inputs_embeds(ids, positions(1, 0, 3)), rtol=0, atol=0)
    _, alpha = hand_residual(second[0, :2], table, MASK)
    torch.testing.assert_close(state.alpha_at(positions(1, 0, 2))[0], alpha)


def test_committed_position_forgets_its_residual(table):
    state = ResidualState(table, MASK, ResidualConfig())
    state.update(torch.randn(1, 2, VOCAB), torch.tensor([[MASK, MASK]]), positions(1, 0, 2))
    state.update(torch.randn(1, 2, VOCAB), torch.tensor([[7, MASK]]), positions(1, 0, 2))
    # position 0 masked again (a remasking sampler): no stale residual
    embeds = state.inputs_embeds(torch.tensor([[MASK, MASK]]), positions(1, 0, 2))
    assert torch.equal(embeds[0, 0], table[MASK])
    assert not torch.equal(embeds[0, 1], table[MASK])


def test_absolute_positions_for_slices(table):
    state = ResidualState(table, MASK, ResidualConfig())
    ids = torch.full((1, 8), MASK)
    logits = torch.randn(1, 8, VOCAB)
    state.update(logits, ids, positions(1, 0, 8))
    # a later call sees only positions 5..7
    embeds = state.inputs_embeds(ids[:, 5:], positions(1, 5, 3))
    expected, _ = hand_residual(logits[0, 5:], table, MASK)
    torch.testing.assert_close(embeds[0], expected)


def test_scope_limits_writes_and_injection(table):
    state = ResidualState(table, MASK, ResidualConfig())
    ids = torch.full((1, 4), MASK)
    scope = torch.tensor([[True, True, False, False]])
    assert state.update(torch.randn(1, 4, VOCAB), ids, positions(1, 0, 4), scope) == 2
    assert state.has_residual(positions(1, 0, 4)).tolist() == [[True, True, False, False]]
    embeds = state.inputs_embeds(ids, positions(1, 0, 4), torch.tensor([[False] * 4]))
    assert torch.equal(embeds, table[ids])


def test_batch_rows_are_independent(table):
    ids = torch.tensor([[MASK, 5, MASK], [MASK, MASK, 6]])
    logits = torch.randn(2, 3, VOCAB)
    batched = ResidualState(table, MASK, ResidualConfig())
    batched.update(logits, ids, positions(2, 0, 3))
    together = batched.inputs_embeds(ids, positions(2, 0, 3))
    for row in range(2):
        single = ResidualState(table, MASK, ResidualConfig())
        single.update(logits[row:row + 1], ids[row:row + 1], positions(1, 0, 3))
        torch.testing.assert_close(together[row:row + 1],
                                   single.inputs_embeds(ids[row:row + 1], positions(1, 0, 3)))


def test_t_res_and_options_reach_the_op(table):
    logits = torch.randn(1, 2, VOCAB)
    ids = torch.full((1, 2), MASK)
    state = ResidualState(table, MASK, ResidualConfig(t_res=0.5))
    state.update(logits, ids, positions(1, 0, 2))
    _, alpha = hand_residual(logits[0], table, MASK, t_res=0.5)
    torch.testing.assert_close(state.alpha_at(positions(1, 0, 2))[0], alpha)
    zero = ResidualState(table, MASK, ResidualConfig(strategy="fixed", alpha_scale=0.0))
    zero.update(logits, ids, positions(1, 0, 2))
    assert torch.equal(zero.inputs_embeds(ids, positions(1, 0, 2)), table[ids])


def test_reset_forgets_everything(table):
    state = ResidualState(table, MASK, ResidualConfig())
    ids = torch.full((1, 3), MASK)
    state.update(torch.randn(1, 3, VOCAB), ids, positions(1, 0, 3))
    state.reset(1)
    assert torch.equal(state.inputs_embeds(ids, positions(1, 0, 3)), table[ids])


def test_dirichlet_logits_are_seeded_log_probabilities():
    draw = dirichlet_logits(4, VOCAB, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(draw.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)
    again = dirichlet_logits(4, VOCAB, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw, again)
    other = dirichlet_logits(4, VOCAB, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(draw, other)

    def mean_entropy(concentration: float) -> float:
        logp = dirichlet_logits(256, VOCAB, concentration,
                                generator=torch.Generator().manual_seed(3))
        return float(-(logp.exp() * logp).sum(-1).mean())

    # a larger concentration gives flatter draws
    assert mean_entropy(0.1) < mean_entropy(1.0) < mean_entropy(10.0)


@pytest.mark.parametrize("kwargs", [dict(init="warm"), dict(strategy="x"), dict(scope="x"),
                                    dict(t_res=0.0), dict(alpha_scale=1.5),
                                    dict(dirichlet_concentration=0.0)])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        ResidualConfig(**kwargs)


def test_mask_id_outside_table_is_refused(table):
    with pytest.raises(ValueError, match="mask id"):
        ResidualState(table, VOCAB + 3, ResidualConfig())


def test_storage_follows_the_residuals_in_flight_not_the_sequence_length(table):
    # a long semi-AR decode, block by block: committed positions hand their pool rows back,
    # so the pool never holds more than one block per batch row
    batch, block, blocks = 2, 4, 16
    state = ResidualState(table, MASK, ResidualConfig(scope="block"))
    generator = torch.Generator().manual_seed(3)
    for b in range(blocks):
        start = b * block
        ids = torch.full((batch, block), MASK)
        for step in range(block):
            state.update(torch.randn(batch, block, VOCAB, generator=generator), ids,
                         positions(batch, start, block))
            assert state.residuals_held == int((ids == MASK).sum())
            ids[:, step] = 7  # commit one token per row per step
        state.update(torch.randn(batch, block, VOCAB), ids, positions(batch, start, block))
        assert state.residuals_held == 0
    assert state.slot.shape[1] >= blocks * block
    assert state.pool_embeds.shape[0] <= 16  # the first allocation, never grown


def test_pool_rows_are_reused_and_values_stay_with_their_position(table):
    state = ResidualState(table, MASK, ResidualConfig())
    rows, pos = torch.tensor([0, 0, 1]), torch.tensor([5, 9, 5])
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4))
    state.write(rows, pos, logits)
    expected, alpha = hand_residual(logits, table, MASK)
    torch.testing.assert_close(state.residuals_at(rows, pos), expected)
    state.forget(torch.tensor([0]), torch.tensor([9]))
    state.clear_rows([1])
    assert state.residuals_held == 1
    assert state.stored(rows, pos).tolist() == [True, False, False]
    more = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(5))
    state.write(torch.tensor([2, 2]), torch.tensor([1, 2]), more)  # takes the freed rows
    assert state.residuals_held == 3
    torch.testing.assert_close(state.residuals_at(rows[:1], pos[:1]), expected[:1])
    torch.testing.assert_close(state.residuals_at(torch.tensor([2, 2]), torch.tensor([1, 2])),
                               hand_residual(more, table, MASK)[0])
    # [B, l] lookups: batch row b at positions[b] (3 rows: the state's batch)
    alpha_more = hand_residual(more, table, MASK)[1]
    torch.testing.assert_close(state.alpha_at(torch.tensor([[5, 9], [5, 5], [1, 2]])),
                               torch.tensor([[alpha[0], 0.0], [0.0, 0.0], alpha_more.tolist()]))


def test_a_pair_written_twice_in_one_call_holds_one_pool_row(table):
    state = ResidualState(table, MASK, ResidualConfig())
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(6))
    state.write(torch.tensor([0, 0]), torch.tensor([3, 3]), logits)
    assert state.residuals_held == 1
    state.forget(torch.tensor([0]), torch.tensor([3]))
    assert state.residuals_held == 0


def test_a_known_position_bound_gives_the_same_state_as_reading_it():
    generator = torch.Generator().manual_seed(8)
    table = torch.randn(VOCAB, 8, generator=generator)
    ids = torch.tensor([[MASK, 7, MASK], [MASK, MASK, 9]])
    at = positions(2, 4, 3)
    states = [ResidualState(table, MASK, ResidualConfig()) for _ in range(2)]
    for _ in range(2):
        logits = torch.randn(2, 3, VOCAB, generator=generator)
        written = [states[0].update(logits, ids, at), states[1].update(logits, ids, at, length=7)]
        assert written[0] == written[1] == int((ids == MASK).sum())
        ids = ids.clone()
        ids[0, 0] = 5  # committed: its pool row is handed back
    assert states[0].residuals_held == states[1].residuals_held == int((ids == MASK).sum())
    plain = torch.nn.functional.embedding(ids, table)
    torch.testing.assert_close(states[0].inject(plain, ids, at),
                               states[1].inject(plain, ids, at, length=7), rtol=0, atol=0)
    torch.testing.assert_close(states[0].alpha_at(at), states[1].alpha_at(at, length=7))
