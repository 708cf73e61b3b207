"""lm-evaluation-harness models `rcd` (RCD decoding) and `seqd` (the same, residuals off).

    lm_eval --model rcd --model_args pretrained=PATH,gen_length=256,block_length=32 \\
        --tasks gsm8k_cot --num_fewshot 5 --batch_size 4 --output_path results/
    rcd-lm-eval ...                                     # the same, offline by default
    python -m rcd_ext.integrations.lm_eval_model ...   # = rcd-lm-eval

Plain `lm_eval` finds both names through the `rcd_ext_lm_eval.pth` startup hook
(`rcd_ext_lm_eval_startup`: lazy registry entries, see its docstring); releases that read the
`lm_eval.models` entry-point group find `RCDLM` / `SeqDLM` there too. `cli_main`
(`rcd-lm-eval`) runs lm-eval's own CLI on exactly the arguments given, after setting
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE to 1 unless they are set, and
prints a bad `--model_args` value as one line (exit code 2). `model_args` are checked and
defaulted by `lm_eval_args.check_model_args` before anything loads.

What each request type does:
- `generate_until`: `rcd_ext.generate` on batches of up to `batch_size` prompts, cut at the
  first EOS and at the earliest stop string (`until`, plus the EOS text as lm-eval's HFLM adds
  it). Models whose adapter supports left padding (the tiny dLLM, Dream) batch prompts of any
  lengths, longest first; the others batch prompts of equal token length only. Either way
  each result equals decoding its prompt alone (greedy).
- `loglikelihood`: a Monte-Carlo estimate of the masked-diffusion ELBO, as LLaDA's own
  evaluation computes it (`masked_diffusion_elbo`); residuals play no part in one forward.
- `loglikelihood_rolling`: NotImplementedError.

Every decoding option is a `--model_args` key (see `RCDLM.__init__`); lm-eval's `--batch_size`
and `--device` arrive as keyword arguments. Multi-process runs (`torchrun` or `accelerate
launch` with N processes) use torch.distributed directly: one model replica per process,
lm-eval splits the requests by rank.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import lm_eval.models  # noqa: F401  built-in models first: the registry fills lazily when empty
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from rcd_ext.integrations.lm_eval_args import (
    CheckpointFacts,
    ModelArgsError,
    check_fits,
    check_model_args,
    print_model_args_errors_briefly,
)
from rcd_ext.seeding import seeded_generator

logger = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16}


# ---- pure helpers (unit-tested) -----------------------------------------------------------------
def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut]


def forward_process(
    target_length: int, samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's low-variance masking for `samples` draws over a target of `target_length` tokens.

    The number of masked tokens l is stratified over 1..L across the draws (a random offset,
    then evenly spaced), each draw masks a uniformly random subset of that size.

    Returns is_masked [samples, L] bool and l [samples] long (both on the CPU).
    """
    length = target_length
    offset = int(torch.randint(1, length + 1, (), generator=generator))
    counts = torch.round(torch.linspace(float(offset), offset + (samples - 1) * (length / samples),
                                        steps=samples)).long()
    counts = (counts - 1) % length + 1
    order = torch.stack([torch.randperm(length, generator=generator) for _ in range(samples)])
    is_masked = order < counts[:, None]
    return is_masked, counts


