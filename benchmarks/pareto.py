"""SeqD vs RCD at equal training budget: tasks x residual sources x init x seeds.

Per (task, seed): stage 1 trains a fresh tiny dLLM with SeqD for --stage1 steps (the frozen
reference). Stage 2 starts every variant from those weights for --stage2 steps: SeqD continued
(the equal-budget baseline) and RCD with each residual source. Every model decodes the same
held-out problems at each step budget and threshold (RCD warm and cold).

    python benchmarks/pareto.py                        # both tasks, 3 seeds (~30 min, 2 cores)
    python benchmarks/pareto.py --tasks coupled_choices --seeds 0 --stage1 200 --stage2 100
    python benchmarks/pareto.py --plot-only            # redraw from the JSON
    python benchmarks/pareto.py --plot-only --merge cpu_pointer_chasing cpu_coupled_choices

Writes benchmarks/results/pareto_<tag>.json (config + one record per setting, the demo's
schema plus task, seed, variant) after every (task, seed), and pareto_<tag>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from rcd_ext.atomic_files import save_figure_atomic, write_json_atomic

RESULTS = Path(__file__).parent / "results"
# name -> (stage, residual source, no-residual fraction)
VARIANTS: dict[str, tuple[str, str, float]] = {
    "seqd": ("seqd", "same", 0.0),
    "rcd-same": ("rcd", "same", 0.1),
    "rcd-previous-step": ("rcd", "previous-step", 0.1),
    "rcd-previous-step-nr0": ("rcd", "previous-step", 0.0),
    "rcd-self": ("rcd", "self", 0.1),
}


def run_one(task_name: str, seed: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Train the reference and every variant for one (task, seed); decode; return records."""
    from rcd_ext.demo.evaluate import decode_record
    from rcd_ext.tasks import get_task
    from rcd_ext.training import DiffusionArguments, build_tiny_model, train
    from rcd_ext.training.trainer import load_trainable

    spec = f"task:{task_name}"
    task = get_task(task_name)
    test = task.test_set(args.test_size, seed=0)  # fixed for every seed and variant
    common = dict(logging_steps=10**9, save_steps=10**9, seed=seed)
    model, tokenizer = build_tiny_model(spec, layers=args.layers, seed=seed)
    ref_dir = work / f"{task_name}-{seed}-ref"
    began = time.perf_counter()
    train(data=spec, output_dir=str(ref_dir), diffusion=DiffusionArguments(stage="seqd"),
          model=model, tokenizer=tokenizer, max_steps=args.stage1, **common)
    print(f"{task_name} seed {seed}: stage 1 {time.perf_counter() - began:.0f}s", flush=True)
    reference, _ = load_trainable(str(ref_dir))
    reference.eval()
    records = []
    for name, (stage, source, no_residual) in VARIANTS.items():
        began = time.perf_counter()
        target, _ = load_trainable(str(ref_dir))
        diffusion = DiffusionArguments(stage=stage, residual_source=source,
                                       no_residual_fraction=no_residual)
        # stage 2 draws its data and noise from another seed than stage 1
        train(data=spec, output_dir=str(work / f"{task_name}-{seed}-{name}"),
              diffusion=diffusion, model=target, tokenizer=tokenizer, max_steps=args.stage2,
              reference=reference if stage == "rcd" else None,
              **{**common, "seed": seed + 1000})
        target.eval()
        inits = [None] if stage == "seqd" else ["warm", "cold"]
        for init in inits:
            settings = [(s, None) for s in args.steps] + [(None, t) for t in args.thresholds]
            for steps, threshold in settings:
                record = decode_record(target, task, test, method="seqd" if init is None
                                       else "rcd", init=init, steps=steps, threshold=threshold,
                                       reference=reference)
                records.append({"task": task_name, "seed": seed, "variant": name,
                                "answer_length": task.answer_length, **record})
        print(f"  {name}: {time.perf_counter() - began:.0f}s", flush=True)
    return records


