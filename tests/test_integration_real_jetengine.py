"""Optional: `patch_jetengine` on JetEngine's own engine code, on the CPU.

    RCD_JETENGINE_PATH=<JetEngine checkout> pytest tests/test_integration_real_jetengine.py

Real JetEngine code exercised: `LLMEngine.generate` / `add_request` / `step`, `Scheduler`
(`schedule`, `postprocess` with its remasking strategies), `Sequence`, `BlockManager`,
`ModelRunner.run` / `prepare_prefill` / `prepare_denoise` / `prepare_block_tables` /
`run_model`, `Config`, the forward context, and `VocabParallelEmbedding` / `ParallelLMHead`
(as the model's embedding and LM head, under a one-process gloo group).

CPU stand-ins, because JetEngine cannot run on the CPU as it is:
- the SDAR decoder layers (Triton paged attention, flash-attn): a small torch layer that
  mixes the tokens of each request; `jetengine.models.*` are replaced by empty modules;
- `flashinfer` (CUDA-only sampling): softmax with temperature and `torch.multinomial`;
- device placement: `model_runner.py` hard-codes `torch.device("cuda")`, pinned memory and
  `.cuda()`; its `torch` global is given a view in which "cuda" is the CPU, pinning is
  dropped, and `Tensor.cuda` returns the tensor;
- the engine object is assembled without `LLMEngine.__init__` / `ModelRunner.__init__`, which
  load weights, size the KV cache from free GPU memory and capture CUDA graphs (the tokenizer
  is a stub with `eos_token_id` and `decode`).
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from rcd_ext.integrations.jetengine import patch_jetengine
from rcd_ext.ops import residual_context

JETENGINE = os.environ.get("RCD_JETENGINE_PATH")
pytestmark = pytest.mark.skipif(
    not (JETENGINE and (Path(JETENGINE) / "jetengine/engine/model_runner.py").exists()),
    reason="set RCD_JETENGINE_PATH to a JetEngine checkout (Labman42/JetEngine)")

VOCAB, DIM, MASK, EOS, BLOCK = 96, 32, 95, 3, 4


def _stub_flashinfer() -> dict[str, types.ModuleType]:
    class LogitsPipe:
        def __init__(self, steps):
            pass

        def __call__(self, logits, temperature=1.0):
            return torch.softmax(logits.float() / temperature, dim=-1)

    def top_k_top_p_sampling_from_probs(probs, top_k=0, top_p=1.0):
        return torch.multinomial(probs.float(), 1).squeeze(-1)

    root = types.ModuleType("flashinfer")
    processors = types.ModuleType("flashinfer.logits_processor")
    for name in ("Temperature", "Softmax", "TopP", "TopK", "Sample"):
        setattr(processors, name, type(name, (), {}))
    processors.LogitsPipe = LogitsPipe
    sampling = types.ModuleType("flashinfer.sampling")
    sampling.top_k_top_p_sampling_from_probs = top_k_top_p_sampling_from_probs
    sampling.top_p_sampling_from_probs = top_k_top_p_sampling_from_probs
    root.logits_processor, root.sampling = processors, sampling
    modules = {"flashinfer": root, "flashinfer.logits_processor": processors,
               "flashinfer.sampling": sampling}
    for name, cls in (("sdar", "SDARForCausalLM"), ("sdar_moe", "SDARMoeForCausalLM"),
                      ("llada", "LladaForCausalLM")):
        module = types.ModuleType(f"jetengine.models.{name}")
        setattr(module, cls, type(cls, (), {}))
        modules[module.__name__] = module
    return modules


class _CudaIsCpu:
    """`torch` as model_runner.py sees it here: "cuda" is the CPU and nothing is pinned."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        return torch.device("cpu")

    @staticmethod
    def tensor(*args, pin_memory=False, **kwargs):
        return torch.tensor(*args, **kwargs)