def masked_diffusion_elbo(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    mask_id: int,
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """Monte-Carlo estimate of log p(target | prompt) >= E_l[(L / l) sum_masked log p(x_i | x_t)].

    The masked-diffusion evidence lower bound as LLaDA's evaluation computes it: each of the
    `mc_num` draws masks l of the L target tokens (`forward_process`), runs one forward of the
    noisy sequence and scores the masked tokens, weighted by L / l. The prompt is never masked.

    Args:
        logits_fn: ids [B, P + L] -> logits [B, P + L, V], aligned with the inputs.
        prompt_ids, target_ids: token ids (the target must be non-empty).
        mc_num: number of draws; batch_size: draws per forward.
        generator: CPU generator for the masks (seed it for reproducible scores).

    Returns the estimate in nats (a float; higher is more likely).
    """
    if not target_ids:
        raise ValueError("masked_diffusion_elbo needs a non-empty target")
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be >= 1, got {mc_num}, {batch_size}")
    generator = generator or seeded_generator(0)
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
    target = torch.tensor(list(target_ids), dtype=torch.long)
    length = target.numel()
    total = 0.0
    done = 0
    while done < mc_num:
        samples = min(batch_size, mc_num - done)
        is_masked, counts = forward_process(length, samples, generator)
        noisy = torch.where(is_masked, torch.full_like(is_masked, mask_id, dtype=torch.long),
                            target[None].expand(samples, -1))
        ids = torch.cat([prompt[None].expand(samples, -1), noisy], 1).to(device)
        logits = logits_fn(ids)[:, prompt.numel():].float()
        log_probs = F.log_softmax(logits, -1).gather(
            -1, target.to(logits.device)[None, :, None].expand(samples, -1, 1)).squeeze(-1)
        weights = length / counts.to(logits.device).float()
        total += float(((log_probs * is_masked.to(logits.device)).sum(1) * weights).sum())
        done += samples
    return total / mc_num


def exact_masked_diffusion_elbo(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    mask_id: int,
) -> float:
    """The expectation `masked_diffusion_elbo` estimates, by enumerating every mask subset.

    sum over l = 1..L of (1 / L) (L / l) mean over |S| = l of sum_{i in S} log p(x_i | x_S masked).
    2^L - 1 forwards: for checking the estimator on short targets only.
    """
    import itertools

    length = len(target_ids)
    if not 1 <= length <= 12:
        raise ValueError(f"exact ELBO enumerates 2^L subsets; L = {length} is outside 1..12")
    prompt = list(prompt_ids)
    value = 0.0
    for count in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), count))
        rows = []
        for subset in subsets:
            noisy = [mask_id if i in subset else t for i, t in enumerate(target_ids)]
            rows.append(prompt + noisy)
        logits = logits_fn(torch.tensor(rows))[:, len(prompt):].float()
        log_probs = F.log_softmax(logits, -1).gather(
            -1, torch.tensor(list(target_ids))[None, :, None].expand(len(rows), -1, 1)
        ).squeeze(-1)
        inside = torch.zeros(len(rows), length)
        for row, subset in enumerate(subsets):
            inside[row, list(subset)] = 1.0
        value += float((log_probs * inside).sum(1).mean()) / count
    return value


