"""Two-stage RCD training: the loss against a hand computation, freezing, injection, resume,
reload into generate, and the errors users meet first."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil

import pytest
import torch

from rcd_ext.models import TinyDLLMConfig, TinyDLLMModel
from rcd_ext.training import (
    DiffusionArguments,
    DiffusionCollator,
    DiffusionTrainer,
    TaskStream,
    build_tiny_model,
    diffusion_loss,
    draw_noise,
    train,
    training_arguments,
)
from rcd_ext.training.checkpoint_integrity import (
    COMPLETE_MARKER,
    checkpoint_problem,
    resolve_resume,
)
from rcd_ext.training.data import load_jsonl, load_training_data
from rcd_ext.training.objective import injected_residual

TASK = "task:pointer_chasing:num_symbols=5,hops=4"
FAST = dict(max_steps=4, per_device_train_batch_size=8, warmup_steps=1, logging_steps=2,
            save_steps=1000, learning_rate=1e-2)


def tiny_pair(seed: int = 0):
    """Two differently initialised tiny models sharing one tokenizer."""
    target, tokenizer = build_tiny_model(TASK, hidden_size=16, layers=1, heads=2, seed=seed)
    reference, _ = build_tiny_model(TASK, hidden_size=16, layers=1, heads=2, seed=seed + 1)
    return target, reference, tokenizer


def task_batch(size: int = 6):
    stream = iter(TaskStream(load_training_data(TASK).task, seed=3, chunk=size))
    return DiffusionCollator(pad_id=0)([next(stream) for _ in range(size)])


def hand_loss(target, input_ids, response, noise, mask_id, source_logits=None):
    """The objective written out with plain torch, position by position where it is clearer."""
    noisy = input_ids.clone()
    noisy[noise.masked] = mask_id
    table = target.get_input_embeddings().weight.detach()
    embeds = table[noisy].clone()
    if source_logits is not None:
        vocab = source_logits.shape[-1]
        for b, i in zip(*torch.nonzero(noise.masked & noise.residual[:, None], as_tuple=True),
                        strict=True):
            p = torch.softmax(source_logits[b, i], -1)
            alpha = -(p * torch.log(p)).sum() / math.log(vocab)
            embeds[b, i] = (1 - alpha) * table[mask_id] + alpha * (p @ table)
    logits = target(inputs_embeds=embeds).logits
    log_p = torch.log_softmax(logits, -1).gather(-1, input_ids[..., None])[..., 0]
    per_token = -log_p * noise.masked / noise.t[:, None]
    return per_token.sum() / response.sum()


def test_seqd_loss_matches_hand_computation():
    target, _, tokenizer = tiny_pair()
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], generator=torch.Generator().manual_seed(1))
    loss = diffusion_loss(target, batch, noise, mask_id=tokenizer.mask_token_id, stage="seqd")
    want = hand_loss(target, batch["input_ids"], batch["response_mask"], noise,
                     tokenizer.mask_token_id)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert not noise.masked[:, :TaskStream(load_training_data(TASK).task).task.prompt_length].any()


@pytest.mark.parametrize("source", ["same", "previous-step", "self"])
def test_rcd_loss_matches_hand_computation(source):
    target, reference, tokenizer = tiny_pair()
    mask_id = tokenizer.mask_token_id
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], no_residual_fraction=0.3,
                       generator=torch.Generator().manual_seed(2))
    assert noise.residual.any() and noise.extra.any()
    loss = diffusion_loss(target, batch, noise, mask_id=mask_id, stage="rcd",
                          reference=reference, residual_source=source)
    source_ids = batch["input_ids"].masked_fill(noise.masked, mask_id)
    if source != "same":
        source_ids = source_ids.masked_fill(noise.extra, mask_id)
    with torch.no_grad():
        source_logits = (target if source == "self" else reference)(input_ids=source_ids).logits
    want = hand_loss(target, batch["input_ids"], batch["response_mask"], noise, mask_id,
                     source_logits)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # the loss must differ from SeqD's on the same noise: the residual is really there
    seqd = diffusion_loss(target, batch, noise, mask_id=mask_id, stage="seqd")
    assert abs(loss.item() - seqd.item()) > 1e-6
    # gradients reach the target only
    loss.backward()
    assert target.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in reference.parameters())


def test_residuals_only_at_masked_positions():
    target, reference, tokenizer = tiny_pair()
    mask_id = tokenizer.mask_token_id
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], no_residual_fraction=0.5,
                       generator=torch.Generator().manual_seed(5))
    noisy = batch["input_ids"].masked_fill(noise.masked, mask_id)
    positions = noise.masked & noise.residual[:, None]
    embedding = target.get_input_embeddings()
    plain = embedding(noisy)
    with torch.no_grad():
        logits = reference(input_ids=noisy).logits
    with injected_residual(target, positions, logits, mask_id):
        injected = embedding(noisy)
    changed = (injected - plain).abs().amax(-1) > 0
    assert positions.any()
    assert torch.equal(changed, positions)
    assert torch.equal(embedding(noisy), plain)  # the hook is gone afterwards


def test_reference_stays_frozen_and_target_trains(tmp_path):
    target, reference, tokenizer = tiny_pair()
    before_ref = {k: v.clone() for k, v in reference.state_dict().items()}
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    trainer = train(data=TASK, output_dir=str(tmp_path), model=target, tokenizer=tokenizer,
                    reference=reference, diffusion=DiffusionArguments(stage="rcd"), **FAST)
    assert trainer.state.global_step == 4
    for key, value in reference.state_dict().items():
        assert torch.equal(value, before_ref[key]), key
    assert all(not p.requires_grad for p in reference.parameters())
    assert any(not torch.equal(v, before_target[k]) for k, v in target.state_dict().items())


def resumable_run(output, target_seed, resume=None):
    """6 steps of stage rcd, checkpoints at 3 and 6; the target starts from `target_seed`."""
    target, _, tokenizer = tiny_pair(seed=target_seed)
    _, reference, _ = tiny_pair()  # the same reference in every run
    trainer = train(data=TASK, output_dir=str(output), model=target, tokenizer=tokenizer,
                    reference=reference, resume_from_checkpoint=resume,
                    diffusion=DiffusionArguments(stage="rcd", no_residual_fraction=0.3),
                    **{**FAST, "max_steps": 6, "save_steps": 3})
    return trainer, target


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(trainer, model, output dir) of a run that was never interrupted."""
    output = tmp_path_factory.mktemp("whole")
    return (*resumable_run(output, 0), output)


