"""A from-scratch double of Fast-dLLM's `llada/generate.py`: same public signatures, same model
calls and return values `(x, nfe)`, a simpler transfer rule (greedy, most confident first).

Call conventions reproduced:
- `generate`: `model(x)` on the whole sequence every step;
- `generate_with_prefix_cache`: per block, `model(x, use_cache=True)` then the cache cut to the
  prefix `[:, :, :s]` and steps `model(x[:, s:], past_key_values=..., use_cache=True)` on a
  *view* of x (positions s.. are implied by the cache length; logits cover later blocks too);
- `generate_with_dual_cache`: per block, `model(x, use_cache=True)` then steps
  `model(x[:, s:e], past_key_values=..., use_cache=True, replace_position=[B, L] bool)`, the
  model writing the block's K/V into the cache in place;
- every block start is a full forward that already commits tokens (nfe counts it).
"""

from __future__ import annotations

import torch


def _transfer(logits, mask_index, x, count, threshold, mask_id):
    """(x0, transfer [B, l] bool): the `count` most confident masked positions (all above
    `threshold`, at least one, when a threshold is given). The mask token is never proposed
    (random doubles could otherwise stall a block)."""
    logits = logits.clone()
    logits[..., mask_id] = -torch.inf
    probabilities = torch.softmax(logits.double(), -1)
    confidence, x0 = probabilities.max(-1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, confidence, torch.tensor(-1.0, dtype=torch.double))
    transfer = torch.zeros_like(mask_index)
    for row in range(x.shape[0]):
        if threshold is not None:
            chosen = (confidence[row] > threshold) & mask_index[row]
            chosen[confidence[row].argmax()] = bool(mask_index[row].any())
            transfer[row] = chosen
        else:
            k = min(int(count), int(mask_index[row].sum()))
            transfer[row, confidence[row].topk(k).indices] = k > 0
    return x0, transfer


def _per_step(block_length, steps):
    base, extra = divmod(block_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


@torch.no_grad()
def generate(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.,
             remasking='low_confidence', mask_id=126336, threshold=None, factor=None):
    """Semi-AR blocks without cache. Returns (x [B, Lp + gen_length], nfe)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long,
                   device=model.device)
    x[:, :prompt.shape[1]] = prompt
    blocks = gen_length // block_length
    counts = _per_step(block_length, steps // blocks)
    nfe = 0
    for block in range(blocks):
        s = prompt.shape[1] + block * block_length
        e = s + block_length
        step = 0
        while (x[:, s:e] == mask_id).any():
            nfe += 1
            logits = model(x).logits
            mask_index = x == mask_id
            mask_index[:, e:] = False
            x0, transfer = _transfer(logits, mask_index, x, counts[min(step, len(counts) - 1)],
                                     threshold, mask_id)
            x[transfer] = x0[transfer]
            step += 1
    return x, nfe


@torch.no_grad()
def generate_with_prefix_cache(model, prompt, steps=128, gen_length=128, block_length=128,
                               temperature=0., remasking='low_confidence', mask_id=126336,
                               threshold=None, factor=None):
    """Semi-AR blocks over a prefix K/V cache. Returns (x, nfe)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long,
                   device=model.device)
    x[:, :prompt.shape[1]] = prompt
    blocks = gen_length // block_length
    counts = _per_step(block_length, steps // blocks)
    nfe = 0
    for block in range(blocks):
        s = prompt.shape[1] + block * block_length
        e = s + block_length
        output = model(x, use_cache=True)
        mask_index = x == mask_id
        mask_index[:, e:] = False
        x0, transfer = _transfer(output.logits, mask_index, x, counts[0], threshold, mask_id)
        x[transfer] = x0[transfer]
        nfe += 1
        cache = [tuple(t[:, :, :s] for t in layer) for layer in output.past_key_values]
        step = 1
        while (x[:, s:e] == mask_id).any():
            nfe += 1
            logits = model(x[:, s:], past_key_values=cache, use_cache=True).logits
            mask_index = x[:, s:] == mask_id
            mask_index[:, block_length:] = False
            x0, transfer = _transfer(logits, mask_index, x[:, s:],
                                     counts[min(step, len(counts) - 1)], threshold, mask_id)
            x[:, s:][transfer] = x0[transfer]  # writes through the view into x
            step += 1
    return x, nfe


@torch.no_grad()
def generate_with_dual_cache(model, prompt, steps=128, gen_length=128, block_length=128,
                             temperature=0., remasking='low_confidence', mask_id=126336,
                             threshold=None, factor=None):
    """Semi-AR blocks over a prefix + suffix K/V cache updated in place. Returns (x, nfe)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long,
                   device=model.device)
    x[:, :prompt.shape[1]] = prompt
    blocks = gen_length // block_length
    counts = _per_step(block_length, steps // blocks)
    nfe = 0
    for block in range(blocks):
        s = prompt.shape[1] + block * block_length
        e = s + block_length
        output = model(x, use_cache=True)
        cache = output.past_key_values
        mask_index = x == mask_id
        mask_index[:, e:] = False
        x0, transfer = _transfer(output.logits, mask_index, x, counts[0], threshold, mask_id)
        x[transfer] = x0[transfer]
        nfe += 1
        replace_position = torch.zeros_like(x, dtype=torch.bool)
        replace_position[:, s:e] = True
        step = 1
        while (x[:, s:e] == mask_id).any():
            nfe += 1
            logits = model(x[:, s:e], past_key_values=cache, use_cache=True,
                           replace_position=replace_position).logits
            mask_index = x[:, s:e] == mask_id
            x0, transfer = _transfer(logits, mask_index, x[:, s:e],
                                     counts[min(step, len(counts) - 1)], threshold, mask_id)
            x[:, s:e][transfer] = x0[transfer]
            step += 1
    return x, nfe
