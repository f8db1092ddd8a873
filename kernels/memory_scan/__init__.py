"""The decaying-memory scan: public op plus torch twins (see naive.py for the equations).

``backend``: "auto" (default) takes the fused Triton kernels (fused.py) for CUDA tensors and
the torch twins otherwise; "triton" forces the kernels (on CPU only under TRITON_INTERPRET=1,
for tests); "torch" forces the twins.
"""
from __future__ import annotations

from .._dispatch import use_triton as _use_triton
from .naive import memory_scan_loop, memory_scan_step_torch, memory_scan_torch

__all__ = ["memory_scan", "memory_scan_step", "memory_scan_loop", "memory_scan_torch",
           "memory_scan_step_torch"]


def memory_scan(g_logits, k, v, initial_state=None, cu_seqlens=None, output_final_state=False,
                backend: str = "auto"):
    """k~, v~ (and the final state when asked) for [batch, seq, heads, dim] inputs.

    Uses the fused Triton kernel on CUDA when available, the torch scan otherwise.
    """
    if _use_triton(backend, g_logits, k, v):
        from .fused import memory_scan_fused
        return memory_scan_fused(g_logits, k, v, initial_state=initial_state,
                                 cu_seqlens=cu_seqlens, output_final_state=output_final_state)
    return memory_scan_torch(g_logits, k, v, initial_state=initial_state, cu_seqlens=cu_seqlens,
                             output_final_state=output_final_state)


def memory_scan_step(g_logits, k, v, state, backend: str = "auto"):
    """Advance the state by one token: inputs [batch, heads, dim]; returns (k~_t, v~_t, new_state).

    The Triton step has no backward: when any input needs a gradient the torch twin runs.
    """
    needs_grad = any(t.requires_grad for t in (g_logits, k, v, *state))
    if _use_triton(backend, g_logits, k, v, *state) and not (needs_grad and backend == "auto"):
        from .fused import memory_scan_step_fused
        return memory_scan_step_fused(g_logits, k, v, state)
    return memory_scan_step_torch(g_logits, k, v, state)