def test_resume_past_a_torn_last_checkpoint_reproduces_uninterrupted_run(
        tmp_path, monkeypatch, capsys, uninterrupted):
    import transformers.modeling_utils as modeling_utils

    whole_trainer, whole, _ = uninterrupted
    real_save = modeling_utils.safe_save_file
    saves = []

    def disk_full_at_second_save(tensors, filename, metadata=None):
        saves.append(filename)
        if len(saves) < 2:
            return real_save(tensors, filename, metadata=metadata)
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # half of the file reached the disk
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    # The run dies saving checkpoint-6, as a full disk or a kill mid-save leaves it.
    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full_at_second_save)
    with pytest.raises(OSError, match="No space left"):
        resumable_run(tmp_path, 0)
    monkeypatch.undo()
    assert checkpoint_problem(tmp_path / "checkpoint-6").startswith(
        "trainer_state.json is missing")
    capsys.readouterr()
    # --resume: the torn checkpoint-6 is named and skipped. The resumed run starts from other
    # initial weights, so only a real resume from checkpoint-3 (weights, optimizer, data
    # position, RNG) can end where the uninterrupted run ended.
    resumed_trainer, resumed = resumable_run(tmp_path, 7, resume=True)
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [f"warning: {tmp_path / 'checkpoint-6'} is incomplete (trainer_state.json "
                       "is missing (the save did not finish)); resuming from checkpoint-3 "
                       "instead"]
    assert resumed_trainer.state.global_step == 6
    # steps 1-3 were not run again: the resumed trainer saw half the tokens
    assert resumed_trainer._tokens_seen * 2 == whole_trainer._tokens_seen > 0
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key
    last = [t.state.log_history[-2] for t in (whole_trainer, resumed_trainer)]
    assert last[0]["step"] == last[1]["step"] == 6 and last[0]["loss"] == last[1]["loss"]
    assert checkpoint_problem(tmp_path / "checkpoint-6") is None  # saved again, whole


def truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


TEARS = {  # what a kill or a full disk mid-save leaves, and what the check says about it
    "truncated weights": (lambda c: truncate(c / "model.safetensors"),
                          "model.safetensors has .* bytes, .* were saved"),
    "missing trainer state": (lambda c: (c / "trainer_state.json").unlink(),
                              "trainer_state.json is missing"),
    "truncated optimizer": (lambda c: truncate(c / "optimizer.pt"),
                            "optimizer.pt has .* bytes, .* were saved"),
    "truncated tokenizer": (lambda c: truncate(c / "tokenizer.json"),
                            "tokenizer.json has .* bytes"),
}
UNMARKED_TEARS = {  # the same without the completion marker (stock Trainer, older saves)
    "truncated weights": (lambda c: truncate(c / "model.safetensors"),
                          r"model.safetensors is truncated \(\d+ of \d+ bytes\)"),
    "truncated trainer state": (lambda c: truncate(c / "trainer_state.json"),
                                "trainer_state.json is truncated"),
    "truncated optimizer": (lambda c: truncate(c / "optimizer.pt"),
                            r"optimizer.pt is truncated \(not a whole zip archive\)"),
    "missing optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "truncated rng state": (lambda c: truncate(c / "rng_state.pth"), "rng_state.pth is trunc"),
    "missing rng state": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
}


