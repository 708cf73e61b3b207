"""Remasking parts: the linear schedule, candidate sampling, and the two commit policies."""

from __future__ import annotations

import pytest
import torch

from rcd_ext.decoding.remasking import sample_tokens, select_commits, transfer_schedule


def test_schedule_splits_evenly_remainder_first():
    schedule = transfer_schedule(torch.tensor([10, 3, 0]), 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError):
        transfer_schedule(torch.tensor([3]), 0)


def test_greedy_sampling_returns_argmax_and_its_probability():
    logits = torch.randn(2, 5, 7)
    tokens, confidence = sample_tokens(logits)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(confidence, torch.softmax(logits, -1).max(-1).values)


def test_top_k_one_and_tiny_top_p_are_greedy_even_with_temperature():
    logits = torch.randn(3, 4, 9)
    generator = torch.Generator().manual_seed(0)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        tokens, confidence = sample_tokens(logits, temperature=2.0, generator=generator, **kwargs)
        assert torch.equal(tokens, logits.argmax(-1))
        # confidence always comes from the plain softmax, whatever was sampled from
        torch.testing.assert_close(confidence, torch.softmax(logits, -1).max(-1).values)


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]])).expand(1, 4000, 3)
    tokens, _ = sample_tokens(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(tokens.flatten(), minlength=3).float() / 4000
    torch.testing.assert_close(frequency, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_fixed_policy_commits_the_most_confident_candidates():
    confidence = torch.tensor([[0.9, 0.2, 0.8, 0.95]])
    candidates = torch.tensor([[True, True, True, False]])
    chosen = select_commits(confidence, candidates, torch.tensor([2]))
    assert chosen.tolist() == [[True, False, True, False]]


def test_threshold_policy_commits_above_threshold_and_at_least_the_count():
    confidence = torch.tensor([[0.9, 0.2, 0.8, 0.3], [0.1, 0.2, 0.3, 0.4]])
    candidates = torch.ones(2, 4, dtype=torch.bool)
    chosen = select_commits(confidence, candidates, torch.tensor([1, 1]), policy="threshold",
                            threshold=0.5)
    assert chosen.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_count_larger_than_candidates_is_clamped_and_bad_policy_refused():
    chosen = select_commits(torch.rand(1, 3), torch.tensor([[True, False, False]]),
                            torch.tensor([3]))
    assert chosen.tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="policy"):
        select_commits(torch.rand(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]),
                       policy="random")
    with pytest.raises(ValueError):
        sample_tokens(torch.randn(1, 2, 3), temperature=-1.0)
