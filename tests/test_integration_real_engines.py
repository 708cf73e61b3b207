"""Optional: the patches on real engine code with tiny random-weight models (CPU, minutes).

Run with a checkout of the engine (these tests are skipped otherwise):
    RCD_FAST_DLLM_PATH=/path/to/Fast-dLLM  pytest tests/test_integration_real_engines.py
    RCD_D2F_PATH=/path/to/Discrete-Diffusion-Forcing  pytest tests/test_integration_real_engines.py
    RCD_SDAR_PATH=/path/to/SDAR  pytest tests/test_integration_real_engines.py
The Fast-dLLM checkout may hold `llada/` (2025 layout) and/or `v1/llada/` (2026 layout); its
modelling code needs `einops`. Checked per layout and sampler: flag off and alpha 0 give the
unpatched output bit for bit; flag on injects exactly where the independent oracle says, with
positions taken from the real calls' cache / replace_position arguments. D2F: its
`eval_llada.py` is imported with `peft` stubbed when absent (only names are imported) and the
real `_generate_block_single` runs on an object holding the attributes it reads. SDAR: its
`generate.py` on SDAR-4B-Chat's remote code (shrunk config), with CPU stand-ins for the
flash-attn / triton imports that code cannot run without (see `stub_sdar_gpu_imports`).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from rcd_ext.integrations.d2f import patch_d2f
from rcd_ext.integrations.fast_dllm import patch_fast_dllm, patch_fast_dllm_dream
from tests.engine_doubles.oracle import (
    SamplerIds,
    check_injection,
    d2f_dream_shift,
    shift_own_first,
)
from tests.engine_doubles.real_checkout import CallRecorder, engine_imports

FAST_DLLM = os.environ.get("RCD_FAST_DLLM_PATH")
D2F = os.environ.get("RCD_D2F_PATH")
LLADA_MASK = 126336
SAMPLERS = ("generate", "generate_with_prefix_cache", "generate_with_dual_cache")

pytestmark = pytest.mark.slow


def fast_dllm_layouts() -> list[Path]:
    if not FAST_DLLM:
        return []
    root = Path(FAST_DLLM)
    return [root / sub for sub in ("llada", "v1/llada") if (root / sub / "generate.py").exists()]


def tiny_llada(package: str = "model"):
    """A 2-layer LLaDA of an engine's own modelling code (`package`.modeling_llada: Fast-dLLM's
    `model`, D2F's `model_cache.llada`) with LLaDA-8B's vocabulary, random weights."""
    import importlib

    config_class = importlib.import_module(f"{package}.configuration_llada").LLaDAConfig
    model_class = importlib.import_module(f"{package}.modeling_llada").LLaDAModelLM
    config = config_class(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128,
                          vocab_size=126464, embedding_size=126464, mask_token_id=LLADA_MASK,
                          rope=True, block_type="llama", activation_type="silu",
                          layer_norm_type="rms", include_bias=False, weight_tying=False,
                          max_sequence_length=256, init_device="cpu", rms_norm_eps=1e-5,
                          use_cache=False)
    torch.manual_seed(0)
    return model_class(config, init_params=True).eval()


@pytest.mark.skipif(not fast_dllm_layouts(), reason="set RCD_FAST_DLLM_PATH to a Fast-dLLM "
                    "checkout with llada/ or v1/llada/")
@pytest.mark.parametrize("layout", fast_dllm_layouts(), ids=lambda p: p.relative_to(FAST_DLLM)
                         .as_posix() if FAST_DLLM else str(p))
def test_fast_dllm_llada_samplers(layout, monkeypatch):
    with engine_imports(layout):
        import generate

        model = tiny_llada()
        prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
        settings = {"steps": 8, "gen_length": 16, "block_length": 8, "threshold": 0.9}
        plain = {name: getattr(generate, name)(model, prompt, **settings) for name in SAMPLERS}
        patch = patch_fast_dllm(generate)
        for name in SAMPLERS:
            sampler = getattr(generate, name)
            for extra in ({"rcd": False}, {"alpha_scale": 0.0}):
                x, nfe = sampler(model, prompt, **settings, **extra)
                assert torch.equal(x, plain[name][0]) and nfe == plain[name][1], (name, extra)
            spy = SamplerIds().install(monkeypatch)
            recorder = CallRecorder(model)
            sampler(model, prompt, **settings)
            recorder.remove()
            monkeypatch.undo()
            embed = model.get_input_embeddings().weight
            injected = check_injection(recorder.calls, spy.ids, embed, LLADA_MASK,
                                       prompt.shape[1], 8, atol=1e-4)
            assert injected > 0, name
        patch.undo()


def stub_d2f_imports(monkeypatch) -> None:
    """peft / lm-eval names D2F's eval scripts import at module level but the sampler never
    uses, where this environment lacks them."""
    if "peft" not in sys.modules:
        try:
            import peft  # noqa: F401
        except ImportError:  # the script only imports names from peft at module level
            stub = types.ModuleType("peft")
            for name in ("LoraConfig", "get_peft_model", "PeftConfig", "PeftModel"):
                setattr(stub, name, object)
            monkeypatch.setitem(sys.modules, "peft", stub)
    try:  # lm-eval versions without get_dtype: the sampler never uses it
        import lm_eval.api.registry as lm_eval_registry
        import lm_eval.models.utils as lm_eval_utils

        if not hasattr(lm_eval_utils, "get_dtype"):
            monkeypatch.setattr(lm_eval_utils, "get_dtype", lambda dtype: dtype, raising=False)
        # both eval scripts register the alias "dream_lora": keep the registry out of it
        monkeypatch.setattr(lm_eval_registry, "register_model",
                            lambda *names: (lambda cls: cls))
    except ImportError:
        pytest.skip("D2F's eval scripts import lm_eval")


@pytest.mark.skipif(not (D2F and (Path(D2F) / "D2F-eval/eval_llada.py").exists()),
                    reason="set RCD_D2F_PATH to a Discrete-Diffusion-Forcing checkout")
def test_d2f_llada_block_sampler(monkeypatch):
    directory = Path(D2F) / "D2F-eval"
    stub_d2f_imports(monkeypatch)
    with engine_imports(directory):
        for name in [n for n in sys.modules if n.split(".")[0] == "model_cache"]:
            del sys.modules[name]
        import eval_llada

        model = tiny_llada("model_cache.llada")
        lm = object.__new__(eval_llada.DreamLoRA)  # only the attributes the sampler reads
        lm.__dict__.update(model=model, mask_token_id=LLADA_MASK, block_size=4,
                           block_add_threshold=0.5, decoded_token_threshold=0.9,
                           skip_threshold=0.95, max_new_tokens=16, max_length=64,
                           _device=torch.device("cpu"), target_dtype=torch.float32,
                           sampling_strategy="default", temperature=0.0, top_p=None,
                           top_k=None, tokenizer=types.SimpleNamespace(
                               decode=lambda ids, skip_special_tokens=False: ""))
        prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
        plain = lm._generate_block_single(prompt)
        patch = patch_d2f(eval_llada.DreamLoRA)
        assert lm._generate_block_single(prompt, rcd=False) == plain
        assert lm._generate_block_single(prompt, alpha_scale=0.0) == plain
        spy = SamplerIds().install(monkeypatch)
        recorder = CallRecorder(model)
        lm._generate_block_single(prompt)
        recorder.remove()
        embed = model.get_input_embeddings().weight
        assert check_injection(recorder.calls, spy.ids, embed, LLADA_MASK, prompt.shape[1],
                               None, atol=1e-4) > 0
        patch.undo()
        for name in [n for n in sys.modules if n.split(".")[0] == "model_cache"]:
            del sys.modules[name]


def fast_dllm_dream_layouts() -> list[Path]:
    if not FAST_DLLM:
        return []
    root = Path(FAST_DLLM)
    return [root / sub for sub in ("dream", "v1/dream")
            if (root / sub / "model/generation_utils_block.py").exists()]


@pytest.mark.skipif(not fast_dllm_dream_layouts(), reason="set RCD_FAST_DLLM_PATH to a "
                    "Fast-dLLM checkout with dream/ or v1/dream/")
@pytest.mark.parametrize("layout", fast_dllm_dream_layouts(),
                         ids=lambda p: p.relative_to(FAST_DLLM).as_posix() if FAST_DLLM
                         else str(p))
@pytest.mark.parametrize("dual_cache", [False, True])
def test_fast_dllm_dream_block_sampler(layout, dual_cache, monkeypatch):
    with engine_imports(layout):
        from model.configuration_dream import DreamConfig
        from model.generation_utils_block import DreamGenerationConfig, DreamGenerationMixin
        from model.modeling_dream import DreamModel

        config = DreamConfig(vocab_size=151680, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, mask_token_id=151666,
                             pad_token_id=151643, bos_token_id=151643, eos_token_id=151643)
        torch.manual_seed(0)
        model = DreamModel(config).eval()
        model.generation_config = DreamGenerationConfig(
            mask_token_id=151666, pad_token_id=151643, bos_token_id=151643, eos_token_id=151643)
        patch = patch_fast_dllm_dream(DreamGenerationMixin)
        # as dream/eval.py does, after the patch
        model.diffusion_generate = types.MethodType(DreamGenerationMixin.diffusion_generate,
                                                    model)
        model._sample = types.MethodType(DreamGenerationMixin._sample, model)
        prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
        settings = {"max_new_tokens": 16, "steps": 16, "block_length": 8, "threshold": 0.9,
                    "dual_cache": dual_cache, "alg": "confidence_threshold",
                    "temperature": 0.0}
        plain = patch.originals["diffusion_generate"](model, prompt.clone(), **settings)
        assert torch.equal(model.diffusion_generate(prompt.clone(), **settings, rcd=False),
                           plain)
        assert torch.equal(model.diffusion_generate(prompt.clone(), **settings,
                                                    alpha_scale=0.0), plain)
        spy = SamplerIds().install(monkeypatch)
        recorder = CallRecorder(model, cache_length_dim=1, embeds_only=True)
        model.diffusion_generate(prompt.clone(), **settings)
        recorder.remove()
        embed = model.get_input_embeddings().weight
        assert check_injection(recorder.calls, spy.ids, embed, 151666, prompt.shape[1], 8,
                               shift=shift_own_first, atol=1e-4) > 0
        patch.undo()


@pytest.mark.skipif(not (D2F and (Path(D2F) / "D2F-eval/eval_dream.py").exists()),
                    reason="set RCD_D2F_PATH to a Discrete-Diffusion-Forcing checkout")
def test_d2f_dream_block_sampler(monkeypatch):
    directory = Path(D2F) / "D2F-eval"
    stub_d2f_imports(monkeypatch)
    with engine_imports(directory):
        for name in [n for n in sys.modules if n.split(".")[0] == "model_cache"]:
            del sys.modules[name]
        import eval_dream
        from model_cache.dream.configuration_dream import DreamConfig
        from model_cache.dream.model_dream import DreamModel

        config = DreamConfig(vocab_size=151680, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, mask_token_id=151666,
                             pad_token_id=151643, bos_token_id=151643, eos_token_id=151643)
        torch.manual_seed(0)
        model = DreamModel(config).eval()
        lm = object.__new__(eval_dream.DreamLoRA)
        tokenizer = types.SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)),
                                          eos_token="<eos>", eos_token_id=None)
        lm.__dict__.update(model=model, mask_token_id=151666, block_size=4,
                           block_add_threshold=0.5, decoded_token_threshold=0.9,
                           skip_threshold=0.95, max_new_tokens=16, max_length=64,
                           _device=torch.device("cpu"), target_dtype=torch.float32,
                           sampling_strategy="default", temperature=0.0, top_p=None,
                           top_k=None, tokenizer=tokenizer)
        prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
        plain = lm._generate_block_single(prompt)
        patch = patch_d2f(eval_dream.DreamLoRA)
        assert lm._generate_block_single(prompt, rcd=False) == plain
        assert lm._generate_block_single(prompt, alpha_scale=0.0) == plain
        spy = SamplerIds().install(monkeypatch)
        recorder = CallRecorder(model)
        lm._generate_block_single(prompt)
        recorder.remove()
        embed = model.get_input_embeddings().weight
        assert check_injection(recorder.calls, spy.ids, embed, 151666, prompt.shape[1], None,
                               shift=d2f_dream_shift(recorder.calls), atol=1e-4) > 0
        patch.undo()
        for name in [n for n in sys.modules if n.split(".")[0] == "model_cache"]:
            del sys.modules[name]


SDAR = os.environ.get("RCD_SDAR_PATH")
SDAR_MODEL_DIR = "training/model/SDAR-4B-Chat"
SDAR_MASK = 151669


def stub_sdar_gpu_imports(monkeypatch, package: str) -> None:
    """CPU stand-ins for what SDAR's modelling code imports from GPU-only packages.

    modeling_sdar.py imports flash-attn's Triton RMSNorm unconditionally (used by every
    SDARRMSNorm) and calls `flash_attn_func` for every decoding forward (an all-True block
    mask); its training loss module imports triton. Neither runs on CPU, so: RMSNorm and
    non-causal GQA attention written here on torch ops (same math, not the kernels), and the
    training-only loss module replaced by an empty one (only used when model.training).
    """
    import torch.nn.functional as F

    def rms_norm_fn(x, weight, bias=None, eps=1e-6, **_):
        out = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
        return (out if bias is None else out + bias.float()).to(x.dtype)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        # flash-attn layout [b, l, heads, d], kv heads may be fewer (GQA)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=causal,
                                             scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    def unavailable(*args, **kwargs):
        raise NotImplementedError("not available in the CPU stand-in")

    modules = {name: types.ModuleType(name) for name in (
        "flash_attn", "flash_attn.ops", "flash_attn.ops.triton",
        "flash_attn.ops.triton.layer_norm", "flash_attn.bert_padding",
        f"{package}.fused_linear_diffusion_cross_entropy")}
    modules["flash_attn"].flash_attn_func = flash_attn_func
    modules["flash_attn"].flash_attn_varlen_func = unavailable
    modules["flash_attn.ops.triton.layer_norm"].rms_norm_fn = rms_norm_fn
    for name in ("index_first_axis", "pad_input", "unpad_input"):
        setattr(modules["flash_attn.bert_padding"], name, unavailable)
    modules[f"{package}.fused_linear_diffusion_cross_entropy"] \
        .FusedLinearDiffusionCrossEntropyLoss = unavailable
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def tiny_sdar(monkeypatch):
    """SDAR-4B-Chat's own remote code (configuration_sdar.py, modeling_sdar.py) with its
    config.json shrunk to 2 layers, hidden 64 (vocabulary and mask id kept), random weights."""
    import importlib
    import json

    directory = Path(SDAR) / SDAR_MODEL_DIR
    package = "rcd_test_sdar_remote"  # the directory name has dashes: load it as a package
    root = types.ModuleType(package)
    root.__path__ = [str(directory)]
    monkeypatch.setitem(sys.modules, package, root)
    stub_sdar_gpu_imports(monkeypatch, package)
    configuration = importlib.import_module(f"{package}.configuration_sdar")
    modeling = importlib.import_module(f"{package}.modeling_sdar")
    for name in ("configuration_sdar", "modeling_sdar"):
        monkeypatch.setitem(sys.modules, f"{package}.{name}", sys.modules[f"{package}.{name}"])
    settings = json.loads((directory / "config.json").read_text())
    settings.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_window_layers=2, torch_dtype="float32")
    config = configuration.SDARConfig(**settings)
    assert config.mask_token_id == SDAR_MASK and config.vocab_size == 151936
    torch.manual_seed(0)
    return modeling.SDARForCausalLM(config).eval()


@pytest.mark.skipif(not (SDAR and (Path(SDAR) / "generate.py").exists()
                         and (Path(SDAR) / SDAR_MODEL_DIR / "modeling_sdar.py").exists()),
                    reason="set RCD_SDAR_PATH to a JetAstra/SDAR checkout")
@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "sequential"])
def test_sdar_block_diffusion_generate(strategy, monkeypatch):
    from rcd_ext.integrations.sdar import patch_sdar

    model = tiny_sdar(monkeypatch)
    with engine_imports(Path(SDAR)):
        import generate

        # 9 prompt tokens, block 4: two prefilled blocks (SDPA under the block-causal mask),
        # then a block holding 1 prompt token; decoding forwards go through flash_attn_func
        prompt = {"input_ids": torch.randint(0, 1000, (1, 9),
                                             generator=torch.Generator().manual_seed(1))}
        settings = {"mask_id": SDAR_MASK, "gen_length": 11, "block_length": 4,
                    "denoising_steps": 4, "remasking_strategy": strategy}

        def run(sampler, **extra):
            torch.manual_seed(2)  # SDAR samples with torch.multinomial
            return sampler(model, prompt, **settings, **extra)

        plain = run(generate.block_diffusion_generate)
        assert plain.shape == (1, 20) and (plain[:, 9:] != SDAR_MASK).all()
        patch = patch_sdar(generate)
        assert torch.equal(run(generate.block_diffusion_generate, rcd=False), plain)
        assert torch.equal(run(generate.block_diffusion_generate, alpha_scale=0.0), plain)
        spy = SamplerIds().install(monkeypatch)
        recorder = CallRecorder(model)
        run(generate.block_diffusion_generate)
        recorder.remove()
        embed = model.get_input_embeddings().weight
        assert check_injection(recorder.calls, spy.ids, embed, SDAR_MASK,
                               prompt["input_ids"].shape[1], None, atol=1e-4) > 0
        patch.undo()