@pytest.fixture
def jet(monkeypatch, tmp_path):
    """The jetengine package imported from the checkout with the stand-ins above."""
    import torch.distributed as dist

    for name in [n for n in sys.modules if n == "jetengine" or n.startswith("jetengine.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in _stub_flashinfer().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(JETENGINE)
    from jetengine.config import Config
    from jetengine.engine import llm_engine, model_runner, scheduler
    from jetengine.layers import embed_head
    from jetengine.sampling_params import SamplingParams
    from jetengine.utils import context

    monkeypatch.setattr(model_runner, "torch", _CudaIsCpu())
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "hidden_size": DIM, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 1, "head_dim": 8,
        "intermediate_size": 64, "max_position_embeddings": 512, "vocab_size": VOCAB}))
    yield types.SimpleNamespace(
        Config=Config, LLMEngine=llm_engine.LLMEngine, ModelRunner=model_runner.ModelRunner,
        Scheduler=scheduler.Scheduler, SamplingParams=SamplingParams, embed_head=embed_head,
        context=context, model_dir=str(tmp_path / "model"))
    if started:
        dist.destroy_process_group()
    for name in [n for n in sys.modules if n == "jetengine" or n.startswith("jetengine.")]:
        del sys.modules[name]


class TinySDAR(nn.Module):
    """JetEngine's embedding and LM head around a CPU stand-in for SDAR's decoder layers."""

    def __init__(self, jet, seed: int = 0):
        super().__init__()
        self.context = jet.context
        self.model = nn.Module()
        self.model.embed_tokens = jet.embed_head.VocabParallelEmbedding(VOCAB, DIM, None)
        self.lm_head = jet.embed_head.ParallelLMHead(VOCAB, DIM, None)
        self.positions = nn.Embedding(512, DIM)
        self.mix = nn.Linear(DIM, DIM)
        generator = torch.Generator().manual_seed(seed)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator)
            parameter.requires_grad_(False)
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        context = self.context.get_context()
        if context.cu_seqlens_q is not None:  # PREFILL: whole prompts, split by cu_seqlens
            lengths = (context.cu_seqlens_q[1:] - context.cu_seqlens_q[:-1]).long()
            segments = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        else:  # DENOISE: block_length tokens per request
            segments = torch.arange(input_ids.numel()) // context.block_length
        self.calls.append({"run_type": context.run_type.name, "ids": input_ids.clone(),
                           "positions": positions.clone(), "embeds": embeds.clone()})
        hidden = embeds + self.positions(positions)
        mixed = torch.tanh(self.mix(hidden))
        pooled = torch.zeros(int(segments.max()) + 1, DIM).index_add_(0, segments, mixed)
        return hidden + pooled[segments] / DIM

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(torch.tanh(hidden))
        self.calls[-1]["logits"] = logits.clone()
        return logits


def build_engine(jet, *, enforce_eager: bool | None = True, tensor_parallel_size: int = 1):
    """A JetEngine LLMEngine on the CPU (constructors bypassed, see the module docstring)."""
    kwargs = {} if enforce_eager is None else {"enforce_eager": enforce_eager}
    config = jet.Config(jet.model_dir, mask_token_id=MASK, block_length=BLOCK, max_num_seqs=3,
                        max_num_batched_tokens=4096, max_model_len=256,
                        tensor_parallel_size=tensor_parallel_size, **kwargs)
    config.num_kvcache_blocks = 32
    config.eos = EOS
    runner = object.__new__(jet.ModelRunner)
    runner.config, runner.block_size = config, config.kvcache_block_size
    runner.enforce_eager, runner.world_size, runner.rank = config.enforce_eager, 1, 0
    runner.model = TinySDAR(jet)
    records: list[tuple[str, list[int], list[int]]] = []

    def recorded_run(seqs, run_type):  # who was in each forward, for the reference
        lengths = ([len(seq.token_ids) for seq in seqs] if run_type.name == "PREFILL"
                   else [seq.block_length for seq in seqs])
        records.append((run_type.name, [seq.seq_id for seq in seqs], lengths))
        return jet.ModelRunner.run(runner, seqs, run_type)

    runner.run = recorded_run
    engine = object.__new__(jet.LLMEngine)
    engine.config, engine.model_runner = config, runner
    engine.tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=None,
                                             decode=lambda ids: " ".join(map(str, ids)))
    engine.scheduler = jet.Scheduler(config)
    engine.scheduler.consistent_sampling_params = False
    engine.records = records
    return engine


