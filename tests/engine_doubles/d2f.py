"""A from-scratch double of D2F's Hugging Face block sampler (`_generate_block_single` of its
lm-eval model classes, LLaDA variant).

Conventions reproduced: the lm object holds `model`, `mask_token_id`, `block_size`,
`block_add_threshold`, `max_new_tokens`, `device`; several blocks are in flight: a new block of
masks is appended (`torch.cat`) once the last block is decoded past `block_add_threshold`; the
prompt and every finished block go to the K/V cache through `update_kvcache=<end position>` on
a forward that starts at the first uncached block; other steps run `x_t[:, first_active:]`
over the cache. Runs under `torch.inference_mode()`. Returns the generated ids as a list.
"""

from __future__ import annotations

import torch


class D2FLLaDALM:
    def __init__(self, model, mask_token_id: int, block_size: int = 4,
                 block_add_threshold: float = 0.5, max_new_tokens: int = 16,
                 confidence_threshold: float = 0.9):
        self.model = model
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.block_add_threshold = block_add_threshold
        self.max_new_tokens = max_new_tokens
        self.confidence_threshold = confidence_threshold
        self.device = torch.device("cpu")

    def _generate_block_single(self, prompt: torch.Tensor) -> list[int]:
        self.model.eval()
        mask_id, size = self.mask_token_id, self.block_size
        with torch.inference_mode():
            x_t = prompt.to(self.device)
            blocks = [{"start": 0, "end": prompt.shape[1], "state": "to_cache"}]
            cache, cache_length = None, 0
            while True:
                last = blocks[-1]
                done = float((x_t[0, last["start"]:last["end"]] != mask_id).float().mean())
                if len(blocks) - 1 < self.max_new_tokens // size and done >= \
                        self.block_add_threshold:
                    start = x_t.shape[1]
                    x_t = torch.cat([x_t, torch.full((1, size), mask_id)], dim=1)
                    blocks.append({"start": start, "end": start + size, "state": "active"})
                active = [b for b in blocks if b["state"] == "active"]
                to_cache = [b for b in blocks if b["state"] == "to_cache"]
                if not active and not to_cache:
                    break
                if to_cache:
                    start, update = to_cache[0]["start"], to_cache[-1]["end"]
                else:
                    start, update = min(b["start"] for b in active), 0
                outputs = self.model(x_t[:, start:], attention_bias=None,
                                     past_key_values=cache, use_cache=True,
                                     update_kvcache=update)
                if update:
                    cache, cache_length = outputs.past_key_values, update
                    for block in to_cache:
                        block["state"] = "in_cache"
                logits = outputs.logits
                previous_active = False
                for block in blocks:
                    if block["state"] != "active":
                        previous_active = False
                        continue
                    columns = slice(block["start"] - start, block["end"] - start)
                    masked = x_t[0, block["start"]:block["end"]] == mask_id
                    if masked.any():
                        block_logits = logits[0, columns].clone()
                        block_logits[:, mask_id] = -torch.inf  # never propose the mask
                        probabilities = torch.softmax(block_logits.double(), -1)
                        confidence, x0 = probabilities.max(-1)
                        confidence = torch.where(masked, confidence, torch.tensor(-1.0).double())
                        chosen = masked & (confidence > self.confidence_threshold)
                        chosen[confidence.argmax()] = True
                        x_t[0, block["start"]:block["end"]][chosen] = x0[chosen]
                    if not (x_t[0, block["start"]:block["end"]] == mask_id).any() and \
                            not previous_active:
                        block["state"] = "to_cache"
                    previous_active = block["state"] == "active"
            assert cache_length <= x_t.shape[1]
            return x_t[0, prompt.shape[1]:].tolist()
