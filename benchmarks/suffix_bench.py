"""The dual-cache suffix question, on trained checkpoints: what should masked positions of the
blocks *after* the one being decoded receive?

Fast-dLLM's dual cache computes the K/V of later blocks once, at the block start, and reuses
them for every step of the block. `suffix="mask"` (RCD scope "block", the default) feeds those
positions plain [M], so every cache mode sees the same inputs; `suffix="residual"` (scope
"all") feeds them the residuals of the previous block's last step, which the dual cache then
freezes, one block stale. `rcd_ext.decoding.generate` runs the same three cache modes as
Fast-dLLM's samplers (no cache, prefix cache, dual cache with in-place block K/V), so the
question is measured here on the tiny dLLM trained with the demo's recipe (reference 1000
SeqD steps; SeqD and RCD 500 more steps each), on two tasks, over several training seeds.

Per (task, seed, block length, steps per block, cache, method): accuracy on the held-out
problems and the share of answer tokens equal to the no-cache decode of the same method.

    python benchmarks/suffix_bench.py                      # ~15 min on 2 CPU cores
    python benchmarks/suffix_bench.py --plot-only          # redraw from the JSON

Writes benchmarks/results/suffix_<tag>.json and .png (with the command line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rcd_ext.atomic_files import save_figure_atomic, write_json_atomic

RESULTS = Path(__file__).parent / "results"
CACHES = ("none", "prefix", "dual")
# method -> (model, rcd, scope, init)
METHODS = {
    "seqd": ("seqd", False, "block", "cold"),
    "rcd mask-suffix cold": ("rcd", True, "block", "cold"),
    "rcd residual-suffix cold": ("rcd", True, "all", "cold"),
    "rcd mask-suffix warm": ("rcd", True, "block", "reference"),
    "rcd residual-suffix warm": ("rcd", True, "all", "reference"),
}


def decode_all(models: dict[str, torch.nn.Module], task: Any, test: list, *, task_name: str,
               seed: int, block_lengths: list[int], steps_per_block: list[int]) -> list[dict]:
    """Every (block length, steps per block, cache, method) on one set of checkpoints."""
    from rcd_ext.decoding import generate

    prompts = torch.stack([prompt for prompt, _ in test])
    length = task.answer_length
    records = []
    for block_length in block_lengths:
        for per_block in steps_per_block:
            steps = per_block * (length // block_length)
            for method, (model_name, rcd, scope, init) in METHODS.items():
                no_cache = None
                for cache in CACHES:
                    out = generate(models[model_name], prompts, gen_length=length,
                                   block_length=block_length, steps=steps, remasking="fixed",
                                   rcd=rcd, scope=scope, init=init, cache=cache,
                                   ref_model=models["reference"] if rcd else None,
                                   stop_at_eos=False)
                    if no_cache is None:
                        no_cache = out.tokens
                    records.append({
                        "task": task_name, "seed": seed, "block_length": block_length,
                        "steps_per_block": per_block, "cache": cache, "method": method,
                        "accuracy": task.score(out.tokens, prompts),
                        "agrees_with_no_cache": float((out.tokens == no_cache).float().mean()),
                        "n": len(test),
                    })
    return records


def mean_by(records: list[dict], *keys: str) -> dict[tuple, float]:
    """Mean accuracy over seeds for each value of `keys`."""
    groups: dict[tuple, list[float]] = {}
    for record in records:
        groups.setdefault(tuple(record[k] for k in keys), []).append(record["accuracy"])
    return {key: statistics.fmean(values) for key, values in groups.items()}


def paired_suffix_gaps(records: list[dict]) -> dict[tuple, list[float]]:
    """(task, cache, init) -> residual-suffix minus mask-suffix accuracy, one value per
    (seed, block length, steps per block) pair."""
    by_key = {(r["task"], r["seed"], r["block_length"], r["steps_per_block"], r["cache"],
               r["method"]): r["accuracy"] for r in records}
    gaps: dict[tuple, list[float]] = {}
    for (task, seed, block, per_block, cache, method), accuracy in by_key.items():
        if not method.startswith("rcd residual-suffix"):
            continue
        init = method.rsplit(" ", 1)[1]
        mask = by_key[(task, seed, block, per_block, cache, f"rcd mask-suffix {init}")]
        gaps.setdefault((task, cache, init), []).append(accuracy - mask)
    return gaps


def report(records: list[dict]) -> str:
    """Markdown: mean accuracy per setting, then the paired suffix gaps and the decision."""
    tasks = sorted({r["task"] for r in records})
    settings = sorted({(r["block_length"], r["steps_per_block"]) for r in records})
    means = mean_by(records, "task", "block_length", "steps_per_block", "cache", "method")
    lines = []
    for task in tasks:
        lines += [f"### {task} (mean accuracy over seeds)", "",
                  "| block / steps per block | cache | " + " | ".join(METHODS) + " |",
                  "|---|---|" + "---|" * len(METHODS)]
        for block, per_block in settings:
            for cache in CACHES:
                cells = [f"{means[(task, block, per_block, cache, m)]:.3f}" for m in METHODS]
                lines.append(f"| {block} / {per_block} | {cache} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### residual-suffix minus mask-suffix (paired by seed and setting)", "",
              "| task | cache | init | mean | min | max | residual ahead |",
              "|---|---|---|---|---|---|---|"]
    for (task, cache, init), gaps in sorted(paired_suffix_gaps(records).items()):
        ahead = sum(g > 0 for g in gaps)
        lines.append(f"| {task} | {cache} | {init} | {statistics.fmean(gaps):+.3f} | "
                     f"{min(gaps):+.3f} | {max(gaps):+.3f} | {ahead}/{len(gaps)} |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Dual-cache accuracy, mask vs residual suffix, per task and setting (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records})
    settings = sorted({(r["block_length"], r["steps_per_block"]) for r in records})
    means = mean_by(records, "task", "block_length", "steps_per_block", "cache", "method")
    shown = ["seqd", "rcd mask-suffix warm", "rcd residual-suffix warm",
             "rcd mask-suffix cold", "rcd residual-suffix cold"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    width = 0.8 / len(shown)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, method in enumerate(shown):
            values = [means[(task, b, s, "dual", method)] for b, s in settings]
            ax.bar([x + i * width for x in range(len(settings))], values, width, label=method)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(settings))],
                      [f"block {b}\n{s} step/block" for b, s in settings])
        ax.set_ylabel("accuracy (dual cache)")
        ax.set_ylim(0, 1)
        ax.set_title(task)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Dual cache: later blocks fed [M] (mask) or stale residuals (residual)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["pointer_chasing", "coupled_choices"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--stage1", type=int, default=1000)
    parser.add_argument("--stage2", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--block-lengths", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps-per-block", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = RESULTS / f"suffix_{args.tag}.json"
    if args.plot_only:
        records = json.loads(out.read_text())["records"]
        plot(records, out.with_suffix(".png"))
        print(report(records))
        return

    from rcd_ext.demo.checkpoints import load_checkpoints, train_checkpoints
    from rcd_ext.tasks import get_task

    config = {k: v for k, v in vars(args).items() if k != "plot_only"}
    config.update(device="cpu", methods={k: list(v) for k, v in METHODS.items()},
                  command="python " + " ".join(sys.argv))
    records: list[dict] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for task_name in args.tasks:
            task = get_task(task_name)
            test = task.test_set(args.test_size, seed=0)  # the same problems for every seed
            for seed in args.seeds:
                began = time.perf_counter()
                directory = Path(work) / f"{task_name}-{seed}"
                train_checkpoints(directory, task=f"task:{task_name}", stage1=args.stage1,
                                  stage2=args.stage2, seed=seed)
                models = load_checkpoints(directory)
                records += decode_all(models, task, test, task_name=task_name, seed=seed,
                                      block_lengths=args.block_lengths,
                                      steps_per_block=args.steps_per_block)
                # after every seed, whole: a kill mid-write must not lose the earlier seeds
                write_json_atomic(out, {"config": config, "records": records}, indent=1)
                print(f"{task_name} seed {seed}: {time.perf_counter() - began:.0f}s", flush=True)
    plot(records, out.with_suffix(".png"))
    print(report(records))


if __name__ == "__main__":
    main()
