"""Residual and decoding options: one dataclass per concern, each field's rules in its metadata.

`ResidualConfig` (the residual) and `DecodingConfig` (the decoding loop) are THE definition of
their options: name, type, default, help, choices and bounds. Everything that takes them
generates from the fields: `rcd generate`'s flags (`add_arguments`), lm-eval's `model_args`
(`integrations.lm_eval_args`), `generate(**flat)` and `wrap(**flat)` (`split_flat`), the engine
patches (`integrations.engine_patching`).

Metadata keys of a field (`option(...)`): "help"; "choices", a tuple or a `LazyChoices` (names
that live in torch modules: read on first use, so `rcd --help` does not import torch);
"bounds", a `Bounds`. The gen_length / block_length / steps rules are `check_lengths`, called by
`DecodingConfig.__post_init__` and, spelled as each boundary names its options (`Spelling`), by
the CLI and lm-eval.

This module imports no torch: the CLI builds its parser from it.
"""

from __future__ import annotations

import argparse
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

__all__ = [
    "CACHE_MODES", "CLI", "PYTHON", "REFERENCE_SOURCES", "RESIDUAL_SOURCES", "STAGES",
    "UNROLL_COMMITS", "UNROLL_INITS", "Bounds", "DecodingConfig", "DiffusionArguments",
    "LazyChoices", "OptionError", "ResidualConfig", "Spelling", "add_arguments",
    "check_lengths", "field_type", "needs_reference_model", "option", "option_names",
    "split_flat",
]

CACHE_MODES = ("none", "prefix", "dual")
# stage-2 training: where a masked position's residual comes from (rcd_ext.training.objective);
# the first two read the frozen reference model
RESIDUAL_SOURCES = ("same", "previous-step", "self", "dirichlet", "unroll")
REFERENCE_SOURCES = ("same", "previous-step")
STAGES = ("seqd", "rcd")
# what the first step of source "unroll"'s decoding loop is given (as inference's `init`)
UNROLL_INITS = ("cold", "dirichlet")
# what source "unroll" commits: the target's own tokens, or the true ones at its chosen positions
UNROLL_COMMITS = ("truth", "model")


def needs_reference_model(stage: str, residual_source: str) -> bool:
    """Whether training `stage` with `residual_source` reads the frozen reference model."""
    return stage == "rcd" and residual_source in REFERENCE_SOURCES


class LazyChoices(Sequence[str]):
    """A tuple of names read on first use from `load` (e.g. a registry in a torch module)."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load

    def names(self) -> tuple[str, ...]:
        return tuple(self._load())

    def __getitem__(self, index: Any) -> Any:
        return self.names()[index]

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, value: object) -> bool:
        return value in self.names()

    def __repr__(self) -> str:
        return repr(self.names())


@dataclass(frozen=True)
class Bounds:
    """An interval of accepted numbers; `text` says it the way messages do ("in (0, 1]")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    @property
    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number_text(self.low)}"
        return (f"in {'(' if self.low_open else '['}{_number_text(self.low)}, "
                f"{_number_text(self.high)}{')' if self.high_open else ']'}")


def _number_text(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


POSITIVE = Bounds(low=0, low_open=True)
NONNEGATIVE = Bounds(low=0)
AT_LEAST_ONE = Bounds(low=1)
PROBABILITY = Bounds(low=0, high=1, low_open=True)
UNIT = Bounds(low=0, high=1)


def option(default: Any, help: str, *, choices: Sequence[str] | None = None,
           bounds: Bounds | None = None) -> Any:
    """A dataclass field carrying its help, choices and bounds (see the module docstring)."""
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds})


