"""Model FLOPs per trained token (forward + backward), for the TFLOP/s-per-GPU estimate.

Counted: every GEMM (q/k/v, out-proj, SwiGLU MLP, LM head, and the memory's gate projection and
optional output gate, both computed as extra rows of the fused qkv GEMM) at 6 FLOPs per weight per token (2 forward, 4 backward); causal attention
scores and values (on average s/2 keys per query, fwd + bwd = 3x forward); the memory scan's
elementwise work (sigmoid, the two k/v recurrences; small, counted for honesty). Not counted:
norms, RoPE, softmax, the loss. A dilated-mask pass is counted as dense (SDPA computes the full
masked product).
"""
from __future__ import annotations

from ..config import ModelConfig

SCAN_FLOPS_PER_CHANNEL = 12  # forward: sigmoid (~4), 1-g, two multiply-adds for k and v (~8 with 1-g)


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    h, L, v = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    gemm_weights = h * (q + 2 * kv) + q * h + 3 * h * cfg.ffn_hidden_size
    scan = 0.0
    if cfg.memory.enabled:
        gemm_weights += h * kv  # the gate projection W_g
        if cfg.memory.output_gate:
            gemm_weights += h * q
        scan = 3 * SCAN_FLOPS_PER_CHANNEL * kv  # forward + backward (~2x forward)
    per_layer = 6 * gemm_weights + 3 * (2 * 2 * q * seq_length / 2) + scan
    return L * per_layer + 6 * h * v
