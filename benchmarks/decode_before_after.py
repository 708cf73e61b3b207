"""RCD's per-step bookkeeping before and after a change, in one run on one machine.

The "before" decoding files (wrapper, residual state, loops, generation, remasking) come from a
git revision or a directory of old copies; they are laid over a copy of the current package
(same op, same model code), and worker processes of each version alternate so that load from
other processes hits both alike. Per loop of benchmarks/decode_bench.py (tiny dLLM, one
thread) each worker reports:

- wall time of SeqD, RCD cold and RCD warm-started from a reference model (min over repeats);
- aten ops and host reads (`.item()`/`int()`/`bool()` on tensors, `nonzero`) per step, counted
  with a TorchDispatchMode (independent of load);
- a cProfile of one RCD-cold decode: seconds in the model, in the residual op, and the rest of
  the wrapper's own time (its bookkeeping), and the wrapper's top functions;
- a probe on a model too small to hide the bookkeeping (d=32, one layer): SeqD, RCD and RCD with
  the op replaced by a zero stand-in, min of many short runs, giving the wrapper's and the op's
  milliseconds per step.

    python benchmarks/decode_before_after.py --before-rev HEAD
    python benchmarks/decode_before_after.py --before-dir /tmp/old --rounds 3

Writes benchmarks/results/decode_before_after_cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LEAN_FILES = ["rcd_ext/wrapper.py", "rcd_ext/residual.py", "rcd_ext/decoding/loops.py",
              "rcd_ext/decoding/generation.py", "rcd_ext/decoding/remasking.py"]
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}


def snapshot(target: Path, before_rev: str | None, before_dir: Path | None) -> None:
    """A copy of the current package at `target`/rcd_ext, with the old decoding files if asked."""
    shutil.copytree(ROOT / "rcd_ext", target / "rcd_ext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "integrations", target / "rcd_ext" / "integrations",
                    ignore=shutil.ignore_patterns("__pycache__", "lm_eval_startup"))
    for path in LEAN_FILES if (before_rev or before_dir) else []:
        if before_rev:
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{before_rev}:{path}"],
                                  check=True, capture_output=True, text=True).stdout
        else:
            text = (before_dir / path).read_text()
        (target / path).write_text(text)


# ---- worker: runs inside one version ---------------------------------------------------------
def count_ops(model, prompts, bench, args, cache: str, **kwargs) -> tuple[float, float, int]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counter = Count()
    with counter:
        result = bench.run_once(model, prompts, args, cache, args.steps, **kwargs)
    steps = result.stats.denoising_steps
    reads = sum(n for name, n in counter.ops.items() if name in HOST_READS)
    return sum(counter.ops.values()) / steps, reads / steps, steps


def profile_rcd(model, prompts, bench, args, cache: str) -> dict:
    """cProfile of one RCD-cold decode: model, op, and the wrapper's own remaining time."""
    profile = cProfile.Profile()
    profile.enable()
    bench.run_once(model, prompts, args, cache, args.steps, rcd=True)
    profile.disable()
    stats = pstats.Stats(profile).stats
    wrapper_total = model_total = op_total = 0.0
    own: dict[str, float] = {}
    for (filename, _line, name), (_, _, tottime, cumtime, _) in stats.items():
        if filename.endswith("rcd_ext/wrapper.py") and name == "__call__":
            wrapper_total += cumtime
        if filename.endswith("rcd_ext/ops.py") and name == "residual_context":
            op_total += cumtime
        if filename.endswith("tiny_dllm.py") and name == "forward" and cumtime > model_total:
            model_total = cumtime
        if "rcd_ext" in filename and any(part in filename for part in ("wrapper", "residual")):
            own[f"{Path(filename).name}:{name}"] = own.get(f"{Path(filename).name}:{name}",
                                                           0.0) + tottime
    top = sorted(own.items(), key=lambda item: -item[1])[:8]
    return {"wrapper_call_s": wrapper_total, "model_forward_s": model_total, "op_s": op_total,
            "bookkeeping_s": wrapper_total - model_total - op_total,
            "top_own_time_s": dict(top)}