def summarise(records: list[dict]) -> dict[tuple, dict[str, float]]:
    """Mean accuracy/tokens per step/forwards over seeds, keyed by (task, variant, init,
    steps, threshold)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["variant"], r["init"], r["steps"], r["threshold"])].append(r)
    return {key: {"accuracy": sum(r["accuracy"] for r in rows) / len(rows),
                  "tokens_per_step": sum(r["tokens_per_step"] for r in rows) / len(rows),
                  "forwards": sum(r["forwards"] for r in rows) / len(rows),
                  "answer_length": rows[0]["answer_length"],
                  "seeds": len(rows)} for key, rows in groups.items()}


def markdown_table(records: list[dict], steps: list[int], thresholds: list[float]) -> str:
    """Mean accuracy per variant/init (rows) and setting (columns), per task."""
    summary = summarise(records)
    lines = []
    for task in sorted({r["task"] for r in records}):
        header = [f"s{s}" for s in steps] + [f"tau {t}" for t in thresholds]
        lines += [f"**{task}**", "", "| variant | init | " + " | ".join(header) + " |",
                  "|---|---|" + "---|" * len(header)]
        keys = sorted({(k[1], k[2]) for k in summary if k[0] == task},
                      key=lambda k: (k[0] != "seqd", k))
        for variant, init in keys:
            cells = []
            for s in steps:
                v = summary.get((task, variant, init, s, None))
                cells.append("" if v is None else f"{v['accuracy']:.3f}")
            for t in thresholds:
                v = summary.get((task, variant, init, None, t))
                cells.append("" if v is None else
                             f"{v['accuracy']:.3f} ({v['tokens_per_step']:.2f})")
            lines.append(f"| {variant} | {init or '-'} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paired_lines(records: list[dict], steps: list[int]) -> str:
    """Per task, RCD variant/init minus SeqD at each fixed step budget, paired by seed:
    mean difference and the number of seeds where RCD is ahead."""
    by_key = {(r["task"], r["seed"], r["variant"], r["init"], r["steps"]): r["accuracy"]
              for r in records if r["threshold"] is None}
    lines = []
    for task in sorted({r["task"] for r in records}):
        seeds = sorted({r["seed"] for r in records if r["task"] == task})
        lines.append(f"paired RCD - SeqD on {task} ({len(seeds)} seeds; mean, seeds ahead):")
        for variant in [v for v in VARIANTS if v != "seqd"]:
            for init in ("warm", "cold"):
                cells = []
                for s in steps:
                    diffs = [by_key[(task, seed, variant, init, s)]
                             - by_key[(task, seed, "seqd", None, s)] for seed in seeds
                             if (task, seed, variant, init, s) in by_key]
                    if diffs:
                        ahead = sum(d > 0 for d in diffs)
                        cells.append(f"s{s} {sum(diffs) / len(diffs):+.3f} ({ahead}/{len(diffs)})")
                lines.append(f"  {variant} {init}: " + ", ".join(cells))
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Accuracy vs tokens per step and vs tokens per forward, one row of panels per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(records)
    tasks = sorted({r["task"] for r in records})
    figure, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        curves: dict[tuple, list] = defaultdict(list)
        for (t, variant, init, _s, _tau), v in summary.items():
            if t == task:
                curves[(variant, init)].append({**v, "fixed": _tau is None})
        for index, ((variant, init), points) in enumerate(sorted(curves.items(),
                                                                 key=lambda c: str(c[0]))):
            label = variant if init is None else f"{variant} {init}"
            color = f"C{index}"
            for column, axis_key in enumerate(("tokens_per_step", "per_forward")):
                def x_of(p: dict, axis_key: str = axis_key) -> float:
                    return (p["tokens_per_step"] if axis_key == "tokens_per_step"
                            else p["answer_length"] / p["forwards"])
                # fixed step budgets as a line, thresholds as open squares (another policy)
                fixed = sorted((x_of(p), p["accuracy"]) for p in points if p["fixed"])
                axes[row, column].plot([x for x, _ in fixed], [y for _, y in fixed],
                                       ":" if init == "cold" else "-", color=color, marker="o",
                                       markersize=3, label=label)
                tau = [(x_of(p), p["accuracy"]) for p in points if not p["fixed"]]
                axes[row, column].scatter([x for x, _ in tau], [y for _, y in tau],
                                          marker="s", facecolors="none", edgecolors=color)
        for column, name in enumerate(("tokens per step", "tokens per forward (ref counted)")):
            axes[row, column].set_xlabel(name)
            axes[row, column].set_ylabel("exact match")
            axes[row, column].set_title(f"{task}: accuracy vs {name}\n"
                                        "(lines: fixed steps; squares: thresholds)", fontsize=9)
            axes[row, column].grid(alpha=0.3)
        axes[row, 0].legend(fontsize=7)
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["pointer_chasing", "coupled_choices"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--stage1", type=int, default=1000)
    parser.add_argument("--stage2", type=int, default=500)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--tag", default="cpu", help="results file suffix")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--merge", nargs="+", default=None, metavar="TAG",
                        help="with --plot-only: join pareto_TAG.json files into pareto_<tag>")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = RESULTS / f"pareto_{args.tag}.json"
    if args.plot_only:
        if args.merge:
            parts = [json.loads((RESULTS / f"pareto_{tag}.json").read_text())
                     for tag in args.merge]
            config = {**parts[0]["config"], "tasks": [t for p in parts
                                                      for t in p["config"]["tasks"]],
                      "tag": args.tag, "command": [p["config"].get("command") for p in parts]
                      + ["python " + " ".join(sys.argv)]}
            write_json_atomic(out, {"config": config, "records": [
                r for p in parts for r in p["records"]]}, indent=1)
        data = json.loads(out.read_text())
        plot(data["records"], out.with_suffix(".png"))
        print(markdown_table(data["records"], data["config"]["steps"],
                             data["config"]["thresholds"]))
        print(paired_lines(data["records"], data["config"]["steps"]))
        return
    config = {k: v for k, v in vars(args).items() if k != "plot_only"}
    config["variants"] = {k: list(v) for k, v in VARIANTS.items()}
    config["device"] = "cpu"
    config["command"] = "python " + " ".join(sys.argv)
    records: list[dict[str, Any]] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks:
            for seed in args.seeds:
                records += run_one(task, seed, args, Path(work))
                # after every seed, whole: a kill mid-write must not lose the earlier seeds
                write_json_atomic(out, {"config": config, "records": records}, indent=1)
    plot(records, out.with_suffix(".png"))
    print(markdown_table(records, args.steps, args.thresholds))
    print(paired_lines(records, args.steps))


if __name__ == "__main__":
    main()
