"""The sparse (top-k) residual against the exact one: cost, approximation error, accuracy.

    python benchmarks/topk_bench.py            # writes benchmarks/results/topk_cpu.json and .png
    python benchmarks/topk_bench.py --parts error e2e   # skip the (slow) timing part

CPU only (a GPU is where the saving matters: there the exact op is bound by reading the whole
V x D table; see docs/engines.md). Three parts:

(a) op: time and peak extra memory of the exact fused op and of `residual_top_k` = 16, 64, 256
    at the LLaDA-8B shape (N=64, V=126464, D=4096, bf16) and the op_bench CPU shapes, through
    op_bench's own helpers (random-normal x 3 logits and table). The top-k time is with the
    table's mean row cached; its first call (which computes that mean) is reported apart.
(b) error: ||e_k - e|| / ||e - m|| per position against k, on (1) the logits the op really
    receives while the shipped demo checkpoints decode held-out coupled-choices problems (RCD
    warm and cold, 2 and 4 steps; V = 29, so k is also given as k / V), recorded by wrapping the
    op, with the RCD model's own table; (2) SYNTHETIC Zipf-like logits at V=126464 (rank r of a
    random permutation gets logit -s log r, s = 1, 1.5, 2) with a random-normal table (D=1024).
(c) e2e: accuracy of the shipped checkpoints on 500 held-out coupled-choices problems with
    residual_top_k in {1, 2, 4, 8, exact} at 1, 2, 4 steps, RCD warm and cold, through
    `rcd_ext.demo.evaluate.decode_record` (its `generate` is given residual_top_k), plus the
    paired comparison with the exact residual on the same problems.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import platform
import sys
import time
from pathlib import Path

import torch

from rcd_ext import ops
from rcd_ext.atomic_files import save_figure_atomic, write_json_atomic

sys.path.insert(0, str(Path(__file__).parent))
import op_bench  # noqa: E402  (the sibling benchmark's timing and memory helpers)

RESULTS = Path(__file__).parent / "results"
LLADA_SHAPE = {"name": "LLaDA-8B-N64-bf16", "rows": 64, "vocab": 126464, "dim": 4096,
               "dtype": "bfloat16"}
OP_KS = (16, 64, 256)
E2E_KS = (1, 2, 4, 8, None)
E2E_STEPS = (1, 2, 4)


def relative_errors(logits, table, mask, ks, **kwargs) -> dict[str, list[float]]:
    """{k: per-row ||e_k - e|| / ||e - m||} against the exact op, and "dropped": rows left out
    because ||e - m|| < 1e-3 ||m|| (alpha ~ 0: the residual is [M] whatever k; there the ratio
    is float32 rounding over a vanishing denominator)."""
    exact, _ = ops.residual_context(logits, table, mask, **kwargs)
    scale = (exact.float() - mask.float()).norm(dim=-1)
    keep = scale > 1e-3 * mask.float().norm()
    errors: dict = {"dropped": int((~keep).sum())}
    for k in ks:
        sparse, _ = ops.residual_context(logits, table, mask, residual_top_k=k, **kwargs)
        error = (sparse.float() - exact.float()).norm(dim=-1)[keep] / scale[keep]
        errors[str(k)] = error.tolist()
    return errors


def summarise(values: list[float]) -> dict[str, float]:
    data = torch.tensor(values, dtype=torch.float64)
    return {"median": data.median().item(), "p90": data.quantile(0.9).item(),
            "mean": data.mean().item(), "max": data.max().item(), "n": len(values)}


# ---- (a) time and memory -------------------------------------------------------------------------
def part_op(repeats: int) -> list[dict]:
    records = []
    # op_bench's CPU shapes include the LLaDA-8B one since issue 13: run it once
    others = [shape for shape in op_bench.CPU_SHAPES if shape["name"] != LLADA_SHAPE["name"]]
    for shape in [LLADA_SHAPE, *others]:
        began = time.perf_counter()
        record = op_bench.run_shape(shape, "cpu", repeats, "cpu", top_k=list(OP_KS))
        records.append(record)
        line = (f"{shape['name']:>22}: exact {record['fused']['min_ms']:8.1f} ms "
                f"{record['fused']['peak_extra_mib']:6.1f} MiB")
        for k, sparse in record["top_k"].items():
            line += (f" | k={k}: {sparse['min_ms']:6.1f} ms {sparse['peak_extra_mib']:5.1f} MiB "
                     f"(first {sparse['first_call_ms']:.0f} ms)")
        print(line + f"  [{time.perf_counter() - began:.0f}s]", flush=True)
    return records


# ---- (b) approximation error ---------------------------------------------------------------------
@contextlib.contextmanager
def recording_op(store: list):
    """Record the (logits, table, mask) of every residual_context call ResidualState makes."""
    import rcd_ext.residual as residual

    original = residual.residual_context

    def recorder(logits, embed_weight, mask_embed, **kwargs):
        store.append(logits.detach().float().clone())
        return original(logits, embed_weight, mask_embed, **kwargs)

    residual.residual_context = recorder
    try:
        yield
    finally:
        residual.residual_context = original


def part_error(test_size: int) -> dict:
    from rcd_ext.demo.checkpoints import load_checkpoints
    from rcd_ext.demo.evaluate import decode_record
    from rcd_ext.tasks import get_task

    models = load_checkpoints()
    task = get_task("coupled_choices")
    test = task.test_set(test_size, seed=0)
    model = models["rcd"]
    table = model.get_input_embeddings().weight.detach()
    mask_id = model.config.mask_token_id
    mask = table[mask_id]
    vocab = table.shape[0]
    logged: list[torch.Tensor] = []
    with recording_op(logged):
        for init in ("warm", "cold"):
            for steps in (2, 4):
                decode_record(model, task, test, method="rcd", init=init, steps=steps,
                              reference=models["reference"])
    logits = torch.cat(logged)
    probs = torch.softmax(logits, -1)
    ks = list(range(1, vocab))
    tiny_errors = relative_errors(logits, table, mask, ks)
    dropped = tiny_errors.pop("dropped")
    tiny = {
        "source": (f"logits the residual op received while the shipped RCD checkpoint decoded "
                   f"{len(test)} held-out coupled_choices problems (warm + cold, 2 + 4 steps); "
                   "table and mask row of that checkpoint"),
        "vocab": vocab, "rows": logits.shape[0], "rows_dropped_alpha_near_0": dropped,
        "top1_mass_median": probs.max(-1).values.median().item(),
        "alpha_median": ops.residual_context(logits, table, mask)[1].median().item(),
        "by_k": {k: {"k_over_v": int(k) / vocab, **summarise(v)}
                 for k, v in tiny_errors.items()},
    }
    print(f"tiny checkpoints ({tiny['rows']} rows, V={vocab}, median top-1 mass "
          f"{tiny['top1_mass_median']:.2f}): median error " + ", ".join(
              f"k={k} {tiny['by_k'][str(k)]['median']:.3f}" for k in (1, 2, 4, 8, 16)), flush=True)

    vocab, dim, rows = 126464, 1024, 64
    g = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, dim, generator=g)
    mask = torch.randn(dim, generator=g)
    zipf = []
    zipf_ks = [1, 4, 16, 64, 256, 1024, 4096, 16384]
    for exponent in (1.0, 1.5, 2.0):
        ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)]) + 1
        logits = -exponent * torch.log(ranks.float())
        probs = torch.softmax(logits, -1)
        errors = relative_errors(logits, table, mask, zipf_ks)
        entry = {"exponent": exponent, "rows_dropped_alpha_near_0": errors.pop("dropped"),
                 "top1_mass": probs.max(-1).values.mean().item(),
                 "alpha": ops.residual_context(logits, table, mask)[1].mean().item(),
                 "by_k": {k: {"k_over_v": int(k) / vocab, **summarise(v)}
                          for k, v in errors.items()}}
        zipf.append(entry)
        print(f"SYNTHETIC Zipf s={exponent} (top-1 mass {entry['top1_mass']:.3f}, alpha "
              f"{entry['alpha']:.2f}): median error " + ", ".join(
                  f"k={k} {entry['by_k'][str(k)]['median']:.3g}" for k in zipf_ks), flush=True)
    return {"tiny_checkpoints": tiny,
            "synthetic_zipf": {"note": ("SYNTHETIC: logit -s log(rank) over a random permutation "
                                        "per row, random-normal table and mask row, fp32"),
                               "vocab": vocab, "dim": dim, "rows": rows, "by_exponent": zipf}}


# ---- (c) accuracy end to end ---------------------------------------------------------------------
@contextlib.contextmanager
def decode_with_top_k(k: int | None, outputs: list):
    """Give `decode_record`'s generate `residual_top_k=k`, keeping each result's tokens."""
    from rcd_ext.demo import evaluate

    original = evaluate.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        result = original(*args, residual_top_k=k, **kwargs)
        outputs.append(result.tokens)
        return result

    evaluate.generate = generate
    try:
        yield
    finally:
        evaluate.generate = original


def part_e2e(test_size: int) -> list[dict]:
    from rcd_ext.demo.checkpoints import load_checkpoints
    from rcd_ext.demo.evaluate import decode_record
    from rcd_ext.tasks import get_task

    models = load_checkpoints()
    task = get_task("coupled_choices")
    test = task.test_set(test_size, seed=0)
    prompts = torch.stack([prompt for prompt, _ in test])
    vocab = models["rcd"].get_input_embeddings().weight.shape[0]
    records = []
    for steps in E2E_STEPS:
        record = decode_record(models["seqd"], task, test, method="seqd", steps=steps)
        records.append(record | {"residual_top_k": None})
        for init in ("warm", "cold"):
            runs = {}
            for k in E2E_KS:
                outputs: list[torch.Tensor] = []
                with decode_with_top_k(k, outputs):
                    record = decode_record(models["rcd"], task, test, method="rcd", init=init,
                                           steps=steps, reference=models["reference"])
                runs[k] = (record, task.is_correct(prompts, outputs[0]), outputs[0])
            _, exact_correct, exact_tokens = runs[None]
            for k, (record, correct, tokens) in runs.items():
                record = record | {
                    "residual_top_k": k, "k_over_v": None if k is None else k / vocab,
                    "stderr": math.sqrt(record["accuracy"] * (1 - record["accuracy"])
                                        / record["n"]),
                    "lost_vs_exact": int((exact_correct & ~correct).sum()),
                    "gained_vs_exact": int((~exact_correct & correct).sum()),
                    "same_answer_as_exact": (tokens == exact_tokens).all(1).float().mean().item(),
                }
                records.append(record)
            print(f"steps {steps} {init:>4}: " + ", ".join(
                f"k={'exact' if r['residual_top_k'] is None else r['residual_top_k']} "
                f"{r['accuracy']:.3f}" for r in records[-len(E2E_KS):]), flush=True)
    return records


# ---- plot ----------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    records = result.get("op", [])
    if records:
        labels = ["exact"] + [f"k={k}" for k in OP_KS]
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            values = [r["fused"]["min_ms"] if label == "exact"
                      else r["top_k"][label[2:]]["min_ms"] for r in records]
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(records))]
            ax.bar(xs, values, width, label=label)
            for x, value, r in zip(xs, values, records, strict=True):
                memory = (r["fused"] if label == "exact" else r["top_k"][label[2:]])
                ax.text(x, value, f"{memory['peak_extra_mib']:.0f}M", ha="center",
                        va="bottom", fontsize=6)
        ax.set_xticks(range(len(records)), [r["name"] for r in records], fontsize=7,
                      rotation=10)
        ax.set_ylabel("ms per call (best of runs; label: peak extra MiB)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("(a) CPU time: exact vs top-k (table mean cached)", fontsize=9)
    ax = axes[1]
    errors = result.get("error")
    if errors:
        tiny = errors["tiny_checkpoints"]
        ks = [float(v["k_over_v"]) for v in tiny["by_k"].values()]
        ax.plot(ks, [v["median"] for v in tiny["by_k"].values()], "o-",
                label=f"tiny checkpoints' logits (V={tiny['vocab']}), median")
        ax.plot(ks, [v["p90"] for v in tiny["by_k"].values()], "o:", color="C0",
                label="tiny checkpoints, 90th percentile", markersize=3)
        for j, entry in enumerate(errors["synthetic_zipf"]["by_exponent"]):
            by_k = entry["by_k"]
            ax.plot([v["k_over_v"] for v in by_k.values()], [v["median"] for v in by_k.values()],
                    "s--", color=f"C{j + 1}",
                    label=f"SYNTHETIC Zipf s={entry['exponent']} (V=126464), median")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k / V")
        ax.set_ylabel("||e_k - e|| / ||e - m||")
        ax.legend(fontsize=7)
        ax.set_title("(b) approximation error", fontsize=9)
    ax = axes[2]
    e2e = result.get("e2e")
    if e2e:
        order = list(E2E_KS)
        for init in ("warm", "cold"):
            for i, steps in enumerate(E2E_STEPS):
                rows = {r["residual_top_k"]: r for r in e2e
                        if r["method"] == "rcd" and r["init"] == init and r["steps"] == steps}
                ys = [rows[k]["accuracy"] for k in order]
                ax.errorbar(range(len(order)), ys, yerr=[rows[k]["stderr"] for k in order],
                            fmt="o-" if init == "warm" else "s--", color=f"C{i}",
                            label=f"RCD {init}, {steps} step{'s' * (steps > 1)}", capsize=2)
        for i, steps in enumerate(E2E_STEPS):
            seqd = next(r for r in e2e if r["method"] == "seqd" and r["steps"] == steps)
            ax.axhline(seqd["accuracy"], color=f"C{i}", lw=0.8, alpha=0.5)
        ax.set_xticks(range(len(order)), [str(k) if k else "exact" for k in order])
        ax.set_xlabel("residual_top_k (V = 29); thin lines: SeqD")
        ax.set_ylabel("accuracy (500 held-out problems, +- 1 s.e.)")
        ax.legend(fontsize=7)
        ax.set_title("(c) demo checkpoints, coupled choices", fontsize=9)
    fig.suptitle(f"sparse (top-k) residual vs exact, CPU only ({result['device']}, torch "
                 f"{result['torch']})", fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("op", "error", "e2e"),
                        default=["op", "error", "e2e"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {
        "benchmark": "topk_bench",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device + " (CPU only, no GPU)",
        "torch": torch.__version__,
        "backend": ops.backend("cpu"),
    }
    began = time.perf_counter()
    if "op" in args.parts:
        result["op"] = part_op(args.repeats)
    if "error" in args.parts:
        result["error"] = part_error(args.test_size)
    if "e2e" in args.parts:
        result["e2e"] = part_e2e(args.test_size)
    result["wall_s"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "topk_cpu.json", result, indent=1)
    plot(result, args.out / "topk_cpu.png")
    print(f"wrote {args.out / 'topk_cpu'}.json and .png ({result['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