def torn_copy(uninterrupted, tmp_path, tear, marked=True):
    """checkpoint-3 (complete) and a torn checkpoint-6, copied from the uninterrupted run."""
    source = uninterrupted[2]
    for name in ("checkpoint-3", "checkpoint-6"):
        shutil.copytree(source / name, tmp_path / name)
    torn = tmp_path / "checkpoint-6"
    if not marked:
        (torn / COMPLETE_MARKER).unlink()
    tear(torn)
    return torn


@pytest.mark.parametrize("kind", sorted(TEARS))
def test_torn_checkpoint_with_marker_is_detected(tmp_path, uninterrupted, kind):
    tear, reason = TEARS[kind]
    torn = torn_copy(uninterrupted, tmp_path, tear)
    assert re.match(reason, checkpoint_problem(torn))
    assert resolve_resume(True, tmp_path, say=False) == str(tmp_path / "checkpoint-3")


@pytest.mark.parametrize("kind", sorted(UNMARKED_TEARS))
def test_torn_checkpoint_without_marker_is_detected(tmp_path, uninterrupted, kind):
    tear, reason = UNMARKED_TEARS[kind]
    torn = torn_copy(uninterrupted, tmp_path, tear, marked=False)
    assert re.match(reason, checkpoint_problem(torn))
    assert checkpoint_problem(tmp_path / "checkpoint-3") is None


def test_complete_checkpoints_pass_with_and_without_marker(tmp_path, uninterrupted):
    torn = torn_copy(uninterrupted, tmp_path, lambda c: None, marked=False)
    assert checkpoint_problem(torn) is None
    assert resolve_resume(True, tmp_path) == str(torn)
    assert json.loads((uninterrupted[2] / "checkpoint-6" / COMPLETE_MARKER).read_text())[
        "files"]["model.safetensors"] > 0


def test_nothing_complete_to_resume_from_is_one_line_error(tmp_path, uninterrupted):
    with pytest.raises(ValueError, match=r"no complete checkpoint .* \(no checkpoint-N dir"):
        resolve_resume(True, tmp_path)
    torn_copy(uninterrupted, tmp_path, TEARS["truncated weights"][0])
    truncate(tmp_path / "checkpoint-3" / "optimizer.pt")
    with pytest.raises(ValueError) as raised:
        resolve_resume(True, tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert "checkpoint-6: model.safetensors has" in message
    assert "checkpoint-3: optimizer.pt has" in message
    with pytest.raises(ValueError, match="resume checkpoint .*checkpoint-6 is incomplete: "):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    assert resolve_resume(None, tmp_path) is None


def test_checkpoint_reloads_into_generate(tmp_path, capsys):
    from rcd_ext.cli import main
    from rcd_ext.decoding import generate
    from rcd_ext.models.adapters import load_model

    assert main(["train", "--stage", "seqd", "--model", "tiny", "--data", TASK,
                 "--output-dir", str(tmp_path / "ref"), "--max-steps", "3", "--batch-size", "8",
                 "--hidden-size", "16", "--layers", "1", "--heads", "2",
                 "--save-steps", "1000"]) == 0
    assert main(["train", "--stage", "rcd", "--reference", str(tmp_path / "ref"), "--data", TASK,
                 "--output-dir", str(tmp_path / "rcd"), "--max-steps", "2", "--batch-size", "8",
                 "--save-steps", "1000"]) == 0
    model, tokenizer = load_model(str(tmp_path / "rcd"))
    reference, _ = load_model(str(tmp_path / "ref"))
    task = load_training_data(TASK).task
    prompt, _ = task.test_set(1)[0]
    out = generate(model, prompt, tokenizer=tokenizer, gen_length=4, block_length=4,
                   init="reference", ref_model=reference, stop_at_eos=False)
    assert out.tokens.shape == (1, 4)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "rcd"), "--ref-model",
                 str(tmp_path / "ref"), "--prompt", task.prompt_text(prompt), "--gen-length",
                 "4", "--block-length", "4"]) == 0
    assert "RCD" in capsys.readouterr().out
    saved = json.loads((tmp_path / "rcd" / "rcd_training.json").read_text())
    assert saved["stage"] == "rcd" and saved["residual_source"] == "previous-step"


