"""Build an OLMo2 (optionally RAT+ memory) GPTModel from a ModelConfig."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ModelConfig, PrecisionConfig
from .layer_spec import get_olmo2_block_spec
from .te import HAVE_TE


@dataclass
class OLMo2TransformerConfig(TransformerConfig):
    """megatron's TransformerConfig plus the memory fields the RAT+ attention reads."""

    memory: bool = False
    memory_gate_init: str = "ratplus"
    memory_gate_init_std: float = 0.02
    memory_gate_bias: bool = False
    memory_identity_bias: float = -6.0


def to_transformer_config(cfg: ModelConfig, precision: PrecisionConfig | None = None, *,
                          tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                          use_cpu_initialization: bool | None = None, **overrides) -> OLMo2TransformerConfig:
    """The megatron config for ``cfg``; ``overrides`` pass straight to TransformerConfig."""
    cfg.validate(tp=tp, pp=pp)
    precision = (precision or PrecisionConfig(bf16=False)).validate()
    mem = cfg.memory
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    fuse = torch.cuda.is_available() if precision.fusions is None else precision.fusions
    fp8 = {}
    if precision.fp8 is not None:
        fp8 = dict(fp8=precision.fp8, fp8_recipe=precision.fp8_recipe)
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        bias_activation_fusion=fuse,  # SwiGLU in one kernel (megatron's bias_swiglu, no bias here)
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=fuse and HAVE_TE,  # megatron's fused RoPE is TE's kernel
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        bf16=precision.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        attention_output_gate=mem.enabled and mem.output_gate,
        memory=mem.enabled,
        memory_gate_init=mem.gate_init,
        memory_gate_init_std=mem.gate_init_std,
        memory_gate_bias=mem.enabled and mem.has_gate_bias,
        memory_identity_bias=mem.identity_bias,
        **fp8,
    )
    kwargs.update(overrides)
    return OLMo2TransformerConfig(**kwargs)


def build_model(cfg: ModelConfig, tconfig: OLMo2TransformerConfig | None = None, *,
                pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                use_te: bool | None = None, pg_collection=None) -> GPTModel:
    """An OLMo2 GPTModel for this rank's TP/PP shard (megatron's parallel state must be set up)."""
    tconfig = tconfig or to_transformer_config(cfg)
    use_te = HAVE_TE if use_te is None else use_te
    spec = get_olmo2_block_spec(tconfig, use_te=use_te, vp_stage=vp_stage)
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.rope_theta,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
