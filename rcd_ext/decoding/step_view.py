"""Views of a decoding trace: how each block unmasked, step by step, with alpha per position.

- `render_steps`: a text grid (one line per step, one column per position): tokens committed
  at that step stand out (bold green on a terminal, `*token*` otherwise), earlier ones are
  plain, positions still masked after the step show a shade glyph and the alpha of the residual
  they were given as input to that step (the init strategy's on a block's first line).
- `trace_records`: the same as JSON-ready dicts.
- `plot_steps`: a PNG heat map (steps x positions, colour = alpha, committed tokens written in),
  written atomically (`rcd_ext.atomic_files`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rcd_ext.atomic_files import save_figure_atomic
from rcd_ext.decoding.generation import StepTrace

SHADES = " ░▒▓█"
GREEN_BOLD, RESET = "\033[1;32m", "\033[0m"


def _shade(alpha: float) -> str:
    return SHADES[min(len(SHADES) - 1, int(round(alpha * (len(SHADES) - 1))))]


def token_namer(tokenizer: Any) -> Callable[[int], str]:
    """id -> short printable token text (the id itself without a tokenizer)."""
    if tokenizer is None:
        return str

    def name(token_id: int) -> str:
        text = tokenizer.convert_ids_to_tokens(int(token_id))
        text = str(text).replace("Ġ", "_").replace("▁", "_").replace("\n", "\\n")
        return text if len(text) <= 8 else text[:7] + "…"

    return name


def render_steps(
    trace: Sequence[StepTrace],
    mask_id: int,
    *,
    row: int = 0,
    tokenizer: Any = None,
    color: bool = False,
) -> str:
    """Text grid of batch row `row`'s trace; one section per block."""
    name = token_namer(tokenizer)
    lines: list[str] = []
    if not trace:
        return "(no steps recorded)"
    width = 5  # "▒0.51"
    for record in trace:
        for token_id in record.tokens[row].tolist():
            if token_id != mask_id:
                width = max(width, len(name(token_id)) + 2)  # room for *fresh* markers
    width += 1  # a space between columns
    current_block = None
    for record in trace:
        if record.block != current_block:
            current_block = record.block
            span = record.tokens.shape[1]
            end = record.start + span - 1
            lines.append(f"block {record.block}  positions {record.start}..{end}  "
                         "(masked: shade + alpha of the residual given to the step)")
            header = "".join(f"{record.start + i:>{width}}" for i in range(span))
            lines.append(f"{'step':>5} |{header}")
        cells = []
        for token_id, fresh, alpha in zip(record.tokens[row].tolist(),
                                          record.committed[row].tolist(),
                                          record.alpha_in[row].tolist(), strict=True):
            if token_id == mask_id:
                text = f"{_shade(alpha)}{alpha:.2f}"
                cells.append(f"{text:>{width}}")
            elif fresh:
                text = name(token_id)
                if color:
                    cells.append(" " * max(0, width - len(text)) + GREEN_BOLD + text + RESET)
                else:
                    cells.append(f"{'*' + text + '*':>{width}}")
            else:
                cells.append(f"{name(token_id):>{width}}")
        count = sum(record.committed[row].tolist())
        lines.append(f"{record.step + 1:>5} |{''.join(cells)}   +{count}")
    return "\n".join(lines)


def trace_records(trace: Sequence[StepTrace], tokenizer: Any = None) -> list[dict[str, Any]]:
    """JSON-ready list: block, step, start, tokens, committed, alpha_in, alpha (per row)."""
    name = token_namer(tokenizer)
    records = []
    for record in trace:
        records.append({
            "block": record.block, "step": record.step, "start": record.start,
            "tokens": record.tokens.tolist(),
            "token_text": [[name(t) for t in row] for row in record.tokens.tolist()]
            if tokenizer is not None else None,
            "committed": record.committed.tolist(),
            "alpha_in": [[round(a, 4) for a in row] for row in record.alpha_in.tolist()],
            "alpha": [[round(a, 4) for a in row] for row in record.alpha.tolist()],
        })
    return records


def plot_steps(trace: Sequence[StepTrace], mask_id: int, path: str | Path, *, row: int = 0,
               tokenizer: Any = None, title: str = "RCD unmasking") -> Path:
    """Write a PNG: rows = steps (all blocks stacked), columns = positions, colour = the alpha
    each masked position was given at that step; committed tokens written where they land."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = token_namer(tokenizer)
    first = min(r.start for r in trace)
    last = max(r.start + r.tokens.shape[1] for r in trace)
    grid = np.full((len(trace), last - first), np.nan)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * (last - first)), max(3, 0.35 * len(trace))))
    for index, record in enumerate(trace):
        for offset, (token_id, fresh, alpha) in enumerate(zip(
                record.tokens[row].tolist(), record.committed[row].tolist(),
                record.alpha_in[row].tolist(), strict=True)):
            column = record.start - first + offset
            if token_id == mask_id or fresh:
                grid[index, column] = alpha
            if fresh:
                ax.text(column, index, name(token_id), ha="center", va="center", fontsize=7,
                        fontweight="bold", color="darkgreen")
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="alpha given to masked positions")
    ax.set_xlabel("position")
    ax.set_ylabel("denoising step (blocks stacked)")
    ax.set_xticks(range(0, last - first, max(1, (last - first) // 16)))
    ax.set_xticklabels([str(first + i) for i in range(0, last - first,
                                                       max(1, (last - first) // 16))])
    ax.set_title(title)
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path, dpi=120)  # a failed save keeps the previous PNG
    finally:
        plt.close(fig)
