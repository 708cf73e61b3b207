"""What every engine adapter shares: the RCD options, building the wrapper, and patching.

The residual logic itself lives in `rcd_ext.wrapper.RCDModel` (on top of `ResidualState` and
the fused op); this module only decides *how an engine reaches it*:

- `RCDOptions`: the keyword-only extras the patched samplers take (`rcd=`, `ref_model=`,
  residual options, `suffix=`), with defaults fixed when the patch is installed;
- `patch_attribute` / `AttributePatch`: the one way an adapter changes an engine: set an
  attribute on a class, an instance or a module, keep what was there, restore exactly (the
  owner's own `__dict__` as it was: an attribute that was inherited or absent is deleted
  again, never left behind as a copy);
- `SamplerPatch`: what a patch changed (`replace` goes through `patch_attribute`), and `undo()`;
- `unpatched`: the engine's own function behind a (possibly patched, possibly bound) value;
- `build_rcd_model`: one `RCDModel` per generate call (a fresh residual state per prompt);
- `swapped_forward`: for samplers that call the model as `self(...)` or `self.forward(...)`
  from a method bound to the model (Dream's `diffusion_generate`, v2's `batch_sample`), the
  model's `forward` is replaced for the duration of the call, with a re-entrancy guard so
  that a call made from inside the replacement reaches the original forward;
- `rebind`: replace a function everywhere it was imported by name (`from generate import
  generate` in the engine's eval/chat scripts keeps its own reference).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from rcd_ext.models.adapters import ModelAdapter
from rcd_ext.residual import ResidualConfig
from rcd_ext.wrapper import RCDModel

SUFFIXES = ("mask", "residual")


@dataclass(frozen=True)
class RCDOptions:
    """Options of a patched sampler (keyword-only extras; defaults set by the patch).

    rcd: False makes the patched sampler call the original with the original model (bit for
        bit the unpatched engine).
    ref_model: frozen reference dLLM for init="reference" (the paper's LLaDA warm start).
    residual: the residual options (`rcd_ext.residual.ResidualConfig`: t_res, temper_delta,
        strategy, alpha_scale, init, dirichlet_concentration); a patched sampler takes each of
        them as a keyword of its own (`t_res=0.92`). Its `scope` is set from `suffix`.
    suffix: what masked positions *after* the block being decoded receive (Fast-dLLM's
        semi-AR samplers): "mask" (default) keeps plain [M] embeddings there, so the dual
        cache's suffix K/V, written once per block, hold the same inputs as in the no-cache
        and prefix-cache samplers; "residual" also injects the last step's residuals there
        (the wrapper's scope="all"), which the dual cache then freezes for the whole block.
    seed: seeds the Dirichlet init.
    """

    rcd: bool = True
    ref_model: nn.Module | None = None
    residual: ResidualConfig = ResidualConfig()
    suffix: str = "mask"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.suffix not in SUFFIXES:
            raise ValueError(f"suffix must be one of {SUFFIXES}, got {self.suffix!r}")

    def residual_config(self, scope: str | None = None) -> ResidualConfig:
        """The `ResidualConfig` these options describe (`scope` overrides the suffix rule)."""
        if scope is None:
            scope = "block" if self.suffix == "mask" else "all"
        return replace(self.residual, scope=scope)

    def updated(self, changes: dict[str, Any]) -> RCDOptions:
        """A copy with `changes`, flat option names (None values keep the current option)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - set(OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown RCD option(s) {sorted(unknown)}; known: "
                            f"{sorted(OPTION_NAMES)}")
        residual = {k: changes.pop(k) for k in RESIDUAL_NAMES if k in changes}
        if residual:
            changes["residual"] = replace(self.residual, **residual)  # validates them
        return replace(self, **changes)


# the residual options a patched sampler takes as keywords (scope comes from `suffix`)
RESIDUAL_NAMES = tuple(f.name for f in fields(ResidualConfig) if f.name != "scope")

OPTION_NAMES = tuple(f.name for f in fields(RCDOptions) if f.name != "residual") + RESIDUAL_NAMES


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RCD options, the sampler's own kwargs) from the kwargs of a patched call."""
    options = {k: kwargs[k] for k in OPTION_NAMES if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
    return options, rest


def bound_arguments(signature: inspect.Signature, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every argument of a call by name, defaults included (block_length, mask_id exactly as
    the engine's function will see them)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def build_rcd_model(
    model: nn.Module,
    options: RCDOptions,
    *,
    mask_id: int,
    gen_start: int,
    block_length: int | None,
    scope: str | None = None,
    adapter: ModelAdapter | None = None,
    device: torch.device | None = None,
) -> RCDModel:
    """A fresh `RCDModel` for one generate call.

    gen_start: first generated position (blocks are counted from it, as the samplers do).
    block_length: the sampler's block; None injects at every masked position with logits.
    scope: "block" | "all" (default from `options.suffix`).
    """
    generator = None
    if options.seed is not None:
        generator = torch.Generator(device=device or "cpu").manual_seed(options.seed)
    rcd_model = RCDModel(model, ref_model=options.ref_model,
                         config=options.residual_config(scope), adapter=adapter,
                         mask_id=mask_id, block_length=block_length, block_origin="prompt",
                         generator=generator)
    rcd_model.reset(gen_start=gen_start)
    return rcd_model


_ABSENT = object()  # "the owner's __dict__ had no such attribute" (restore deletes it)
_REPLACED = "__rcd_replaced__"  # on an adapter's function: what its patch replaced


@dataclass
class AttributePatch:
    """One attribute set on a class, an instance or a module; `restore()` puts back exactly
    what the owner's own `__dict__` held (`is` the same object), or deletes the attribute
    when it was inherited or absent. Restoring twice does nothing the second time."""

    owner: Any
    name: str
    before: Any = _ABSENT
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        self.restored = True
        if self.before is _ABSENT:
            if self.name in vars(self.owner):
                delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.before)


def _function_of(value: Any) -> Any:
    # a bound method's attributes live on its function
    return getattr(value, "__func__", value)


def patch_attribute(owner: Any, name: str, value: Any, *,
                    over_patches: bool = False) -> AttributePatch:
    """Set `owner.name = value` (owner: class, instance or module); returns the
    `AttributePatch` that restores it.

    over_patches: when the attribute holds the function of an earlier RCD patch (a function
        with `__rcd_original__`, which is marked here with what it replaced), restore what
        that patch replaced, not the patch: re-patching starts from the unpatched engine
        instead of stacking (the engine adapters' rule).
    """
    if isinstance(owner, nn.Module) and any(name in vars(owner).get(table, {}) for table in
                                            ("_modules", "_parameters", "_buffers")):
        # these live in the module's tables, not its __dict__: no exact restore possible here
        raise TypeError(f"patch_attribute: {type(owner).__name__}.{name} is a submodule, "
                        "parameter or buffer (patch a method or a plain attribute)")
    before = vars(owner).get(name, _ABSENT)
    if over_patches:
        earlier = _function_of(before)
        if inspect.isfunction(earlier) and _REPLACED in vars(earlier):
            before = vars(earlier)[_REPLACED]
    function = _function_of(value)
    if inspect.isfunction(function) and hasattr(function, "__rcd_original__"):
        vars(function)[_REPLACED] = before  # only an adapter's own functions are marked
    setattr(owner, name, value)
    return AttributePatch(owner, name, before)


def unpatched(value: Any) -> Any:
    """The engine's own function behind `value`: a bound method gives its function, an RCD
    patch (`__rcd_original__`) the function it wraps."""
    function = _function_of(value)
    return getattr(function, "__rcd_original__", function)


@dataclass
class SamplerPatch:
    """What a patch changed; `undo()` restores the engine exactly.

    Attributes:
        options: the default RCD options of the patched samplers.
        originals: name -> original function (or method) per patched target.
        rebound: 'module.name' of every imported name rebound to a patched function.
        last_rcd_model: the `RCDModel` of the most recent RCD call (stats, alpha trace).
        last_hook: the `EmbeddingHookRCD` of the most recent call of a hook-based adapter.
    """

    options: RCDOptions
    originals: dict[str, Any] = field(default_factory=dict)
    rebound: list[str] = field(default_factory=list)
    last_rcd_model: RCDModel | None = None
    last_hook: Any = None
    _restore: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def call_options(self, kwargs: dict[str, Any]) -> tuple[RCDOptions, dict[str, Any]]:
        """(the options of one patched call, the engine function's own kwargs): the patch's
        defaults updated by the RCD keywords found in `kwargs`."""
        changes, rest = split_options(kwargs)
        return self.options.updated(changes), rest

    def replace(self, owner: Any, name: str, value: Any, original: Any = None) -> None:
        """Set `owner.name = value` until `undo()` (over an earlier RCD patch: `undo()` goes
        back to the unpatched engine); `original` is recorded in `originals[name]`."""
        self._restore.append(patch_attribute(owner, name, value, over_patches=True).restore)
        if original is not None:
            self.originals[name] = original

    def undo(self) -> None:
        """Put every original function back (module attributes and rebound imports)."""
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()


class _ReentrancyGuard:
    active = False


@contextlib.contextmanager
def swapped_forward(model: nn.Module, through: Callable[..., Any]) -> Iterator[None]:
    """Route `model(...)` and `model.forward(...)` through `through` while the block runs.

    The instance attribute `forward` shadows the class method; calls made from inside
    `through` (the wrapper's own call to the model, its "self" init forward, or an explicit
    `model.forward(...)`) re-enter and reach the original forward. Forward hooks registered
    on `model` therefore run twice per step (outer call and inner call): hooks that replace
    `forward` (accelerate's device hooks) are captured as the original and run once.
    """
    original = model.forward
    guard = _ReentrancyGuard()

    def forward(*args: Any, **kwargs: Any) -> Any:
        if guard.active:
            return original(*args, **kwargs)
        guard.active = True
        try:
            return through(*args, **kwargs)
        finally:
            guard.active = False

    swap = patch_attribute(model, "forward", forward)
    try:
        yield
    finally:
        swap.restore()


def rebind(old: Callable[..., Any], new: Callable[..., Any]) -> list[str]:
    """Replace every module-level name bound to `old` by `new`; returns 'module.name' rebound.

    Covers `from generate import generate_with_dual_cache` in scripts already imported
    (eval_llada.py, chat.py, __main__).
    """
    rebound = []
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is old:
                namespace[name] = new
                rebound.append(f"{module_name}.{name}")
    return rebound
