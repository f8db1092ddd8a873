"""Attention modules: torch SDPA core attention, and the RAT+ memory attention.

The memory is a property of the attention module: `RATPlusSelfAttention` is megatron's
`SelfAttention` with the gate projection's rows fused into `linear_qkv` and the scan on k (after
the k-norm) and v, before RoPE; everything else (projections, norms, RoPE, core attention) is
megatron's.
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from kernels import memory_scan

from ..qkv_layout import GATE, copy_common_parts, qkv_parts, rows_per_group, split_groups


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


def _gate_init(config):
    """The RAT+ initialisation of the gate rows: N(0, memory_gate_init_std), or zeros for `identity`."""
    if config.memory_gate_init == "identity":
        return torch.nn.init.zeros_
    return partial(torch.nn.init.normal_, mean=0.0, std=config.memory_gate_init_std)


def _init_fused_qkv(weight, qkv_init, gate_init, parts):
    """Initialise a fused [q, (og), k, v, g]-per-group weight: q/k/v(/og) rows exactly as megatron
    initialises an unfused linear_qkv (through a [rows, hidden] tensor, so init methods that read the
    shape see the one they expect), the gate rows with the RAT+ init.

    megatron calls this on the full weight (CPU initialisation, then split over TP) or on this
    rank's shard (GPU); both are whole query groups.
    """
    plain_parts = tuple(p for p in parts if p[0] != GATE)
    groups = weight.shape[0] // rows_per_group(parts)
    plain = torch.empty(groups * rows_per_group(plain_parts), *weight.shape[1:], dtype=weight.dtype,
                        device=weight.device)
    qkv_init(plain)
    copy_common_parts(weight, parts, plain, plain_parts)
    with torch.no_grad():
        gate_init(split_groups(weight, parts)[GATE])
    return weight


def _with_gate_rows(linear_qkv, parts, gate_init):
    """Builder of linear_qkv with the memory's gate rows appended to every query group.

    SelfAttention asks for [q, (og), k, v] per group; this builds [q, (og), k, v, g], so the gate
    logits come out of the same GEMM (and, under sequence parallelism, the same all-gather of the
    input) as q/k/v. TP shards stay whole groups, so each rank's gate rows match its k/v heads.
    """
    base = rows_per_group(parts) - dict(parts)[GATE]

    def build(input_size, output_size, *, init_method, **kwargs):
        if output_size % base:
            raise ValueError(f"linear_qkv output size {output_size} is not whole query groups of {base} rows")
        fused_size = output_size // base * rows_per_group(parts)
        return linear_qkv(input_size, fused_size,
                          init_method=partial(_init_fused_qkv, qkv_init=init_method, gate_init=gate_init,
                                              parts=parts), **kwargs)

    return build


class RATPlusSelfAttention(SelfAttention):
    """Self-attention over the decaying memory of keys and values (RAT+).

    g = sigmoid(W_g h) per k/v channel; k~_t = g_t k~_{t-1} + (1 - g_t) k_t (same gate for v);
    RoPE then acts on q and k~. W_g's rows live inside linear_qkv, per query group
    [q, (output gate), k, v, g] (see ratplus_megatron.qkv_layout): one GEMM and, under sequence
    parallelism, one all-gather serve q/k/v and the gate, and each TP rank's gate rows line up
    with its k/v heads. The optional gate bias (linear_qkv has none in OLMo2) is its own 1-D
    parameter ``memory_gate_bias``, sharded over TP like the gate rows. Needs config.memory_*
    fields (see OLMo2TransformerConfig).
    """

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules,
                 layer_number: int, attn_mask_type=AttnMaskType.padding, cp_comm_type=None,
                 pg_collection=None, pp_layer_offset=None, name=None):
        if config.context_parallel_size > 1:
            raise ValueError("the memory scan does not support context parallelism "
                             "(it would need a cross-rank carry); use context_parallel_size=1")
        if getattr(config, "qk_clip", False):
            raise ValueError("qk_clip rescales megatron's [q, k, v] rows; the memory's fused layout is not supported")
        parts = qkv_parts(config.num_attention_heads, config.num_query_groups, config.kv_channels,
                          output_gate=config.attention_output_gate, memory=True)
        fused = dataclasses.replace(submodules, linear_qkv=_with_gate_rows(submodules.linear_qkv, parts,
                                                                             _gate_init(config)))
        super().__init__(config=config, submodules=fused, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection, pp_layer_offset=pp_layer_offset, name=name)
        if config.num_query_groups < self.world_size:
            raise ValueError(f"the memory gate shards by kv heads: tensor parallel size {self.world_size} "
                             f"exceeds num_query_groups={config.num_query_groups}")
        self.qkv_parts = parts
        self.linear_qkv_out_dim += self.kv_projection_size
        bias = None
        if config.memory_gate_bias:
            value = config.memory_identity_bias if config.memory_gate_init == "identity" else 0.0
            bias = torch.nn.Parameter(torch.full((self.kv_projection_size // self.world_size,), value,
                                                 dtype=config.params_dtype, device=self.linear_qkv.weight.device))
            # Sharded like the gate rows: megatron then counts it on every rank in the grad norm and
            # never sums its gradient over TP (each rank's slice gets its own, complete gradient).
            set_tensor_model_parallel_attributes(bias, is_parallel=True, dim=0, stride=1)
        self.memory_gate_bias = bias  # 1-D: the optimizers skip weight decay on it
        self._cu_seqlens = None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.memory_gate_bias is not None:  # the default would store it replicated over TP
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            state.update(make_sharded_tensors_for_checkpoint(
                {"memory_gate_bias": self.memory_gate_bias}, prefix, {"memory_gate_bias": 0}, sharded_offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]))
        return state

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
        if not split_qkv:
            raise NotImplementedError("the memory needs split q/k/v (disable fused_single_qkv_rope)")
        mixed, _ = self.linear_qkv(hidden_states)  # [s, b, local groups * rows per group]
        parts = split_groups(mixed, self.qkv_parts, dim=-1)  # views, each [s, b, local groups, rows]
        hn = self.hidden_size_per_attention_head
        query = parts["q"].reshape(*mixed.shape[:2], -1, hn)  # [s, b, local heads, hn]
        key, value, gate_logits = parts["k"], parts["v"], parts[GATE]
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        if self.memory_gate_bias is not None:
            gate_logits = gate_logits + self.memory_gate_bias.view(-1, hn)
        # The scan takes any strides: the gate logits and v go in as views of the fused output, and
        # megatron's [s, b, h, d] as a [b, s, h, d] view.
        k_mem, v_mem = memory_scan(gate_logits.transpose(0, 1), key.transpose(0, 1),
                                   value.transpose(0, 1), cu_seqlens=self._cu_seqlens)
        out = (query, k_mem.transpose(0, 1), v_mem.transpose(0, 1))
        if output_gate:  # megatron's attention_output_gate: [s, b, local heads, hn]
            out += (parts["og"].reshape(*mixed.shape[:2], -1, hn),)
        return out
