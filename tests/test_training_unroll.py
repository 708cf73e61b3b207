"""Stage-2 residual source "unroll": the target's own decoding loop from the noisy input.

The loss is checked against the loop and objective written out by hand, position by position
(an independent plain reference with the same global-RNG draws), and end to end through `train`
and `rcd train`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training import FAST, TASK, task_batch, tiny_pair

from rcd_ext.cli import main
from rcd_ext.training import DiffusionArguments, diffusion_loss, draw_noise, train
from rcd_ext.training.objective import masked_diffusion_loss, model_logits


def residual_embeds(table, mask_id, ids, residual_logits):
    """Input embeddings with (1 - alpha) E[M] + alpha p E at every (b, i) in residual_logits."""
    embeds = table[ids].clone()
    vocab = table.shape[0]
    for (b, i), z in residual_logits.items():
        p = torch.softmax(z, -1)
        alpha = -(p * torch.log(p.clamp_min(1e-30))).sum() / math.log(vocab)
        embeds[b, i] = (1 - alpha) * table[mask_id] + alpha * (p @ table)
    return embeds


def hand_unrolled_loss(target, batch, noise, mask_id, max_steps, fraction, commits="truth"):
    """The unroll source written out plainly: draws, loop, commits and loss."""
    input_ids, response = batch["input_ids"], batch["response_mask"]
    table = target.get_input_embeddings().weight.detach()
    vocab = table.shape[0]
    unrolls = bool(torch.rand(()) < fraction)
    k = int(torch.randint(0, max_steps + 1, ()))
    k = k if unrolls else 0
    ids = input_ids.masked_fill(noise.masked, mask_id)
    still = noise.masked.clone()
    rows = noise.residual.tolist()
    # the Dirichlet(1) init, one row per residual position in row-major order
    draws = -torch.log(torch.rand(int((still & noise.residual[:, None]).sum()), vocab)
                       .clamp_min(1e-30))
    draws = torch.log(draws / draws.sum(-1, keepdim=True))
    positions = [(b, i) for b, i in still.nonzero().tolist() if rows[b]]
    residual = dict(zip(positions, draws, strict=True))
    plan = {}
    for b in range(ids.shape[0]):
        m = int(still[b].sum()) if rows[b] else 0
        kept = math.ceil(m / (k + 1)) if k else m
        plan[b] = [(m - kept) // k + (step < (m - kept) % k) for step in range(k)]
    target.eval()
    with torch.no_grad():
        for step in range(k):
            logits = target(inputs_embeds=residual_embeds(table, mask_id, ids, residual)).logits
            residual = {}
            for b in range(ids.shape[0]):
                z = logits[b].clone()
                z[:, mask_id] = -math.inf
                confidence, tokens = torch.softmax(z, -1).max(-1)
                open_positions = [i for i in range(ids.shape[1]) if still[b, i]]
                ranked = sorted(open_positions, key=lambda i: -float(confidence[i]))
                for i in ranked[:plan[b][step]]:
                    ids[b, i] = input_ids[b, i] if commits == "truth" else tokens[i]
                    still[b, i] = False
                if rows[b]:
                    residual.update({(b, i): logits[b, i] for i in range(ids.shape[1])
                                     if still[b, i]})
    target.train()
    logits = target(inputs_embeds=residual_embeds(table, mask_id, ids, residual)).logits
    log_p = torch.log_softmax(logits, -1).gather(-1, input_ids[..., None])[..., 0]
    t = noise.t.clone()
    if k:
        for b in range(ids.shape[0]):
            if rows[b]:
                t[b] = max(int(still[b].sum()), 1) / int(response[b].sum())
    return (-log_p * still / t[:, None]).sum() / response.sum(), ids, still, k


@pytest.mark.parametrize("max_steps,fraction,seed,commits", [
    (3, 1.0, 5, "truth"), (3, 1.0, 5, "model"), (2, 1.0, 8, "model"), (3, 0.0, 5, "truth")])
def test_unroll_loss_matches_the_loop_written_out_by_hand(max_steps, fraction, seed, commits):
    target, _, tokenizer = tiny_pair()
    mask_id = tokenizer.mask_token_id
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], no_residual_fraction=0.3,
                       generator=torch.Generator().manual_seed(5))
    assert noise.residual.any() and not noise.residual.all()
    torch.manual_seed(seed)
    loss = diffusion_loss(target, batch, noise, mask_id=mask_id, stage="rcd",
                          residual_source="unroll", unroll_steps=max_steps,
                          unroll_fraction=fraction, unroll_commits=commits)
    assert target.training  # the loop ran in eval mode and gave the mode back
    torch.manual_seed(seed)
    want, ids, still, k = hand_unrolled_loss(target, batch, noise, mask_id, max_steps, fraction,
                                             commits)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert (k > 0) == (fraction > 0)  # these seeds draw k > 0 when the step unrolls
    if k:
        # the loop committed tokens, yet every row that had masks keeps one for the loss
        assert int((noise.masked & ~still).sum()) > 0
        had_masks = noise.masked.any(1)
        assert bool(still[had_masks].any(1).all())


def test_unroll_with_a_cold_first_step_and_no_unroll_is_the_seqd_loss():
    target, _, tokenizer = tiny_pair()
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], generator=torch.Generator().manual_seed(1))
    loss = diffusion_loss(target, batch, noise, mask_id=tokenizer.mask_token_id, stage="rcd",
                          residual_source="unroll", unroll_fraction=0.0, unroll_init="cold")
    noisy = batch["input_ids"].masked_fill(noise.masked, tokenizer.mask_token_id)
    want = masked_diffusion_loss(model_logits(target, noisy, None), batch["input_ids"], noise,
                                 batch["response_mask"])
    torch.testing.assert_close(loss, want)


def test_unroll_commits_model_or_truth_and_no_gradient_flows_through_the_loop():
    target, _, tokenizer = tiny_pair()
    mask_id = tokenizer.mask_token_id
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], generator=torch.Generator().manual_seed(2))
    states = {}
    for commits in ("model", "truth"):
        torch.manual_seed(0)
        states[commits] = hand_unrolled_loss(target, batch, noise, mask_id, 3, 1.0, commits)
    _, ids, still, k = states["model"]
    assert k > 0
    committed = noise.masked & ~still
    # an untrained target commits tokens that are not the answer: the state is on-policy
    assert bool((ids[committed] != batch["input_ids"][committed]).any())
    _, ids, still, _ = states["truth"]
    committed = noise.masked & ~still
    assert committed.any() and torch.equal(ids[committed], batch["input_ids"][committed])
    torch.manual_seed(0)
    loss = diffusion_loss(target, batch, noise, mask_id=mask_id, stage="rcd",
                          residual_source="unroll", unroll_steps=3)
    loss.backward()
    grads = [p.grad for p in target.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_train_with_unroll_needs_no_reference_and_saves_its_options(tmp_path):
    target, _, tokenizer = tiny_pair()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    diffusion = DiffusionArguments(stage="rcd", residual_source="unroll", unroll_steps=2,
                                   unroll_init="cold")
    trainer = train(data=TASK, output_dir=str(tmp_path), model=target, tokenizer=tokenizer,
                    diffusion=diffusion, **FAST)
    assert trainer.state.global_step == 4
    assert any(not torch.equal(v, before[k]) for k, v in target.state_dict().items())
    saved = json.loads((tmp_path / "rcd_training.json").read_text())
    assert (saved["residual_source"], saved["unroll_steps"], saved["unroll_init"]) == (
        "unroll", 2, "cold")


@pytest.mark.parametrize("field,value,message", [
    ("unroll_steps", 0, "unroll_steps must be >= 1"),
    ("unroll_fraction", 1.5, "unroll_fraction must be in [0, 1]"),
    ("unroll_init", "reference", "unroll_init must be one of ('cold', 'dirichlet')"),
    ("unroll_commits", "mixed", "unroll_commits must be one of ('truth', 'model')"),
])
def test_unroll_options_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        DiffusionArguments(stage="rcd", residual_source="unroll", **{field: value})


def test_cli_unroll_source_runs_without_reference(tmp_path, capsys):
    assert main(["train", "--stage", "rcd", "--model", "tiny", "--data", "task:pointer_chasing",
                 "--residual-source", "unroll", "--unroll-steps", "0",
                 "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--unroll-steps: expected an integer >= 1, got 0" in capsys.readouterr().err
    code = main(["train", "--stage", "rcd", "--model", "tiny", "--data", "task:pointer_chasing",
                 "--residual-source", "unroll", "--unroll-steps", "2", "--max-steps", "2",
                 "--batch-size", "4", "--threads", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "rcd_training.json").read_text())
    assert saved["residual_source"] == "unroll" and saved["unroll_steps"] == 2


def test_resume_of_an_unroll_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    """k and the Dirichlet init come from the global RNG, which the checkpoint restores."""
    diffusion = DiffusionArguments(stage="rcd", residual_source="unroll", unroll_steps=3,
                                   unroll_fraction=0.7)
    settings = {**FAST, "max_steps": 6, "save_steps": 3}

    def run(output, seed, resume=None):
        target, _, tokenizer = tiny_pair(seed=seed)
        train(data=TASK, output_dir=str(output), model=target, tokenizer=tokenizer,
              diffusion=diffusion, resume_from_checkpoint=resume, **settings)
        return target

    whole = run(tmp_path / "whole", 0)
    run(tmp_path / "cut", 0)
    # a run from other initial weights resumed at step 3 can only match by a real resume
    resumed = run(tmp_path / "cut", 5, resume=str(tmp_path / "cut" / "checkpoint-3"))
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key


def test_k_covers_the_first_step_and_the_fraction_turns_unrolling_off():
    from rcd_ext.training.unroll import draw_unroll_steps

    torch.manual_seed(0)
    drawn = [draw_unroll_steps(2, 1.0) for _ in range(300)]
    assert set(drawn) == {0, 1, 2}  # k = 0 trains the loop's first step, as inference runs it
    assert all(draw_unroll_steps(4, 0.0) == 0 for _ in range(50))
    half = [draw_unroll_steps(4, 0.5) for _ in range(2000)]
    assert 0.55 < half.count(0) / len(half) < 0.65  # 1/2 + 1/2 * 1/5