def probe_bookkeeping(bench, args: argparse.Namespace, cache: str, attention: str) -> dict:
    """Per-step milliseconds of the wrapper's bookkeeping and of the op, on a model too small to
    hide them (d=32, one layer, same V and batch): SeqD, RCD, and RCD with the op replaced by
    a stand-in that returns zeros; min over `--probe-repeats` interleaved runs (short runs: the
    minimum is the unloaded cost even on a busy machine)."""
    import rcd_ext.residual as residual_module

    small = argparse.Namespace(**{**vars(args), "hidden": 32, "layers": 1, "heads": 2})
    model = bench.build_model(small, seed=0, attention=attention)
    prompts = torch.randint(5, small.vocab, (small.batch, small.prompt_length),
                            generator=torch.Generator().manual_seed(0))
    real_op = residual_module.residual_context

    def stand_in(logits, embed_weight, mask_embed, **kwargs):
        rows = logits.shape[0]
        return (embed_weight.new_zeros((rows, embed_weight.shape[1])),
                torch.zeros(rows, device=logits.device))

    def run(rcd: bool, op) -> tuple[float, int]:
        residual_module.residual_context = op
        try:
            result = bench.run_once(model, prompts, small, cache, small.steps, rcd=rcd)
        finally:
            residual_module.residual_context = real_op
        return result.stats.wall_time_s, result.stats.denoising_steps

    variants = {"seqd": (False, real_op), "rcd": (True, real_op),
                "rcd_op_stubbed": (True, stand_in)}
    best = {name: float("inf") for name in variants}
    steps = 1
    for repeat in range(args.probe_repeats + 1):
        for name, (rcd, op) in variants.items():
            wall, steps = run(rcd, op)
            if repeat:
                best[name] = min(best[name], wall)
    return {"min_wall_s": best, "steps": steps,
            "bookkeeping_ms_per_step": 1e3 * (best["rcd_op_stubbed"] - best["seqd"]) / steps,
            "op_ms_per_step": 1e3 * (best["rcd"] - best["rcd_op_stubbed"]) / steps,
            "seqd_ms_per_step": 1e3 * best["seqd"] / steps}


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import decode_bench as bench

    torch.set_num_threads(1)
    bench_args = argparse.Namespace(device="cpu", hidden=128, layers=4, heads=4, vocab=4096,
                                    batch=4, prompt_length=32, gen_length=64, block_length=32,
                                    remasking="fixed", threshold=0.9, steps=args.steps,
                                    probe_repeats=args.probe_repeats)
    prompts = torch.randint(5, bench_args.vocab, (4, 32),
                            generator=torch.Generator().manual_seed(0))
    out = {"rcd_ext": __import__("rcd_ext").__file__, "loops": {}}
    for loop in args.loops:
        attention = "block_causal" if loop == "block_causal" else "bidirectional"
        cache = "none" if loop == "block_causal" else loop
        model = bench.build_model(bench_args, seed=0, attention=attention)
        reference = bench.build_model(bench_args, seed=1, attention=attention)
        variants = {"seqd": {"rcd": False}, "rcd-cold": {"rcd": True},
                    "rcd-warm": {"rcd": True, "init": "reference", "ref_model": reference}}
        walls: dict[str, list[float]] = {name: [] for name in variants}
        tokens = 0
        for repeat in range(args.repeats + 1):
            for name, kwargs in variants.items():
                result = bench.run_once(model, prompts, bench_args, cache, args.steps, **kwargs)
                tokens = result.stats.tokens
                if repeat:
                    walls[name].append(result.stats.wall_time_s)
        ops = {name: count_ops(model, prompts, bench, bench_args, cache, **kwargs)
               for name, kwargs in (("seqd", variants["seqd"]), ("rcd-cold", {"rcd": True}))}
        out["loops"][loop] = {
            "tokens": tokens, "walls_s": walls,
            "ops_per_step": {name: value[0] for name, value in ops.items()},
            "host_reads_per_step": {name: value[1] for name, value in ops.items()},
            "steps": ops["seqd"][2],
            "profile_rcd_cold": profile_rcd(model, prompts, bench, bench_args, cache),
            "probe": probe_bookkeeping(bench, bench_args, cache, attention)}
    print(json.dumps(out))


