"""RCD's registration, launch-time decisions, config errors and per-request refusals, against
SGLang's real plugin loader, algorithm table, CUDA-graph config and SamplingParams."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.dllm.algorithm")

from sglang.srt.arg_groups import model_override_base  # noqa: E402
from sglang.srt.model_executor.cuda_graph_config import Backend, CudaGraphConfig  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from rcd_ext.integrations.sglang.algorithm import RCD  # noqa: E402
from rcd_ext.integrations.sglang.config import RCDServingConfig  # noqa: E402
from rcd_ext.integrations.sglang.server_args import rcd_launch_decisions  # noqa: E402

PROBE = """
import sys
from sglang.srt.dllm.algorithm import algo_name_to_cls, get_algorithm_cls
assert "RCD" not in algo_name_to_cls  # SGLang's own scan does not find it
from sglang.srt.plugins import load_plugins
load_plugins()
cls = get_algorithm_cls("RCD")
print(cls.__module__, cls.__mro__[1].__name__)
"""


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    # cwd outside the checkout: a stale rcd_ext.egg-info there would shadow the installed
    # distribution's entry points
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",
                                                                     "SGLANG_PLUGINS")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**environment, **env})


def test_load_plugins_registers_rcd_in_a_fresh_process(tmp_path: Path):
    done = _probe(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["rcd_ext.integrations.sglang.algorithm", "LowConfidence"]
    # with the plugin filtered out by SGLang's own switch, RCD stays unknown
    skipped = _probe(tmp_path, SGLANG_PLUGINS="some_other_plugin")
    assert skipped.returncode != 0 and "Unknown diffusion LLM algorithm: RCD" in skipped.stderr


def _view(tmp_path: Path, yaml_text: str | None = None, **fields):
    path = None
    if yaml_text is not None:
        path = tmp_path / "rcd.yaml"
        path.write_text(yaml_text)
    defaults = {"dllm_algorithm_config": path, "pp_size": 1, "tp_size": 1,
                "cuda_graph_config": CudaGraphConfig()}
    return SimpleNamespace(**{**defaults, **fields})


def test_launch_turns_cuda_graphs_off_for_both_phases(tmp_path: Path):
    view = _view(tmp_path, "t_res: 0.8\nthreshold: 0.9\nresidual_top_k: 64\n", tp_size=2)
    assert view.cuda_graph_config.decode.backend == Backend.FULL  # SGLang's default
    decisions = rcd_launch_decisions(view, "SDARForCausalLM")
    graphs = decisions["cuda_graph_config"]
    assert graphs.decode.backend == graphs.prefill.backend == Backend.DISABLED
    assert set(decisions) == {"cuda_graph_config"}  # radix cache and chunked prefill untouched


@pytest.mark.parametrize(("yaml_text", "architecture", "fields", "message"), [
    (None, "LLaDA2MoeModelLM", {}, "model architecture LLaDA2MoeModelLM is not supported"),
    (None, "SDARForCausalLM", {"pp_size": 2}, "pipeline parallelism is not supported"),
    ("t_rez: 0.9\n", "SDARForCausalLM", {}, "unknown key 't_rez'"),
    ("strategy: max\n", "SDARForCausalLM", {}, "strategy must be one of entropy"),
    ("init: reference\n", "SDARForCausalLM", {}, "init must be one of cold, dirichlet"),
    ("alpha_scale: 1.5\n", "SDARForCausalLM", {}, "alpha_scale must be a number in [0, 1]"),
])
def test_launch_refuses_with_one_line(tmp_path, yaml_text, architecture, fields, message):
    with pytest.raises(ValueError) as error:
        rcd_launch_decisions(_view(tmp_path, yaml_text, **fields), architecture)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_configure_server_args_declares_through_sglang(tmp_path, monkeypatch):
    server_args = SimpleNamespace()
    view = _view(tmp_path, "alpha_scale: 0.5\n")
    monkeypatch.setattr(model_override_base, "resolving_view", lambda args: view)
    hf = SimpleNamespace(architectures=["SDARForCausalLM"])
    monkeypatch.setattr(model_override_base, "model_config_of",
                        lambda args: SimpleNamespace(hf_config=hf))
    RCD.configure_server_args(server_args)
    (source, declared), = server_args._resolved_overrides
    assert source == "RCD"
    assert declared["cuda_graph_config"].decode.backend == Backend.DISABLED
    hf.architectures = ["Qwen3ForCausalLM"]
    with pytest.raises(ValueError, match="Qwen3ForCausalLM is not supported"):
        RCD.configure_server_args(SimpleNamespace())


def _req(**sampling) -> SimpleNamespace:
    return SimpleNamespace(sampling_params=SamplingParams(**sampling), return_logprob=False,
                           custom_logit_processor=None)


def test_validate_request_refuses_what_rcd_cannot_honour():
    assert RCD.validate_request(_req(temperature=0.0, max_new_tokens=16)) is None
    message = RCD.validate_request(_req(regex="[a-z]+", logit_bias={"3": 1.0}))
    assert message.startswith("RCD does not support request-level regex, logit_bias")
    logprobs = _req()
    logprobs.return_logprob = True
    assert "return_logprob" in RCD.validate_request(logprobs)


def test_config_defaults_and_sglang_keys():
    config = RCDServingConfig.from_mapping({"block_size": 32, "residual_top_k": 16})
    assert (config.threshold, config.t_res, config.init, config.block_size) == (0.95, 1.0,
                                                                               "cold", 32)
    with pytest.raises(ValueError, match="residual_top_k must be an integer >= 1"):
        RCDServingConfig.from_mapping({"residual_top_k": 0})
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        RCDServingConfig.from_mapping([1, 2])
