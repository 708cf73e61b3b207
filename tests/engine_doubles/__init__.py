"""Test doubles of dLLM engines, written from scratch for rcd-ext's integration tests.

They reproduce public signatures, call conventions, cache layouts, in-place cache writes and
return types of Fast-dLLM (LLaDA and Dream samplers) and D2F (the Hugging Face block sampler),
not their code: the decoding rules are deliberately simple (greedy, highest confidence first).
"""
