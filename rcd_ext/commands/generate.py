"""`rcd generate`: decode prompts with RCD (or plain SeqD with --seqd) from the command line.

    rcd generate --model PATH [--ref-model PATH --init reference] --prompt "..." [--seqd]
                 [--gen-length 64 --block-length 32 --steps 64 --remasking threshold ...]
                 [--show-steps [--steps-out steps.json|steps.png|steps.txt]]

Prints each completion, then one line of stats. A progress bar over blocks goes to stderr.
Every argument is checked before a model loads (see `check_arguments`): a wrong one is one line
on stderr and exit code 2. `--steps` above `--gen-length` is refused (each step unmasks at least
one token, so the extra steps would never run). Prompt words the tokenizer does not know are
named in a warning (`--unknown-words refuse` makes them an error).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from rcd_ext.commands._device import check_device
from rcd_ext.commands._model_source import resolve_model_source
from rcd_ext.commands._usage import (
    UsageError,
    check_input_file,
    check_output_file,
    nonnegative_int,
)
from rcd_ext.options import (
    CLI,
    DecodingConfig,
    OptionError,
    ResidualConfig,
    add_arguments,
    check_lengths,
    values_of,
)

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
STEPS_OUT_SUFFIXES = (".json", ".png", ".txt")
# where the CLI's flags differ from the dataclass fields they are generated from (the Python
# defaults stay in the dataclasses; these are resolved in `check_arguments` / `run`)
DECODING_FLAGS = {
    "gen_length": {"default": None,
                   "help": "tokens to generate (default: the answer length of the task in the "
                           "checkpoint's rcd_training.json, else 64; shortened to what the "
                           "model's context leaves)"},
    "block_length": {"default": None,
                     "help": "tokens per block (default: a block-causal model's own, else 32, "
                             "or --gen-length when shorter)"},
}
RESIDUAL_FLAGS = {
    "init": {"default": None, "help": "what a masked position gets before it has logits of "
                                      "its own (one of: %(choices)s; default: reference with "
                                      "--ref-model, else cold)"},
    "residual_top_k": {"metavar": "K"},
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `rcd generate`."""
    parser = subparsers.add_parser(
        "generate", help="decode prompts with RCD (or SeqD)",
        description="Decode prompts with Residual Context Diffusion, or plain SeqD (--seqd).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="target dLLM: local path or hub name")
    parser.add_argument("--ref-model", help="frozen reference model (for --init reference)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text (repeat for a batch; prompts of different lengths "
                             "are left-padded where the model supports it)")
    parser.add_argument("--prompt-file", help="file with one prompt per line")
    parser.add_argument("--seqd", action="store_true", help="plain decoding, residuals off")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap each prompt in the tokenizer's chat template")
    decoding = parser.add_argument_group("decoding")
    add_arguments(decoding, DecodingConfig, overrides=DECODING_FLAGS)
    decoding.add_argument("--seed", type=int, default=None)
    decoding.add_argument("--mask-id", type=nonnegative_int, default=None,
                          help="override the mask id")
    residual = parser.add_argument_group("residual")
    add_arguments(residual, ResidualConfig, overrides=RESIDUAL_FLAGS)
    loading = parser.add_argument_group("loading")
    loading.add_argument("--trust-remote-code", action="store_true",
                         help="run the checkpoint's own modelling code (LLaDA, Dream, SDAR)")
    loading.add_argument("--dtype", choices=tuple(DTYPES), default="auto")
    loading.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if any)")
    output = parser.add_argument_group("output")
    output.add_argument("--show-steps", action="store_true",
                        help="print how each block unmasked, step by step, with alpha")
    output.add_argument("--steps-out",
                        help="also save the steps: a .json, .png (needs matplotlib) or .txt file")
    output.add_argument("--json", action="store_true", help="print one JSON object instead")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    output.add_argument("--unknown-words", choices=("warn", "refuse"), default="warn",
                        help="prompt words outside the tokenizer's vocabulary (they become its "
                             "unknown token): warn on stderr, or refuse to run")
    parser.set_defaults(func=run)
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        lines = check_input_file("--prompt-file", args.prompt_file).read_text(
            encoding="utf-8").splitlines()
        prompts.extend(line for line in lines if line.strip())
        if not prompts:
            raise UsageError(f"--prompt-file {args.prompt_file}: no non-empty line (write one "
                             "prompt per line)")
    if not prompts:
        raise UsageError("no prompt (give --prompt TEXT or --prompt-file FILE)")
    return prompts


