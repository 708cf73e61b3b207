"""Projected RCD/SeqD decode speed of 8B dLLMs on this CPU, from measured parts.

One denoising step of SeqD is the model's forward on the step's tokens: `layers` decoder
layers plus the final norm and LM head. RCD adds the residual op on the rows that stay masked
(`rcd_ext.ops.residual_context`, exact or `residual_top_k=k`, whatever kernel is installed when
this runs). Both are measured here at the real widths and dtype, in one process, interleaved,
min of `--repeats`:

    seqd_step = layers x t(decoder layer on N tokens) + t(norm + LM head on N tokens)
    rcd_step  = seqd_step + t(op on N rows)
    projected RCD/SeqD tokens/s = seqd_step / rcd_step   (both commit the same tokens a step)

N is the step's token count and the op's row count at once: every position of the block is
still masked (a block's first step), the op's largest share. The decoder layer is a plain
Llama/Qwen-style layer built from torch modules (RMSNorm, q/k/v/o projections with the real
head and KV-head counts, rotary embedding, SDPA over the N tokens, SwiGLU MLP) with random
weights; attention over a cached prefix is left out (a few % of an 8B layer at N <= 64 and a
context of 1-2k tokens). The table E the op reads is the LM head's weight (an untied table of
the same shape costs the same to read).

    python benchmarks/projection_bench.py                  # both models, N 32 64, k 16 64 256
    python benchmarks/projection_bench.py --models LLaDA-8B --rows 32 --repeats 2

Writes benchmarks/results/projection_cpu.json (with the command, machine load and threads)
and a PNG. docs/decoding.md ("Projected cost at real scale") describes the method.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from rcd_ext import ops
from rcd_ext.atomic_files import save_figure_atomic, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class ModelShape:
    """The widths that set an 8B dLLM's per-step cost."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


MODELS = {
    # LLaDA-8B: multi-head attention (32 KV heads), MLP 12288, untied 126464-row table
    "LLaDA-8B": ModelShape(vocab=126464, hidden=4096, intermediate=12288, layers=32, heads=32,
                           kv_heads=32),
    # SDAR-8B (Qwen3-8B): grouped-query attention with 8 KV heads, MLP 12288
    "SDAR-8B": ModelShape(vocab=151936, hidden=4096, intermediate=12288, layers=36, heads=32,
                          kv_heads=8),
}


class DecoderLayer(nn.Module):
    """A pre-norm Llama/Qwen-style decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.heads, self.kv_heads = shape.heads, shape.kv_heads
        self.head_dim = shape.hidden // shape.heads
        kv_width = self.kv_heads * self.head_dim
        self.attn_norm = nn.RMSNorm(shape.hidden)
        self.q_proj = nn.Linear(shape.hidden, shape.hidden, bias=False)
        self.k_proj = nn.Linear(shape.hidden, kv_width, bias=False)
        self.v_proj = nn.Linear(shape.hidden, kv_width, bias=False)
        self.o_proj = nn.Linear(shape.hidden, shape.hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(shape.hidden)
        self.gate_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.up_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x [B, H, N, head_dim] at positions 0..N-1."""
        half = self.head_dim // 2
        frequencies = 10000.0 ** (-torch.arange(half, device=x.device) / half)
        angles = torch.arange(x.shape[2], device=x.device)[:, None] * frequencies[None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        first, second = x[..., :half], x[..., half:]
        return torch.cat([first * cos - second * sin, first * sin + second * cos], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, hidden] -> [B, N, hidden]."""
        batch, tokens, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rotate(q), self._rotate(k)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(batch, tokens, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def fastest(calls: dict[str, Callable[[], object]], repeats: int,
            warm_ups: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Min wall seconds of each call over `repeats` rounds; the calls are interleaved within a
    round so that load from other processes hits them alike. `warm_ups` (default: the calls
    themselves) run once first: one-time costs (the top-k path's table mean, kernel set-up)
    stay out of the times, and a one-row warm-up keeps an 8B run short."""
    for call in (warm_ups or calls).values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - began)
    return best


