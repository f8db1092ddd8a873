"""OLMo2 layer and block specs for megatron-core, with or without the RAT+ memory.

Reads like megatron's own gpt_layer_specs: one TransformerLayer spec, TE modules when Transformer
Engine is importable (TE linears, so FP8 covers qkv, the memory gate fused into it, and the MLP;
TEDotProductAttention), local modules otherwise (torch SDPA core attention). OLMo2 specifics: no pre-norms
(input/pre-MLP layernorm are identities), post-sublayer RMSNorm on the row-parallel outputs,
full-width QK RMSNorm, SwiGLU.
"""
from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import RATPlusSelfAttention, SDPACoreAttention
from .norms import FullWidthQKNorm, OLMo2RMSNorm, PostNormRowParallelLinear, PostNormTERowParallelLinear
from .te import HAVE_TE


def _modules(use_te: bool):
    """(column-parallel linear, post-normed row-parallel linear, core attention, norm) per backend."""
    if use_te:
        if not HAVE_TE:
            raise ImportError("use_te=True but Transformer Engine is not installed "
                              "(pip install 'ratplus-megatron[te]')")
        from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear,
                                                                 TEDotProductAttention, TENorm)

        return TEColumnParallelLinear, PostNormTERowParallelLinear, TEDotProductAttention, TENorm
    return ColumnParallelLinear, PostNormRowParallelLinear, SDPACoreAttention, OLMo2RMSNorm


def get_olmo2_layer_spec(memory: bool = False, use_te: bool | None = None) -> ModuleSpec:
    """One OLMo2 decoder layer; ``memory`` swaps in the RAT+ memory attention.

    The memory has no submodule of its own: RATPlusSelfAttention builds ``linear_qkv`` with the
    gate rows in it, so the same (TE, FP8-capable) column-parallel linear computes them.
    """
    use_te = HAVE_TE if use_te is None else use_te
    column_linear, row_linear, core_attention, _ = _modules(use_te)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=RATPlusSelfAttention if memory else SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=ModuleSpec(module=FullWidthQKNorm, params={"target": "q"}),
                    k_layernorm=ModuleSpec(module=FullWidthQKNorm, params={"target": "k"}),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=partial(MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_olmo2_block_spec(config, use_te: bool | None = None, vp_stage: int | None = None,
                         pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage: its layers plus OLMo2's final RMSNorm."""
    use_te = HAVE_TE if use_te is None else use_te
    layer = get_olmo2_layer_spec(memory=config.memory, use_te=use_te)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=_modules(use_te)[3])
