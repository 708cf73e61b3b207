"""Alpha strategies: how much of a masked position's residual is mixed in, from its entropy.

Every strategy maps the normalized entropy h = H / log V in [0, 1] of a position's tempered
distribution (and `alpha_scale`) to alpha; the residual is (1 - alpha) E[M] + alpha delta.

This registry is the list of strategies: `rcd_ext.ops`, `rcd_ext.op_reference`,
`rcd_ext.op_checks`, `ResidualConfig` and the CLI choices read it. A strategy is

- `alpha(normalized, alpha_scale)`: the reference definition, plain torch on float32 [N];
- `kernel_code`: the `rcd_ext::Strategy` value (csrc/residual_codes.h) when the compiled
  kernels fuse it, else None: the op then runs its plain-torch path (correct, unfused);
- `uses_entropy`: False when alpha ignores h (the kernels and the reference then skip the
  entropy; `alpha` receives zeros).

Adding one: `register_alpha_strategy(AlphaStrategy("name", fn))` in a module of your own plus its
test; to fuse it later, add its case to csrc/residual_codes.h and set `kernel_code`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rcd_ext.registry import Registry

__all__ = ["ALPHA_STRATEGIES", "AlphaStrategy", "STRATEGIES", "alpha_from_normalized",
           "get_alpha_strategy", "register_alpha_strategy"]

# (normalized entropy [N] float32, alpha_scale) -> alpha [N] float32
AlphaFunction = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class AlphaStrategy:
    """One alpha strategy (see the module docstring)."""

    name: str
    alpha: AlphaFunction
    kernel_code: int | None = None
    uses_entropy: bool = True


ALPHA_STRATEGIES: Registry[AlphaStrategy] = Registry("alpha strategy")
# live tuple-like view of the names: `name in STRATEGIES`, choices, error messages
STRATEGIES = ALPHA_STRATEGIES.view()


def register_alpha_strategy(strategy: AlphaStrategy) -> AlphaStrategy:
    """Make `strategy` available under `strategy.name` everywhere a strategy is accepted."""
    if strategy.kernel_code is not None and strategy.kernel_code in _kernel_codes():
        raise ValueError(f"alpha strategy {strategy.name!r}: kernel_code {strategy.kernel_code} "
                         f"is already used by {_kernel_codes()[strategy.kernel_code]!r}")
    return ALPHA_STRATEGIES.register(strategy.name, strategy)


def get_alpha_strategy(name: str) -> AlphaStrategy:
    """The strategy registered as `name`; ValueError naming the known ones otherwise."""
    return ALPHA_STRATEGIES.get(name)


def alpha_from_normalized(strategy: str, normalized: torch.Tensor,
                          alpha_scale: float) -> torch.Tensor:
    """alpha [N] float32 of `strategy` from the normalized entropy [N] float32."""
    return get_alpha_strategy(strategy).alpha(normalized, float(alpha_scale))


def _kernel_codes() -> dict[int, str]:
    return {s.kernel_code: name for name, s in ALPHA_STRATEGIES.items()
            if s.kernel_code is not None}


def _entropy_alpha(normalized: torch.Tensor, alpha_scale: float) -> torch.Tensor:
    return alpha_scale * normalized


def _confidence_alpha(normalized: torch.Tensor, alpha_scale: float) -> torch.Tensor:
    return alpha_scale * (1.0 - normalized)


def _fixed_alpha(normalized: torch.Tensor, alpha_scale: float) -> torch.Tensor:
    return torch.full_like(normalized, alpha_scale)


# the paper's strategy: uncertain positions take more of their residual
register_alpha_strategy(AlphaStrategy("entropy", _entropy_alpha, kernel_code=0))
register_alpha_strategy(AlphaStrategy("confidence", _confidence_alpha, kernel_code=1))
register_alpha_strategy(AlphaStrategy("fixed", _fixed_alpha, kernel_code=2, uses_entropy=False))
