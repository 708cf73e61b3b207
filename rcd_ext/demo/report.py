"""The demo's outputs: a table, a plot of the two frontiers, and a plain verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcd_ext.atomic_files import save_figure_atomic

Record = dict[str, Any]
VARIANTS = (("seqd", None, "SeqD"), ("rcd", "warm", "RCD warm"), ("rcd", "cold", "RCD cold"))


def _setting(record: Record) -> tuple:
    return (record["steps"], record["threshold"])


def _label(setting: tuple) -> str:
    steps, threshold = setting
    return f"{steps} step{'s' if steps != 1 else ''}" if threshold is None else f"tau {threshold}"


def _find(records: list[Record], method: str, init: str | None, setting: tuple) -> Record | None:
    for record in records:
        if (record["method"], record["init"], _setting(record)) == (method, init, setting):
            return record
    return None


def settings_of(records: list[Record]) -> list[tuple]:
    """Settings in display order: fixed step budgets (fewest first), then thresholds."""
    unique = {_setting(r) for r in records}
    fixed = sorted((s for s in unique if s[1] is None), key=lambda s: s[0])
    return fixed + sorted((s for s in unique if s[1] is not None), key=lambda s: s[1])


def table(records: list[Record]) -> str:
    """Accuracy (tokens/step, forwards per problem) per setting and variant."""
    header = f"{'setting':<10}" + "".join(f"{name:>24}" for *_, name in VARIANTS)
    lines = [header, "-" * len(header)]
    for setting in settings_of(records):
        cells = []
        for method, init, _ in VARIANTS:
            r = _find(records, method, init, setting)
            cells.append("" if r is None else
                         f"{r['accuracy']:.3f} ({r['tokens_per_step']:.2f}/st, "
                         f"{r['forwards']:.1f}f)")
        lines.append(f"{_label(setting):<10}" + "".join(f"{c:>24}" for c in cells))
    lines.append("accuracy (tokens per step, forward passes per problem incl. the reference)")
    return "\n".join(lines)


def token_table(records: list[Record]) -> str:
    """Per-token accuracy (share of response tokens right) per setting and variant."""
    header = f"{'setting':<10}" + "".join(f"{name:>12}" for *_, name in VARIANTS)
    lines = [header, "-" * len(header)]
    for setting in settings_of(records):
        cells = [_find(records, method, init, setting) for method, init, _ in VARIANTS]
        lines.append(f"{_label(setting):<10}" + "".join(
            f"{'' if r is None else format(r['token_accuracy'], '.3f'):>12}" for r in cells))
    lines.append("per-token accuracy (response tokens right, position by position)")
    return "\n".join(lines)


def verdict(records: list[Record], init: str = "warm") -> list[str]:
    """Plain sentences: where RCD (`init` start, warm by default) is ahead of SeqD and where
    it is not."""
    ahead, behind, tied = [], [], []
    name = f"RCD {init}"
    for setting in settings_of(records):
        seqd, rcd = (_find(records, "seqd", None, setting),
                     _find(records, "rcd", init, setting))
        if seqd is None or rcd is None:
            continue
        gap = rcd["accuracy"] - seqd["accuracy"]
        # a difference of one problem or less is a tie, not a result
        bucket = tied if abs(gap) * seqd["n"] <= 1 else ahead if gap > 0 else behind
        bucket.append(f"{_label(setting)} ({rcd['accuracy']:.3f} vs {seqd['accuracy']:.3f})")
    lines = []
    fixed = [s for s in settings_of(records) if s[1] is None]
    if fixed:
        parallel = fixed[0]
        seqd = _find(records, "seqd", None, parallel)
        rcd = _find(records, "rcd", init, parallel)
        if seqd and rcd:
            state = "AHEAD of" if rcd["accuracy"] > seqd["accuracy"] else "NOT ahead of"
            lines.append(f"Most parallel common setting ({_label(parallel)} for the answer): "
                         f"{name} {rcd['accuracy']:.3f} is {state} SeqD {seqd['accuracy']:.3f}"
                         f" (RCD used {rcd['forwards']:.0f} forwards, "
                         f"SeqD {seqd['forwards']:.0f}).")
            # the warm start's reference forward is a real cost: compare at equal forwards too
            same_cost = [r for r in records if r["method"] == "seqd" and r["threshold"] is None
                         and abs(r["forwards"] - rcd["forwards"]) < 1e-6]
            if same_cost:
                other = same_cost[0]
                word = "ahead of" if rcd["accuracy"] > other["accuracy"] else "not ahead of"
                lines.append(f"At equal forward passes ({rcd['forwards']:.0f}), {name} is {word}"
                             f" SeqD with {other['steps']} steps ({other['accuracy']:.3f}).")
    lines.append(f"{name} ahead at: " + (", ".join(ahead) or "no setting"))
    lines.append(f"{name} behind at: " + (", ".join(behind) or "no setting"))
    if tied:
        lines.append("Tied (within one problem): " + ", ".join(tied))
    cold_ahead, cold_behind = _compare(records, "cold")
    if init != "cold" and (cold_ahead or cold_behind):
        lines.append("RCD cold (no extra forward) ahead at: " + (", ".join(cold_ahead) or
                                                                 "no setting")
                     + "; behind at: " + (", ".join(cold_behind) or "no setting"))
    best = {label: max(r["accuracy"] for r in records if (r["method"], r["init"]) == (m, i))
            for m, i, label in VARIANTS
            if any((r["method"], r["init"]) == (m, i) for r in records)}
    lines.append("Best accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    return lines


def _compare(records: list[Record], init: str) -> tuple[list[str], list[str]]:
    """Settings where RCD with `init` is ahead of / behind SeqD by more than one problem."""
    ahead, behind = [], []
    for setting in settings_of(records):
        seqd, rcd = _find(records, "seqd", None, setting), _find(records, "rcd", init, setting)
        if seqd is None or rcd is None:
            continue
        gap = rcd["accuracy"] - seqd["accuracy"]
        if abs(gap) * seqd["n"] > 1:
            (ahead if gap > 0 else behind).append(_label(setting))
    return ahead, behind


def plot(records: list[Record], path: Path, title: str) -> None:
    """PNG: accuracy vs tokens per step (left) and vs tokens per forward pass (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, (method, init, name) in zip(("C0", "C1", "C2"), VARIANTS, strict=True):
        rows = [r for r in records if (r["method"], r["init"]) == (method, init)]
        # fixed step budgets and thresholds are two policies: two curves, one colour
        for policy, marker, style in (("fixed", "o", "-"), ("threshold", "s", "--")):
            chosen = [r for r in rows if (r["threshold"] is None) == (policy == "fixed")]
            if not chosen:
                continue
            for axis, x_of in zip(axes, (lambda r: r["tokens_per_step"],
                                         lambda r: r["tokens_per_step"] * _steps_taken(r)
                                         / r["forwards"]), strict=True):
                points = sorted((x_of(r), r["accuracy"]) for r in chosen)
                axis.plot([p[0] for p in points], [p[1] for p in points], style, color=color,
                          marker=marker, label=f"{name} ({policy})")
    for axis, name in zip(axes, ("tokens per step", "tokens per forward (reference counted)"),
                          strict=True):
        axis.set_xlabel(name)
        axis.set_ylabel("exact match")
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    try:
        save_figure_atomic(figure, path, dpi=110)
    finally:
        plt.close(figure)


def _steps_taken(record: Record) -> float:
    """Mean denoising steps per problem (the answer length / tokens per step cancels out)."""
    return record["forwards"] - (1.0 if record["init"] == "warm" else 0.0)
