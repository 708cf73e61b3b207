"""Engine integrations, installed as `rcd_ext.integrations`: a drop-in RCD flag for existing
dLLM samplers and the lm-evaluation-harness model `rcd`.

Modules (each imported on its own, so that none pulls in another engine's dependencies):
- `fast_dllm`: `patch_fast_dllm` (LLaDA samplers), `patch_fast_dllm_dream` (Dream) — Fast-dLLM
- `fast_dllm_v2`: `patch_fast_dllm_v2` (block-diffusion `batch_sample`, embedding hook)
- `d2f`: `patch_d2f` (Discrete Diffusion Forcing's Hugging Face samplers)
- `sdar`: `patch_sdar` (SDAR's `block_diffusion_generate`)
- `d2f_vllm`: `patch_d2f_vllm` (D2F's vLLM-style serving engine)
- `jetengine`: `patch_jetengine` (SDAR's JetEngine serving engine)
- `engine_patching`: the shared options and patch/undo machinery
- `runner_patch`: `RunnerPatch`, the base of the serving-engine adapters (JetEngine,
  d2f_vllm): `wrap` a runner method, `attach` the embedding hook, exact `undo()`
- `embedding_hook`: `EmbeddingHookRCD` and `SequenceSlots` for engines fed token ids only
- `lm_eval_model`: the lm-eval models `rcd` and `seqd`, and the `rcd-lm-eval` entry point
- `sglang`: the SGLang dLLM algorithm `RCD` (`--dllm-algorithm RCD`) and its
  `sglang.srt.plugins` entry point
See docs/engines.md, docs/evaluation.md and docs/serving.md.
"""
