"""`--model_args` of the lm-eval models `rcd` / `seqd`: checked and defaulted before any load.

`check_model_args` turns lm-eval's parsed key/values into `ModelArgs`, refusing every bad value
with a `ModelArgsError` whose message is one line naming the key and what would be accepted.
It reads only the checkpoint's small JSON files (`config.json` for the context length and a
block-causal model's block, `rcd_training.json` for the task it was trained on), so a typo
costs a second, not a model load.

Defaults that fit the model:
- `block_length`: the model's own block (block-causal models), else the answer length of the
  synthetic task in `rcd_training.json` (`data: task:NAME[:k=v,...]`), else 32, at most half
  the context.
- `gen_length`: the training task's answer length, else per request the task's
  `max_gen_toks` rounded up to `block_length` (the caller caps it to the context).
- `steps`: `gen_length` (one token per step).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from rcd_ext.options import DecodingConfig, ResidualConfig, field_type, option_names

DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEFAULT_BLOCK_LENGTH = 32
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ModelArgsError(ValueError):
    """A bad `--model_args` value; the message is one line naming the key."""


@dataclass(frozen=True)
class CheckpointFacts:
    """What the checkpoint's JSON files say about sizes (None: not known before loading).

    context: longest sequence (config.json max_position_embeddings / max_sequence_length).
    model_block: a block-causal model's own block length (config.json block_length).
    task: the synthetic training task (rcd_training.json `data: task:NAME...`), with its
        prompt_length and answer_length in tokens.
    """

    context: int | None = None
    model_block: int | None = None
    task: str | None = None
    prompt_length: int | None = None
    answer_length: int | None = None


@dataclass
class ModelArgs:
    """Checked model_args. `residual` and `decoding` are what `rcd_ext.generate` takes;
    `decoding.gen_length` and `decoding.temperature` are filled per request from `gen_length`
    (None: the task's max_gen_toks, fitted) and `temperature` (None: the task's)."""

    pretrained: str
    tokenizer: str | None
    ref_model: str | None
    trust_remote_code: bool
    dtype: str
    device: str | None
    batch_size: int
    gen_length: int | None
    temperature: float | None
    seed: int
    mask_id: int | None
    rcd: bool
    mc_num: int
    mc_batch_size: int
    greedy_check: bool
    max_length: int | None
    add_bos_token: bool | None
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(gen_length=None))
    facts: CheckpointFacts = field(default_factory=CheckpointFacts)


# ---- reading the checkpoint's JSON files --------------------------------------------------------
def _json_file(pretrained: str, name: str) -> dict | None:
    """`name` next to a local checkpoint, or in the hub cache (never downloaded); None if absent
    or unreadable."""
    path = Path(pretrained).expanduser() / name
    if not path.is_file() and not Path(pretrained).expanduser().is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(pretrained, name)
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # noqa: BLE001  not a hub name, or no hub client: nothing known
            return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _task_sizes(spec: str) -> tuple[str, int, int] | None:
    """`task:NAME[:k=v,...]` (as `rcd train --data` takes it) -> (name, prompt, answer length)."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] != "task":
        return None
    options: dict[str, Any] = {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, _, value = item.partition("=")
        options[key] = _number_or_text(value)
    try:
        from rcd_ext.tasks import get_task

        task = get_task(parts[1], **options)
    except Exception:  # noqa: BLE001  an unknown task: no sizes
        return None
    return parts[1], int(task.prompt_length), int(task.answer_length)


def _number_or_text(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def read_checkpoint_facts(pretrained: str) -> CheckpointFacts:
    """Sizes from `config.json` and `rcd_training.json` of `pretrained` (see CheckpointFacts)."""
    config = _json_file(pretrained, "config.json") or {}
    context = config.get("max_position_embeddings") or config.get("max_sequence_length")
    block = config.get("block_length") if config.get("attention") == "block_causal" else None
    training = _json_file(pretrained, "rcd_training.json") or {}
    sizes = _task_sizes(str(training.get("data", "")))
    name, prompt, answer = sizes if sizes else (None, None, None)
    return CheckpointFacts(context=int(context) if isinstance(context, int) else None,
                           model_block=int(block) if isinstance(block, int) else None,
                           task=name, prompt_length=prompt, answer_length=answer)


# ---- one key at a time ---------------------------------------------------------------------------
class _Reader:
    """Reads keys out of the raw model_args, raising ModelArgsError that names them."""

    def __init__(self, model: str, raw: Mapping[str, Any]) -> None:
        self.model = model
        self.raw = dict(raw)

    def fail(self, key: str, problem: str, fix: str) -> ModelArgsError:
        value = self.raw.get(key)
        return ModelArgsError(f"{self.model} model_args: {key}={value!r} {problem} ({fix})")

    def is_none(self, key: str) -> bool:
        value = self.raw.get(key)
        return value is None or (isinstance(value, str) and value.strip().lower() in ("none", ""))

    def integer(self, key: str, default: int | None, minimum: int | None = 1) -> int | None:
        if self.is_none(key):
            return default
        value = self.raw[key]
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value)
        bound = "" if minimum is None else f" >= {minimum}"
        if number is None:
            raise self.fail(key, "is not an integer", f"give an integer{bound}, e.g. {key}=8")
        if minimum is not None and number < minimum:
            raise self.fail(key, f"is below {minimum}", f"give an integer{bound}")
        return number

    def real(self, key: str, default: float | None, accept: Callable[[float], bool],
             expected: str) -> float | None:
        if self.is_none(key):
            return default
        value = self.raw[key]
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            raise self.fail(key, "is not a number", f"give a number {expected}") from None
        if not math.isfinite(number) or not accept(number):
            raise self.fail(key, "is out of range", f"give a number {expected}")
        return number

    def boolean(self, key: str, default: bool | None) -> bool | None:
        if self.is_none(key):
            return default
        value = self.raw[key]
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise self.fail(key, "is not a boolean", "give true or false")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        if self.is_none(key):
            return default
        value = str(self.raw[key]).strip().lower()
        if value not in choices:
            raise self.fail(key, "is not known", f"one of {', '.join(choices)}")
        return value

    def text(self, key: str) -> str | None:
        return None if self.is_none(key) else str(self.raw[key])


def _device(read: _Reader) -> str | None:
    device = read.text("device")
    if device is None:
        return None
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise read.fail("device", "is not a torch device", "e.g. cpu, cuda, cuda:1") from None
    return device


def _t_res(read: _Reader) -> float:
    from rcd_ext.op_checks import check_t_res

    value = read.real("t_res", 1.0, lambda x: x > 0, "> 0, e.g. t_res=0.92")
    try:
        return check_t_res(value)
    except ValueError:  # positive but so small that 1 / t_res overflows float32
        raise read.fail("t_res", "is too small (1 / t_res must be a finite float32)",
                        "give a number > 0, e.g. t_res=0.92") from None


def _batch_size(read: _Reader) -> int:
    value = read.raw.get("batch_size")
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        # lm-eval's "auto" probes memory; decoding batches are small anyway: max_batch_size or 1
        return read.integer("max_batch_size", 1) or 1
    return read.integer("batch_size", 1) or 1


# ---- the whole set -------------------------------------------------------------------------------
# keys that are not residual or decoding options (those are generated from the dataclasses)
RUN_KEYS = frozenset((
    "pretrained", "tokenizer", "ref_model", "trust_remote_code", "dtype", "device", "batch_size",
    "max_batch_size", "seed", "mask_id", "rcd", "mc_num", "mc_batch_size", "greedy_check",
    "max_length", "add_bos_token",
))
OPTION_KEYS = frozenset(option_names(ResidualConfig, DecodingConfig))
KNOWN_KEYS = RUN_KEYS | OPTION_KEYS
# decoding options whose lm-eval default is "decided later": gen_length and block_length fitted
# to the checkpoint (`_fit_lengths`), temperature the task's
DERIVED_LATER = {"gen_length": None, "block_length": None, "temperature": None}


def read_option(read: _Reader, config_class: type, spec: Field, default: Any) -> Any:
    """One option key, read by its field's type, choices and bounds."""
    name, kind = spec.name, field_type(config_class, spec.name)
    choices, bounds = spec.metadata.get("choices"), spec.metadata.get("bounds")
    if name == "t_res":  # its own message for values too small for float32
        return _t_res(read)
    if kind is bool:
        return read.boolean(name, default)
    if choices is not None:
        return read.choice(name, default, tuple(choices))
    if kind is int:
        return read.integer(name, default, minimum=None if bounds is None else int(bounds.low))
    if kind is float:
        accept = bounds.contains if bounds is not None else math.isfinite
        return read.real(name, default, accept, bounds.text if bounds is not None else "")
    return read.text(name) if not read.is_none(name) else default


def read_options(read: _Reader, config_class: type,
                 defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of `config_class` from the model_args (absent: `defaults`, else the field's
    default)."""
    return {spec.name: read_option(read, config_class, spec, defaults.get(spec.name, spec.default))
            for spec in fields(config_class)}


def _residual(read: _Reader, ref_model: str | None) -> ResidualConfig:
    values = read_options(read, ResidualConfig,
                          {"init": "reference" if ref_model else "cold"})
    if values["init"] == "reference" and ref_model is None:
        raise read.fail("init", "needs a reference model", "add ref_model=<path>")
    try:
        return ResidualConfig(**values)
    except ValueError as error:  # a rule between fields; each field's own range is read above
        raise ModelArgsError(f"{read.model} model_args: {error}") from None


def check_model_args(model: str, raw: Mapping[str, Any], *, residuals_default: bool,
                     facts: CheckpointFacts | None = None) -> ModelArgs:
    """Every key of `raw` checked and converted; the decoding defaults fitted to the checkpoint.

    Args:
        model: the lm-eval model name, for messages ("rcd" / "seqd").
        raw: model_args as lm-eval passes them (values already int / float / bool / str).
        residuals_default: `rcd` when the key is absent.
        facts: the checkpoint's sizes (default: read from `raw["pretrained"]`).

    Raises ModelArgsError (one line, naming the key) for any bad or unknown key.
    """
    read = _Reader(model, raw)
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ModelArgsError(f"{model} model_args: unknown key(s) {', '.join(unknown)} "
                             f"({_suggestion(unknown[0])})")
    pretrained = read.text("pretrained")
    if pretrained is None:
        raise ModelArgsError(f"{model} model_args: pretrained is missing "
                             "(pretrained=<path or hub name of the dLLM>)")
    if facts is None:
        facts = read_checkpoint_facts(pretrained)
    ref_model = read.text("ref_model")
    residual = _residual(read, ref_model)
    decoding = read_options(read, DecodingConfig, DERIVED_LATER)
    args = ModelArgs(
        pretrained=pretrained, tokenizer=read.text("tokenizer"), ref_model=ref_model,
        trust_remote_code=bool(read.boolean("trust_remote_code", False)),
        dtype=read.choice("dtype", "auto", DTYPE_NAMES), device=_device(read),
        batch_size=_batch_size(read), gen_length=decoding["gen_length"],
        temperature=decoding["temperature"],
        seed=int(read.integer("seed", 0, minimum=None) or 0),
        mask_id=read.integer("mask_id", None, minimum=0),
        rcd=bool(read.boolean("rcd", residuals_default)),
        mc_num=int(read.integer("mc_num", 128) or 128),
        mc_batch_size=int(read.integer("mc_batch_size", 32) or 32),
        greedy_check=bool(read.boolean("greedy_check", False)),
        max_length=read.integer("max_length", None, minimum=2),
        add_bos_token=read.boolean("add_bos_token", None), residual=residual, facts=facts)
    block_length = _fit_lengths(read, args, decoding["block_length"])
    args.decoding = _decoding(read, dict(decoding, gen_length=args.gen_length,
                                         block_length=block_length,
                                         temperature=args.temperature or 0.0))
    return args


def _decoding(read: _Reader, values: dict[str, Any]) -> DecodingConfig:
    """DecodingConfig's own rules (gen_length / block_length / steps) as a ModelArgsError."""
    try:
        return DecodingConfig(**values)
    except ValueError as error:
        raise ModelArgsError(f"{read.model} model_args: {error}") from None


def _suggestion(unknown: str) -> str:
    import difflib

    close = difflib.get_close_matches(unknown, sorted(KNOWN_KEYS), n=1)
    return f"did you mean {close[0]}?" if close else \
        "see help(rcd_ext.integrations.lm_eval_model.RCDLM) or docs/evaluation.md"


def _fit_lengths(read: _Reader, args: ModelArgs, block: int | None) -> int:
    """Default block_length / gen_length from the checkpoint, then check that they fit the
    context (the gen_length / block_length / steps rules are DecodingConfig's, in `_decoding`).
    Sets args.gen_length; returns block_length."""
    facts = args.facts
    if facts.context is not None and args.max_length is not None \
            and args.max_length > facts.context:
        raise read.fail("max_length", f"exceeds the model's context of {facts.context}",
                        f"give at most {facts.context}")
    context = args.max_length or facts.context
    if block is None:
        block = facts.model_block or facts.answer_length or DEFAULT_BLOCK_LENGTH
        if context is not None and facts.model_block is None:
            block = max(1, min(block, context // 2))
    elif facts.model_block is not None and block != facts.model_block:
        raise read.fail("block_length", f"differs from the model's own block of "
                        f"{facts.model_block} (a block-causal model decodes its own blocks)",
                        f"drop it or give block_length={facts.model_block}")
    if args.gen_length is None and facts.answer_length is not None \
            and facts.answer_length % block == 0:
        args.gen_length = facts.answer_length
    if args.gen_length is not None:
        check_fits(read.model, args.gen_length, block, context, facts, read.raw.get("gen_length"))
    return block


def check_fits(model: str, gen_length: int, block_length: int, context: int | None,
               facts: CheckpointFacts, given: Any = None) -> None:
    """Raise ModelArgsError naming gen_length when it leaves no room for a prompt (with the
    training task's prompt length where known, one token otherwise) in `context` positions."""
    if context is None:
        return
    slack = block_length - 1 if facts.model_block is not None else 0
    prompt = facts.prompt_length or 1
    room = context - slack - prompt
    if gen_length <= room:
        return
    what = (f"its training prompts ({facts.task}) take {facts.prompt_length}"
            if facts.prompt_length else "a prompt needs at least 1")
    shown = given if given is not None else gen_length
    raise ModelArgsError(
        f"{model} model_args: gen_length={shown!r} does not fit: the model's context is "
        f"{context} tokens and {what} (give gen_length <= {max(room, 0)}, a multiple of "
        f"block_length={block_length})")


# ---- one line instead of a traceback -------------------------------------------------------------
def print_model_args_errors_briefly() -> None:
    """When the process is lm-eval's own CLI (`lm_eval`, `lm-eval`, `python -m lm_eval`), print
    an uncaught ModelArgsError as its one-line message instead of a traceback; other exceptions
    (and other programs) keep Python's hook."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    main = sys.argv[0].replace(os.sep, "/") if sys.argv and sys.argv[0] else ""
    if program not in ("lm_eval", "lm-eval") and not main.endswith("lm_eval/__main__.py"):
        return
    previous = sys.excepthook
    if getattr(previous, "_rcd_brief", False):
        return

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        if isinstance(error, ModelArgsError):
            print(f"lm_eval: {error}", file=sys.stderr)
        else:
            previous(kind, error, trace)

    hook._rcd_brief = True  # type: ignore[attr-defined]
    sys.excepthook = hook
