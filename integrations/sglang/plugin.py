"""Entry point of group `sglang.srt.plugins`: makes `--dllm-algorithm RCD` resolvable.

SGLang builds `algo_name_to_cls` once, by scanning its own algorithm package, and resolves
`--dllm-algorithm` through `get_algorithm_cls`, which reads that dict. `load_plugins()` runs this
function in every SGLang process (launcher, scheduler, detokenizer) before server arguments are
resolved, so adding the class to the dict is all registration takes.
"""

from __future__ import annotations


def register() -> None:
    """Put `RCD` into SGLang's algorithm table (idempotent)."""
    from sglang.srt.dllm import algorithm as sglang_algorithms

    from rcd_ext.integrations.sglang.algorithm import RCD

    sglang_algorithms.algo_name_to_cls[RCD.__name__] = RCD