def test_tokenizer_mismatch_is_refused(tmp_path):
    target, _, tokenizer = tiny_pair()
    other_tokenizer = load_training_data("task:pointer_chasing").task.build_tokenizer()
    other = TinyDLLMModel(TinyDLLMConfig(vocab_size=len(other_tokenizer), hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         mask_token_id=1))
    with pytest.raises(ValueError, match="reference vocab .* != target vocab"):
        DiffusionTrainer(model=target, args=training_arguments(str(tmp_path)),
                         train_dataset=load_training_data(TASK),
                         data_collator=DiffusionCollator(0), processing_class=tokenizer,
                         diffusion=DiffusionArguments(stage="rcd"), reference=other)
    with pytest.raises(ValueError, match="needs a reference"):
        DiffusionTrainer(model=target, args=training_arguments(str(tmp_path)),
                         train_dataset=load_training_data(TASK),
                         data_collator=DiffusionCollator(0), processing_class=tokenizer,
                         diffusion=DiffusionArguments(stage="rcd", residual_source="same"))


def test_bad_rows_name_file_and_line(tmp_path):
    _, _, tokenizer = tiny_pair()
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "s0 s1", "response": "s2"})
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"prompt": "s0"}): "expected keys 'prompt' and 'response'",
        json.dumps({"messages": [{"role": "user", "content": "s0"}]}): "'messages' must be",
        json.dumps({"messages": [{"role": "user", "content": "s0"},
                                 {"role": "user", "content": "s1"}]}): "last message",
        json.dumps([1, 2]): "expected a JSON object",
    }
    for bad, message in cases.items():
        path.write_text(good + "\n\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"{path}:3: .*{message}"):
            load_jsonl(path, tokenizer)


def test_jsonl_rows_and_collator():
    _, _, tokenizer = tiny_pair()
    symbols = load_training_data(TASK).task.symbols
    rows = [{"prompt": f"{symbols[0]} {symbols[1]}", "response": symbols[2]},
            {"messages": [{"role": "user", "content": symbols[3]},
                          {"role": "assistant", "content": f"{symbols[4]} {symbols[0]}"}]}]
    from rcd_ext.training.data import tokenize_row

    examples = [tokenize_row(row, tokenizer, f"row {i}") for i, row in enumerate(rows)]
    batch = DiffusionCollator(pad_id=tokenizer.pad_token_id)(examples)
    eos = tokenizer.eos_token_id
    assert batch["input_ids"].tolist()[0] == tokenizer(rows[0]["prompt"])["input_ids"] + [
        tokenizer.convert_tokens_to_ids(symbols[2]), eos]
    assert batch["response_mask"].tolist() == [[False, False, True, True],
                                               [False, True, True, True]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    noise = draw_noise(batch["response_mask"], generator=torch.Generator().manual_seed(0))
    assert not (noise.masked & ~batch["response_mask"]).any()


def test_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    _, _, tokenizer = tiny_pair()
    symbols = load_training_data(TASK).task.symbols
    datasets.Dataset.from_list([{"prompt": symbols[0], "response": symbols[1]}] * 3).save_to_disk(
        str(tmp_path / "ds"))
    data = load_training_data(str(tmp_path / "ds"), tokenizer)
    assert len(data) == 3 and data[0]["prompt_length"] == 1
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_training_data(str(tmp_path / "missing.jsonl"), tokenizer)


def test_loss_is_finite_and_bounded_for_eps():
    target, _, tokenizer = tiny_pair()
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], eps=0.5, generator=torch.Generator().manual_seed(0))
    assert (noise.t >= 0.5).all()
    loss = diffusion_loss(target, batch, noise, mask_id=tokenizer.mask_token_id)
    assert torch.isfinite(loss)


def test_injection_reaches_through_ddp_style_wrappers():
    target, reference, tokenizer = tiny_pair()
    batch = task_batch()
    noise = draw_noise(batch["response_mask"], generator=torch.Generator().manual_seed(4))

    class Wrapper(torch.nn.Module):  # the shape of DDP/FSDP: the model sits in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    kwargs = dict(mask_id=tokenizer.mask_token_id, stage="rcd", reference=reference)
    torch.testing.assert_close(diffusion_loss(Wrapper(target), batch, noise, **kwargs),
                               diffusion_loss(target, batch, noise, **kwargs))


def test_chat_template_renders_the_prompt():
    from rcd_ext.training.data import tokenize_row

    _, _, tokenizer = tiny_pair()
    symbols = load_training_data(TASK).task.symbols
    # a template that wraps every message in [BOS] ... and adds [BOS] as generation prompt
    tokenizer.chat_template = ("{% for m in messages %}[BOS] {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}[BOS]{% endif %}")
    row = {"messages": [{"role": "user", "content": symbols[0]},
                        {"role": "assistant", "content": symbols[1]}]}
    example = tokenize_row(row, tokenizer, "row")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first, second = (tokenizer.convert_tokens_to_ids(s) for s in symbols[:2])
    assert example["input_ids"].tolist() == [bos, first, bos, second, eos]
    assert example["prompt_length"] == 3
