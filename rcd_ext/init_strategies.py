"""Init strategies: the first residual of a masked position that has no logits of its own yet.

`RCDModel` looks the configured `ResidualConfig.init` up here on every call and, for the masked
in-scope positions without a residual, asks the strategy for logits [R, V]; the residual op
turns them into residuals exactly as it does a real step's logits. Built in:

- cold: nothing (plain E[M] until the position's first step);
- reference: a frozen reference dLLM's forward over the whole sequence seen so far;
- self: one extra forward of the target model on the same call;
- dirichlet: log p0 with p0 ~ Dirichlet(c * 1) (`ResidualConfig.dirichlet_concentration`).

Adding one: a function `(wrapper, call) -> logits [R, V]` registered with
`register_init_strategy(InitStrategy("name", fn))` in a module of your own, plus its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rcd_ext.registry import Registry

if TYPE_CHECKING:
    from rcd_ext.wrapper import RCDModel

__all__ = ["INIT_STRATEGIES", "INIT_STRATEGY_REGISTRY", "InitCall", "InitStrategy",
           "get_init_strategy", "register_init_strategy"]


@dataclass(frozen=True)
class InitCall:
    """The wrapper call being primed.

    Attributes:
        input_ids: [B, l] the call's tokens.
        positions: [B, l] their absolute positions.
        rows, cols: [R] the entries of input_ids to prime (masked, in scope, no residual yet).
        args, kwargs: the call as the sampler made it (for strategies that run the model).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]


# (wrapper, call) -> logits [R, V] over the target's vocabulary, on the table's device
InitLogits = Callable[["RCDModel", InitCall], torch.Tensor]


@dataclass(frozen=True)
class InitStrategy:
    """One init strategy. `logits` None: the strategy primes nothing (cold).
    `needs_reference`: `RCDModel` then requires `ref_model` and checks it against the target."""

    name: str
    logits: InitLogits | None
    needs_reference: bool = False


INIT_STRATEGY_REGISTRY: Registry[InitStrategy] = Registry("init strategy")
# live tuple-like view of the names (ResidualConfig's check, CLI choices)
INIT_STRATEGIES = INIT_STRATEGY_REGISTRY.view()


def register_init_strategy(strategy: InitStrategy) -> InitStrategy:
    """Make `strategy` available as `ResidualConfig(init=strategy.name)`."""
    return INIT_STRATEGY_REGISTRY.register(strategy.name, strategy)


def get_init_strategy(name: str) -> InitStrategy:
    """The strategy registered as `name`; ValueError naming the known ones otherwise."""
    return INIT_STRATEGY_REGISTRY.get(name)


def _dirichlet_logits(wrapper: RCDModel, call: InitCall) -> torch.Tensor:
    # imported here: rcd_ext.residual imports this module for INIT_STRATEGIES
    from rcd_ext.residual import dirichlet_logits

    return dirichlet_logits(
        int(call.rows.numel()), wrapper.adapter.vocab_size,
        wrapper.residual_config.dirichlet_concentration,
        generator=wrapper.generator, device="cpu",
    ).to(wrapper.adapter.embed_weight.device)


def _self_logits(wrapper: RCDModel, call: InitCall) -> torch.Tensor:
    with torch.no_grad():
        output = wrapper.model(*call.args, **call.kwargs)
    wrapper.stats.self_init_forwards += 1
    return wrapper.adapter.logits(output)[call.rows, call.cols]


def _reference_logits(wrapper: RCDModel, call: InitCall) -> torch.Tensor:
    # imported here: rcd_ext.wrapper imports this module
    from rcd_ext.wrapper import UNKNOWN

    end = int(call.positions.max()) + 1
    context = wrapper.sequence[:, :end]
    if bool((context == UNKNOWN).any()):
        raise ValueError(
            "init='reference' needs every token before the positions being decoded, "
            "but the wrapper has not seen all of them (call it once on the full "
            "sequence first, or use init='self' / 'dirichlet' / 'cold')"
        )
    extra = wrapper.ref_adapter.uncached_kwargs(end, wrapper.block_length,
                                                call.input_ids.device)
    with torch.no_grad():
        output = wrapper.ref_model(input_ids=context, **extra)
    wrapper.stats.reference_forwards += 1
    return wrapper.ref_adapter.logits(output)[call.rows, call.positions[call.rows, call.cols]]


register_init_strategy(InitStrategy("cold", None))
register_init_strategy(InitStrategy("reference", _reference_logits, needs_reference=True))
register_init_strategy(InitStrategy("self", _self_logits))
register_init_strategy(InitStrategy("dirichlet", _dirichlet_logits))
