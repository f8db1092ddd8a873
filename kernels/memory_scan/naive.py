"""Torch twins of the decaying-memory scan.

    g_t  = sigmoid(g_logits_t)                      (fp32)
    k~_t = g_t * k~_{t-1} + (1 - g_t) * k_t         (same gate for v)

Tensors are [batch, seq, heads, dim]; any strides. ``cu_seqlens`` (int, [N + 1]) packs N
sequences along ``seq`` with batch 1: the state restarts at every sequence start.
``initial_state`` / final state: a pair ``(k_state, v_state)``, each [N, heads, dim] in fp32
(N = batch, or the number of packed sequences).
"""
from __future__ import annotations

import torch

State = tuple[torch.Tensor, torch.Tensor]


def _sequence_starts(cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of every independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, seq) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got batch {batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seq or any(e < s for s, e in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to seq={seq}, got {bounds}")
    return [(0, s, e) for s, e in zip(bounds, bounds[1:])]


def memory_scan_loop(g_logits, k, v, initial_state: State | None = None, cu_seqlens=None,
                     output_final_state: bool = False, dtype=torch.float64):
    """Sequential reference in float64 (or ``dtype``): the equations, one step at a time."""
    B, T, H, D = k.shape
    seqs = _sequence_starts(cu_seqlens, B, T)
    g = torch.sigmoid(g_logits.to(dtype))
    xs = (k.to(dtype), v.to(dtype))
    outs = [torch.empty_like(x) for x in xs]
    finals = [k.new_zeros((len(seqs), H, D), dtype=dtype) for _ in xs]
    for n, (b, s, e) in enumerate(seqs):
        for x, out, final, i in zip(xs, outs, finals, range(2)):
            h = k.new_zeros((H, D), dtype=dtype) if initial_state is None else initial_state[i][n].to(dtype)
            for t in range(s, e):
                h = g[b, t] * h + (1 - g[b, t]) * x[b, t]
                out[b, t] = h
            final[n] = h
    return (outs[0], outs[1], tuple(finals)) if output_final_state else (outs[0], outs[1])


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1 with h_{-1} = 0, by log2(T) doubling steps.

    Out-of-place, so autograd differentiates it. Gates lie in [0, 1]: products never overflow.
    """
    T = a.shape[1]
    step = 1
    while step < T:
        b = torch.cat([b[:, :step], b[:, step:] + a[:, step:] * b[:, :-step]], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    return b


def memory_scan_torch(g_logits, k, v, initial_state: State | None = None, cu_seqlens=None,
                      output_final_state: bool = False):
    """Vectorised, differentiable torch scan (the associative-scan formulation RAT+ uses), fp32 inside.

    Sequence starts get a_t = 0 and b_t = g_t * h0 + (1 - g_t) * x_t, which restarts the state
    (from ``initial_state`` when given) without a Python loop over sequences.
    """
    B, T, H, D = k.shape
    if g_logits.shape != k.shape or v.shape != k.shape:
        raise ValueError(f"g_logits, k and v must share one shape, got {tuple(g_logits.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    g = torch.sigmoid(g_logits.float())
    starts = torch.zeros(B, T, 1, 1, dtype=torch.bool, device=k.device)
    seq_id = torch.zeros(B, T, dtype=torch.long, device=k.device)
    if cu_seqlens is None:
        starts[:, 0] = True
        seq_id[:] = torch.arange(B, device=k.device)[:, None]
        seqs = [(b, 0, T) for b in range(B)]
    else:
        seqs = _sequence_starts(cu_seqlens, B, T)
        for n, (_, s, e) in enumerate(seqs):
            if e > s:
                starts[0, s] = True
                seq_id[0, s:e] = n
    a = torch.where(starts, torch.zeros_like(g), g)
    outs, finals = [], []
    for i, x in enumerate((k, v)):
        bx = (1 - g) * x.float()
        if initial_state is not None:
            h0 = initial_state[i].float()[seq_id]  # [B, T, H, D]: each position's sequence state
            bx = bx + torch.where(starts, g * h0, torch.zeros_like(bx))
        h = _linear_scan(a, bx)
        outs.append(h.to(x.dtype))
        if output_final_state:
            # an empty packed sequence hands its initial state through unchanged
            fin = [h[b, e - 1] if e > s else
                   (initial_state[i][n].float() if initial_state is not None else h.new_zeros(H, D))
                   for n, (b, s, e) in enumerate(seqs)]
            finals.append(torch.stack(fin))
    return (outs[0], outs[1], tuple(finals)) if output_final_state else (outs[0], outs[1])


def memory_scan_step_torch(g_logits, k, v, state: State):
    """One decoding step: inputs [batch, heads, dim]; returns (k~_t, v~_t, new_state)."""
    g = torch.sigmoid(g_logits.float())
    new = tuple(g * s.float() + (1 - g) * x.float() for s, x in zip(state, (k, v)))
    return new[0].to(k.dtype), new[1].to(v.dtype), new
