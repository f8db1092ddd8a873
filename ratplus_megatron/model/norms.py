"""OLMo2's norms on megatron-core: RMSNorm in fp32, full-width QK norm under TP, post-sublayer norms.

OLMo2 normalises each sublayer's *output* (``h = h + RMSNorm(attn(h))``), which megatron's
TransformerLayer has no slot for, so the norm rides on the row-parallel output projections
(attention ``linear_proj`` and MLP ``linear_fc2``), after their all-reduce.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                             make_sharded_tensors_for_checkpoint)

from .te import HAVE_TE


class OLMo2RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32, weight applied in fp32, cast back (as transformers' Olmo2RMSNorm)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class _AllReduceBothWays(torch.autograd.Function):
    """Sum over the TP group in forward *and* backward.

    The summed statistic feeds every rank's own head shard, so its gradient is the sum of the
    ranks' partial gradients; megatron's reduce_from_tensor_model_parallel_region would drop them.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthQKNorm(MegatronModule):
    """OLMo2's QK norm: one RMSNorm over all heads of q (or k), not megatron's per-head norm.

    Built where megatron builds ``q_layernorm``/``k_layernorm`` (called with ``hidden_size`` =
    head_dim) and applied to the [s, b, local_heads, head_dim] shard: the sum of squares is
    all-reduced over the TP group.

    The weight ([heads * head_dim], HF's shape) is replicated on every TP rank and each rank uses
    its heads' slice. megatron treats q/k-layernorm weights as replicated and sums their gradients
    over TP (finalize_model_grads); a rank's gradient is non-zero only in its own slice, so that sum
    is the true gradient. (A head-sharded weight would have its shards' gradients added together.)
    It is 1-D so that optimizers skip weight decay on it as on every other norm gain: megatron's
    rule (and ours on CPU) is "no decay for 1-D parameters"; a 2-D gain was decayed towards 0,
    capping how sharp attention can get.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6,
                 target: str = "q", **_unused):
        super().__init__(config=config)
        if target not in ("q", "k"):
            raise ValueError(f"FullWidthQKNorm target must be 'q' or 'k', got {target!r}")
        heads = config.num_attention_heads if target == "q" else config.num_query_groups
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if heads % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the {heads} {target} heads")
        self.full_width = heads * hidden_size
        self.eps = eps
        self.local_heads = heads // tp
        self.first_head = parallel_state.get_tensor_model_parallel_rank() * self.local_heads
        self.head_dim = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(heads * hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sumsq = xf.square().sum(dim=(-2, -1), keepdim=True)
        if torch.distributed.is_initialized() and self.tp_group.size() > 1:
            sumsq = _AllReduceBothWays.apply(sumsq, self.tp_group)
        xf = xf * torch.rsqrt(sumsq / self.full_width + self.eps)
        weight = self.weight.narrow(0, self.first_head * self.head_dim,
                                    self.local_heads * self.head_dim).view(self.local_heads, self.head_dim)
        return (weight * xf).to(x.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets,  # replicated over TP
                                                   tp_group=self.tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


class PostNormMixin:
    """Adds ``post_norm`` on the (all-reduced) output of a row-parallel linear."""

    post_norm_builder = OLMo2RMSNorm

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_norm = type(self).post_norm_builder(
            config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        if bias is not None:  # the norm must see the biased output; nothing is left to add later
            out, bias = out + bias, None
        return self.post_norm(out), bias


class PostNormRowParallelLinear(PostNormMixin, RowParallelLinear):
    """megatron's RowParallelLinear followed by OLMo2's post-sublayer RMSNorm."""


if HAVE_TE:
    from megatron.core.extensions.transformer_engine import TENorm, TERowParallelLinear

    class PostNormTERowParallelLinear(PostNormMixin, TERowParallelLinear):
        """TE's row-parallel linear (FP8-capable) followed by TE's fused RMSNorm."""

        post_norm_builder = TENorm
else:
    PostNormTERowParallelLinear = None
