"""`rcd generate`: decode prompts with RCD (or plain SeqD with --seqd) from the command line.

    rcd generate --model PATH [--ref-model PATH --init reference] --prompt "..." [--seqd]
                 [--gen-length 64 --block-length 32 --steps 64 --remasking threshold ...]
                 [--show-steps [--steps-out steps.json|steps.png|steps.txt]]

Prints each completion, then one line of stats. A progress bar over blocks goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


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
    decoding.add_argument("--gen-length", type=int, default=64)
    decoding.add_argument("--block-length", type=int, default=32)
    decoding.add_argument("--steps", type=int, default=None,
                          help="denoising steps for the whole generation (default gen-length)")
    decoding.add_argument("--remasking", choices=("fixed", "threshold"), default="fixed")
    decoding.add_argument("--threshold", type=float, default=0.9)
    decoding.add_argument("--temperature", type=float, default=0.0)
    decoding.add_argument("--top-p", type=float, default=1.0)
    decoding.add_argument("--top-k", type=int, default=0)
    decoding.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                          help="KV cache of the semi-AR loop")
    decoding.add_argument("--no-stop-at-eos", action="store_true")
    decoding.add_argument("--seed", type=int, default=None)
    decoding.add_argument("--mask-id", type=int, default=None, help="override the mask id")
    residual = parser.add_argument_group("residual")
    residual.add_argument("--init", choices=("cold", "reference", "self", "dirichlet"),
                          default=None, help="default: reference with --ref-model, else cold")
    residual.add_argument("--t-res", type=float, default=1.0)
    residual.add_argument("--temper-delta", action="store_true")
    residual.add_argument("--strategy", choices=("entropy", "confidence", "fixed"),
                          default="entropy")
    residual.add_argument("--alpha-scale", type=float, default=1.0)
    residual.add_argument("--scope", choices=("block", "all"), default="block")
    residual.add_argument("--residual-top-k", type=int, default=None, metavar="K",
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
    output.add_argument("--steps-out", help="also save the steps: .json, .png or .txt")
    output.add_argument("--json", action="store_true", help="print one JSON object instead")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts.extend(line for line in lines if line.strip())
    if not prompts:
        raise SystemExit("rcd generate: give at least one --prompt or a --prompt-file")
    return prompts


def run(args: argparse.Namespace) -> int:
    """Load, decode, print; returns the exit code."""
    import torch

    from rcd_ext.decoding.generation import generate
    from rcd_ext.decoding.step_view import plot_steps, render_steps, trace_records
    from rcd_ext.models.adapters import get_adapter, load_model

    prompts = _prompts(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code,
                                  torch_dtype=DTYPES[args.dtype], device=device)
    if tokenizer is None:
        raise SystemExit(f"rcd generate: no tokenizer found with {args.model}")
    ref_model = ref_tokenizer = None
    if args.ref_model:
        ref_model, ref_tokenizer = load_model(args.ref_model,
                                              trust_remote_code=args.trust_remote_code,
                                              torch_dtype=DTYPES[args.dtype], device=device)
    init = args.init or ("reference" if ref_model is not None else "cold")
    want_trace = args.show_steps or bool(args.steps_out)
    try:
        adapter = get_adapter(model, tokenizer, mask_id=args.mask_id,
                              require_embeddings=not args.seqd)
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
    except (ValueError, TypeError) as error:
        print(f"rcd generate: {error}", file=sys.stderr)
        return 2
    method = "SeqD" if args.seqd else f"RCD (init {init})"
    mask_id = adapter.mask_id
    if args.json:
        print(json.dumps({"method": method, "prompts": prompts, "text": result.text,
                          "tokens": result.tokens.tolist(), "stats": result.stats.as_dict(),
                          "steps": trace_records(result.trace, tokenizer)
                          if want_trace else None}))
    else:
        for index, (prompt, text) in enumerate(zip(prompts, result.text, strict=True)):
            print(f"[{index}] {prompt!r} -> {text!r}")
            if args.show_steps:
                print(render_steps(result.trace, mask_id, row=index, tokenizer=tokenizer,
                                   color=sys.stdout.isatty()))
                print()
        print(f"{method}: {result.stats.summary()}")
    if args.steps_out:
        path = Path(args.steps_out)
        if path.suffix == ".png":
            plot_steps(result.trace, mask_id, path, tokenizer=tokenizer, title=method)
        elif path.suffix == ".json":
            path.write_text(json.dumps({"method": method, "mask_id": mask_id,
                                        "steps": trace_records(result.trace, tokenizer)}))
        else:
            views = [render_steps(result.trace, mask_id, row=i, tokenizer=tokenizer)
                     for i in range(len(prompts))]
            path.write_text("\n\n".join(views) + "\n", encoding="utf-8")
        print(f"steps written to {path}", file=sys.stderr)
    return 0
