"""Tokens/s of SGLang's dLLM serving with RCD off (LowConfidence) vs on (RCD), at TP 1 and 2.

A random-weight SDAR-shaped model (SGLang's `SDARForCausalLM` on a Qwen3 config, weights from
`load_format="dummy"`, no tokenizer: prompts are token ids) served by SGLang's offline `Engine`.
Each setting runs in a fresh subprocess (one Engine per process): a warm-up batch, then
`--repeats` timed batches of `--batch` prompts; tokens/s = generated tokens / seconds (median).

Settings per TP size:
- `low_confidence`: SGLang's LowConfidence with its default CUDA graphs (what users run today);
- `low_confidence_eager`: LowConfidence with CUDA graphs off (isolates RCD's own cost);
- `rcd`: RCD (which turns CUDA graphs off, see docs/serving.md), residuals on.

Needs CUDA GPUs (2 for TP 2) and the SGLang venv with SGLang's CUDA packages (sgl-kernel,
flashinfer); not run on the CPU-only development machines.

    python benchmarks/sglang_bench.py --preset sdar-1.7b --tp 1 2
    python benchmarks/sglang_bench.py --preset sdar-8b --tp 2 --block-size 32

Writes benchmarks/results/sglang_<preset>.json (with the command line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rcd_ext.atomic_files import write_json_atomic, write_text_atomic

# Qwen3 shapes (SDAR is Qwen3 with block-diffusion attention); vocabulary 151936, mask 151669
PRESETS = {
    "sdar-tiny": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
    "sdar-1.7b": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                  "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
    "sdar-8b": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
}
SETTINGS = {
    "low_confidence": ("LowConfidence", {}, False),
    "low_confidence_eager": ("LowConfidence", {}, True),
    "rcd": ("RCD", {"t_res": 1.0, "strategy": "entropy"}, False),
}


def write_model(directory: Path, preset: str) -> None:
    """config.json of an SDAR-shaped model (weights: SGLang's dummy loader)."""
    config = {"architectures": ["SDARForCausalLM"], "model_type": "qwen3",
              "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "hidden_act": "silu", "attention_bias": False, **PRESETS[preset]}
    write_json_atomic(directory / "config.json", config)


def run_one(args: argparse.Namespace) -> dict:
    """One Engine, one setting: median tokens/s over the timed batches."""
    import sglang

    algorithm, options, eager = SETTINGS[args.setting]
    config_path = Path(args.model) / f"{args.setting}.yaml"
    lines = [f"{k}: {v}" for k, v in {"block_size": args.block_size, "threshold": args.threshold,
                                      **options}.items()]
    write_text_atomic(config_path, "\n".join(lines) + "\n")
    extra = {"disable_cuda_graph": True} if eager else {}
    engine = sglang.Engine(model_path=args.model, load_format="dummy", skip_tokenizer_init=True,
                           tp_size=args.tp, dllm_algorithm=algorithm,
                           dllm_algorithm_config=str(config_path),
                           max_running_requests=args.batch, mem_fraction_static=0.8, **extra)
    prompts = [[(7 * i + 13 * j) % 150000 for j in range(args.prompt_len)]
               for i in range(args.batch)]
    params = {"max_new_tokens": args.gen_len, "temperature": 0.0, "ignore_eos": True}
    try:
        engine.generate(input_ids=prompts, sampling_params=params)  # warm-up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = engine.generate(input_ids=prompts, sampling_params=params)
            seconds = time.perf_counter() - start
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
            rates.append(tokens / seconds)
    finally:
        engine.shutdown()
    return {"setting": args.setting, "algorithm": algorithm, "tp": args.tp,
            "cuda_graphs": algorithm == "LowConfidence" and not eager,
            "tokens_per_s": statistics.median(rates), "runs": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sdar-1.7b")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--setting", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.setting:  # the child: one Engine
        print(json.dumps(run_one(args)), flush=True)
        return 0
    out = args.out or Path(__file__).parent / "results" / f"sglang_{args.preset}.json"
    results = []
    with tempfile.TemporaryDirectory() as model_dir:
        write_model(Path(model_dir), args.preset)
        for tp in args.tp:
            for setting in SETTINGS:
                command = [sys.executable, __file__, "--setting", setting, "--model", model_dir,
                           "--tp", str(tp), "--batch", str(args.batch),
                           "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                           "--block-size", str(args.block_size),
                           "--threshold", str(args.threshold), "--repeats", str(args.repeats)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"sglang_bench: {setting} at TP {tp} failed:\n{done.stderr[-3000:]}",
                          file=sys.stderr)
                    results.append({"setting": setting, "tp": tp, "error": done.stderr[-500:]})
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"TP {tp} {setting:22s} {result['tokens_per_s']:10.1f} tokens/s")
                results.append(result)
    write_json_atomic(out, {"command": " ".join(sys.argv), "preset": args.preset,
                            "shape": PRESETS[args.preset], "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