# ---- driver -----------------------------------------------------------------------------------
def summarise(runs: dict[str, list[dict]], loops: list[str]) -> dict:
    summary = {}
    for loop in loops:
        entry = {}
        for version, outputs in runs.items():
            records = [output["loops"][loop] for output in outputs]
            walls = {name: min(w for r in records for w in r["walls_s"][name])
                     for name in records[0]["walls_s"]}
            tokens, steps = records[0]["tokens"], records[0]["steps"]
            profiles = [r["profile_rcd_cold"] for r in records]
            best = min(profiles, key=lambda p: p["wrapper_call_s"])
            entry[version] = {
                "tokens_per_s": {name: tokens / wall for name, wall in walls.items()},
                "rcd_over_seqd": {name: walls["seqd"] / wall for name, wall in walls.items()
                                  if name != "seqd"},
                "rcd_extra_ms_per_step": {name: 1e3 * (wall - walls["seqd"]) / steps
                                          for name, wall in walls.items() if name != "seqd"},
                "ops_per_step": records[0]["ops_per_step"],
                "host_reads_per_step": records[0]["host_reads_per_step"],
                "profile_rcd_cold_best": best,
                "bookkeeping_share_of_rcd_cold": best["bookkeeping_s"] / best["wrapper_call_s"],
                "op_share_of_rcd_cold": best["op_s"] / best["wrapper_call_s"],
                "probe_small_model": min((r["probe"] for r in records),
                                         key=lambda p: p["min_wall_s"]["rcd_op_stubbed"]),
            }
        summary[loop] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-rev", default=None, help="git revision of the old files")
    parser.add_argument("--before-dir", type=Path, default=None,
                        help="directory holding the old files at their repository paths")
    parser.add_argument("--loops", nargs="+", default=["none", "prefix", "dual", "block_causal"])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the versions")
    parser.add_argument("--probe-repeats", type=int, default=15,
                        help="repeats of the small-model bookkeeping probe")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_before_after_cpu.json")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if bool(args.before_rev) == bool(args.before_dir):
        print("decode_before_after: give one of --before-rev or --before-dir", file=sys.stderr)
        return 2
    from rcd_ext.atomic_files import write_json_atomic

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        roots = {"before": Path(scratch) / "before", "after": Path(scratch) / "after"}
        snapshot(roots["before"], args.before_rev, args.before_dir)
        snapshot(roots["after"], None, None)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps",
                   str(args.steps), "--repeats", str(args.repeats), "--probe-repeats",
                   str(args.probe_repeats), "--loops", *args.loops]
        for round_index in range(args.rounds):
            for version, root in roots.items():
                env = dict(os.environ, PYTHONPATH=str(root))
                done = subprocess.run(command, env=env, check=True, capture_output=True,
                                      text=True)
                output = json.loads(done.stdout.strip().splitlines()[-1])
                if not output["rcd_ext"].startswith(str(root)):
                    raise RuntimeError(f"worker imported {output['rcd_ext']}, not {root}")
                runs[version].append(output)
                print(f"round {round_index} {version} done", flush=True)
    summary = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(
            sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "threads": 1, "cpus": os.cpu_count(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": os.getloadavg(),
        "config": {"steps": args.steps, "repeats": args.repeats, "rounds": args.rounds,
                   "model": "decode_bench defaults: d128 L4 V4096, batch 4, prompt 32, gen 64, "
                            "block 32"},
        "results": summarise(runs, args.loops),
        "notes": "Walls: min over all repeats of all rounds. rcd-warm = init 'reference'. "
                 "Host reads count .item()/int()/bool() on tensors and nonzero calls. "
                 "bookkeeping_s = wrapper __call__ cumulative time - model forward - op under "
                 "cProfile (which inflates Python time alike for both versions).",
    }
    write_json_atomic(args.out, summary, indent=1)
    for loop, entry in summary["results"].items():
        b, a = entry["before"], entry["after"]
        print(f"{loop:>12}: RCD/SeqD cold {b['rcd_over_seqd']['rcd-cold']:.3f} -> "
              f"{a['rcd_over_seqd']['rcd-cold']:.3f}, warm {b['rcd_over_seqd']['rcd-warm']:.3f}"
              f" -> {a['rcd_over_seqd']['rcd-warm']:.3f} | extra ops/step "
              f"{b['ops_per_step']['rcd-cold'] - b['ops_per_step']['seqd']:.0f} -> "
              f"{a['ops_per_step']['rcd-cold'] - a['ops_per_step']['seqd']:.0f}, host reads "
              f"{b['host_reads_per_step']['rcd-cold']:.1f} -> "
              f"{a['host_reads_per_step']['rcd-cold']:.1f} | bookkeeping share "
              f"{b['bookkeeping_share_of_rcd_cold']:.2f} -> "
              f"{a['bookkeeping_share_of_rcd_cold']:.2f} | probe bookkeeping ms/step "
              f"{b['probe_small_model']['bookkeeping_ms_per_step']:.3f} -> "
              f"{a['probe_small_model']['bookkeeping_ms_per_step']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
