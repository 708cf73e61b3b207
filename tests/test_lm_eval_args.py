"""`--model_args` of `rcd` / `seqd`: refused before any model load, one line naming the key;
defaults that fit the shipped demo checkpoints; prompts cut to the context are reported."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from test_lm_eval_model import save_tiny_model  # noqa: E402

import rcd_ext.models.adapters as adapters  # noqa: E402
from rcd_ext.demo.checkpoints import SHIPPED  # noqa: E402
from rcd_ext.integrations.lm_eval_args import (  # noqa: E402
    CheckpointFacts,
    ModelArgsError,
    check_model_args,
    read_checkpoint_facts,
)
from rcd_ext.integrations.lm_eval_model import RCDLM, SeqDLM  # noqa: E402
from rcd_ext.tasks import get_task  # noqa: E402

torch.set_num_threads(1)
DEMO = str(SHIPPED / "rcd")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-args"))  # context 64, no training file


@pytest.fixture
def no_model_load(monkeypatch) -> list[str]:
    """Replaces the loader; the list records every checkpoint something tried to load."""
    loaded: list[str] = []

    def refuse(name_or_path, **kwargs):
        loaded.append(name_or_path)
        raise AssertionError(f"model load of {name_or_path} before the model_args were checked")

    monkeypatch.setattr(adapters, "load_model", refuse)
    return loaded


# (model_args, the key the message must name, a phrase of the message)
REFUSED = [
    (f"pretrained={DEMO},steps=two", "steps='two'", "not an integer"),
    (f"pretrained={DEMO},remasking=foo", "remasking='foo'", "fixed, threshold"),
    (f"pretrained={DEMO},gen_length=10", "gen_length=10", "does not fit"),
    (f"pretrained={DEMO},gen_length=16,block_length=4", "gen_length=16", "<= 8"),
    (f"pretrained={DEMO},block_length=0", "block_length=0", "below 1"),
    (f"pretrained={DEMO},threshold=1.5", "threshold=1.5", "(0, 1]"),
    (f"pretrained={DEMO},top_p=0", "top_p=0", "(0, 1]"),
    (f"pretrained={DEMO},t_res=0", "t_res=0", "> 0"),
    (f"pretrained={DEMO},t_res=1e-39", "t_res=1e-39", "1 / t_res"),
    (f"pretrained={DEMO},alpha_scale=2", "alpha_scale=2", "[0, 1]"),
    (f"pretrained={DEMO},temperature=-1", "temperature=-1", ">= 0"),
    (f"pretrained={DEMO},cache=bogus", "cache='bogus'", "none, prefix, dual"),
    (f"pretrained={DEMO},strategy=bogus", "strategy='bogus'", "entropy"),
    (f"pretrained={DEMO},scope=bogus", "scope='bogus'", "block, all"),
    (f"pretrained={DEMO},init=reference", "init='reference'", "ref_model"),
    (f"pretrained={DEMO},dtype=float8", "dtype='float8'", "bfloat16"),
    (f"pretrained={DEMO},device=bogus", "device='bogus'", "torch device"),
    (f"pretrained={DEMO},stop_at_eos=maybe", "stop_at_eos='maybe'", "true or false"),
    (f"pretrained={DEMO},batch_size=0", "batch_size=0", "below 1"),
    (f"pretrained={DEMO},mc_num=none1", "mc_num='none1'", "not an integer"),
    (f"pretrained={DEMO},max_length=100", "max_length=100", "context of 24"),
    (f"pretrained={DEMO},gen_length=8,steps=3,block_length=4", "steps=3", "multiple of 2"),
    (f"pretrained={DEMO},steps=16", "steps=16", "exceeds gen_length=8"),
    (f"pretrained={DEMO},gen_lenght=8", "gen_lenght", "did you mean gen_length"),
    ("trust_remote_code=True", "pretrained", "missing"),
]


@pytest.mark.parametrize("model", [RCDLM, SeqDLM])
@pytest.mark.parametrize("arg_string, key, phrase", REFUSED)
def test_bad_model_args_are_refused_before_any_load(model, arg_string, key, phrase,
                                                    no_model_load) -> None:
    with pytest.raises(ModelArgsError) as caught:
        model.create_from_arg_string(arg_string, {"device": "cpu", "batch_size": 1})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{model.MODEL_NAME} model_args: ")
    assert key in message and phrase in message, message
    assert no_model_load == []


def test_gen_length_is_checked_where_the_context_is_known(tmp_path) -> None:
    # no config.json to read beforehand (a hub name not in the cache): checked after the load
    facts = CheckpointFacts()
    args = check_model_args("rcd", {"pretrained": "org/not-cached", "gen_length": 100,
                                    "block_length": 4}, residuals_default=True, facts=facts)
    assert args.gen_length == 100  # nothing known yet: accepted here
    path = save_tiny_model(tmp_path, max_positions=64)
    with pytest.raises(ModelArgsError, match=r"gen_length=100 does not fit.*context is 64"):
        RCDLM(pretrained=path, device="cpu", gen_length=100, block_length=4,
              max_length=None)


def test_demo_checkpoint_facts_come_from_its_config_and_training_record() -> None:
    task = get_task("coupled_choices")
    facts = read_checkpoint_facts(DEMO)
    assert facts == CheckpointFacts(context=24, model_block=None, task="coupled_choices",
                                    prompt_length=task.prompt_length,
                                    answer_length=task.answer_length)
    assert task.prompt_length + task.answer_length == 24


def test_defaults_fit_the_demo_checkpoint_and_decode_its_task() -> None:
    lm = RCDLM.create_from_arg_string(f"pretrained={DEMO}", {"device": "cpu", "batch_size": 4})
    assert lm.gen_length == 8 and lm.decoding.block_length == 8
    assert lm.decoding.steps is None  # generate's default: gen_length, one token per step
    task = get_task("coupled_choices")
    prompts, _ = task.sample_train(4, generator=torch.Generator().manual_seed(0))
    requests = [Instance("generate_until", {}, (task.prompt_text(p), {"until": [],
                                                                      "max_gen_toks": 8}), i)
                for i, p in enumerate(prompts)]
    answers = lm.generate_until(requests, disable_tqdm=True)
    ids = torch.stack([task.parse_answer(answer) for answer in answers])
    # the trained checkpoint, one token per step: right on these training problems
    assert bool(task.is_correct(prompts, ids).all()), answers


def test_model_args_device_wins_over_lm_evals_default_device(tiny_path) -> None:
    # lm-eval passes device="cuda:0" even without --device; model_args name the device
    lm = RCDLM.create_from_arg_obj({"pretrained": tiny_path, "device": "cpu", "gen_length": 8,
                                    "block_length": 4},
                                   {"device": "cuda:0", "batch_size": 2, "max_batch_size": None})
    assert lm.device == torch.device("cpu") and lm.batch_size == 2


def test_lm_eval_values_are_accepted_as_lm_eval_parses_them(tiny_path) -> None:
    lm = SeqDLM.create_from_arg_string(
        f"pretrained={tiny_path},gen_length=8,block_length=4,steps=4,threshold=0.5,"
        "remasking=threshold,stop_at_eos=false,t_res=0.92,residual_top_k=none,temperature=0",
        {"device": "cpu"})
    assert lm.decoding.steps == 4 and lm.decoding.threshold == 0.5
    assert lm.decoding.stop_at_eos is False and lm.residual.residual_top_k is None
    assert lm.residual.t_res == pytest.approx(0.92) and lm.temperature == 0.0
    assert lm.rcd is False


def test_block_length_default_is_at_most_half_the_context(tiny_path) -> None:
    args = check_model_args("rcd", {"pretrained": tiny_path}, residuals_default=True,
                            facts=CheckpointFacts(context=24))
    assert args.decoding.block_length == 12 and args.gen_length is None


def test_cut_prompts_are_reported_once_per_call_with_counts(tiny_path, caplog) -> None:
    lm = RCDLM(pretrained=tiny_path, device="cpu", gen_length=8, block_length=4, steps=4,
               batch_size=2)
    long_prompt = " ".join(["3"] * 80)  # 80 tokens; the context of 64 leaves 56 beside 8
    requests = [Instance("generate_until", {}, (long_prompt, {"until": []}), 0),
                Instance("generate_until", {}, ("3 4 5", {"until": []}), 1),
                Instance("generate_until", {}, (long_prompt + " 4", {"until": []}), 2)]
    with caplog.at_level(logging.WARNING):
        lm.generate_until(requests, disable_tqdm=True)
    warnings = [r.getMessage() for r in caplog.records if "cut from the left" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 of 3 generate_until prompts" in warnings[0]
    assert "dropping 24 to 25 tokens" in warnings[0] and "context of 64" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lm.generate_until(requests[1:2], disable_tqdm=True)
    assert not [r for r in caplog.records if "cut from the left" in r.getMessage()]


def test_generation_longer_than_the_context_allows_is_capped_with_a_warning(tiny_path,
                                                                            caplog) -> None:
    lm = RCDLM(pretrained=tiny_path, device="cpu", block_length=4)
    with caplog.at_level(logging.WARNING):
        assert lm._generation_length(256) == 32 and lm._generation_length(256) == 32
    assert lm._generation_length(6) == 8  # what fits is rounded up to whole blocks
    capped = [r.getMessage() for r in caplog.records if "max_gen_toks=256" in r.getMessage()]
    assert len(capped) == 1 and "generating 32" in capped[0]