class OptionError(ValueError):
    """A bad option value; `name` is the field (e.g. "steps"), the message says what to give."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Spelling:
    """How a boundary writes options in messages: Python and lm-eval `steps=3`, CLI
    `--steps 3`; `exceeds` is the word for "larger than" (the CLI has always printed ">")."""

    flags: bool = False
    exceeds: str = "exceeds"

    def name(self, field_name: str) -> str:
        return "--" + field_name.replace("_", "-") if self.flags else field_name

    def given(self, field_name: str, value: Any) -> str:
        if self.flags:
            return f"{self.name(field_name)} {value}"
        return f"{field_name}={value!r}"


PYTHON = Spelling()
CLI = Spelling(flags=True, exceeds=">")


def check_lengths(gen_length: int, block_length: int, steps: int | None,
                  spelling: Spelling = PYTHON) -> None:
    """THE gen_length / block_length / steps rules; OptionError naming the option otherwise.

    gen_length must be whole blocks; steps (None: gen_length) at most gen_length (each step
    commits at least one token, so extra steps never run) and a multiple of the block count
    (every block gets the same number of steps).
    """
    def given(name: str, value: Any) -> str:
        return spelling.given(name, value)

    if gen_length % block_length:
        raise OptionError("gen_length", (
            f"{given('gen_length', gen_length)} is not a multiple of "
            f"{given('block_length', block_length)} (give a multiple of {block_length}, or "
            f"change {spelling.name('block_length')})"))
    if steps is None:
        return
    if steps > gen_length:
        raise OptionError("steps", (
            f"{given('steps', steps)} {spelling.exceeds} {given('gen_length', gen_length)}: "
            f"each step unmasks at least one token, so at most {gen_length} steps run (use "
            f"{given('steps', gen_length)} or fewer)"))
    blocks = gen_length // block_length
    if steps % blocks:
        raise OptionError("steps", (
            f"{given('steps', steps)} is not a multiple of the {blocks} blocks "
            f"({given('gen_length', gen_length)} / {given('block_length', block_length)}): "
            f"each block gets the same number of steps, so steps must be a positive multiple "
            f"of the number of blocks (give a multiple of {blocks})"))


def check_fields(config: Any) -> None:
    """OptionError for a field outside its choices or bounds (None passes: "not set")."""
    for spec in fields(config):
        check_field(spec, getattr(config, spec.name))


def check_field(spec: Field, value: Any) -> None:
    """OptionError if `value` is outside the field's choices or bounds (None passes)."""
    choices, bounds = spec.metadata.get("choices"), spec.metadata.get("bounds")
    if value is None:
        return
    if choices is not None and value not in choices:
        raise OptionError(spec.name, f"{spec.name} must be one of {tuple(choices)}, "
                                     f"got {value!r}")
    if bounds is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                               or not bounds.contains(value)):
        raise OptionError(spec.name, f"{spec.name} must be {bounds.text}, got {value!r}")


def _strategies() -> Sequence[str]:
    from rcd_ext.op_reference import STRATEGIES

    return STRATEGIES


def _init_strategies() -> Sequence[str]:
    from rcd_ext.residual import INIT_STRATEGIES

    return INIT_STRATEGIES


def _policies() -> Sequence[str]:
    from rcd_ext.decoding.remasking import POLICIES

    return POLICIES


def _scopes() -> Sequence[str]:
    from rcd_ext.residual import SCOPES

    return SCOPES


