"""One way to turn a seed into random streams for decoding.

`generate`, `wrap` and the lm-eval model each need one or two independent generators from one
user seed (sampling on the model's device, the Dirichlet warm start on the CPU). Stream `n` of
seed `s` is a generator seeded with `s + n`: stream 0 is what `wrap(seed=s)` has always used,
and `generate(seed=s)` samples from stream 0 and draws the Dirichlet init from stream 1.
"""

from __future__ import annotations

import torch

SAMPLING_STREAM = 0
DIRICHLET_STREAM = 1


def seeded_generator(seed: int | None, *, stream: int = 0,
                     device: torch.device | str = "cpu") -> torch.Generator | None:
    """A torch.Generator on `device` seeded with seed + stream; None when seed is None
    (unseeded: the global RNG)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed) + stream)
