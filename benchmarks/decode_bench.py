"""Decode throughput of RCD vs SeqD with `rcd_ext.generate` on one random-weight tiny dLLM.

Same model, prompts and settings for both; SeqD is the same loop with residuals off. Reports
tokens/s, forward passes (the reference's counted apart), the RCD/SeqD tokens/s ratio, and where
RCD's extra time goes (the residual op, the embedding injection, the wrapper's bookkeeping).

    python benchmarks/decode_bench.py                      # CPU defaults, about a minute
    python benchmarks/decode_bench.py --hidden 512 --layers 8 --vocab 32000 --device cuda

Writes benchmarks/results/decode_<device>.json (with the command that produced it) and a PNG.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import rcd_ext.residual as residual_module
from rcd_ext import ops
from rcd_ext.atomic_files import save_figure_atomic, write_json_atomic
from rcd_ext.decoding.generation import generate
from rcd_ext.models import TinyDLLMConfig, TinyDLLMModel

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(args: argparse.Namespace, seed: int, attention: str) -> TinyDLLMModel:
    torch.manual_seed(seed)
    config = TinyDLLMConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=args.prompt_length + args.gen_length + args.block_length,
        mask_token_id=1, pad_token_id=0, eos_token_id=2, attention=attention,
        block_length=args.block_length if attention == "block_causal" else None,
        initializer_range=0.2,
    )
    return TinyDLLMModel(config).to(args.device).eval()


class Timer:
    """Accumulates the wall time of calls to one function (synchronising on CUDA)."""

    def __init__(self, function, device: str):
        self.function, self.device, self.seconds, self.calls = function, device, 0.0, 0

    def __call__(self, *args, **kwargs):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = self.function(*args, **kwargs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - began
        self.calls += 1
        return result


def run_once(model, prompts, args, cache: str, steps: int, **kwargs):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    result = generate(model, prompts, gen_length=args.gen_length, block_length=args.block_length,
                      steps=steps, cache=cache, stop_at_eos=False, remasking=args.remasking,
                      threshold=args.threshold, **kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return result


def measure(model, prompts, args, cache, steps, variants: dict[str, dict]) -> dict[str, dict]:
    """Median wall time per variant; repeats interleave the variants so that load from other
    processes hits them alike."""
    for kwargs in variants.values():
        run_once(model, prompts, args, cache, steps, **kwargs)  # warm-up
    walls: dict[str, list[float]] = {name: [] for name in variants}
    results = {}
    for _ in range(args.repeats):
        for name, kwargs in variants.items():
            results[name] = run_once(model, prompts, args, cache, steps, **kwargs)
            walls[name].append(results[name].stats.wall_time_s)
    measured = {}
    for name, result in results.items():
        wall, stats = statistics.median(walls[name]), result.stats
        measured[name] = {
            "tokens_per_s": stats.tokens / wall, "wall_s": wall, "walls_s": walls[name],
            "forwards": stats.forward_passes, "reference_forwards": stats.reference_forwards,
            "steps": stats.denoising_steps, "tokens_per_step": stats.tokens_per_step,
            "tokens_per_forward": stats.tokens_per_forward}
    return measured


def breakdown(model, prompts, args, cache, steps) -> dict:
    """Seconds of one RCD run spent in the residual op and in building inputs_embeds."""
    op_timer = Timer(residual_module.residual_context, args.device)
    embeds_timer = Timer(residual_module.ResidualState.inputs_embeds, args.device)
    model_seconds = [0.0]

    def started(module, inputs):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        module._bench_began = time.perf_counter()

    def finished(module, inputs, output):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        model_seconds[0] += time.perf_counter() - module._bench_began

    hooks = [model.register_forward_pre_hook(started), model.register_forward_hook(finished)]
    residual_module.residual_context = op_timer
    residual_module.ResidualState.inputs_embeds = (
        lambda self, *a, **k: embeds_timer(self, *a, **k))
    try:
        result = run_once(model, prompts, args, cache, steps)
    finally:
        residual_module.residual_context = op_timer.function
        residual_module.ResidualState.inputs_embeds = embeds_timer.function
        for hook in hooks:
            hook.remove()
    wall = result.stats.wall_time_s
    return {"cache": cache, "wall_s": wall, "model_forward_s": model_seconds[0],
            "residual_op_s": op_timer.seconds, "residual_op_calls": op_timer.calls,
            "inject_embeds_s": embeds_timer.seconds,
            "other_s": wall - model_seconds[0] - op_timer.seconds - embeds_timer.seconds}


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["loop"], r["steps"]) for r in records})
    methods = sorted({r["method"] for r in records})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        values = []
        for label in labels:
            match = [r for r in records if (r["loop"], r["steps"]) == label
                     and r["method"] == method]
            values.append(match[0]["tokens_per_s"] if match else 0.0)
        ax.bar([i + index * width for i in range(len(labels))], values, width, label=method)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{loop}\n{steps} steps" for loop, steps in labels], fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--loops", nargs="+", default=["none", "prefix", "dual", "block_causal"],
                        help="semi-AR cache modes and/or block_causal (block diffusion)")
    parser.add_argument("--remasking", default="fixed")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, args.vocab, (args.batch, args.prompt_length),
                            generator=generator).to(args.device)
    records, breakdowns = [], []
    for loop in args.loops:
        attention = "block_causal" if loop == "block_causal" else "bidirectional"
        cache = "none" if loop == "block_causal" else loop
        model = build_model(args, seed=0, attention=attention)
        reference = build_model(args, seed=1, attention=attention)
        for steps in args.steps:
            variants = {"seqd": dict(rcd=False), "rcd-cold": dict(rcd=True),
                        "rcd-reference": dict(rcd=True, init="reference", ref_model=reference)}
            measured = measure(model, prompts, args, cache, steps, variants)
            for name, values in measured.items():
                values.update(loop=loop, steps=steps, method=name,
                              ratio_vs_seqd=values["tokens_per_s"]
                              / measured["seqd"]["tokens_per_s"])
                records.append(values)
                print(f"{loop:>12} steps {steps:>3} {name:>13}: {values['tokens_per_s']:8.1f} "
                      f"tok/s  x{values['ratio_vs_seqd']:.3f}  forwards {values['forwards']}"
                      f" + {values['reference_forwards']} ref", flush=True)
        breakdowns.append(dict(breakdown(model, prompts, args, cache, max(args.steps)),
                               loop=loop))
    device_name = args.device if not args.device.startswith("cuda") else \
        torch.cuda.get_device_name(torch.device(args.device))
    summary = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or
                                                                              sys.argv[1:])]),
        "device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(), "op_backend": ops.backend(args.device),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": records, "time_breakdown_rcd_cold": breakdowns,
        "notes": "SeqD = generate(rcd=False); RCD = the same loop through rcd_ext.wrap. "
                 "tokens_per_s counts generated tokens of the whole batch over the median wall "
                 "time of the repeats after one warm-up run.",
    }
    tag = "cpu" if args.device == "cpu" else "cuda"
    out = Path(args.out) if args.out else RESULTS / f"decode_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, summary, indent=1)
    plot(records, out.with_suffix(".png"),
         f"RCD vs SeqD decode, tiny dLLM d={args.hidden} L={args.layers} V={args.vocab} "
         f"({device_name})")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    for item in breakdowns:
        print(f"{item['loop']:>12}: wall {item['wall_s']:.3f}s = model "
              f"{item['model_forward_s']:.3f} + residual op {item['residual_op_s']:.3f} + "
              f"inject {item['inject_embeds_s']:.3f} + other {item['other_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
