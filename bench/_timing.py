"""GPU timing shared by the kernel benchmarks: median of per-call CUDA-event times, each call
preceded by an L2 flush, optionally replayed from a CUDA graph (no launch gaps from Python).

The flush decides what the L2 holds when the timed call starts (50 MB on the H200, which
matters for calls that move ~100-300 MB):
* "write": zero a 256 MB buffer (triton.testing.do_bench's way). L2 is left full of DIRTY lines,
  which the timed call must write back to HBM as it evicts them: up to ~50 MB of extra traffic.
* "read": sum a 256 MB buffer. L2 is left full of clean lines that are dropped for free: the state
  after a kernel that streamed weights or a KV cache, the common case in a decode step.
* "none": back-to-back calls (L2 warm with the previous call's data).
"""
from __future__ import annotations

import statistics

import torch

FLUSHES = ("write", "read", "none")
_BUF: dict = {}


def _flush_fn(flush: str, device):
    if flush == "none":
        return lambda: None
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
    if device not in _BUF:
        _BUF[device] = torch.empty(64 * 2**20, dtype=torch.float32, device=device)  # 256 MB
    buf = _BUF[device]
    return buf.zero_ if flush == "write" else (lambda: buf.sum())


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn() captured as a CUDA graph, after one eager call and one on a side stream (compiles,
    allocator warm-up)."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def time_ms(fn, *, graph: bool = False, flush: str = "write", warmup: int = 10, rep: int = 50,
            grad_to_none=None) -> float:
    """Median milliseconds of fn() on the current CUDA device (grad_to_none: tensors whose .grad
    is reset before each call, so that backward never accumulates)."""
    call = capture_graph(fn).replay if graph else fn
    flush_l2 = _flush_fn(flush, torch.device("cuda", torch.cuda.current_device()))

    def clear():
        for x in grad_to_none or ():
            x.grad = None
        flush_l2()

    for _ in range(warmup):
        clear()
        call()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for st, en in zip(starts, ends):
        clear()
        st.record()
        call()
        en.record()
    torch.cuda.synchronize()
    return statistics.median(st.elapsed_time(en) for st, en in zip(starts, ends))
