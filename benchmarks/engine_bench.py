"""Tokens/s of Fast-dLLM's own LLaDA samplers with the RCD flag off vs on.

Runs the real `generate.py` of a Fast-dLLM checkout (2025 `llada/` or 2026 `v1/llada/`) on a
random-weight LLaDA built from the checkout's own modelling code, patched with
`rcd_ext.integrations.fast_dllm.patch_fast_dllm`. Per sampler: median seconds over `--repeats`
runs with rcd=False (the unpatched engine) and rcd=True, tokens/s = gen_length / seconds, and
the ratio on/off (issue target on a GPU: >= 0.97). Also records, for the dual-cache suffix
question, how many generated tokens the dual-cache sampler shares with the no-cache sampler
under suffix="mask" (default) and suffix="residual".

    python benchmarks/engine_bench.py --fast-dllm /path/to/Fast-dLLM --preset tiny      # CPU
    python benchmarks/engine_bench.py --fast-dllm /path/to/Fast-dLLM --preset llada-8b  # GPU

Writes benchmarks/results/engine_<preset>_<device>.json (with the command line).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rcd_ext.atomic_files import write_json_atomic

PRESETS = {
    # 2 layers with LLaDA-8B's vocabulary: runs on a CPU, dominated by the LM head
    "tiny": {"d_model": 64, "n_heads": 4, "n_layers": 2, "mlp_hidden_size": 128},
    # LLaDA-8B's shape (random weights): d 4096, 32 layers, 32 heads, MLP 12288
    "llada-8b": {"d_model": 4096, "n_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288},
}
SAMPLERS = ("generate", "generate_with_prefix_cache", "generate_with_dual_cache")
LLADA_MASK = 126336


def build_model(preset: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight LLaDAModelLM of the checkout's modelling code in `preset`'s shape."""
    from model.configuration_llada import LLaDAConfig
    from model.modeling_llada import LLaDAModelLM

    shape = PRESETS[preset]
    config = LLaDAConfig(**shape, n_kv_heads=shape["n_heads"], vocab_size=126464,
                         embedding_size=126464, mask_token_id=LLADA_MASK, rope=True,
                         block_type="llama", activation_type="silu", layer_norm_type="rms",
                         include_bias=False, weight_tying=False, max_sequence_length=4096,
                         init_device=device, rms_norm_eps=1e-5, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaDAModelLM(config, init_params=True)
    return model.to(dtype).eval()


def timed(function, repeats: int, device: str) -> tuple[float, object]:
    """(median seconds, last result) of `repeats` calls after one warm-up call."""
    result = function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast-dllm", required=True, help="Fast-dLLM checkout")
    parser.add_argument("--layout", default="auto", choices=["auto", "llada", "v1/llada"])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=64)  # the paper's Table 3
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--t-res", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    root = Path(args.fast_dllm)
    layout = args.layout
    if layout == "auto":
        layout = "v1/llada" if (root / "v1/llada/generate.py").exists() else "llada"
    sys.path.insert(0, str(root / layout))
    import generate  # Fast-dLLM's own sampler module

    from rcd_ext.integrations.fast_dllm import patch_fast_dllm

    model = build_model(args.preset, device, dtype)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 100000, (1, args.prompt_length), generator=generator).to(device)
    settings = {"steps": args.steps, "gen_length": args.gen_length,
                "block_length": args.block_length, "threshold": args.threshold}
    patch = patch_fast_dllm(generate, t_res=args.t_res)
    results = {}
    with torch.inference_mode():
        for name in args.samplers:
            sampler = getattr(generate, name)
            row = {}
            for label, flag in (("off", False), ("on", True)):
                seconds, (x, nfe) = timed(lambda s=sampler, f=flag: s(model, prompt, **settings,
                                                                      rcd=f),
                                          args.repeats, device)
                row[label] = {"seconds": seconds, "nfe": nfe,
                              "tokens_per_s": args.gen_length / seconds}
                print(f"{name:28s} rcd={label:3s} {seconds:8.3f} s  nfe {nfe:4d}  "
                      f"{args.gen_length / seconds:9.1f} tok/s", flush=True)
            row["on_over_off"] = row["on"]["tokens_per_s"] / row["off"]["tokens_per_s"]
            results[name] = row
        agreement = {}
        if {"generate", "generate_with_dual_cache"} <= set(args.samplers):
            for suffix in ("mask", "residual"):
                full, _ = generate.generate(model, prompt, **settings, suffix=suffix)
                dual, _ = generate.generate_with_dual_cache(model, prompt, **settings,
                                                            suffix=suffix)
                generated = slice(args.prompt_length, None)
                agreement[suffix] = float((full[:, generated] == dual[:, generated])
                                          .float().mean())
    patch.undo()
    record = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__, "preset": args.preset, "layout": layout,
        "dtype": str(dtype), "settings": settings, "prompt_length": args.prompt_length,
        "t_res": args.t_res, "repeats": args.repeats, "results": results,
        "dual_vs_no_cache_token_agreement": agreement,
        "note": "random weights: tokens/s is meaningful, agreement only as a smoke figure",
    }
    out = Path(args.out or Path(__file__).parent / "results" /
               f"engine_{args.preset}_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
