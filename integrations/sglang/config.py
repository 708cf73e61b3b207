"""The `--dllm-algorithm-config` YAML of the RCD algorithm: one dataclass, checked key by key.

Kept free of SGLang imports so that a config can be checked anywhere. Every error is one line
naming the key, the value and what was expected.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rcd_ext.op_checks import check_t_res
from rcd_ext.options import ResidualConfig, fields_by_name

SERVING_INITS = ("cold", "dirichlet")
# keys SGLang itself reads from the same YAML (DllmConfig.from_server_args)
SGLANG_KEYS = ("block_size",)


@dataclass(frozen=True)
class RCDServingConfig:
    """RCD options for SGLang (YAML keys = field names).

    threshold: commit rule of SGLang's LowConfidence (commit every masked position whose top
        probability exceeds it, else the single most confident one).
    t_res, temper_delta, strategy, alpha_scale, residual_top_k: as `rcd_ext.ops.residual_context`
        (alpha_scale 0 turns residuals off: RCD then commits exactly what LowConfidence commits).
    init: what a block's masked positions get before their first forward: "cold" (plain [MASK]
        embedding, no extra work) or "dirichlet" (a residual from logits log p0,
        p0 ~ Dirichlet(dirichlet_concentration), seeded per request and block from dirichlet_seed).
    block_size: read by SGLang itself (overrides the architecture's default block size).
    """

    threshold: float = 0.95
    t_res: float = 1.0
    temper_delta: bool = False
    strategy: str = "entropy"
    alpha_scale: float = 1.0
    init: str = "cold"
    dirichlet_concentration: float = 1.0
    dirichlet_seed: int = 0
    residual_top_k: int | None = None
    block_size: int | None = None

    @classmethod
    def from_mapping(cls, mapping: Any,
                     source: str = "--dllm-algorithm-config") -> RCDServingConfig:
        """Checked config from a YAML mapping; ValueError (one line, naming the key) otherwise."""
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, dict):
            raise ValueError(f"{source}: the RCD config must be a YAML mapping, got "
                             f"{type(mapping).__name__}")
        known = [f.name for f in fields(cls)]
        for key in mapping:
            if key not in known:
                raise ValueError(f"{source}: unknown key {key!r} (RCD keys: {', '.join(known)})")
        config = cls(**mapping)
        config.check(source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path | None) -> RCDServingConfig:
        """Checked config from a YAML file (None: the defaults)."""
        if path is None:
            return cls()
        import yaml

        text = Path(path).read_text()
        return cls.from_mapping(yaml.safe_load(text), source=str(path))

    def check(self, source: str) -> None:
        def fail(key: str, expected: str) -> None:
            raise ValueError(f"{source}: {key} must be {expected}, got {getattr(self, key)!r}")

        if not _is_real(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            fail("threshold", "a number in [0, 1]")
        try:  # the rule of the op (1 / t_res must be a finite float32), with its message
            check_t_res(self.t_res)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None
        if not isinstance(self.temper_delta, bool):
            fail("temper_delta", "true or false")
        strategies = tuple(fields_by_name(ResidualConfig)["strategy"].metadata["choices"])
        if self.strategy not in strategies:
            fail("strategy", f"one of {', '.join(strategies)}")
        if not _is_real(self.alpha_scale) or not 0.0 <= self.alpha_scale <= 1.0:
            fail("alpha_scale", "a number in [0, 1]")
        if self.init not in SERVING_INITS:
            fail("init", f"one of {', '.join(SERVING_INITS)} (a reference model is not served)")
        if not _is_real(self.dirichlet_concentration) or not self.dirichlet_concentration > 0:
            fail("dirichlet_concentration", "a number > 0")
        if not _is_int(self.dirichlet_seed):
            fail("dirichlet_seed", "an integer")
        if self.residual_top_k is not None and not (_is_int(self.residual_top_k)
                                                    and self.residual_top_k >= 1):
            fail("residual_top_k", "an integer >= 1 or null")
        if self.block_size is not None and not (_is_int(self.block_size) and self.block_size >= 1):
            fail("block_size", "an integer >= 1")
        try:  # the residual options' own rules, in one place
            self.residual()
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None

    def residual(self) -> ResidualConfig:
        """The residual options of this config as `rcd_ext.options.ResidualConfig`."""
        return ResidualConfig(**{name: getattr(self, name) for name in fields_by_name(
            ResidualConfig) if name in fields_by_name(type(self))})


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