def check_decoding(args: argparse.Namespace) -> None:
    """UsageError for decoding values that do not fit together (no model needed)."""
    try:  # the rules of DecodingConfig, spelled with the flags' names
        check_lengths(args.gen_length, args.block_length, args.steps, CLI)
    except OptionError as error:
        raise UsageError(str(error)) from None
    from rcd_ext.op_checks import MIN_T_RES  # imports torch, which the model load needs next

    if args.t_res < MIN_T_RES:
        raise UsageError(f"--t-res {args.t_res}: 1 / t_res overflows float32 (use --t-res >= "
                         f"{MIN_T_RES:.3g})")
    if args.init == "reference" and not args.ref_model:
        raise UsageError("--init reference needs --ref-model (give the reference checkpoint, "
                         "or another --init)")


def fit_lengths_to_model(args: argparse.Namespace, model_source: str) -> None:
    """Fill --gen-length / --block-length when not given, from the checkpoint's config.json and
    rcd_training.json (no model load); UsageError for a --gen-length the context cannot hold."""
    from rcd_ext.integrations.lm_eval_args import read_checkpoint_facts

    facts = read_checkpoint_facts(model_source)
    if args.block_length is None and facts.model_block is not None:
        args.block_length = facts.model_block
    room = _room(facts, args.block_length)
    if args.gen_length is None:
        args.gen_length = _default_gen_length(facts.answer_length, args.block_length, room)
    if args.block_length is None:  # one block for a short generation, like the Python API's 32
        args.block_length = min(DecodingConfig.block_length, args.gen_length)
    if room is not None and args.gen_length > room:
        prompt = (f"its training prompts ({facts.task}) take {facts.prompt_length}"
                  if facts.prompt_length else "a prompt needs at least 1")
        raise UsageError(f"--gen-length {args.gen_length} does not fit: the model's context is "
                         f"{facts.context} tokens and {prompt} (give --gen-length <= "
                         f"{max(room, 0)}, a multiple of --block-length {args.block_length})")


def _room(facts: Any, block_length: int | None) -> int | None:
    """Generated tokens the model's context leaves beside a prompt (None: context unknown);
    a block-causal model may need up to a block - 1 more positions for block alignment."""
    if facts.context is None:
        return None
    slack = block_length - 1 if facts.model_block is not None and block_length else 0
    return facts.context - slack - (facts.prompt_length or 1)


def _default_gen_length(answer_length: int | None, block_length: int | None,
                        room: int | None) -> int:
    """The training task's answer length, else DecodingConfig's default; cut to whole blocks
    (the given block, else the default one, else one block of `room`) when it does not fit."""
    wanted = answer_length or DecodingConfig.gen_length
    if room is None or wanted <= room:
        return wanted
    unit = block_length or DecodingConfig.block_length
    if room >= unit:
        return room // unit * unit
    return room if block_length is None and room >= 1 else wanted


def residual_config(args: argparse.Namespace) -> ResidualConfig:
    """The residual flags as a ResidualConfig (init: reference with --ref-model, else cold);
    UsageError naming the flag for a value the dataclass refuses."""
    values = values_of(args, ResidualConfig)
    values["init"] = args.init or ("reference" if args.ref_model else "cold")
    try:
        return ResidualConfig(**values)
    except ValueError as error:
        raise UsageError(f"{error} (see rcd generate --help)") from None


def check_steps_out(path: str | None) -> None:
    """UsageError unless --steps-out names a writable .json/.png/.txt (PNG: matplotlib)."""
    if path is None:
        return
    file = check_output_file("--steps-out", path, STEPS_OUT_SUFFIXES)
    if file.suffix.lower() == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--steps-out {path}: a PNG needs matplotlib (pip install "
                         "matplotlib, or use .json or .txt)")


def check_arguments(args: argparse.Namespace) -> tuple[list[str], str, str | None, str]:
    """Every check that needs no model: (prompts, model source, reference source, device)."""
    prompts = _prompts(args)
    model = resolve_model_source("--model", args.model)
    fit_lengths_to_model(args, model)
    check_decoding(args)
    residual_config(args)
    check_steps_out(args.steps_out)
    reference = resolve_model_source("--ref-model", args.ref_model) if args.ref_model else None
    return prompts, model, reference, check_device("--device", args.device)