def measure_model(shape: ModelShape, rows: int, top_ks: list[int], repeats: int,
                  dtype: torch.dtype, seed: int = 0, exact: bool = True) -> dict[str, float]:
    """Min seconds of one decoder layer and of the norm + LM head on `rows` tokens, and of the
    residual op on `rows` masked rows (key "op_exact" unless `exact` is False, "op_top{k}")."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layer = DecoderLayer(shape).to(dtype).eval()
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.02)
        final_norm = nn.RMSNorm(shape.hidden).to(dtype)
        head = torch.randn(shape.vocab, shape.hidden, dtype=dtype) * 0.02
    mask_embed = head[0]

    def calls_on(count: int) -> dict[str, Callable[[], object]]:
        hidden = torch.randn(1, count, shape.hidden, dtype=dtype)
        # flat random logits: no trained model at hand
        logits = (torch.randn(count, shape.vocab) * 3).to(dtype)
        calls: dict[str, Callable[[], object]] = {
            "layer": lambda: layer(hidden),
            "head": lambda: nn.functional.linear(final_norm(hidden), head),
        }
        if exact:
            calls["op_exact"] = lambda: ops.residual_context(logits, head, mask_embed)
        for k in top_ks:
            calls[f"op_top{k}"] = (
                lambda k=k: ops.residual_context(logits, head, mask_embed, residual_top_k=k))
        return calls

    with torch.inference_mode():
        return fastest(calls_on(rows), repeats, warm_ups=calls_on(1))


def project(shape: ModelShape, times: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per op setting: projected SeqD and RCD step seconds and RCD/SeqD tokens/s."""
    seqd_step = shape.layers * times["layer"] + times["head"]
    projected = {}
    for name, seconds in times.items():
        if name.startswith("op_"):
            rcd_step = seqd_step + seconds
            projected[name[3:]] = {"seqd_step_s": seqd_step, "rcd_step_s": rcd_step,
                                   "op_share": seconds / rcd_step,
                                   "rcd_over_seqd": seqd_step / rcd_step}
    return projected


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nN={r['rows']}" for r in records]
    settings = list(records[0]["projected"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(records)), 4))
    width = 0.8 / len(settings)
    for index, setting in enumerate(settings):
        ax.bar([i + index * width for i in range(len(records))],
               [r["projected"][setting]["rcd_over_seqd"] for r in records], width,
               label=setting)
    ax.axhline(0.97, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(records))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("projected RCD / SeqD tokens/s")
    ax.set_title("8B dLLM step on this CPU: decoder layers + LM head vs the residual op")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-exact", action="store_true",
                        help="time only the top-k settings (when the exact op is too slow)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "projection_cpu.json"))
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or min(args.top_k) < 1 or args.repeats < 1:
        print("projection_bench: --rows, --top-k and --repeats must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()
    began = time.perf_counter()
    records: list[dict] = []
    out = Path(args.out)
    for name in args.models:
        shape = MODELS[name]
        for rows in args.rows:
            times = measure_model(shape, rows, args.top_k, args.repeats, dtype,
                                  exact=not args.no_exact)
            projected = project(shape, times)
            records.append({"model": name, "rows": rows, "shape": asdict(shape),
                            "seconds": times, "projected": projected})
            print(f"{name} N={rows}: layer {times['layer'] * 1e3:.0f} ms x {shape.layers} + "
                  f"head {times['head'] * 1e3:.0f} ms = step "
                  f"{next(iter(projected.values()))['seqd_step_s']:.2f} s | " + ", ".join(
                      f"{s} {p['rcd_over_seqd']:.3f}" for s, p in projected.items()),
                  flush=True)
            # after every record: a run stopped early keeps what it measured
            write_json_atomic(out, summarise(args, argv, records, load_before, began), indent=1)
    plot(records, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def summarise(args: argparse.Namespace, argv: list[str] | None, records: list[dict],
              load_before: tuple[float, float, float], began: float) -> dict:
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(
            sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "op_backend": ops.backend("cpu"), "dtype": args.dtype,
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": os.getloadavg(), "wall_s": time.perf_counter() - began,
        "results": records,
        "notes": "Projected RCD/SeqD tokens/s = (layers x layer + head) / (that + op), all "
                 "measured here (min of the repeats, interleaved). N = tokens forwarded = "
                 "masked rows given to the op (a block's first step). Random weights; flat "
                 "random logits (x3). Attention over a cached prefix is left out. Other "
                 "processes shared the machine (see the load averages): the ratios come from "
                 "one interleaved run, the absolute seconds do not transfer.",
    }


if __name__ == "__main__":
    sys.exit(main())
