"""Launch-time decisions of the RCD algorithm (`RCD.configure_server_args`) and its per-request
refusals (`RCD.validate_request`).

CUDA graphs: SGLang 0.5.23's dLLM graph replay copies `forward_batch.input_embeds` into its
buffers only for algorithms with a separate context pass (`requires_separate_context_encoding`,
Gemma4Renoise); for any other algorithm a replayed graph would read the token ids and silently
drop the residuals. RCD therefore turns CUDA graphs off for both phases (every denoising forward
runs eagerly; docs/serving.md gives the cost). The radix cache and chunked prefill stay as they
are: a block's KV is persisted by its last forward, which sees only committed tokens and so
plain embeddings, so cached prefixes are the same as LowConfidence's.
"""

from __future__ import annotations

import logging
from typing import Any

from rcd_ext.integrations.sglang.config import RCDServingConfig

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("SDARForCausalLM", "SDARMoeForCausalLM")
# (attribute of SamplingParams or Req, its neutral value)
_REFUSED_SAMPLING = (("json_schema", None), ("regex", None), ("ebnf", None),
                     ("structural_tag", None), ("logit_bias", None))
_REFUSED_REQUEST = (("return_logprob", False), ("custom_logit_processor", None))


def rcd_launch_decisions(view: Any, architecture: str) -> dict[str, Any]:
    """The server-argument fields RCD declares, from a resolved view of the arguments; ValueError
    (one line, with the fix) for what RCD cannot serve."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    RCDServingConfig.from_yaml(view.dllm_algorithm_config)  # every config error, at launch
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"--dllm-algorithm RCD: model architecture {architecture} is not "
                         f"supported (RCD serves {', '.join(SUPPORTED_ARCHITECTURES)})")
    if view.pp_size > 1:
        raise ValueError("--dllm-algorithm RCD: pipeline parallelism is not supported "
                         "(use --pp-size 1)")
    graphs = view.cuda_graph_config
    if Backend.DISABLED != graphs.decode.backend or Backend.DISABLED != graphs.prefill.backend:
        logger.warning("RCD: CUDA graphs disabled (SGLang's dLLM graph replay does not carry "
                       "input_embeds for this algorithm); every denoising step runs eagerly")
    for phase in (Phase.DECODE, Phase.PREFILL):
        graphs = with_phase(graphs, phase, backend=Backend.DISABLED)
    return {"cuda_graph_config": graphs}


def configure_rcd_server_args(source: str, server_args: Any) -> None:
    """Check RCD's config and the launch options against what it supports and declare its
    decisions on `server_args` (SGLang's resolution stash, as Gemma4Renoise does)."""
    from sglang.srt.arg_groups.model_override_base import model_config_of, resolving_view
    from sglang.srt.arg_groups.overrides import declare_resolution

    view = resolving_view(server_args)
    architectures = getattr(model_config_of(server_args).hf_config, "architectures", None) or []
    architecture = architectures[0] if architectures else "(none declared)"
    declare_resolution(server_args, source, **rcd_launch_decisions(view, architecture))


def unsupported_request_features(req: Any) -> list[str]:
    """Names of the request features RCD refuses: constrained decoding, logit biases and custom
    logit processors (the residual is built from unmodified logits, the commit from modified
    ones: the two would disagree) and log-probabilities (not produced by the dLLM loop)."""
    params = req.sampling_params
    unsupported = [name for name, neutral in _REFUSED_SAMPLING
                   if getattr(params, name, neutral) not in (neutral, {}, "")]
    unsupported += [name for name, neutral in _REFUSED_REQUEST
                    if getattr(req, name, neutral) not in (neutral, False, None)]
    return unsupported
