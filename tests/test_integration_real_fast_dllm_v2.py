"""Optional: `patch_fast_dllm_v2` on the real Fast-dLLM v2 code (CPU, tiny random weights).

Skipped unless the real code is given (nothing of it is in this repository):
    RCD_FAST_DLLM_V2_PATH=/path/to/Fast-dLLM/v2 \
    RCD_FAST_DLLM_V2_MODEL_PATH=/path/to/Fast_dLLM_v2_7B \
        pytest tests/test_integration_real_fast_dllm_v2.py
Expected layout:
    $RCD_FAST_DLLM_V2_PATH/generation_functions.py     NVlabs/Fast-dLLM `v2/` (the mixin class
                                                       `Fast_dLLM_QwenForCausalLM.batch_sample`)
    $RCD_FAST_DLLM_V2_MODEL_PATH/modeling.py           the remote code of the HF checkpoint
    $RCD_FAST_DLLM_V2_MODEL_PATH/configuration.py      Efficient-Large-Model/Fast_dLLM_v2_7B
RCD_FAST_DLLM_V2_MODEL_PATH may be left out when the modelling files sit in
$RCD_FAST_DLLM_V2_PATH itself, in its sub-folder `Fast_dLLM_v2_7B/` or in a sibling folder
`Fast_dLLM_v2_7B/` (e.g. /tmp/fast-dllm-v2/{v2,Fast_dLLM_v2_7B}). No weights are read:
the checkpoint's own classes are built with a shrunk config (2 layers, hidden 64, vocabulary
and special ids kept) and random weights, fp32 on CPU.

The modelling code runs unchanged on CPU (its eval path uses SDPA; flex-attention and
torch.compile serve training only). Two shims for transformers 4.52 (the checkpoint targets
4.53), nothing else is replaced:
- `transformers.configuration_utils.layer_type_validation` (new in 4.53, imported by the
  checkpoint's configuration.py) is provided where absent: it only validates layer names;
- `transformers.utils.auto_docstring` is an identity while generation_functions.py is
  imported: 4.52's version fails on that plain mixin class (it writes docstrings only).

Checked, with and without `use_block_cache`, on batches of prompts of unequal lengths padded
with the mask token as v2/eval.py does (prefill / no prefill / block-aligned prompt; a stop
token the model does emit, so that finished rows leave the batch): flag off and alpha 0 give
the unpatched output bit for bit; flag on injects exactly the residuals an independent replay
of the real calls expects (positions from the real model's own `position_ids`, residuals from
the previous call's logits after v2's shift); the patched run completes and changes outputs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from rcd_ext.integrations.fast_dllm_v2 import patch_fast_dllm_v2
from tests.engine_doubles.models import Call
from tests.engine_doubles.oracle import check_injection, shift_own_first

V2 = os.environ.get("RCD_FAST_DLLM_V2_PATH")
V2_MODEL = os.environ.get("RCD_FAST_DLLM_V2_MODEL_PATH")
MASK = 151665  # v2's mask id (batch_sample default)
STOP = 151645  # <|im_end|> (batch_sample default)
PAD = 151643  # the tokenizer's pad token (<|endoftext|>)
REMOTE = "rcd_test_fast_dllm_v2_remote"  # package name the remote code is loaded under

pytestmark = pytest.mark.slow


def model_directory() -> Path | None:
    if V2_MODEL:
        return Path(V2_MODEL)
    if not V2:
        return None
    for candidate in (Path(V2), Path(V2) / "Fast_dLLM_v2_7B", Path(V2).parent / "Fast_dLLM_v2_7B"):
        if (candidate / "modeling.py").exists():
            return candidate
    return None


def available() -> bool:
    directory = model_directory()
    return bool(V2 and (Path(V2) / "generation_functions.py").exists() and directory
                and (directory / "modeling.py").exists()
                and (directory / "configuration.py").exists())


requires_v2 = pytest.mark.skipif(
    not available(), reason="set RCD_FAST_DLLM_V2_PATH (v2/ of Fast-dLLM) and, unless it holds "
    "them, RCD_FAST_DLLM_V2_MODEL_PATH (modeling.py, configuration.py of Fast_dLLM_v2_7B)")

# (seq_len per row, block_size, small_block_size, max_new_tokens): min_len > block (prefill
# with a committed cache), min_len < block (first block without cache), block-aligned min_len
# (v2 predicts the first new token from the prefill)
CASES = {
    "prefill": ([10, 13, 20], 8, 4, 16),
    "no-prefill": ([5, 7], 8, 4, 16),
    "aligned": ([16, 19], 8, 2, 16),
}


@pytest.fixture
def one_thread():
    # tiny matmuls: thread hand-offs cost 10x the work on 2 shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_v2(monkeypatch):
    """generation_functions (a fresh module object per test) and the remote modelling code."""
    import transformers.configuration_utils as configuration_utils
    import transformers.utils as transformers_utils

    if not hasattr(configuration_utils, "layer_type_validation"):
        def layer_type_validation(layer_types):
            for kind in layer_types:
                if kind not in ("full_attention", "sliding_attention"):
                    raise ValueError(f"unknown layer type {kind!r}")

        monkeypatch.setattr(configuration_utils, "layer_type_validation",
                            layer_type_validation, raising=False)
    root = types.ModuleType(REMOTE)  # modeling.py imports `.configuration`: load as a package
    root.__path__ = [str(model_directory())]
    monkeypatch.setitem(sys.modules, REMOTE, root)
    for name in ("configuration", "modeling"):
        monkeypatch.delitem(sys.modules, f"{REMOTE}.{name}", raising=False)
        module = importlib.import_module(f"{REMOTE}.{name}")
        monkeypatch.setitem(sys.modules, f"{REMOTE}.{name}", module)

    with monkeypatch.context() as patched:
        patched.setattr(transformers_utils, "auto_docstring",
                        lambda obj=None, **_: obj if obj is not None else (lambda o: o))
        spec = importlib.util.spec_from_file_location(
            "rcd_test_v2_generation_functions", Path(V2) / "generation_functions.py")
        generation_functions = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(generation_functions)
    return generation_functions, sys.modules[f"{REMOTE}.configuration"], \
        sys.modules[f"{REMOTE}.modeling"]


def tiny_model(configuration, modeling, block_size: int):
    config = configuration.Fast_dLLM_QwenConfig(
        vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=1e6, bd_size=block_size, pad_token_id=STOP, bos_token_id=PAD,
        eos_token_id=STOP, tie_word_embeddings=False, torch_dtype="float32")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return modeling.Fast_dLLM_QwenForCausalLM(config).eval()


def prompts(seq_len: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded with the mask token, as v2/eval.py batches prompts."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(seq_len), max(seq_len)), MASK)
    for row, length in enumerate(seq_len):
        ids[row, :length] = torch.randint(0, 1000, (length,), generator=generator)
    return ids, torch.tensor(seq_len)


def settings(case: str, seed: int, use_block_cache: bool, stop_token: int = STOP):
    seq_len, block, small, new = CASES[case]
    ids, lengths = prompts(seq_len, seed)
    return ids, {"tokenizer": types.SimpleNamespace(pad_token_id=PAD), "block_size": block,
                 "max_new_tokens": new, "small_block_size": small, "min_len": min(seq_len),
                 "seq_len": lengths, "mask_id": MASK, "threshold": 0.9,
                 "stop_token": stop_token, "use_block_cache": use_block_cache}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class RealCallRecorder:
    """Records every forward of the real v2 model as a `Call`, from its own modules: token ids
    given to the inner model, absolute positions as given to its rotary embedding, the
    embeddings entering the first decoder layer (after any embedding hook), the LM-head logits.
    Independent of the adapter (which swaps `forward` and hooks the embedding module)."""

    def __init__(self, model):
        self.calls: list[Call] = []
        self.ids: list[torch.Tensor] = []
        self._current: dict = {}
        inner = model.model
        self.handles = [
            inner.register_forward_pre_hook(self._ids, with_kwargs=True),
            inner.rotary_emb.register_forward_pre_hook(self._positions),
            inner.layers[0].register_forward_pre_hook(self._embeds),
            model.lm_head.register_forward_hook(self._logits),
        ]

    def _ids(self, module, args, kwargs):
        self._current = {"ids": kwargs["input_ids"].clone(),
                         "block_cache": kwargs.get("block_past_key_values") is not None}

    def _positions(self, module, args):
        self._current["positions"] = args[1].clone()

    def _embeds(self, module, args):
        self._current["embeds"] = args[0].detach().clone()

    def _logits(self, module, args, output):
        current, self._current = self._current, {}
        ids = current["ids"]
        positions = current["positions"].expand(ids.shape[0], -1)
        self.calls.append(Call(positions, ids, current["embeds"], output.detach().clone(),
                               {"block_cache": current["block_cache"]}))
        self.ids.append(ids)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def frequent_token(outputs: dict, seq_len: torch.Tensor) -> int:
    """The token the unpatched run emits most (as stop token: rows then finish early)."""
    generated = Counter()
    for row, tokens in outputs.items():
        generated.update(tokens[int(seq_len[row]):].tolist())
    return generated.most_common(1)[0][0]


@requires_v2
@pytest.mark.parametrize("use_block_cache", [False, True], ids=["no-block-cache", "block-cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_v2_flag_off_and_alpha_zero_bit_identical(case, use_block_cache, monkeypatch,
                                                   one_thread):
    generation_functions, configuration, modeling = load_v2(monkeypatch)
    mixin = generation_functions.Fast_dLLM_QwenForCausalLM
    original = mixin.__dict__["batch_sample"]
    model = tiny_model(configuration, modeling, CASES[case][1])
    ids, kwargs = settings(case, 1, use_block_cache)
    stop = frequent_token(original(model, ids.clone(), **kwargs), kwargs["seq_len"])
    for stop_token in (STOP, stop):  # never emitted / emitted: finished rows leave the batch
        kwargs["stop_token"] = stop_token
        plain = original(model, ids.clone(), **kwargs)
        patch = patch_fast_dllm_v2(mixin)
        model.mdm_sample = types.MethodType(mixin.batch_sample, model)  # as v2/eval.py binds
        assert same(model.mdm_sample(ids.clone(), **kwargs, rcd=False), plain)
        assert same(model.mdm_sample(ids.clone(), **kwargs, alpha_scale=0.0), plain)
        assert "forward" not in vars(model)
        patch.undo()
        assert mixin.__dict__["batch_sample"] is original
        # the instance route: patch a model whose mdm_sample eval.py already bound
        model.mdm_sample = types.MethodType(original, model)
        patch = patch_fast_dllm_v2(model)
        assert same(model.mdm_sample(ids.clone(), **kwargs, rcd=False), plain)
        assert same(model.mdm_sample(ids.clone(), **kwargs, alpha_scale=0.0), plain)
        patch.undo()
        assert model.mdm_sample.__func__ is original


@requires_v2
@pytest.mark.parametrize("use_block_cache", [False, True], ids=["no-block-cache", "block-cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_v2_rcd_injects_where_the_real_calls_say(case, use_block_cache, monkeypatch,
                                                  one_thread):
    generation_functions, configuration, modeling = load_v2(monkeypatch)
    mixin = generation_functions.Fast_dLLM_QwenForCausalLM
    original = mixin.__dict__["batch_sample"]
    model = tiny_model(configuration, modeling, CASES[case][1])
    ids, kwargs = settings(case, 1, use_block_cache)
    kwargs["stop_token"] = frequent_token(original(model, ids.clone(), **kwargs),
                                          kwargs["seq_len"])
    patch = patch_fast_dllm_v2(mixin)
    model.mdm_sample = types.MethodType(mixin.batch_sample, model)
    embed = model.get_input_embeddings().weight
    for stop_token in (STOP, kwargs["stop_token"]):
        kwargs["stop_token"] = stop_token
        recorder = RealCallRecorder(model)
        out = model.mdm_sample(ids.clone(), **kwargs)
        recorder.remove()
        assert sorted(out) == list(range(ids.shape[0]))
        assert all((tokens != MASK).all() for tokens in out.values())
        # the embeddings of every real call: residuals exactly at its masked tokens that an
        # earlier call saw masked (from that call's logits, v2's shift), plain rows elsewhere
        injected = check_injection(recorder.calls, recorder.ids, embed, MASK,
                                   min(CASES[case][0]), None, shift=shift_own_first,
                                   atol=1e-5)
        assert injected > 0
        if use_block_cache:  # small-block calls (replace_position) got residuals too
            small = [c for c in recorder.calls if c.kwargs["block_cache"]]
            assert small and any((c.input_ids == MASK).any() for c in small)
        assert patch.last_hook is not None and "forward" not in vars(model)
    patch.undo()


@requires_v2
@pytest.mark.parametrize("use_block_cache", [False, True], ids=["no-block-cache", "block-cache"])
def test_v2_rcd_changes_outputs(use_block_cache, monkeypatch, one_thread):
    generation_functions, configuration, modeling = load_v2(monkeypatch)
    mixin = generation_functions.Fast_dLLM_QwenForCausalLM
    original = mixin.__dict__["batch_sample"]
    model = tiny_model(configuration, modeling, CASES["prefill"][1])
    patch = patch_fast_dllm_v2(mixin)
    model.mdm_sample = types.MethodType(mixin.batch_sample, model)
    differing = 0
    for seed in range(4):
        ids, kwargs = settings("prefill", seed, use_block_cache)
        plain = original(model, ids.clone(), **kwargs)
        with_rcd = model.mdm_sample(ids.clone(), **kwargs)
        assert sorted(with_rcd) == sorted(plain)
        for row, tokens in with_rcd.items():  # prompts kept, no mask left
            length = int(kwargs["seq_len"][row])
            assert torch.equal(tokens[:length], ids[row, :length])
            assert (tokens != MASK).all()
        differing += not same(with_rcd, plain)
    patch.undo()
    assert differing > 0