PROMPTS = [[5, 9, 2], [7, 1, 4, 8, 3, 10], [11, 12, 13, 14], [21, 22, 23, 24, 25], [40]]


def generate(jet, engine, strategy: str = "low_confidence_dynamic"):
    # entropy_bounded commits at least one token a step: with 2 steps for a block of 4, blocks
    # can be saved (and committed) with masks left, whose residuals outlive the block
    steps = 2 if strategy == "entropy_bounded" else BLOCK
    params = jet.SamplingParams(temperature=1.0, max_tokens=12, block_length=BLOCK,
                                denoising_steps=steps, remasking_strategy=strategy,
                                dynamic_threshold=0.3, eb_threshold=0.5)
    torch.manual_seed(0)
    outputs = engine.generate_streaming(PROMPTS, params, max_active=3, use_tqdm=False)
    engine.outputs = [output["token_ids"] for output in outputs]
    return engine.outputs


@torch.no_grad()
def check_against_reference(engine) -> int:
    """Every forward's embeddings against residuals replayed per (request, position)."""
    calls, records = engine.model_runner.model.calls, engine.records
    assert len(calls) == len(records)
    table = engine.model_runner.model.model.embed_tokens.weight
    stored, injected = {}, 0
    for number, (call, (run_type, seq_ids, lengths)) in enumerate(zip(calls, records,
                                                                      strict=True)):
        owners = [s for s, n in zip(seq_ids, lengths, strict=True) for _ in range(n)]
        keys = [(s, int(p)) for s, p in zip(owners, call["positions"], strict=True)]
        masked = (call["ids"] == MASK).tolist()
        expected = table[call["ids"]].clone()
        if run_type == "DENOISE":
            for n, key in enumerate(keys):
                if masked[n] and key in stored:
                    expected[n] = stored[key]
                    injected += 1
        assert torch.allclose(call["embeds"], expected, atol=1e-5), f"forward {number}"
        if run_type == "DENOISE":
            for n, key in enumerate(keys):
                if masked[n]:
                    stored[key] = residual_context(call["logits"][n][None].float(), table,
                                                   table[MASK], t_res=0.9)[0][0]
                else:
                    stored.pop(key, None)
    return injected


@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "entropy_bounded"])
def test_real_jetengine_flag_off_identical_and_flag_on_matches_reference(jet, strategy):
    expected = generate(jet, build_engine(jet), strategy)

    off = build_engine(jet)
    patch_jetengine(off, rcd=False)
    assert generate(jet, off, strategy) == expected
    zero = build_engine(jet)
    patch_jetengine(zero, alpha_scale=0.0)
    assert generate(jet, zero, strategy) == expected
    reference = build_engine(jet)
    generate(jet, reference, strategy)
    for a, b in zip(zero.model_runner.model.calls, reference.model_runner.model.calls,
                    strict=True):
        assert torch.equal(a["logits"], b["logits"])

    engine = build_engine(jet)
    patch = patch_jetengine(engine, t_res=0.9)
    generate(jet, engine, strategy)
    injected = check_against_reference(engine)
    assert injected > 0 and injected == patch.hook.injected
    assert len({n for _, ids, _ in engine.records for n in ids}) == len(PROMPTS)
    assert patch.hook.state.valid.shape[0] <= 3  # rows were reused across the five requests
    if strategy == "entropy_bounded":  # blocks were saved with masks in them
        assert any(MASK in tokens for tokens in engine.outputs)
    patch.undo()
    assert engine.model_runner.run.__name__ == "recorded_run"
    assert not engine.model_runner.model.model.embed_tokens._forward_hooks


def test_real_jetengine_refusals(jet):
    with pytest.raises(ValueError, match="enforce_eager=False"):
        patch_jetengine(build_engine(jet, enforce_eager=None))  # JetEngine's default
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        patch_jetengine(build_engine(jet, tensor_parallel_size=2))
