"""Attention modules: torch SDPA core attention, and the RAT+ memory attention.

The memory is a property of the attention module: `RATPlusSelfAttention` is megatron's
`SelfAttention` plus a column-parallel gate projection and the scan on k (after the k-norm)
and v, before RoPE; everything else (projections, norms, RoPE, core attention) is megatron's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from kernels import memory_scan


_EXPLICIT_MASK = False


@contextlib.contextmanager
def explicit_attention_mask():
    """Inside this block SDPACoreAttention applies the attention_mask given to the model even in
    causal layers (the mask must then hold causality itself): the trainer's RAT+ dilated pass."""
    global _EXPLICIT_MASK
    previous, _EXPLICIT_MASK = _EXPLICIT_MASK, True
    try:
        yield
    finally:
        _EXPLICIT_MASK = previous


class SDPACoreAttention(MegatronModule):
    """Core attention through torch's scaled_dot_product_attention (flash/efficient backends on GPU).

    megatron's local DotProductAttention materialises the [b, h, s, s] scores; this does not.
    Takes and returns megatron's layout: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn].
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use the TE spec")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences (THD) need the TE spec (TEDotProductAttention)")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        causal = mask_type == AttnMaskType.causal and not (_EXPLICIT_MASK and attention_mask is not None)
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=q.shape[1] != k.shape[1])
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


@dataclass
class RATPlusSelfAttentionSubmodules(SelfAttentionSubmodules):
    """SelfAttention's submodules plus the memory's forget-gate projection."""

    linear_gate: object = None


class RATPlusSelfAttention(SelfAttention):
    """Self-attention over the decaying memory of keys and values (RAT+).

    g = sigmoid(W_g h) per k/v channel; k~_t = g_t k~_{t-1} + (1 - g_t) k_t (same gate for v);
    RoPE then acts on q and k~. The gate projection is column-parallel with output size
    kv_heads * head_dim, so each TP rank's gate shard lines up with its k/v heads: no TP
    communication. Needs config.memory_* fields (see OLMo2TransformerConfig).
    """

    def __init__(self, config: TransformerConfig, submodules: RATPlusSelfAttentionSubmodules,
                 layer_number: int, attn_mask_type=AttnMaskType.padding, cp_comm_type=None,
                 pg_collection=None, pp_layer_offset=None, name=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection, pp_layer_offset=pp_layer_offset, name=name)
        if config.context_parallel_size > 1:
            raise ValueError("the memory scan does not support context parallelism "
                             "(it would need a cross-rank carry); use context_parallel_size=1")
        if config.num_query_groups < self.world_size:
            raise ValueError(f"the memory gate shards by kv heads: tensor parallel size {self.world_size} "
                             f"exceeds num_query_groups={config.num_query_groups}")
        if submodules.linear_gate is None:
            raise ValueError("RATPlusSelfAttention needs submodules.linear_gate")
        identity = config.memory_gate_init == "identity"
        std = config.memory_gate_init_std
        self.linear_gate = submodules.linear_gate(
            config.hidden_size, self.kv_projection_size, config=config,
            init_method=(torch.nn.init.zeros_ if identity
                         else (lambda w: torch.nn.init.normal_(w, mean=0.0, std=std))),
            gather_output=False, bias=config.memory_gate_bias, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="gate", tp_group=self.pg_collection.tp,
        )
        if config.memory_gate_bias:
            with torch.no_grad():
                self.linear_gate.bias.fill_(config.memory_identity_bias if identity else 0.0)
        self._cu_seqlens = None

    def forward(self, hidden_states, attention_mask, *args, inference_context=None,
                packed_seq_params=None, **kwargs):
        if inference_context is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError("megatron inference with the memory is not supported; "
                                      "export to HF (python -m ratplus_megatron.convert mcore-to-hf) and use it there")
        # The scan restarts at document starts of packed (THD) sequences.
        self._cu_seqlens = None if packed_seq_params is None else packed_seq_params.cu_seqlens_kv
        try:
            return super().forward(hidden_states, attention_mask, *args,
                                   packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._cu_seqlens = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        qkv = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                  output_gate=output_gate, split_qkv=split_qkv)
        if not split_qkv:
            raise NotImplementedError("the memory needs split q/k/v (disable fused_single_qkv_rope)")
        query, key, value = qkv[0], qkv[1], qkv[2]
        gate_logits, _ = self.linear_gate(hidden_states)  # [s, b, local_kv_heads * hn]
        gate_logits = gate_logits.view(key.shape)
        # megatron's [s, b, h, d] enters the scan as a [b, s, h, d] view: no copy.
        k_mem, v_mem = memory_scan(gate_logits.transpose(0, 1), key.transpose(0, 1),
                                   value.transpose(0, 1), cu_seqlens=self._cu_seqlens)
        return (query, k_mem.transpose(0, 1), v_mem.transpose(0, 1), *qkv[3:])
