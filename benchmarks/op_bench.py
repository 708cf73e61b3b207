"""Fused residual-context op vs the naive torch version: time and peak extra memory.

    python benchmarks/op_bench.py --device cpu    # writes benchmarks/results/op_cpu.json and .png
    python benchmarks/op_bench.py --device cuda   # on a GPU: LLaDA-8B and Qwen3-8B shapes
    python benchmarks/op_bench.py --device cuda --top-k 16 64 256   # + the sparse residual

Naive torch is what one would write by hand: float32 softmax and log-softmax over the whole
[N, V] logits, the entropy, then softmax(z) cast to the table's dtype @ E. Peak extra memory is
everything allocated during one call (outputs included, for both): on CPU read from the
profiler's allocation events, on CUDA from torch.cuda.max_memory_allocated. On CUDA the fused
op's time is also reported against the roofline max(bytes / HBM bandwidth, flops / tensor-core
peak), bytes = one read of E[:V] + two reads of the logits + the probability chunks.

`--top-k K ...` adds the sparse residual (`residual_top_k=K`) per shape: its time with the
table's mean row cached (and its first call, which computes that mean), peak extra memory, and
the median relative error ||e_k - e|| / ||e - m|| against the fused op on these logits
(random normal x 3: a flat distribution, far from a trained model's, so the error is a worst
case; benchmarks/topk_bench.py measures it on realistic logits).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rcd_ext import ops

RESULTS = Path(__file__).parent / "results"

CPU_SHAPES = [
    {"name": "V32k-D1024-fp32", "rows": 64, "vocab": 32000, "dim": 1024, "dtype": "float32"},
    {"name": "V152k-D2048-bf16", "rows": 64, "vocab": 151936, "dim": 2048, "dtype": "bfloat16"},
]
CUDA_SHAPES = [
    {"name": f"{model}-N{rows}", "rows": rows, "vocab": vocab, "dim": 4096, "dtype": "bfloat16"}
    for model, vocab in (("LLaDA-8B", 126464), ("SDAR-Qwen3-8B", 151936))
    for rows in (64, 512)
]
# Dense bf16 tensor-core peak and HBM bandwidth (vendor figures, SXM parts).
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def naive_residual_context(logits, table, mask, t_res=1.0):
    vocab = logits.shape[1]
    z = logits.float()
    log_q = torch.log_softmax(z / t_res, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    alpha = entropy / math.log(vocab)
    p = torch.softmax(z, dim=-1)
    delta = (p.to(table.dtype) @ table[:vocab]).float()
    embeds = (1 - alpha)[:, None] * mask.float() + alpha[:, None] * delta
    return embeds.to(table.dtype), alpha


def fused_residual_context(logits, table, mask, t_res=1.0):
    return ops.residual_context(logits, table, mask, t_res=t_res)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return {"min_ms": min(samples) * 1e3, "median_ms": statistics.median(samples) * 1e3}


def peak_extra_bytes(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def top_k_record(logits, table, mask, k: int, device: str, repeats: int) -> dict:
    """The sparse residual at one k: time (cached table mean), first call, memory, error."""
    exact, _ = fused_residual_context(logits, table, mask, 0.92)

    def call():
        return ops.residual_context(logits, table, mask, t_res=0.92, residual_top_k=k)

    ops.clear_table_mean_cache()
    synchronize(device)
    began = time.perf_counter()
    call()
    synchronize(device)
    first_ms = (time.perf_counter() - began) * 1e3
    record = time_call(call, device, repeats, warmup=1) | {
        "first_call_ms": first_ms, "peak_extra_mib": peak_extra_bytes(call, device) / 2**20}
    got, _ = call()
    error = ((got.float() - exact.float()).norm(dim=-1)
             / (exact.float() - mask.float()).norm(dim=-1))
    record["median_rel_error_vs_exact"] = error.median().item()
    return record


def roofline_ms(shape: dict, device_name: str) -> float | None:
    peaks = next((v for k, v in GPU_PEAKS.items() if k in device_name), None)
    if peaks is None:
        return None
    flops_peak, bandwidth = peaks
    rows, vocab, dim = shape["rows"], shape["vocab"], shape["dim"]
    element = torch.finfo(getattr(torch, shape["dtype"])).bits // 8
    moved = vocab * dim * element + 2 * rows * vocab * element + 2 * rows * vocab * element
    return max(moved / bandwidth, 2 * rows * vocab * dim / flops_peak) * 1e3


def run_shape(shape: dict, device: str, repeats: int, device_name: str,
              top_k: list[int] | None = None) -> dict:
    dtype = getattr(torch, shape["dtype"])
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape["rows"], shape["vocab"], generator=generator) * 3).to(device,
                                                                                      dtype)
    table = (torch.randn(shape["vocab"], shape["dim"], generator=generator) * 0.02).to(device,
                                                                                       dtype)
    mask = (torch.randn(shape["dim"], generator=generator) * 0.02).to(device, dtype)
    record = dict(shape)
    for label, fn in (("fused", fused_residual_context), ("naive", naive_residual_context)):
        call = lambda fn=fn: fn(logits, table, mask, 0.92)  # noqa: E731
        record[label] = time_call(call, device, repeats) | {
            "peak_extra_mib": peak_extra_bytes(call, device) / 2**20}
    got, _ = fused_residual_context(logits, table, mask, 0.92)
    want, _ = naive_residual_context(logits, table, mask, 0.92)
    record["max_abs_diff_vs_naive"] = (got.float() - want.float()).abs().max().item()
    record["speedup_vs_naive"] = record["naive"]["min_ms"] / record["fused"]["min_ms"]
    record["memory_fraction_of_naive"] = (record["fused"]["peak_extra_mib"]
                                          / record["naive"]["peak_extra_mib"])
    bound = roofline_ms(shape, device_name) if device == "cuda" else None
    if bound is not None:
        record["roofline_ms"] = bound
        record["fraction_of_roofline"] = bound / record["fused"]["min_ms"]
    for k in top_k or []:
        record.setdefault("top_k", {})[str(k)] = top_k_record(logits, table, mask, k, device,
                                                              repeats)
    return record


def plot(records: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in records]
    x = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "min_ms", "time per call (ms, best of runs)"),
                           (axes[1], "peak_extra_mib", "peak extra memory (MiB)")):
        width = 0.38
        fused = [r["fused"][key] for r in records]
        naive = [r["naive"][key] for r in records]
        ax.bar([i - width / 2 for i in x], naive, width, label="naive torch", color="#bbbbbb")
        ax.bar([i + width / 2 for i in x], fused, width, label="rcd_ext fused", color="#1f77b4")
        for i, (f, n) in enumerate(zip(fused, naive, strict=True)):
            ax.text(i + width / 2, f, f"{f / n:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), names, rotation=15, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--top-k", type=int, nargs="*", default=[], metavar="K",
                        help="also time the sparse residual (residual_top_k=K) per shape")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads")
    shapes = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    records = []
    for shape in shapes:
        record = run_shape(shape, args.device, args.repeats, device_name, args.top_k)
        records.append(record)
        line = (f"{shape['name']:>22}: fused {record['fused']['min_ms']:8.2f} ms "
                f"{record['fused']['peak_extra_mib']:7.1f} MiB | naive "
                f"{record['naive']['min_ms']:8.2f} ms {record['naive']['peak_extra_mib']:7.1f} MiB"
                f" | speedup {record['speedup_vs_naive']:.2f}x, memory "
                f"{record['memory_fraction_of_naive']:.2f}x")
        if "fraction_of_roofline" in record:
            line += f", {record['fraction_of_roofline']:.0%} of roofline"
        print(line, flush=True)
        for k, sparse in record.get("top_k", {}).items():
            print(f"{'top-' + k:>22}: {sparse['min_ms']:8.2f} ms {sparse['peak_extra_mib']:7.1f} "
                  f"MiB (first call {sparse['first_call_ms']:.1f} ms), median error "
                  f"{sparse['median_rel_error_vs_exact']:.3g}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "op_bench",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device_name,
        "torch": torch.__version__,
        "backend": ops.backend(args.device),
        "records": records,
    }
    stem = f"op_{args.device}" + ("_topk" if args.top_k else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(records, f"residual_context on {device_name} (torch {torch.__version__})",
         args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
