"""Where RCD drifts over long self-loops: a step-by-step account of the slowest decodes.

Reads the checkpoints `benchmarks/pareto.py --keep DIR` left (DIR/<task>-<seed>-<variant>) and
decodes the task's held-out problems at every step budget with a step trace. For each model it
reports, per step of the L-step decode (one token per step):

- the first-error hazard: of the rows with no wrong token yet, the share whose first wrong
  token that step commits (knock-on errors after a first one are not counted);
- the error rate of all the step's commits;
- the mean residual weight alpha_in the committed positions carried into that step.

Then it tries what each hypothesis suggests, at inference only, on every RCD model, at L/2 and
L steps: a smaller
residual weight (alpha_scale 0.5 and 0.25), a sharper or flatter alpha (t_res 0.5 and 2), the
opposite weighting (strategy confidence: alpha = 1 - H / log V), and reports exact match at each
step count.

    python benchmarks/drift.py --keep /tmp/pareto-models --task pointer_chasing:hops=16 --seeds 0 1
    python benchmarks/drift.py --plot-only

Writes benchmarks/results/drift_<tag>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from rcd_ext.atomic_files import save_figure_atomic, write_json_atomic

RESULTS = Path(__file__).parent / "results"
INTERVENTIONS: dict[str, dict[str, float]] = {
    "as trained": {},
    "alpha_scale 0.5": {"alpha_scale": 0.5},
    "alpha_scale 0.25": {"alpha_scale": 0.25},
    "t_res 0.5": {"t_res": 0.5},
    "t_res 2": {"t_res": 2.0},
    "strategy confidence": {"strategy": "confidence"},
}


def step_account(trace: list, answers: torch.Tensor) -> list[dict[str, float]]:
    """Per step of one decode: errors among the commits, the hazard of a first error, alpha.

    trace: `GenerationResult.trace` of a one-block decode; answers: [B, L] the gold tokens
    (the tasks here have one correct answer, so a token is right iff it equals gold).
    hazard: of the rows with no wrong token yet, the share whose first wrong token this step
    commits; drift over a long self-loop shows as a hazard that rises with the step.
    """
    rows = answers.shape[0]
    wrong_before = torch.zeros(rows, dtype=torch.bool)
    account = []
    for step in trace:
        committed = step.committed
        wrong = committed & (step.tokens != answers)
        first = wrong.any(1) & ~wrong_before
        clean = int((~wrong_before).sum())
        account.append({
            "commits": int(committed.sum()),
            "error_rate": float(wrong.sum()) / max(int(committed.sum()), 1),
            "first_errors": int(first.sum()),
            "hazard": float(first.sum()) / max(clean, 1),
            "alpha_in": float(step.alpha_in[committed].mean()) if committed.any() else 0.0,
        })
        wrong_before |= wrong.any(1)
    return account


def analyse_model(path: Path, task: Any, test: list, *, method: str, init: str | None,
                  reference: Any) -> dict[str, Any]:
    """The step account of the L-step decode and exact match under each intervention."""
    from rcd_ext.decoding import generate
    from rcd_ext.demo.evaluate import decode_record
    from rcd_ext.training.trainer import load_trainable

    model, _ = load_trainable(str(path))
    model.eval()
    prompts = torch.stack([p for p, _ in test])
    answers = torch.stack([a for _, a in test])
    length = task.answer_length
    out = generate(model, prompts, gen_length=length, block_length=length, steps=length,
                   rcd=method == "rcd", ref_model=reference if init == "warm" else None,
                   init="reference" if init == "warm" else (init or "cold"),
                   stop_at_eos=False, trace=True, seed=0)
    result: dict[str, Any] = {"steps_account": step_account(out.trace, answers),
                              "accuracy": {}}
    settings = sorted({1, 2, length // 4, length // 2, length} - {0})
    for name, options in (INTERVENTIONS.items() if method == "rcd" else [("as trained", {})]):
        # the interventions at the long loops only (L/2 and L steps), where drift would show
        steps_tried = settings if not options else [length // 2, length]
        result["accuracy"][name] = {
            steps: decode_record(model, task, test, method=method, init=init, steps=steps,
                                 reference=reference, **options)["accuracy"]
            for steps in steps_tried}
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rcd_ext.training.data import parse_task_spec
    from rcd_ext.training.trainer import load_trainable

    task = parse_task_spec(f"task:{args.task}")  # a name, or NAME:key=value,...
    test = task.test_set(args.test_size, seed=0)
    models: dict[str, Any] = defaultdict(dict)
    for seed in args.seeds:
        reference, _ = load_trainable(str(args.keep / f"{args.task}-{seed}-ref"))
        reference.eval()
        for variant in args.variants:
            path = args.keep / f"{args.task}-{seed}-{variant}"
            method = "seqd" if variant.startswith("seqd") else "rcd"
            for init in [None] if method == "seqd" else args.inits:
                label = variant if init is None else f"{variant} {init}"
                models[label][seed] = analyse_model(path, task, test, method=method, init=init,
                                                    reference=reference)
                print(f"{label} seed {seed}: {models[label][seed]['accuracy']}", flush=True)
    return {"task": args.task, "seeds": args.seeds, "models": models}


def mean_account(per_seed: dict) -> list[dict[str, float]]:
    """The step accounts averaged over seeds."""
    accounts = list(per_seed.values())
    keys = accounts[0]["steps_account"][0].keys()
    return [{k: sum(a["steps_account"][j][k] for a in accounts) / len(accounts) for k in keys}
            for j in range(len(accounts[0]["steps_account"]))]


def summary_lines(data: dict[str, Any]) -> str:
    lines = []
    for label, per_seed in data["models"].items():
        account = mean_account(per_seed)
        hazard = " ".join(f"{a['hazard']:.2f}" for a in account)
        alphas = " ".join(f"{a['alpha_in']:.2f}" for a in account)
        lines.append(f"{label}: first-error hazard per step [{hazard}]")
        lines.append(f"  alpha_in of the commits per step [{alphas}]")
        first = next(iter(per_seed.values()))["accuracy"]
        for name, steps in first.items():
            means = {s: sum(per_seed[seed]["accuracy"][name][s] for seed in per_seed)
                     / len(per_seed) for s in steps}
            lines.append(f"  {name}: " + ", ".join(f"s{s} {v:.3f}" for s, v in means.items()))
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (errors, alphas) = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, (label, per_seed) in enumerate(data["models"].items()):
        account = mean_account(per_seed)
        x = range(1, len(account) + 1)
        style = ":" if label.endswith("cold") else "--" if label.endswith("dirichlet") else "-"
        errors.plot(x, [a["hazard"] for a in account], style, color=f"C{index}",
                    label=label, marker="o", markersize=3)
        if not label.startswith("seqd"):
            alphas.plot(x, [a["alpha_in"] for a in account], style, color=f"C{index}",
                        label=label, marker="o", markersize=3)
    errors.set(xlabel="step of the L-step decode (one token per step)",
               ylabel="first-error hazard",
               title=f"{data['task']}: first-error hazard per step\n"
                     f"(of the rows still right; mean over seeds {data['seeds']})")
    alphas.set(xlabel="step", ylabel="mean alpha_in of the committed positions",
               title="residual weight the committed positions carried")
    for axis in (errors, alphas):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="the folder pareto.py --keep wrote")
    parser.add_argument("--task", default="pointer_chasing:hops=16")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+",
                        default=["seqd", "rcd-previous-step", "rcd-dirichlet", "rcd-unroll",
                                 "rcd-unroll-model"])
    parser.add_argument("--inits", nargs="+", default=["warm", "dirichlet"])
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = RESULTS / f"drift_{args.tag}.json"
    if args.plot_only:
        data = json.loads(out.read_text())
    else:
        if args.keep is None:
            parser.error("--keep is required (the folder pareto.py --keep wrote)")
        data = run(args)
        data["command"] = "python " + " ".join(sys.argv)
        data["device"] = "cpu"
        write_json_atomic(out, data, indent=1)
    plot(data, out.with_suffix(".png"))
    print(summary_lines(data))


if __name__ == "__main__":
    main()
