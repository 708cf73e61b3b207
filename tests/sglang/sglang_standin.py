"""A model-runner stand-in and a scheduler stand-in for driving SGLang's real dLLM loops on CPU.

`TinyRunner.forward` is what `DllmAlgorithm._run_sync` / `_run_fdfo` call: it scores each
request's current block after its committed context with rcd_ext's tiny dLLM (bidirectional,
random weights made peaky so that thresholds matter), feeding `forward_batch.input_embeds` when
the algorithm set it and the token embeddings otherwise, and records every call. `decode`
plays the scheduler: one block per request at a time, `run()` per round, states carried in
fdfo mode as SGLang's scheduler carries them (`req.dllm_algo_state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from sglang.srt.dllm.config import DllmConfig
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from rcd_ext.models.tiny_dllm import TinyDLLMConfig, TinyDLLMModel

VOCAB, MASK_ID, BLOCK = 40, 39, 4
SCALE = 2.0  # logits spread enough that thresholds between 0.3 and 0.9 matter


def tiny_model(seed: int = 0) -> TinyDLLMModel:
    torch.manual_seed(seed)
    model = TinyDLLMModel(TinyDLLMConfig(vocab_size=VOCAB, mask_token_id=MASK_ID, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:  # matrices only: norms and biases keep their init
                fan_in = parameter.shape[-1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator)
                                * (SCALE / fan_in ** 0.5))
    return model.eval()


@dataclass
class Call:
    """One forward: the block ids and the embeddings the model saw, the logits it returned."""

    input_ids: torch.Tensor  # [B, block]
    input_embeds: torch.Tensor | None  # [B, block, D] when the algorithm set them
    seen_embeds: torch.Tensor  # [B, block, D] what the model actually used
    logits: torch.Tensor  # [B, block, V]
    rids: list[str]


class TinyRunner:
    """What the loops need of a ModelRunner: `forward` and `model.get_input_embeddings()`."""

    def __init__(self, model: TinyDLLMModel) -> None:
        self.tiny = model
        self.model = SimpleNamespace(get_input_embeddings=lambda: model.embed_tokens)
        self.contexts: dict[str, list[int]] = {}
        self.calls: list[Call] = []

    @torch.no_grad()
    def forward(self, forward_batch: ForwardBatch, pp_proxy_tensors=None):
        batch_size = forward_batch.batch_size
        ids = forward_batch.input_ids.view(batch_size, BLOCK).clone()
        given = forward_batch.input_embeds
        block_embeds = (self.tiny.embed_tokens(ids) if given is None
                        else given.view(batch_size, BLOCK, -1).clone())
        logits = []
        for index, rid in enumerate(forward_batch.rids):
            context = torch.tensor([self.contexts[rid]], dtype=torch.long)
            embeds = torch.cat([self.tiny.embed_tokens(context), block_embeds[index:index + 1]], 1)
            logits.append(self.tiny(inputs_embeds=embeds).logits[0, -BLOCK:])
        logits = torch.stack(logits)
        logits[..., MASK_ID] = -torch.inf  # a trained dLLM never predicts its mask token
        self.calls.append(Call(ids, None if given is None else given.view(batch_size, BLOCK, -1)
                               .clone(), block_embeds, logits, list(forward_batch.rids)))
        output = SimpleNamespace(full_logits=logits.reshape(batch_size * BLOCK, VOCAB))
        return SimpleNamespace(logits_output=output, can_run_graph=False)


def dllm_config(algorithm: str, algorithm_config: dict, fdfo: bool) -> DllmConfig:
    return DllmConfig(algorithm=algorithm, algorithm_config=algorithm_config, block_size=BLOCK,
                      mask_id=MASK_ID, max_running_requests=8, first_done_first_out_mode=fdfo)


@dataclass
class Request:
    """A request as the scheduler stand-in sees it: committed tokens and its open block."""

    rid: str
    prompt: list[int]
    max_blocks: int
    output: list[int] = field(default_factory=list)
    block: list[int] | None = None  # the open block's current ids (fdfo: carried across rounds)
    prompt_in_block: int = 0
    state: object = None
    blocks_done: int = 0


def _open_block(request: Request, runner: TinyRunner) -> None:
    """Start the next block: the prompt's tail that does not fill a whole block, then masks."""
    committed = request.prompt + request.output
    whole = (len(request.prompt) // BLOCK) * BLOCK if not request.output else len(committed)
    tail = committed[whole:]
    runner.contexts[request.rid] = committed[:whole]
    request.block = tail + [MASK_ID] * (BLOCK - len(tail))
    request.prompt_in_block = len(tail)


def _forward_batch(requests: list[Request]) -> ForwardBatch:
    batch_size = len(requests)
    ids = torch.tensor([r.block for r in requests], dtype=torch.long)
    prompt_mask = torch.zeros(batch_size, BLOCK, dtype=torch.bool)
    for index, request in enumerate(requests):
        prompt_mask[index, :request.prompt_in_block] = True
    seq_lens = torch.tensor([len(r.prompt) + len(r.output) + BLOCK for r in requests])
    batch = ForwardBatch(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=batch_size,
                         input_ids=ids.view(-1), req_pool_indices=torch.arange(batch_size),
                         seq_lens=seq_lens, out_cache_loc=None, seq_lens_sum=int(seq_lens.sum()))
    batch.dllm_prompt_mask = prompt_mask
    batch.rids = [r.rid for r in requests]
    return batch


def decode(algorithm, runner: TinyRunner, requests: list[Request], fdfo: bool,
           max_rounds: int = 200, on_round=None) -> dict[str, list[int]]:
    """Decode `max_blocks` blocks per request through `algorithm.run` (the real loops)."""
    active = list(requests)
    for request in active:
        _open_block(request, runner)
    for round_index in range(max_rounds):
        if not active:
            break
        batch = _forward_batch(active)
        if fdfo:
            states = [r.state for r in active]
            _, ids, accepted, states_out, _ = algorithm.run(runner, batch, states)
            for request, block, accept, state in zip(active, ids, accepted, states_out,
                                                     strict=True):
                request.block, request.state = list(block), state
                if accept:
                    _close_block(request, block)
        else:
            _, ids, _, _, _ = algorithm.run(runner, batch)
            for request, block in zip(active, ids, strict=True):
                _close_block(request, request.block[:request.prompt_in_block] + block.tolist())
        for request in active:
            if request.block is None and request.blocks_done < request.max_blocks:
                _open_block(request, runner)
        active = [r for r in active if r.blocks_done < r.max_blocks]
        if on_round is not None:
            active = on_round(round_index, active)
    return {r.rid: r.output for r in requests}


def _close_block(request: Request, block: list[int]) -> None:
    assert MASK_ID not in block[request.prompt_in_block:], block
    request.output.extend(block[request.prompt_in_block:])
    request.block, request.blocks_done = None, request.blocks_done + 1


def requests() -> list[Request]:
    return [Request("a", [3, 7, 11, 2, 5, 9], 3), Request("b", [1, 4], 2),
            Request("c", [8, 8, 6, 12, 30, 21, 17, 14], 3)]
