"""A from-scratch double of Fast-dLLM's Dream block sampler (`generation_utils_block.py`).

Conventions reproduced: `diffusion_generate(self, inputs, generation_config=None, **kwargs)` and
`_sample` are bound onto the model with `types.MethodType`; the model is called positionally
as `self(x, attention_mask, tok_idx, ...)` with attention_mask "full" and tok_idx None; logits
are shifted by one (`cat([logits[:, :1], logits[:, :-1]])`); every block start is a full
forward that commits the block's first token; the prefix cache is cut to `[:, :s, :]`, the
dual cache is written in place through `replace_position`. Returns the token tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shift(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class DreamGenerationMixin:
    @torch.no_grad()
    def diffusion_generate(self, inputs=None, generation_config=None, **kwargs):
        config = generation_config or self.generation_config
        return self._sample(inputs, attention_mask=None, generation_config=config,
                            threshold=kwargs.get("threshold", 0.9),
                            block_length=kwargs.get("block_length", 32),
                            dual_cache=kwargs.get("dual_cache", False))

    def _sample(self, input_ids, attention_mask, generation_config, threshold=0.9,
                block_length=32, dual_cache=False):
        mask_id = generation_config.mask_token_id
        x = F.pad(input_ids, (0, generation_config.max_length - input_ids.shape[1]),
                  value=mask_id)
        blocks = (x.shape[1] - input_ids.shape[1]) // block_length
        for block in range(blocks):
            s = input_ids.shape[1] + block * block_length
            e = s + block_length
            output = self(x, "full", None, use_cache=True)
            logits = _shift(output.logits)
            logits[..., mask_id] = -torch.inf  # never propose the mask (random doubles)
            x[:, s] = logits[:, s].argmax(-1)
            cache = output.past_key_values
            if not dual_cache:
                cache = [tuple(t[:, :s, :] for t in layer) for layer in cache]
            replace_position = torch.zeros_like(x, dtype=torch.bool)
            replace_position[:, s:e] = True
            while (x[:, s:e] == mask_id).any():
                if dual_cache:
                    output = self(x[:, s:e], "full", None, past_key_values=cache, use_cache=True,
                                  dual_cache=True, replace_position=replace_position)
                else:
                    output = self(x[:, s:], "full", None, past_key_values=cache, use_cache=True)
                logits = _shift(output.logits)[:, :block_length]
                logits[..., mask_id] = -torch.inf
                block_x = x[:, s:e]
                masked = block_x == mask_id
                confidence, x0 = torch.softmax(logits.double(), -1).max(-1)
                confidence = torch.where(masked, confidence, torch.tensor(-1.0).double())
                transfer = masked & (confidence > threshold)
                best = confidence.argmax(-1)
                transfer[torch.arange(x.shape[0]), best] = True
                block_x[transfer] = x0[transfer]  # a view: writes into x
        return x
