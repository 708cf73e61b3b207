"""The residual-context op against its floor and the alternatives: time and peak extra memory.

    python benchmarks/op_bench.py --device cpu            # writes benchmarks/results/op_cpu.*
    python benchmarks/op_bench.py --device cpu --load 1   # the same with a busy process on
                                                          # another core: op_cpu_load.*
    python benchmarks/op_bench.py --device cuda           # on a GPU: LLaDA-8B and Qwen3-8B shapes

Per shape, timed interleaved (one call of each variant per round, min and median of the
rounds): the fused exact op; its floor, the bare GEMM p @ E[:V] it must do (p precomputed in
the table's dtype); naive torch, what one would write by hand (float32 softmax and log-softmax
over the whole [N, V] logits, the entropy, then softmax(z) cast to the table's dtype @ E; for
a half table on the CPU, softmax(z) @ E widened to float32, since ATen's half GEMM without
bf16/fp16 instructions takes minutes per call at these shapes);
torch.compile of that naive function; and the sparse residual (`residual_top_k=K`, K = 16, 64,
256 by default) with the table's row sum cached (its first call, which computes that sum, is
reported apart). Every time is also given as a ratio to the floor, and the record says whether
the targets hold: exact <= 1.10x the floor, top-k k=64 >= 3x faster than exact where V >= 32000.

The top-k error is the median relative error ||e_k - e|| / ||e - m|| against the fused op on
these logits (random normal x 3: a flat distribution, far from a trained model's, so the error
is a worst case; benchmarks/topk_bench.py measures it on realistic logits).

Peak extra memory is everything allocated during one call (outputs included): on CPU read from
the profiler's allocation events, on CUDA from torch.cuda.max_memory_allocated. On CUDA the
fused op's time is also reported against the roofline max(bytes / HBM bandwidth, flops /
tensor-core peak), bytes = one read of E[:V] + two reads of the logits + the probability chunks.

`--load P` starts P busy-loop processes (each bounded by --load-seconds, killed at the end) so
that the op is measured while another process takes a core; the JSON records the load averages
before and after (which also count whatever else ran on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from rcd_ext import ops
from rcd_ext.atomic_files import save_figure_atomic, write_json_atomic

RESULTS = Path(__file__).parent / "results"

CPU_SHAPES = [
    {"name": "V32k-D1024-fp32", "rows": 64, "vocab": 32000, "dim": 1024, "dtype": "float32"},
    {"name": "V152k-D2048-bf16", "rows": 64, "vocab": 151936, "dim": 2048, "dtype": "bfloat16"},
    {"name": "LLaDA-8B-N64-bf16", "rows": 64, "vocab": 126464, "dim": 4096, "dtype": "bfloat16"},
]
TOP_KS = (16, 64, 256)
# the targets of issue 13
EXACT_MAX_RATIO_TO_FLOOR = 1.10
TOP_K_MIN_SPEEDUP, TOP_K_TARGET_K, TOP_K_TARGET_MIN_VOCAB = 3.0, 64, 32000
BUSY_LOOP = ("import time\nend = time.monotonic() + {seconds}\n"
             "while time.monotonic() < end:\n    pass\n")
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
    if table.device.type == "cpu" and table.dtype != torch.float32:
        # what one writes on a CPU without bf16/fp16 GEMM instructions (ATen's half GEMM takes
        # minutes per call at these shapes there): widen the table, one float32 GEMM
        delta = p @ table[:vocab].float()
    else:
        delta = (p.to(table.dtype) @ table[:vocab]).float()
    embeds = (1 - alpha)[:, None] * mask.float() + alpha[:, None] * delta
    return embeds.to(table.dtype), alpha


def fused_residual_context(logits, table, mask, t_res=1.0):
    return ops.residual_context(logits, table, mask, t_res=t_res)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def one_sample(fn, device: str) -> float:
    """Seconds of one call of fn (CUDA: between events on the current stream)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(calls: dict[str, Callable], device: str, repeats: int,
                     warmup: int = 1) -> dict[str, dict]:
    """{label: min and median ms} with one call of every variant per round, so that a change in
    the machine's load hits all of them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, fn in calls.items():
            samples[label].append(one_sample(fn, device))
    return {label: {"min_ms": min(values) * 1e3, "median_ms": statistics.median(values) * 1e3}
            for label, values in samples.items()}


def first_call_ms(fn, device: str) -> float:
    synchronize(device)
    began = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - began) * 1e3


@contextlib.contextmanager
def background_load(processes: int, seconds: float) -> Iterator[None]:
    """`processes` busy loops in their own interpreters, each ending by itself after `seconds`
    and killed when the block ends."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=seconds)])
            for _ in range(processes)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def make_shape_inputs(shape: dict, device: str) -> tuple[torch.Tensor, ...]:
    """Random normal x 3 logits [N, V], a random normal x 0.02 table [V, D] and mask row [D]."""
    dtype = getattr(torch, shape["dtype"])
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape["rows"], shape["vocab"], generator=generator).mul_(3)
    table = torch.randn(shape["vocab"], shape["dim"], generator=generator).mul_(0.02)
    table = table.to(device, dtype)  # a float32 table of the LLaDA shape is 2 GB: drop it now
    mask = torch.randn(shape["dim"], generator=generator).mul_(0.02)
    return logits.to(device, dtype), table, mask.to(device, dtype)


