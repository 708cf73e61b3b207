"""Stage-2 residual source "dirichlet": the first residual of the paper's v2, no reference model.
Checked against the objective written out by hand (tests/test_training.py's `hand_loss`) with
the same Dirichlet draws, and end to end through `train` and `rcd train`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training import FAST, TASK, hand_loss, task_batch, tiny_pair

from rcd_ext.cli import main
from rcd_ext.residual import dirichlet_logits
from rcd_ext.training import DiffusionArguments, diffusion_loss, draw_noise, train
from rcd_ext.training.objective import injected_residual


@pytest.mark.parametrize("concentration", [1.0, 0.3])
def test_dirichlet_loss_matches_hand_computation_with_the_same_draws(concentration):
    target, _, tokenizer = tiny_pair()
    mask_id = tokenizer.mask_token_id
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], no_residual_fraction=0.3,
                       generator=torch.Generator().manual_seed(3))
    positions = noise.masked & noise.residual[:, None]
    vocab = target.get_input_embeddings().weight.shape[0]
    torch.manual_seed(11)
    loss = diffusion_loss(target, batch, noise, mask_id=mask_id, stage="rcd",
                          residual_source="dirichlet", dirichlet_concentration=concentration)
    torch.manual_seed(11)  # the same global-RNG draws, one row per injected position
    rows = dirichlet_logits(int(positions.sum()), vocab, concentration)
    source_logits = torch.zeros(*positions.shape, vocab)
    source_logits[positions] = rows
    want = hand_loss(target, batch["input_ids"], batch["response_mask"], noise, mask_id,
                     source_logits)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # the residuals carried real weight: a flat Dirichlet row has alpha well above 0
    p = rows.exp()
    alpha = -(p * rows).sum(-1) / math.log(vocab)
    assert bool((alpha > 0.3).all())


def test_a_drawn_source_is_drawn_once_even_when_the_forward_is_recomputed():
    target, _, tokenizer = tiny_pair()
    noisy = task_batch()["input_ids"]
    positions = noisy == noisy[0, -1]
    calls = []

    def draw(vocab):
        calls.append(vocab)
        return torch.randn(int(positions.sum()), vocab)

    embedding = target.get_input_embeddings()
    with injected_residual(target, positions, draw, tokenizer.mask_token_id):
        first, second = embedding(noisy), embedding(noisy)  # e.g. gradient checkpointing
    assert calls == [embedding.weight.shape[0]]
    assert torch.equal(first, second)


def test_train_with_dirichlet_needs_no_reference_and_saves_its_options(tmp_path):
    target, _, tokenizer = tiny_pair()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    diffusion = DiffusionArguments(stage="rcd", residual_source="dirichlet",
                                   dirichlet_concentration=0.5)
    trainer = train(data=TASK, output_dir=str(tmp_path), model=target, tokenizer=tokenizer,
                    diffusion=diffusion, **FAST)
    assert trainer.state.global_step == 4
    assert any(not torch.equal(v, before[k]) for k, v in target.state_dict().items())
    saved = json.loads((tmp_path / "rcd_training.json").read_text())
    assert saved["residual_source"] == "dirichlet" and saved["dirichlet_concentration"] == 0.5


def test_dirichlet_concentration_must_be_positive():
    with pytest.raises(ValueError, match="dirichlet_concentration must be > 0"):
        DiffusionArguments(stage="rcd", residual_source="dirichlet", dirichlet_concentration=0)


def test_cli_dirichlet_source_runs_without_reference_and_reference_sources_still_need_one(
        tmp_path, capsys):
    assert main(["train", "--stage", "rcd", "--model", "tiny", "--data", "task:pointer_chasing",
                 "--output-dir", str(tmp_path / "ref")]) == 2
    assert "--residual-source previous-step needs --reference" in capsys.readouterr().err
    assert main(["train", "--stage", "rcd", "--model", "tiny", "--data", "task:pointer_chasing",
                 "--residual-source", "dirichlet", "--dirichlet-concentration", "0",
                 "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--dirichlet-concentration" in capsys.readouterr().err
    code = main(["train", "--stage", "rcd", "--model", "tiny", "--data", "task:pointer_chasing",
                 "--residual-source", "dirichlet", "--max-steps", "2", "--batch-size", "4",
                 "--threads", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "rcd_training.json").read_text())
    assert saved["stage"] == "rcd" and saved["residual_source"] == "dirichlet"