def check_prompt_words(tokenizer: Any, prompts: list[str], policy: str) -> None:
    """Warn on stderr (once) about prompt words the tokenizer does not know, or refuse them."""
    from rcd_ext.models.tiny_tokenizer import describe_unknown_words, unknown_words

    unknown = unknown_words(tokenizer, prompts)
    if not unknown:
        return
    message = describe_unknown_words(unknown, getattr(tokenizer, "unk_token", None))
    if policy == "refuse":
        raise UsageError(f"--prompt: {message} (use words of the model's vocabulary, or "
                         "--unknown-words warn)")
    print(f"rcd generate: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Check, load, decode, print; returns the exit code."""
    prompts, model_source, reference_source, device = check_arguments(args)

    from rcd_ext.decoding.generation import generate
    from rcd_ext.decoding.step_view import trace_records
    from rcd_ext.models.adapters import get_adapter, load_model
    from rcd_ext.models.tiny_tokenizer import UnknownWordsWarning

    model, tokenizer = load_model(model_source, trust_remote_code=args.trust_remote_code,
                                  torch_dtype=DTYPES[args.dtype], device=device)
    if tokenizer is None:
        raise UsageError(f"--model {args.model}: no tokenizer found with the model (save the "
                         "tokenizer into the checkpoint directory)")
    check_prompt_words(tokenizer, prompts, args.unknown_words)
    ref_model = ref_tokenizer = None
    if reference_source:
        ref_model, ref_tokenizer = load_model(reference_source,
                                              trust_remote_code=args.trust_remote_code,
                                              torch_dtype=DTYPES[args.dtype], device=device)
    residual = residual_config(args)
    want_trace = args.show_steps or bool(args.steps_out)
    adapter = get_adapter(model, tokenizer, mask_id=args.mask_id,
                          require_embeddings=not args.seqd)
    with warnings.catch_warnings():  # check_prompt_words has told the user already
        warnings.simplefilter("ignore", UnknownWordsWarning)
        result = generate(
            model, prompts, tokenizer=tokenizer, residual=residual,
            decoding=DecodingConfig(**values_of(args, DecodingConfig)), rcd=not args.seqd,
            ref_model=ref_model, ref_tokenizer=ref_tokenizer, seed=args.seed,
            mask_id=args.mask_id, chat_template=args.chat_template, trace=want_trace,
            progress=not args.quiet, adapter=adapter,
        )
    method = "SeqD" if args.seqd else f"RCD (init {residual.init})"
    if args.json:
        print(json.dumps({"method": method, "prompts": prompts, "text": result.text,
                          "tokens": result.tokens.tolist(), "stats": result.stats.as_dict(),
                          "steps": trace_records(result.trace, tokenizer)
                          if want_trace else None}))
    else:
        _print_text(args, prompts, result, method, adapter.mask_id, tokenizer)
    if args.steps_out:
        _write_steps(Path(args.steps_out), result.trace, adapter.mask_id, tokenizer, method,
                     len(prompts))
    return 0


def _print_text(args: argparse.Namespace, prompts: list[str], result: Any, method: str,
                mask_id: int, tokenizer: Any) -> None:
    from rcd_ext.decoding.step_view import render_steps

    for index, (prompt, text) in enumerate(zip(prompts, result.text, strict=True)):
        print(f"[{index}] {prompt!r} -> {text!r}")
        if args.show_steps:
            print(render_steps(result.trace, mask_id, row=index, tokenizer=tokenizer,
                               color=sys.stdout.isatty()))
            print()
    print(f"{method}: {result.stats.summary()}")


def _write_steps(path: Path, trace: list, mask_id: int, tokenizer: Any, method: str,
                 rows: int) -> None:
    """The steps as a PNG, JSON or text file (suffix checked by `check_steps_out`)."""
    from rcd_ext.atomic_files import write_json_atomic, write_text_atomic
    from rcd_ext.decoding.step_view import plot_steps, render_steps, trace_records

    suffix = path.suffix.lower()
    if suffix == ".png":
        plot_steps(trace, mask_id, path, tokenizer=tokenizer, title=method)  # writes atomically
    elif suffix == ".json":
        write_json_atomic(path, {"method": method, "mask_id": mask_id,
                                 "steps": trace_records(trace, tokenizer)}, indent=None)
    else:
        views = [render_steps(trace, mask_id, row=i, tokenizer=tokenizer) for i in range(rows)]
        write_text_atomic(path, "\n\n".join(views) + "\n")
    print(f"steps written to {path}", file=sys.stderr)
