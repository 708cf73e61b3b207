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
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
)

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
STEPS_OUT_SUFFIXES = (".json", ".png", ".txt")


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
    decoding.add_argument("--gen-length", type=positive_int, default=64)
    decoding.add_argument("--block-length", type=positive_int, default=None,
                          help="tokens per block (default 32, or --gen-length when shorter)")
    decoding.add_argument("--steps", type=positive_int, default=None,
                          help="denoising steps for the whole generation (default gen-length)")
    decoding.add_argument("--remasking", choices=("fixed", "threshold"), default="fixed")
    decoding.add_argument("--threshold", type=probability, default=0.9)
    decoding.add_argument("--temperature", type=nonnegative_float, default=0.0)
    decoding.add_argument("--top-p", type=probability, default=1.0)
    decoding.add_argument("--top-k", type=nonnegative_int, default=0)
    decoding.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                          help="KV cache of the semi-AR loop")
    decoding.add_argument("--no-stop-at-eos", action="store_true")
    decoding.add_argument("--seed", type=int, default=None)
    decoding.add_argument("--mask-id", type=nonnegative_int, default=None,
                          help="override the mask id")
    residual = parser.add_argument_group("residual")
    residual.add_argument("--init", choices=("cold", "reference", "self", "dirichlet"),
                          default=None, help="default: reference with --ref-model, else cold")
    residual.add_argument("--t-res", type=positive_float, default=1.0)
    residual.add_argument("--temper-delta", action="store_true")
    residual.add_argument("--strategy", choices=("entropy", "confidence", "fixed"),
                          default="entropy")
    residual.add_argument("--alpha-scale", type=nonnegative_float, default=1.0)
    residual.add_argument("--scope", choices=("block", "all"), default="block")
    residual.add_argument("--residual-top-k", type=positive_int, default=None, metavar="K",
                          help="sparse residual: delta from the K most likely tokens' rows "
                               "(+ the tail's mass on the mean of the others); default exact")
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
    if args.gen_length % args.block_length:
        raise UsageError(f"--gen-length {args.gen_length} is not a multiple of --block-length "
                         f"{args.block_length} (make it one, or change --block-length)")
    blocks = args.gen_length // args.block_length
    if args.steps is not None and args.steps > args.gen_length:
        raise UsageError(f"--steps {args.steps} > --gen-length {args.gen_length}: each step "
                         f"unmasks at least one token, so at most {args.gen_length} steps run "
                         f"(use --steps {args.gen_length} or fewer)")
    if args.steps is not None and args.steps % blocks:
        raise UsageError(f"--steps {args.steps} is not a multiple of the {blocks} blocks "
                         f"(--gen-length {args.gen_length} / --block-length "
                         f"{args.block_length}); use a multiple of {blocks}")
    from rcd_ext.op_checks import MIN_T_RES  # imports torch, which the model load needs next

    if args.t_res < MIN_T_RES:
        raise UsageError(f"--t-res {args.t_res}: 1 / t_res overflows float32 (use --t-res >= "
                         f"{MIN_T_RES:.3g})")
    if args.init == "reference" and not args.ref_model:
        raise UsageError("--init reference needs --ref-model (give the reference checkpoint, "
                         "or another --init)")


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
    if args.block_length is None:  # one block for a short generation, like the Python API's 32
        args.block_length = min(32, args.gen_length)
    check_decoding(args)
    check_steps_out(args.steps_out)
    model = resolve_model_source("--model", args.model)
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
    init = args.init or ("reference" if ref_model is not None else "cold")
    want_trace = args.show_steps or bool(args.steps_out)
    adapter = get_adapter(model, tokenizer, mask_id=args.mask_id,
                          require_embeddings=not args.seqd)
    with warnings.catch_warnings():  # check_prompt_words has told the user already
        warnings.simplefilter("ignore", UnknownWordsWarning)
        result = generate(
            model, prompts, tokenizer=tokenizer, gen_length=args.gen_length,
            block_length=args.block_length, steps=args.steps, remasking=args.remasking,
            threshold=args.threshold, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, cache=args.cache, rcd=not args.seqd, ref_model=ref_model,
            ref_tokenizer=ref_tokenizer, init=init, t_res=args.t_res,
            temper_delta=args.temper_delta, strategy=args.strategy,
            alpha_scale=args.alpha_scale, scope=args.scope,
            residual_top_k=args.residual_top_k, stop_at_eos=not args.no_stop_at_eos,
            seed=args.seed, mask_id=args.mask_id,
            chat_template=args.chat_template, trace=want_trace, progress=not args.quiet,
            adapter=adapter,
        )
    method = "SeqD" if args.seqd else f"RCD (init {init})"
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