def bare_gemm(probs: torch.Tensor, table: torch.Tensor, vocab: int, device: str) -> torch.Tensor:
    """The floor: p [N, V] @ E[:V] summed into float32 over the same V-chunks as the exact
    kernel (one half-precision GEMM over all of V can take another, much slower, BLAS path).
    Half tables on the CPU: float32 BLAS over widened slices of the chunk, the kernel's path on
    CPUs without bf16/fp16 GEMM instructions (ATen's half GEMM is ~40x slower there)."""
    budget = 1 << 22 if device == "cuda" else 1 << 20  # the kernels' kChunkBudgetElements
    columns = min(vocab, max(256, budget // max(1, probs.shape[0]) // 256 * 256))
    acc = torch.zeros(probs.shape[0], table.shape[1], dtype=torch.float32, device=probs.device)
    for start in range(0, vocab, columns):
        chunk = probs[:, start:start + columns]
        if table.dtype == torch.float32:
            acc.addmm_(chunk, table[start:start + columns])
        elif device == "cpu":
            widen = max(64, (1 << 20) // table.shape[1])  # the kernel's kWidenBudgetElements
            for row in range(0, chunk.shape[1], widen):
                acc.addmm_(chunk[:, row:row + widen].float(),
                           table[start + row:start + min(row + widen, chunk.shape[1])].float())
        else:
            acc.add_(chunk @ table[start:start + columns])
    return acc


def median_relative_error(got: torch.Tensor, exact: torch.Tensor, mask: torch.Tensor) -> float:
    """Median over rows of ||got - exact|| / ||exact - mask||."""
    error = ((got.float() - exact.float()).norm(dim=-1)
             / (exact.float() - mask.float()).norm(dim=-1))
    return error.median().item()


def run_shape(shape: dict, device: str, repeats: int, device_name: str,
              top_k: list[int] | None = None) -> dict:
    """Times, memory, errors, ratios to the floor and the targets for one shape."""
    logits, table, mask = make_shape_inputs(shape, device)
    vocab, t_res, ks = shape["vocab"], 0.92, list(top_k or [])
    probs = torch.softmax(logits.float(), dim=-1).to(table.dtype)
    compiled_naive = torch.compile(naive_residual_context, dynamic=False)
    compile_s = first_call_ms(lambda: compiled_naive(logits, table, mask, t_res), device) / 1e3

    def sparse(k):
        return lambda: ops.residual_context(logits, table, mask, t_res=t_res, residual_top_k=k)

    first_calls = {}
    for k in ks:
        ops.clear_table_mean_cache()
        first_calls[k] = first_call_ms(sparse(k), device)  # includes the table's row sum
    calls = {"floor_gemm": lambda: bare_gemm(probs, table, vocab, device),
             "fused": lambda: fused_residual_context(logits, table, mask, t_res),
             "naive": lambda: naive_residual_context(logits, table, mask, t_res),
             "compiled_naive": lambda: compiled_naive(logits, table, mask, t_res)}
    calls |= {f"top_k_{k}": sparse(k) for k in ks}
    times = time_interleaved(calls, device, repeats)
    record = dict(shape) | {label: times[label] for label in
                            ("floor_gemm", "fused", "naive", "compiled_naive")}
    record["compiled_naive"]["compile_s"] = compile_s
    for label in ("fused", "naive"):
        record[label]["peak_extra_mib"] = peak_extra_bytes(calls[label], device) / 2**20
    exact, _ = fused_residual_context(logits, table, mask, t_res)
    want, _ = naive_residual_context(logits, table, mask, t_res)
    record["max_abs_diff_vs_naive"] = (exact.float() - want.float()).abs().max().item()
    record["speedup_vs_naive"] = record["naive"]["min_ms"] / record["fused"]["min_ms"]
    record["memory_fraction_of_naive"] = (record["fused"]["peak_extra_mib"]
                                          / record["naive"]["peak_extra_mib"])
    for k in ks:
        label = f"top_k_{k}"
        record.setdefault("top_k", {})[str(k)] = times[label] | {
            "first_call_ms": first_calls[k],
            "peak_extra_mib": peak_extra_bytes(calls[label], device) / 2**20,
            "median_rel_error_vs_exact": median_relative_error(calls[label]()[0], exact, mask),
            "speedup_vs_exact": record["fused"]["min_ms"] / times[label]["min_ms"]}
    floor = times["floor_gemm"]["min_ms"]
    record["ratio_to_floor"] = {label: t["min_ms"] / floor for label, t in times.items()}
    record["targets"] = shape_targets(record)
    bound = roofline_ms(shape, device_name) if device == "cuda" else None
    if bound is not None:
        record["roofline_ms"] = bound
        record["fraction_of_roofline"] = bound / record["fused"]["min_ms"]
    return record


def shape_targets(record: dict) -> dict:
    """Issue 13's targets for one shape (None where a target does not apply or was not run)."""
    exact_ok = record["ratio_to_floor"]["fused"] <= EXACT_MAX_RATIO_TO_FLOOR
    sparse = record.get("top_k", {}).get(str(TOP_K_TARGET_K))
    top_k_ok = None
    if sparse is not None and record["vocab"] >= TOP_K_TARGET_MIN_VOCAB:
        top_k_ok = sparse["speedup_vs_exact"] >= TOP_K_MIN_SPEEDUP
    return {f"exact_within_{EXACT_MAX_RATIO_TO_FLOOR:.2f}x_floor": exact_ok,
            f"top_k_{TOP_K_TARGET_K}_at_least_{TOP_K_MIN_SPEEDUP:g}x_faster_than_exact": top_k_ok}


def roofline_ms(shape: dict, device_name: str) -> float | None:
    peaks = next((v for k, v in GPU_PEAKS.items() if k in device_name), None)
    if peaks is None:
        return None
    flops_peak, bandwidth = peaks
    rows, vocab, dim = shape["rows"], shape["vocab"], shape["dim"]
    element = torch.finfo(getattr(torch, shape["dtype"])).bits // 8
    moved = vocab * dim * element + 2 * rows * vocab * element + 2 * rows * vocab * element
    return max(moved / bandwidth, 2 * rows * vocab * dim / flops_peak) * 1e3


PLOT_SERIES = [("floor_gemm", "bare GEMM p @ E (floor)", "#444444"),
               ("fused", "rcd_ext exact", "#1f77b4"),
               ("naive", "naive torch", "#bbbbbb"),
               ("compiled_naive", "torch.compile(naive)", "#8c8c8c")]
TOP_K_COLOURS = ("#2ca02c", "#98df8a", "#d62728", "#ff9896")


def plot(records: list[dict], title: str, path: Path) -> None:
    """Time per call as a ratio to the floor (log scale), per shape and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(records[0].get("top_k", {}))
    series = PLOT_SERIES + [(f"top_k_{k}", f"top-k k={k}", colour)
                            for k, colour in zip(ks, TOP_K_COLOURS, strict=False)]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(series)
    for s_index, (label, legend, colour) in enumerate(series):
        for r_index, record in enumerate(records):
            ratio = record["ratio_to_floor"][label]
            x = r_index + (s_index - (len(series) - 1) / 2) * width
            ax.bar(x, ratio, width, color=colour, label=legend if r_index == 0 else None)
            ms = (record["top_k"][label.removeprefix("top_k_")] if label.startswith("top_k_")
                  else record[label])["min_ms"]
            ax.text(x, ratio, f"{ms:.0f}", ha="center", va="bottom", fontsize=6)
    ax.axhline(EXACT_MAX_RATIO_TO_FLOOR, color="#1f77b4", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(records)), [r["name"] for r in records], fontsize=8)
    ax.set_ylabel("time / bare GEMM (labels: ms, best of rounds)")
    ax.legend(fontsize=7, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def print_record(record: dict) -> None:
    ratio = record["ratio_to_floor"]
    line = (f"{record['name']:>22}: floor {record['floor_gemm']['min_ms']:8.2f} ms | exact "
            f"{record['fused']['min_ms']:8.2f} ms ({ratio['fused']:.2f}x) | naive "
            f"{record['naive']['min_ms']:8.2f} ms ({ratio['naive']:.2f}x) | compiled naive "
            f"{record['compiled_naive']['min_ms']:8.2f} ms ({ratio['compiled_naive']:.2f}x)")
    if "fraction_of_roofline" in record:
        line += f", {record['fraction_of_roofline']:.0%} of roofline"
    print(line, flush=True)
    for k, sparse in record.get("top_k", {}).items():
        print(f"{'top-' + k:>22}: {sparse['min_ms']:8.2f} ms ({ratio['top_k_' + k]:.3f}x floor, "
              f"{sparse['speedup_vs_exact']:.1f}x faster than exact) "
              f"{sparse['peak_extra_mib']:6.1f} MiB, first call {sparse['first_call_ms']:.0f} ms, "
              f"median error "
              f"{sparse['median_rel_error_vs_exact']:.3g}", flush=True)
    print(f"{'targets':>22}: {record['targets']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per shape")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--top-k", type=int, nargs="*", default=list(TOP_KS), metavar="K",
                        help="the sparse residual's k values (none: skip it)")
    parser.add_argument("--shapes", nargs="*", default=None, metavar="NAME",
                        help="run only these shapes (by name)")
    parser.add_argument("--load", type=int, default=0, metavar="P",
                        help="busy-loop processes loading other cores during the run")
    parser.add_argument("--load-seconds", type=float, default=1800.0,
                        help="upper bound on each busy loop's life")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    shapes = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    if args.shapes is not None:
        unknown = set(args.shapes) - {shape["name"] for shape in shapes}
        if unknown:
            parser.error(f"unknown shapes {sorted(unknown)}; known: {[s['name'] for s in shapes]}")
        shapes = [shape for shape in shapes if shape["name"] in args.shapes]
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    loadavg_before = os.getloadavg()
    stem = f"op_{args.device}" + ("_load" if args.load else "")
    records: list[dict] = []
    with background_load(args.load, args.load_seconds):
        for shape in shapes:
            records.append(run_shape(shape, args.device, args.repeats, device_name, args.top_k))
            print_record(records[-1])
            # after every shape: a long run that is stopped keeps the shapes it finished
            write_json_atomic(args.out / f"{stem}.json",
                              summary(args, device_name, loadavg_before, records,
                                      len(shapes)))
    plot_title = f"residual_context on {device_name}" + (
        f", {args.load} busy process(es)" if args.load else "") + f" (torch {torch.__version__})"
    plot(records, plot_title, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")
    return 0


def summary(args: argparse.Namespace, device_name: str, loadavg_before: tuple,
            records: list[dict], planned_shapes: int) -> dict:
    """The result file's content: the run's context, whether the targets held, the records."""
    return {
        "benchmark": "op_bench",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device_name,
        "torch": torch.__version__,
        "backend": ops.backend(args.device),
        "top_k_kernel": ops.has_top_k_kernel(args.device, max(args.top_k, default=1)),
        "load": {"busy_processes": args.load, "loadavg_1_5_15_before": loadavg_before,
                 "loadavg_1_5_15_after": os.getloadavg(),
                 "note": "load averages count every process on the machine, the busy loops "
                         "and any other work sharing it"},
        "targets_met": {name: all(r["targets"][name] for r in records
                                  if r["targets"][name] is not None)
                        for name in (records[0]["targets"] if records else {})},
        "shapes_done": f"{len(records)} of {planned_shapes}",
        "records": records,
    }


if __name__ == "__main__":
    sys.exit(main())
