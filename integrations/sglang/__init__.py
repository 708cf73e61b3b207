"""RCD as an SGLang dLLM algorithm (`--dllm-algorithm RCD`), installed as
`rcd_ext.integrations.sglang`.

- `config`: `RCDServingConfig`, the `--dllm-algorithm-config` YAML (no SGLang import)
- `algorithm`: the `RCD` `DllmAlgorithm` (imports SGLang)
- `server_args`: launch-time decisions and per-request refusals
- `plugin`: `register`, the `sglang.srt.plugins` entry point
See docs/serving.md.
"""
