"""Model families for rcd-ext.

Importing this package registers the built-in tiny dLLM (model type ``"rcd-tiny-dllm"``) with
``AutoConfig``, ``AutoModel`` and ``AutoModelForMaskedLM``, so checkpoints saved with
``save_pretrained`` load through the Auto classes without ``trust_remote_code``.
Adapters for other model families live in sibling modules and are imported by their users.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from rcd_ext.models.tiny_dllm import TinyDLLMConfig, TinyDLLMModel, TinyDLLMOutput, TinyKVCache
from rcd_ext.models.tiny_tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, tiny_vocab

# exist_ok: a second registration of the same classes (e.g. importlib.reload) is harmless.
AutoConfig.register(TinyDLLMConfig.model_type, TinyDLLMConfig, exist_ok=True)
AutoModel.register(TinyDLLMConfig, TinyDLLMModel, exist_ok=True)
AutoModelForMaskedLM.register(TinyDLLMConfig, TinyDLLMModel, exist_ok=True)

__all__ = [
    "SPECIAL_TOKENS",
    "TinyDLLMConfig",
    "TinyDLLMModel",
    "TinyDLLMOutput",
    "TinyKVCache",
    "build_tiny_tokenizer",
    "tiny_vocab",
]