def _request_seed(seed: int, *parts: Sequence[int]) -> int:
    """A seed that depends on the request's tokens only (same score on any rank or batch)."""
    digest = hashlib.sha256(repr((seed, [list(p) for p in parts])).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---- the model ----------------------------------------------------------------------------------
class RCDLM(TemplateLM):
    """A diffusion LLM decoded with RCD (or plain SeqD with `rcd=False`) for lm-eval.

    `--model_args` keys (all optional except `pretrained`; checked by
    `rcd_ext.integrations.lm_eval_args.check_model_args` before anything loads):
        pretrained: target dLLM path or hub name. tokenizer: tokenizer path (default pretrained).
        ref_model: frozen reference model (init defaults to "reference" when given).
        trust_remote_code (False), dtype ("auto" | bfloat16 | float16 | float32),
        device (default cuda:LOCAL_RANK when CUDA is there, else cpu; a model_args value wins
            over lm-eval's --device, whose default is cuda:0).
        gen_length: tokens generated per request (default: the answer length of the synthetic
            task in the checkpoint's rcd_training.json, else the task's max_gen_toks rounded up
            to block_length, capped to the context). block_length (the model's own block, else
            that answer length, else 32; at most half the context). steps: denoising steps for
            the whole generation (default gen_length). remasking: fixed | threshold.
            threshold (0.9), temperature (default: the task's; 0 when it does not sample),
            top_p, top_k, cache: none | prefix | dual, stop_at_eos (True), seed (0), mask_id.
        rcd (True for `rcd`, False for `seqd`), init: cold | reference | self | dirichlet,
            t_res (1.0), temper_delta, strategy, alpha_scale, scope, dirichlet_concentration,
            residual_top_k (none: exact; k: the sparse top-k residual).
        batch_size: prompts per generate call (lm-eval's --batch_size; "auto" means
            max_batch_size or 1); they may differ in length where the model takes left-padded
            batches (`pads_prompts`).
        mc_num (128), mc_batch_size (32): draws of the loglikelihood estimate and draws per
            forward; greedy_check (False): compute is_greedy by LLaDA's one-token-at-a-time
            greedy unmasking (L extra forwards per request).
        max_length: longest prompt + generation (default: the model's context); prompts are
            cut from the left to fit (with a warning). add_bos_token: force BOS on / off.

    The residual and decoding keys are the fields of `rcd_ext.options.ResidualConfig` and
    `DecodingConfig` (read from them: `lm_eval_args.OPTION_KEYS`); the model holds them as
    `self.residual` and `self.decoding` (gen_length and temperature filled per request).
    """

    MODEL_NAME = "rcd"
    RESIDUALS_DEFAULT = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        args = check_model_args(self.MODEL_NAME, model_args,
                                residuals_default=self.RESIDUALS_DEFAULT)
        from rcd_ext.models.adapters import get_adapter, load_model

        self._setup_distributed(args.device)
        torch_dtype = DTYPES[args.dtype]
        trust = args.trust_remote_code
        model, loaded_tokenizer = load_model(args.pretrained, trust_remote_code=trust,
                                             torch_dtype=torch_dtype, device=self._device)
        if args.tokenizer is not None:
            from transformers import AutoTokenizer

            loaded_tokenizer = AutoTokenizer.from_pretrained(args.tokenizer,
                                                             trust_remote_code=trust)
        if loaded_tokenizer is None:
            raise ModelArgsError(f"{self.MODEL_NAME} model_args: no tokenizer found next to "
                                 f"pretrained={args.pretrained!r} (add tokenizer=<path>)")
        self.pretrained = args.pretrained
        self.model = model
        self.tokenizer = loaded_tokenizer
        self.adapter = get_adapter(model, loaded_tokenizer, mask_id=args.mask_id)
        self.ref_model = None
        if args.ref_model is not None:
            self.ref_model, _ = load_model(args.ref_model, trust_remote_code=trust,
                                           torch_dtype=torch_dtype, device=self._device)

        self.facts = args.facts
        self.rcd = args.rcd
        self.residual = args.residual
        # gen_length / temperature are filled per request (`generate_until`)
        self.decoding = args.decoding
        self.gen_length = args.gen_length
        self.temperature = args.temperature
        self.seed = args.seed
        self.batch_size_per_gpu = args.batch_size
        self.mc_num = args.mc_num
        self.mc_batch_size = args.mc_batch_size
        self.greedy_check = args.greedy_check
        self._max_length = args.max_length
        self.add_bos_token = args.add_bos_token
        if self.gen_length is not None:  # the loaded model's context may be known only now
            check_fits(self.MODEL_NAME, self.gen_length, self.decoding.block_length,
                       self.max_length, self._facts_after_load())
        # summed DecodeStats of this process's generate calls (reported in get_model_info)
        self.decode_totals = {"sequences": 0, "tokens": 0, "sequence_steps": 0,
                              "forward_passes": 0, "reference_forwards": 0, "wall_time_s": 0.0}
        self._capped_gen_lengths: set[int] = set()

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> RCDLM:
        """lm-eval's constructor path: model_args win over --batch_size / --device (lm-eval
        passes --device cuda:0 even when it was not given, so `device=cpu` must override it)."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> RCDLM:
        """As `create_from_arg_obj`, from "key=value,..." (lm-eval's parser)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _facts_after_load(self) -> CheckpointFacts:
        block_loop = self.adapter.loop == "block_diffusion"
        return replace(self.facts,
                       model_block=self.decoding.block_length if block_loop else None)

    # ---- distributed plumbing (lm-eval 0.4.13 evaluator calls these) ----------------------------
    def _setup_distributed(self, device: str | None) -> None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is not None and str(device).startswith("cuda") \
                and not torch.cuda.is_available():
            logger.warning("device %s requested but CUDA is not available: using cpu", device)
            device = "cpu"
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if device is None or (cuda and world_size > 1):
            device = f"cuda:{local_rank}" if cuda else "cpu"
        self._device = torch.device(device)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._rank, self._world_size = 0, 1
        if world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self._device.type == "cuda" else "gloo")
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's tensor (0-d tensors count as [1])."""
        if self.world_size <= 1:
            return tensor
        import torch.distributed as dist

        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, 0)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's `obj` as a list on rank `dst`; None on the other ranks."""
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---- tokenizer conventions (as HFLM) --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.adapter.eos_id
        return int(eos if eos is not None else self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int | None:
        return self._max_length or self.adapter.max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.pretrained)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        options: dict[str, Any] = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        bos = getattr(self.tokenizer, "bos_token", None)
        if add_special_tokens is None and bos and string.startswith(bos):
            options["add_special_tokens"] = False  # a chat template already wrote the BOS
        ids = list(self.tokenizer.encode(string, **options))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template over lm-eval's messages, as text (HFLM's behaviour)."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"--apply_chat_template: the tokenizer of {self.pretrained!r} has "
                             "no chat template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def decode_summary(self) -> dict[str, float]:
        """Totals of this process's generation: tokens, steps, forwards, time and the rates
        (tokens_per_step averages over sequences, as `DecodeStats.tokens_per_step`)."""
        totals = dict(self.decode_totals)
        totals["tokens_per_step"] = totals["tokens"] / max(1, totals["sequence_steps"])
        totals["tokens_per_second"] = totals["tokens"] / max(totals["wall_time_s"], 1e-9)
        return totals

    def get_model_info(self) -> dict[str, Any]:
        """Added by lm-eval to the results JSON's `config` (after the run)."""
        # lm-eval writes its own --device argument (default "cuda:0") as config.device whatever
        # ran, so where decoding really ran goes under a key of its own
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "model_device": str(next(self.model.parameters()).device),
                "rcd": self.rcd,
                "decoding": {**asdict(self.decoding), **asdict(self.residual),
                             "gen_length": self.gen_length, "temperature": self.temperature},
                "decode_stats": self.decode_summary()}

    # ---- generate_until -------------------------------------------------------------------------
    def _slack(self) -> int:
        """Positions a block-diffusion loop may need past prompt + generation (block padding)."""
        return self.decoding.block_length - 1 if self.adapter.loop == "block_diffusion" else 0

    def _generation_length(self, max_gen_toks: int) -> int:
        """gen_length from model_args, else `max_gen_toks` rounded up to whole blocks and capped
        so that the prompt keeps its training length (or half the context) (warned once)."""
        if self.gen_length is not None:
            return self.gen_length
        block = self.decoding.block_length
        wanted = -(-max_gen_toks // block) * block
        if self.max_length is None:
            return wanted
        prompt = self.facts.prompt_length or self.max_length // 2
        room = (self.max_length - self._slack() - prompt) // block * block
        if wanted <= room:
            return wanted
        if room < block:
            raise ModelArgsError(
                f"{self.MODEL_NAME} model_args: block_length={block} leaves no room for a "
                f"prompt in the model's context of {self.max_length} (give a smaller "
                "block_length, or gen_length)")
        if max_gen_toks not in self._capped_gen_lengths:
            self._capped_gen_lengths.add(max_gen_toks)
            logger.warning("%s: the task asks for max_gen_toks=%d but the model's context is %d "
                           "tokens: generating %d (set gen_length in model_args to choose)",
                           self.MODEL_NAME, max_gen_toks, self.max_length, room)
        return room

    def _prompt_budget(self, gen_length: int) -> int | None:
        """Longest prompt that fits with `gen_length` generated tokens (None: no known limit)."""
        if self.max_length is None:
            return None
        budget = self.max_length - gen_length - self._slack()
        if budget < 1:
            check_fits(self.MODEL_NAME, gen_length, self.decoding.block_length,
                       self.max_length, replace(self._facts_after_load(), prompt_length=None))
        return budget

    def _warn_cut_prompts(self, dropped: list[int], total: int, kind: str) -> None:
        """One warning per call (= per lm-eval run and request type) for prompts cut from the
        left to fit the context: how many, and how many tokens each lost."""
        if not dropped:
            return
        logger.warning(
            "%s: %d of %d %s prompts are longer than the model's context of %d tokens leaves "
            "beside the generation: cut from the left, dropping %d to %d tokens each (few-shot "
            "examples go first; lower --num_fewshot or gen_length to keep them whole)",
            self.MODEL_NAME, len(dropped), total, kind, self.max_length, min(dropped),
            max(dropped))

    def _finish_text(self, tokens: list[int], stops: Sequence[str]) -> str:
        eos = self.adapter.eos_id
        if eos is not None and eos in tokens:
            tokens = tokens[:tokens.index(eos)]
        text = truncate_at_stop(self.tok_decode(tokens, skip_special_tokens=False), stops)
        for special in self.tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text

    @property
    def pads_prompts(self) -> bool:
        """Whether a `generate_until` batch may mix prompt lengths: the adapter decodes
        left-padded batches exactly and a padding token (pad id or EOS) is known."""
        adapter = self.adapter
        return adapter.supports_padding and (adapter.pad_id is not None
                                             or adapter.eos_id is not None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """One completion per request (context, gen_kwargs): batched by generation settings
        (and by prompt length unless the model takes left-padded batches, `pads_prompts`),
        longest prompt first, cut at EOS and at the earliest `until` string."""
        from rcd_ext.decoding import generate

        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []
        dropped: list[int] = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            options = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            stops = handle_stop_sequences(options.pop("until", None), eos=eos_text)
            gen_length = self._generation_length(int(options.pop("max_gen_toks")))
            temperature = self.temperature
            if temperature is None:
                temperature = float(options.get("temperature", 0.0) or 0.0)
            ids = self.tok_encode(context)
            budget = self._prompt_budget(gen_length)
            if budget is not None and len(ids) > budget:
                dropped.append(len(ids) - budget)
                ids = ids[-budget:]
            key = (len(ids), gen_length, temperature)
            jobs.append((key, index, context, gen_kwargs, ids, stops))
        self._warn_cut_prompts(dropped, len(requests), "generate_until")
        mixed = self.pads_prompts
        if mixed:
            # one run of jobs per setting, longest prompt first: lengths change only a little
            # within a batch, so little of it is padding
            jobs.sort(key=lambda job: (job[0][1:], -job[0][0], job[1]))
        else:
            jobs.sort(key=lambda job: (-job[0][0], job[0][1:], job[1]))

        def batchable(job: tuple, first: tuple) -> bool:
            return job[0][1:] == first[0][1:] if mixed else job[0] == first[0]

        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running generate_until requests")
        start = 0
        while start < len(jobs):
            end = start + 1
            while (end < len(jobs) and end - start < self.batch_size
                   and batchable(jobs[end], jobs[start])):
                end += 1
            batch = jobs[start:end]
            _, gen_length, temperature = batch[0][0]
            output = generate(
                self.model, [job[4] for job in batch], tokenizer=self.tokenizer,
                rcd=self.rcd, ref_model=self.ref_model, seed=self.seed, adapter=self.adapter,
                residual=self.residual,
                decoding=replace(self.decoding, gen_length=gen_length, temperature=temperature))
            stats = output.stats
            self.decode_totals["sequences"] += stats.batch_size
            self.decode_totals["tokens"] += stats.tokens
            self.decode_totals["sequence_steps"] += stats.denoising_steps * stats.batch_size
            self.decode_totals["forward_passes"] += stats.forward_passes
            self.decode_totals["reference_forwards"] += stats.reference_forwards
            self.decode_totals["wall_time_s"] += stats.wall_time_s
            for job, row in zip(batch, output.tokens.tolist(), strict=True):
                text = self._finish_text(row, job[5])
                results[job[1]] = text
                self.cache_hook.add_partial("generate_until", (job[2], job[3]), text)
            bar.update(len(batch))
            start = end
        bar.close()
        return [text if text is not None else "" for text in results]

    # ---- loglikelihood --------------------------------------------------------------------------
    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.adapter.logits(self.model(input_ids=ids))

    def _greedy(self, prompt: list[int], target: list[int]) -> bool:
        """LLaDA's check: unmask the target one most-confident token at a time, greedily."""
        mask_id = self.adapter.mask_id
        ids = torch.tensor([prompt + [mask_id] * len(target)], device=self.device)
        for _ in target:
            masked = ids[0] == mask_id
            logits = self._logits(ids)[0][masked].float()
            confidence, choice = F.softmax(logits, -1).max(-1)
            pick = int(confidence.argmax())
            ids[0, masked.nonzero()[pick, 0]] = choice[pick]
        return ids[0, len(prompt):].tolist() == list(target)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        if self.adapter.loop == "block_diffusion":
            raise NotImplementedError(
                f"loglikelihood for block-diffusion models ({self.adapter.family}) is not "
                "implemented: their likelihood bound is per block with a clean prefix; use "
                "generative tasks (generate_until)")
        results = []
        fitted, dropped = self._fit_to_context(requests)
        self._warn_cut_prompts(dropped, len(requests), "loglikelihood")
        for strings, context, continuation in tqdm(
                fitted, disable=disable_tqdm or self.rank != 0,
                desc="Running loglikelihood requests"):
            if not continuation:
                results.append((0.0, True))
                continue
            generator = seeded_generator(_request_seed(self.seed, context, continuation))
            value = masked_diffusion_elbo(
                self._logits, context, continuation, self.adapter.mask_id, mc_num=self.mc_num,
                batch_size=self.mc_batch_size, generator=generator, device=self.device)
            greedy = self._greedy(list(context), list(continuation)) if self.greedy_check \
                else False
            results.append((value, greedy))
            self.cache_hook.add_partial("loglikelihood", strings, (value, greedy))
        return results

    def _fit_to_context(self, requests: list[Any]) -> tuple[list[tuple], list[int]]:
        """(strings, context, continuation) with each context cut from the left so that it and
        its continuation fit the model's context; and the number of tokens each cut dropped."""
        budget = self.max_length
        fitted, dropped = [], []
        for strings, context, continuation in requests:
            if budget is not None and continuation and len(context) + len(continuation) > budget:
                keep = budget - len(continuation)
                if keep < 1:
                    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit "
                                     f"the model's context of {budget} with any prompt")
                dropped.append(len(context) - keep)
                context = context[-keep:]
            fitted.append((strings, context, continuation))
        return fitted, dropped

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        raise NotImplementedError(
            "loglikelihood_rolling (perplexity tasks such as wikitext) is not supported by the "
            f"{type(self).__name__} model: a masked diffusion LM has no left-to-right "
            "factorisation to roll over. Use generative tasks, or loglikelihood tasks "
            "(scored by the Monte-Carlo ELBO)")


class SeqDLM(RCDLM):
    """The SeqD baseline: `rcd` with residuals off (plain masked-diffusion decoding)."""

    MODEL_NAME = "seqd"
    RESIDUALS_DEFAULT = False


# ---- console script -----------------------------------------------------------------------------
def cli_main(argv: Sequence[str] | None = None, program: str = "rcd-lm-eval") -> None:
    """`rcd-lm-eval`: lm-eval's own CLI with `rcd` and `seqd` registered (offline by default).

    A bad `--model_args` value ends the run with its one-line message on stderr, exit code 2.
    """
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ModelArgsError as error:
        print(f"{program}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    # `python -m rcd_ext.integrations.lm_eval_model`: run the importable copy of this module, so
    # that `rcd` / `seqd` are registered once, under the name the registry's lazy entries name
    from rcd_ext.integrations.lm_eval_model import cli_main as importable_cli_main

    importable_cli_main()
else:
    register_model("rcd")(RCDLM)
    register_model("seqd")(SeqDLM)
    print_model_args_errors_briefly()
