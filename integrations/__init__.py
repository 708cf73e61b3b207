"""Engine integrations, installed as `rcd_ext.integrations`: a drop-in RCD flag for existing
dLLM samplers (Fast-dLLM, D2F, SDAR) and the lm-evaluation-harness model `rcd`."""
