"""Model configuration: OLMo2 architecture plus the RAT+ memory switches, and named presets.

`ModelConfig` is what users and recipes write; `to_transformer_config` turns it into the
megatron-core `TransformerConfig` (our subclass with the memory fields) that the layer spec reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

GateInit = Literal["ratplus", "identity"]
FP8Format = Literal["hybrid", "e4m3"]
FP8Recipe = Literal["delayed", "tensorwise", "blockwise"]

# Gate bias of the `identity` initialisation: W_g = 0 and b = -6 give g = sigmoid(-6) = 0.0025, so
# k~_t = 0.9975 k_t + 0.0025 k~_{t-1}: the converted model starts within a measured tolerance of
# plain OLMo2 (tests/test_model.py) and the gate learns from there.
IDENTITY_GATE_BIAS = -6.0


class ConfigError(ValueError):
    """A model or parallel configuration that cannot work; the message names the field."""


@dataclass
class MemoryConfig:
    """The RAT+ exponentially decaying memory on keys and values (off = plain OLMo2)."""

    enabled: bool = False
    gate_init: GateInit = "ratplus"  # ratplus: W_g ~ N(0, gate_init_std), no bias (g ~ 0.5 at start)
    gate_init_std: float = 0.02
    gate_bias: bool | None = None  # None: a bias only for `identity` (which needs one)
    identity_bias: float = IDENTITY_GATE_BIAS
    output_gate: bool = False  # RAT+'s attn_out * sigmoid(W_o x); OLMo2 has none

    @property
    def has_gate_bias(self) -> bool:
        return self.gate_init == "identity" if self.gate_bias is None else self.gate_bias


@dataclass
class ModelConfig:
    """OLMo2 architecture (numbers as in the HF config.json of the released models)."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    ffn_hidden_size: int = 11008
    vocab_size: int = 100352
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self, tp: int = 1, pp: int = 1) -> "ModelConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.num_attention_heads % self.num_kv_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        need(tp >= 1 and pp >= 1, f"tensor/pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
        need(self.num_attention_heads % tp == 0,
             f"tensor parallel size {tp} does not divide num_attention_heads={self.num_attention_heads}")
        need(self.num_kv_heads % tp == 0,
             f"tensor parallel size {tp} does not divide num_kv_heads={self.num_kv_heads} "
             "(the full-width k-norm and the memory gate shard by kv heads)")
        need(self.ffn_hidden_size % tp == 0,
             f"tensor parallel size {tp} does not divide ffn_hidden_size={self.ffn_hidden_size}")
        need(self.vocab_size % tp == 0,
             f"tensor parallel size {tp} does not divide vocab_size={self.vocab_size}")
        need(self.num_layers % pp == 0,
             f"pipeline parallel size {pp} does not divide num_layers={self.num_layers}")
        need(self.memory.gate_init in ("ratplus", "identity"),
             f"memory.gate_init must be 'ratplus' or 'identity', got {self.memory.gate_init!r}")
        need(not (self.memory.gate_init == "identity" and not self.memory.has_gate_bias),
             "memory.gate_init='identity' needs memory.gate_bias (the bias holds the near-identity start)")
        return self

    def num_parameters(self) -> int:
        h, q, kv, f, v = (self.hidden_size, self.num_attention_heads * self.head_dim,
                          self.num_kv_heads * self.head_dim, self.ffn_hidden_size, self.vocab_size)
        attn = h * (q + 2 * kv) + q * h + q + kv + h
        if self.memory.enabled:
            attn += h * kv + (kv if self.memory.has_gate_bias else 0)
            attn += h * q if self.memory.output_gate else 0
        mlp = 3 * h * f + h
        return self.num_layers * (attn + mlp) + 2 * v * h + h


def _olmo2_7b() -> ModelConfig:
    return ModelConfig()


def _olmo2_1b() -> ModelConfig:
    # allenai/OLMo-2-0425-1B: 16 layers, d 2048, 16 heads x 128, SwiGLU 8192.
    return ModelConfig(num_layers=16, hidden_size=2048, num_attention_heads=16, num_kv_heads=16,
                       head_dim=128, ffn_hidden_size=8192)


def _tiny() -> ModelConfig:
    # CPU tests and the quickstart: a few layers, small vocab (the shipped tiny tokenizer's).
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=4,
                       head_dim=16, ffn_hidden_size=128, vocab_size=2048, max_position_embeddings=512,
                       rope_theta=10000.0)


PRESETS = {"olmo2-7b": _olmo2_7b, "olmo2-1b": _olmo2_1b, "tiny": _tiny}


def preset(name: str, **overrides) -> ModelConfig:
    """A named architecture; `overrides` replace fields (``memory=MemoryConfig(...)`` or a dict)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    mem = overrides.pop("memory", None)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)} for preset {name!r}")
    cfg = dataclasses.replace(cfg, **overrides)
    if mem is not None:
        cfg.memory = mem if isinstance(mem, MemoryConfig) else MemoryConfig(**mem)
    return cfg


@dataclass
class PrecisionConfig:
    """Numerics of training: bf16 params/compute, optional FP8 GEMMs through Transformer Engine."""

    bf16: bool = True
    fp8: FP8Format | None = None
    fp8_recipe: FP8Recipe = "delayed"
    # megatron's fused SwiGLU and (with TE) fused RoPE; None = on when CUDA is there. Off on CPU,
    # where the unfused ops are the ones checked against transformers.
    fusions: bool | None = None

    def validate(self) -> "PrecisionConfig":
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"fp8 must be 'hybrid', 'e4m3' or None, got {self.fp8!r}")
        if self.fp8_recipe not in ("delayed", "tensorwise", "blockwise"):
            raise ConfigError(f"fp8_recipe must be delayed, tensorwise or blockwise, got {self.fp8_recipe!r}")
        if self.fp8 is not None:
            from .model.te import HAVE_TE

            if not HAVE_TE:
                # megatron-core silently ignores fp8 without TE: never train "FP8" in bf16 unknowingly.
                raise ConfigError(f"fp8={self.fp8!r} needs Transformer Engine, which is not installed "
                                  "(pip install 'ratplus-megatron[te]'; see README 'Transformer Engine')")
        return self