@dataclass(frozen=True)
class ResidualConfig:
    """Residual options (defaults: the paper's printed algorithm); see each field's help.

    scope "block" injects only inside the block being decoded (positions of later blocks keep
    plain [M]: the same inputs in every cache mode, and N rows of work per step instead of the
    whole tail); "all" injects at every masked position that has logits. residual_top_k k
    reads k rows of the table per position instead of all V (`rcd_ext.ops.residual_context`).
    """

    t_res: float = option(1.0, "temperature of the entropy that gives alpha (and delta with "
                               "temper_delta)", bounds=POSITIVE)
    temper_delta: bool = option(False, "take delta from softmax(z / t_res) instead of "
                                       "softmax(z)")
    strategy: str = option("entropy", "alpha from the entropy H: entropy (H / log V), "
                                      "confidence (1 - H / log V) or fixed (alpha_scale)",
                           choices=LazyChoices(_strategies))
    alpha_scale: float = option(1.0, "multiplies alpha (with strategy fixed it is alpha); 0 "
                                     "turns residuals off", bounds=UNIT)
    init: str = option("cold", "what a masked position gets before it has logits of its own",
                       choices=LazyChoices(_init_strategies))
    dirichlet_concentration: float = option(1.0, "c of the symmetric Dirichlet(c) used by init "
                                                 "dirichlet", bounds=POSITIVE)
    scope: str = option("block", "where residuals are injected: the block being decoded, or "
                                 "every masked position with logits",
                        choices=LazyChoices(_scopes))
    residual_top_k: int | None = option(None, "sparse residual: delta from the K most likely "
                                              "tokens' rows (+ the tail's mass on the mean of "
                                              "the others); default exact", bounds=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        # the existing messages, raised through the checks that the op itself uses
        from rcd_ext.op_checks import check_t_res
        from rcd_ext.ops import check_residual_top_k

        specs = fields_by_name(ResidualConfig)
        for name in ("init", "strategy", "scope"):
            check_field(specs[name], getattr(self, name))
        check_t_res(self.t_res)
        if not 0.0 <= self.alpha_scale <= 1.0:
            raise ValueError(f"alpha_scale must be in [0, 1], got {self.alpha_scale!r}")
        if not self.dirichlet_concentration > 0:
            raise ValueError(
                f"dirichlet_concentration must be > 0, got {self.dirichlet_concentration!r}"
            )
        if self.residual_top_k is not None:
            check_residual_top_k(self.residual_top_k)


@dataclass
class DiffusionArguments:
    """What the training objective needs beyond `TrainingArguments` (`rcd train`'s flags are
    generated from these fields; `rcd_ext.training.objective` says what each source does)."""

    stage: str = option("seqd", "seqd: masked-diffusion SFT (the reference, or the SeqD "
                                "baseline); rcd: residuals from --residual-source",
                        choices=STAGES)
    residual_source: str = option(
        "previous-step", "stage rcd: the residual's source: the reference on the same or a "
        "more-masked input, the target itself, Dirichlet(c) draws, or the target's own decoding "
        "loop unrolled from the noisy input (the last three need no reference)",
        choices=RESIDUAL_SOURCES)
    dirichlet_concentration: float = option(
        1.0, "c of the Dirichlet(c 1_V) residuals of source dirichlet and of unroll-init "
        "dirichlet", bounds=POSITIVE)
    no_residual_fraction: float = option(0.1, "share of rows trained with plain [M] inputs "
                                              "(stage rcd)", bounds=UNIT)
    eps: float = option(1e-3, "t ~ U(eps, 1)", bounds=Bounds(low=0, high=1, low_open=True,
                                                                high_open=True))
    unroll_steps: int = option(4, "source unroll: the loop runs k ~ U{0..K} steps before the "
                                  "training step (K; k no-grad forwards)", bounds=AT_LEAST_ONE)
    unroll_fraction: float = option(1.0, "source unroll: share of training steps that draw k "
                                         "(the others train the loop's first step: k = 0, no "
                                         "extra forward)", bounds=UNIT)
    unroll_init: str = option("dirichlet", "source unroll: the first step's residual, as "
                                           "inference's --init (cold: plain [M])",
                              choices=UNROLL_INITS)
    unroll_commits: str = option("truth", "source unroll: the loop commits the true tokens at "
                                          "the positions the target chose (truth), or the "
                                          "target's own tokens, as inference does (model)",
                                 choices=UNROLL_COMMITS)

    def __post_init__(self) -> None:
        check_fields(self)
        if isinstance(self.unroll_steps, bool) or not isinstance(self.unroll_steps, int):
            raise OptionError("unroll_steps", f"unroll_steps must be an int >= 1, "
                                              f"got {self.unroll_steps!r}")


@dataclass(frozen=True)
class DecodingConfig:
    """Decoding-loop options of `rcd_ext.generate`; see each field's help.

    gen_length None means "not known yet" (lm-eval derives it per request); `generate` needs
    a number. steps None: gen_length (one token per step), divided evenly among the blocks.
    """

    gen_length: int | None = option(64, "tokens to generate", bounds=AT_LEAST_ONE)
    block_length: int = option(32, "tokens per block", bounds=AT_LEAST_ONE)
    steps: int | None = option(None, "denoising steps for the whole generation (default "
                                     "gen-length)", bounds=AT_LEAST_ONE)
    remasking: str = option("fixed", "fixed: the linear schedule's count per step, most "
                                     "confident first; threshold: every candidate above "
                                     "the threshold, at least the schedule's count",
                            choices=LazyChoices(_policies))
    threshold: float | None = option(0.9, "confidence threshold of remasking threshold",
                                     bounds=PROBABILITY)
    temperature: float = option(0.0, "sampling temperature (0: greedy)", bounds=NONNEGATIVE)
    top_p: float = option(1.0, "nucleus sampling mass", bounds=PROBABILITY)
    top_k: int = option(0, "sample among the k most likely tokens (0: all)", bounds=NONNEGATIVE)
    cache: str = option("none", "KV cache of the semi-AR loop (block-diffusion models always "
                                "use theirs)", choices=CACHE_MODES)
    stop_at_eos: bool = option(True, "stop after the block in which every row has produced EOS")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.remasking == "threshold" and self.threshold is None:
            raise OptionError("threshold", "threshold must be in (0, 1] for remasking "
                                           "'threshold', got None")
        if self.gen_length is not None:
            check_lengths(self.gen_length, self.block_length, self.steps)

    @property
    def num_blocks(self) -> int:
        return self.require_gen_length() // self.block_length

    @property
    def steps_per_block(self) -> int:
        steps = self.require_gen_length() if self.steps is None else self.steps
        return steps // self.num_blocks

    def require_gen_length(self) -> int:
        if self.gen_length is None:
            raise OptionError("gen_length", "gen_length is None: give the number of tokens to "
                                            "generate")
        return self.gen_length


# ---- generic helpers -----------------------------------------------------------------------------
def fields_by_name(config_class: type) -> dict[str, Field]:
    return {spec.name: spec for spec in fields(config_class)}


def option_names(*config_classes: type) -> tuple[str, ...]:
    """The field names of the given option dataclasses, in order."""
    return tuple(spec.name for config_class in config_classes for spec in fields(config_class))


def field_type(config_class: type, name: str) -> type:
    """The plain type of a field: int, float, bool or str (Optional unwrapped)."""
    hints = typing.get_type_hints(config_class)
    hint = hints[name]
    arguments = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return arguments[0] if arguments else hint


def split_flat(options: Mapping[str, Any], *config_classes: type) -> list[dict[str, Any]]:
    """Flat keyword options -> one dict per config class; TypeError naming an unknown one."""
    split: list[dict[str, Any]] = [{} for _ in config_classes]
    for key, value in options.items():
        for index, config_class in enumerate(config_classes):
            if key in fields_by_name(config_class):
                split[index][key] = value
                break
        else:
            known = ", ".join(option_names(*config_classes))
            raise TypeError(f"unexpected keyword argument {key!r} (options: {known})")
    return split


def build(config_class: type, given: Any, flat: Mapping[str, Any], keyword: str) -> Any:
    """`given` (a config instance or None) or the config built from `flat`; ValueError when
    both carry options (one place per option: pass either the config or flat keywords)."""
    if given is None:
        return config_class(**flat)
    if not isinstance(given, config_class):
        raise TypeError(f"{keyword} must be a {config_class.__name__}, got "
                        f"{type(given).__name__}")
    if flat:
        raise ValueError(f"{', '.join(flat)} given both as keyword and through {keyword}="
                         f"{config_class.__name__}(...): pass one (e.g. dataclasses.replace("
                         f"{keyword}, {next(iter(flat))}=...))")
    return given


# ---- argparse ------------------------------------------------------------------------------------
def _number_type(kind: type, bounds: Bounds | None) -> Callable[[str], Any]:
    """argparse type: a number of `kind` within `bounds` ("expected an integer >= 1, got 0")."""
    what = "an integer" if kind is int else "a number"
    expected = f"{what} {bounds.text}" if bounds is not None else what

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if bounds is not None and not bounds.contains(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <type> value"
    return parse


def add_arguments(group: Any, config_class: type, *,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One flag per field of `config_class` on an argparse parser or group.

    `--t-res` for t_res; type, choices, help and default from the field; bools as
    `--x/--no-x`. `overrides[name]` replaces keyword arguments of `add_argument` for one
    field (a CLI default that differs from the Python one, a metavar).
    """
    for spec in fields(config_class):
        kind = field_type(config_class, spec.name)
        default = spec.default if spec.default is not MISSING else None
        arguments: dict[str, Any] = {"default": default, "help": spec.metadata.get("help")}
        if kind is bool:
            arguments["action"] = argparse.BooleanOptionalAction
        elif spec.metadata.get("choices") is not None:
            arguments["choices"] = spec.metadata["choices"]
            if isinstance(arguments["choices"], LazyChoices):
                # argparse would list the names while building the parser (importing torch)
                arguments["metavar"] = spec.name.upper()
                arguments["help"] = f"{arguments['help']} (one of: %(choices)s)"
        elif kind in (int, float):
            arguments["type"] = _number_type(kind, spec.metadata.get("bounds"))
        arguments.update((overrides or {}).get(spec.name, {}))
        group.add_argument("--" + spec.name.replace("_", "-"), **arguments)


def values_of(namespace: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The parsed values of `config_class`'s flags, by field name."""
    return {spec.name: getattr(namespace, spec.name) for spec in fields(config_class)}
