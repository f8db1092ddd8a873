"""Fused Triton kernels for the decaying-memory scan (equations in naive.py).

The kernels fuse the whole op: sigmoid of the gate logits in fp32, the (1 - g) scaling, the
recurrence for k and v with an fp32 state, outputs in the input dtype, resets at packed-sequence
starts (``cu_seqlens``), initial and final state.

Forward ("chunk", the default since the H200 sweep of 2026-11-30, bench/results/scan_sweep.json):
a program's lanes are BH heads x BD channels of one batch row, flattened (L = BH * BD lanes,
each head's BD channels contiguous in memory). A tile is [BT, L]: with L >= 8 * 32 * num_warps
(bf16) the compiler spreads the threads over the lanes only, so the BT rows of a lane sit in
one thread and ``tl.associative_scan`` over time is a plain per-thread FMA chain (no shuffles,
no shared memory). A program owns a *chunk* of CT = NSUB * BT steps and walks its tiles in
order, carrying the state in registers, with the next tile's loads issued before this tile's
scan (prefetch). Three launches, no atomics:
  (1) each chunk's affine aggregate (reads z, k, v),
  (2) a scan over the chunk aggregates per lane (tiny),
  (3) each chunk again from its carry, writing the outputs (reads z, k, v, writes k~, v~).
8 tensors of traffic instead of 5; measured 59-60 % of copy bandwidth at batch 8 (the
one-launch decoupled look-back variant, "chunklb", lost at every measured shape and is gone).

Forward ("seq", the default when batch x heads gives at least 0.8 single-head channel blocks per
SM, e.g. batch 4-8 x 32 heads; below 1.5 per SM over 64-channel blocks): one launch, one program
per channel block walks the whole sequence, so inputs are read once (5 tensors of traffic). A
tile is W segments of 2 steps; a segment's two steps compose in registers, the segments' maps
are scanned inside one warp with the exclusive prefix carried along (_pair_combine), and every
step's output comes from its segment's entering state. 69-73 % of copy bandwidth at batch 8 on
the H200 (1.07-1.10x the earlier cross-warp layout, 1.2-1.3x the chunk plan); too few programs
at batch 1-3, where chunk stays.

Backward ("scan" kernel): a channel block is one (batch, head, BD channels) column of the input,
time cut into tiles of BT steps; inside a tile the recurrence h_t = a_t h_{t-1} + b_t is solved
by ``tl.associative_scan`` over the tile's rows (pairs (a, b) compose as affine maps). Two
schedules:

* ``loop``: one program per channel block walks its tiles in order, carrying the state in
  registers. Enough when there are many channel blocks (batch * heads * dim / BD >> SMs).
* ``chained``: one program per (tile, channel block). Programs take a ticket from an atomic
  counter (time-major), so a tile's predecessors were started before it; each tile publishes its
  affine aggregate, then looks back over its predecessors (decoupled look-back) until it meets
  one that published its inclusive state. The chain lets a batch-1 sequence use the whole GPU
  with each byte still read once. Flags are per channel (lane) so that every lane orders its
  own data with its own release / acquire pair.

The backward runs on the reversed sequence. With delta_t = dL/dh_t (through the whole future),
delta_t = dh_t + g_{t+1} delta_{t+1} (cut at sequence ends) and
    dx_t = (1 - g_t) delta_t,
    dz_t = g_t (1 - g_t) sum_x delta_t (h_{t-1} - x_t) = (1 - g_t) sum_x delta_t (h_t - x_t),
    dh0  = g_s delta_s at each sequence start s,
so the backward needs the forward outputs h_t, never h_{t-1}.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

State = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _affine_combine(a1, k1, v1, a2, k2, v2):
    # apply (a1, k1 | v1) first, then (a2, k2 | v2):  h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * k1 + k2, a2 * v1 + v2


@triton.jit
def _row(x, r, which: tl.constexpr):
    # one row of a [BT, BD] tile as a [BD] vector
    return tl.sum(tl.where((r == which)[:, None], x, 0.0), axis=0)


@triton.jit
def _row_info(cu, seq_idx, t, tm, b, T, VARLEN: tl.constexpr):
    """Sequence index, start flag and end flag of each row's position t."""
    if VARLEN:
        n = tl.load(seq_idx + t, mask=tm, other=0)
        s = tl.load(cu + n, mask=tm, other=0)
        e = tl.load(cu + n + 1, mask=tm, other=0)
        is_start = (t == s) & tm
        is_end = (t == e - 1) & tm
    else:
        n = tl.zeros_like(t) + b
        is_start = t == 0
        is_end = t == T - 1
    return n, is_start, is_end


@triton.jit
def _sig2(zl):
    """(sigmoid(z), 1 - sigmoid(z)) with one exp and one reciprocal, both accurate."""
    e = tl.exp(-tl.abs(zl))
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = zl >= 0
    return tl.where(pos, r, er), tl.where(pos, er, r)


# --------------------------------------------------------------------------------------------
# forward: the "chunk" kernels (three launches; see the module docstring)


@triton.jit
def _fwd_lane_coords(j, lane, H, D, NDB, NHG, BH: tl.constexpr, BD: tl.constexpr):
    """Channel block j and lane indices (any shape) -> (batch, per-lane head, per-lane channel,
    lane mask)."""
    db = j % NDB
    rest = j // NDB
    hg = rest % NHG
    b = rest // NHG
    hh = hg * BH + lane // BD
    d = db * BD + lane % BD
    return b, hh, d, (hh < H) & (d < D)


@triton.jit
def _fwd_lanes(j, H, D, NDB, NHG, BH: tl.constexpr, BD: tl.constexpr):
    """Channel block j -> (batch, per-lane head, per-lane channel, lane mask, lane index)."""
    lane = tl.arange(0, BH * BD)
    b, hh, d, lm = _fwd_lane_coords(j, lane, H, D, NDB, NHG, BH, BD)
    return b, hh, d, lm, lane


@triton.jit
def _fwd_offsets(hh, d, sh, sd, OFF64: tl.constexpr):
    """Per-lane offset inside one (batch, step) row; int32 (half the registers) unless the
    launcher saw a row span of 2**31 elements or more. The batch and step offsets are int64,
    added to the scalar base pointers."""
    if OFF64:
        return hh.to(tl.int64) * sh + d.to(tl.int64) * sd
    else:
        return hh * sh + d * sd


@triton.jit
def _fwd_load(z, k, v, oz, okx, ovx, szt, skt, svt, t0, T, lm, ok_rows, BT: tl.constexpr):
    """Raw (input dtype) [BT, L] tiles of z, k, v from step t0; nothing loaded if not ok_rows."""
    t = t0.to(tl.int64) + tl.arange(0, BT)
    io = ((t < T) & ok_rows)[:, None] & lm[None, :]
    zl = tl.load(z + (oz[None, :] + t[:, None] * szt), mask=io, other=0.)
    kx = tl.load(k + (okx[None, :] + t[:, None] * skt), mask=io, other=0.)
    vx = tl.load(v + (ovx[None, :] + t[:, None] * svt), mask=io, other=0.)
    return zl, kx, vx


@triton.jit
def _fwd_tile(zl, kx, vx, h0k, h0v, cu, seq_idx, t0, b, hh, H, T, D, d, lm, BT: tl.constexpr,
              HAS_H0: tl.constexpr, VARLEN: tl.constexpr):
    """Scan of the loaded tile at step t0: (A, Bk, Bv, n, is_end, t, io) with h = A h_in + B."""
    t = t0.to(tl.int64) + tl.arange(0, BT)
    tm = t < T
    io = tm[:, None] & lm[None, :]
    g, omg = _sig2(zl.to(tl.float32))  # one exp, one reciprocal
    n, is_start, is_end = _row_info(cu, seq_idx, t, tm, b, T, VARLEN)
    bk = omg * kx.to(tl.float32)
    bv = omg * vx.to(tl.float32)
    if HAS_H0:
        sidx = (n[:, None] * H + hh[None, :]).to(tl.int64) * D + d[None, :]
        smask = is_start[:, None] & lm[None, :]
        bk += g * tl.load(h0k + sidx, mask=smask, other=0.)
        bv += g * tl.load(h0v + sidx, mask=smask, other=0.)
    a = tl.where(is_start[:, None], 0., g)
    a = tl.where(tm[:, None], a, 1.)  # rows past the end: identity, the last row holds the state
    bk = tl.where(tm[:, None], bk, 0.)
    bv = tl.where(tm[:, None], bv, 0.)
    A, Bk, Bv = tl.associative_scan((a, bk, bv), axis=0, combine_fn=_affine_combine)
    return A, Bk, Bv, n, is_end, t, io


@triton.jit
def _fwd_chunk_step(zl, kx, vx, ga, hk, hv, ts, r, ok, ov, ook, oov, sokt, sovt, h0k, h0v, hTk, hTv,
                    cu, seq_idx, b, hh, H, T, D, d, lm, BT: tl.constexpr, HAS_H0: tl.constexpr,
                    VARLEN: tl.constexpr, WRITE: tl.constexpr):
    """One [BT, L] tile at step ts of a chunk walk (see _fwd_chunk): returns (ga, hk, hv)."""
    A, Bk, Bv, n, is_end, t, io = _fwd_tile(zl, kx, vx, h0k, h0v, cu, seq_idx, ts, b, hh, H,
                                            T, D, d, lm, BT, HAS_H0, VARLEN)
    if WRITE:
        xk = A * hk[None, :] + Bk
        xv = A * hv[None, :] + Bv
        tl.store(ok + (ook[None, :] + t[:, None] * sokt), xk.to(ok.dtype.element_ty), mask=io)
        tl.store(ov + (oov[None, :] + t[:, None] * sovt), xv.to(ov.dtype.element_ty), mask=io)
        if VARLEN:  # sequences end anywhere (an fp32 store in another layout: kept off the
            # plain path, where only the last chunk's carry is a final state)
            sidx = (n[:, None] * H + hh[None, :]).to(tl.int64) * D + d[None, :]
            fmask = is_end[:, None] & lm[None, :]
            tl.store(hTk + sidx, xk, mask=fmask)
            tl.store(hTv + sidx, xv, mask=fmask)
        hk = _row(xk, r, BT - 1)
        hv = _row(xv, r, BT - 1)
    else:
        ta = _row(A, r, BT - 1)
        hk = ta * hk + _row(Bk, r, BT - 1)
        hv = ta * hv + _row(Bv, r, BT - 1)
        ga = ta * ga
    return ga, hk, hv


@triton.jit
def _fwd_chunk(z, k, v, ok, ov, oz, okx, ovx, ook, oov, szt, skt, svt, sokt, sovt, h0k, h0v,
               hTk, hTv, cu, seq_idx, c, b, hh, H, T, D, d, lm, hk, hv, L: tl.constexpr,
               BT: tl.constexpr, NSUB: tl.constexpr, HAS_H0: tl.constexpr,
               VARLEN: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
               WRITE: tl.constexpr):
    """Walks chunk c tile by tile from the state (hk, hv) ([L] each); returns (ga, hk, hv).
    WRITE=False (launch 1, started from zero): the chunk's affine map, state after =
    ga * state before + (hk, hv). WRITE=True (launch 3, started from the carry): stores k~, v~
    and the final states that fall inside the chunk (ga unused). STAGES > 0: Triton's loop
    pipeliner prefetches tiles through shared memory (PREFETCH ignored); else PREFETCH issues
    the next tile's loads into registers before this tile's scan."""
    r = tl.arange(0, BT)
    ga = tl.full([L], 1.0, tl.float32)
    t0 = c * (NSUB * BT)
    if STAGES > 0:
        for s in tl.range(0, NSUB, num_stages=STAGES):
            ts = t0 + s * BT
            zl, kx, vx = _fwd_load(z, k, v, oz, okx, ovx, szt, skt, svt, ts, T, lm, True, BT)
            ga, hk, hv = _fwd_chunk_step(zl, kx, vx, ga, hk, hv, ts, r, ok, ov, ook, oov, sokt, sovt,
                                         h0k, h0v, hTk, hTv, cu, seq_idx, b, hh, H, T, D, d, lm, BT,
                                         HAS_H0, VARLEN, WRITE)
    else:
        if PREFETCH:
            zl, kx, vx = _fwd_load(z, k, v, oz, okx, ovx, szt, skt, svt, t0, T, lm, True, BT)
        for s in range(0, NSUB):
            ts = t0 + s * BT
            if PREFETCH:  # the next tile's loads go out before this tile's scan
                zn, kn, vn = _fwd_load(z, k, v, oz, okx, ovx, szt, skt, svt, ts + BT, T, lm,
                                       s + 1 < NSUB, BT)
            else:
                zl, kx, vx = _fwd_load(z, k, v, oz, okx, ovx, szt, skt, svt, ts, T, lm, True, BT)
            ga, hk, hv = _fwd_chunk_step(zl, kx, vx, ga, hk, hv, ts, r, ok, ov, ook, oov, sokt, sovt,
                                         h0k, h0v, hTk, hTv, cu, seq_idx, b, hh, H, T, D, d, lm, BT,
                                         HAS_H0, VARLEN, WRITE)
            if PREFETCH:
                zl, kx, vx = zn, kn, vn
    if WRITE:
        if not VARLEN:
            last = (c + 1) * (NSUB * BT) >= T  # rows past T are the identity: the carry is final
            sidx = (b * H + hh).to(tl.int64) * D + d
            tl.store(hTk + sidx, hk, mask=lm & last)
            tl.store(hTv + sidx, hv, mask=lm & last)
    return ga, hk, hv


@triton.jit
def _fwd_chunk_scan_kernel(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, ws,
                           T, H, D, NDB, NHG, NCHB, NC,
                           szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                           sokb, sokt, sokh, sokd, sovb, sovt, sovh, sovd,
                           BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                           NSUB: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr,
                           PREFETCH: tl.constexpr, STAGES: tl.constexpr, OFF64: tl.constexpr,
                           WRITE: tl.constexpr):
    """Launches 1 and 3, grid (channel blocks, chunks). WRITE=False (chunks 0..NC-2): the
    aggregates into ws[3, NC, NCHB, L]. WRITE=True (every chunk): chunk c from chunk c-1's
    inclusive state, which launch 2 left in ws's two state planes."""
    j = tl.program_id(0)
    c = tl.program_id(1)
    L: tl.constexpr = BH * BD
    b, hh, d, lm, lane = _fwd_lanes(j, H, D, NDB, NHG, BH, BD)
    b64 = b.to(tl.int64)
    z = z + b64 * szb
    k = k + b64 * skb
    v = v + b64 * svb
    ok = ok + b64 * sokb
    ov = ov + b64 * sovb
    plane = tl.cast(NC, tl.int64) * NCHB * L  # NC == 1 arrives as a constexpr int (no .to)
    if WRITE:
        o = ((c - 1).to(tl.int64) * NCHB + j) * L + lane
        cm = (lane < L) & (c > 0)
        hk = tl.load(ws + plane + o, mask=cm, other=0.)
        hv = tl.load(ws + 2 * plane + o, mask=cm, other=0.)
    else:
        hk = tl.zeros([L], tl.float32)
        hv = tl.zeros([L], tl.float32)
    ga, hk, hv = _fwd_chunk(z, k, v, ok, ov, _fwd_offsets(hh, d, szh, szd, OFF64),
                            _fwd_offsets(hh, d, skh, skd, OFF64),
                            _fwd_offsets(hh, d, svh, svd, OFF64),
                            _fwd_offsets(hh, d, sokh, sokd, OFF64),
                            _fwd_offsets(hh, d, sovh, sovd, OFF64), szt, skt, svt, sokt, sovt,
                            h0k, h0v, hTk, hTv, cu, seq_idx, c, b, hh, H, T, D, d, lm, hk, hv,
                            L, BT, NSUB, HAS_H0, VARLEN, PREFETCH, STAGES, WRITE)
    if not WRITE:
        o = (c.to(tl.int64) * NCHB + j) * L + lane
        tl.store(ws + o, ga)
        tl.store(ws + plane + o, hk)
        tl.store(ws + 2 * plane + o, hv)


@triton.jit
def _fwd_carry_scan_kernel(ws, M, NC, NCB: tl.constexpr, CH: tl.constexpr):
    """Launch 2: per lane, the inclusive states of chunks 0..NC-2 (in place of the aggregates'
    state planes). M = lanes per chunk; blocks of NCB chunks, scanned in order."""
    col = tl.program_id(0) * CH + tl.arange(0, CH)
    cm = col < M
    plane = tl.cast(NC, tl.int64) * M
    rr = tl.arange(0, NCB)
    hk = tl.zeros([CH], tl.float32)
    hv = tl.zeros([CH], tl.float32)
    nblk = tl.cdiv(NC - 1, NCB)
    i = 0
    while i < nblk:
        cc = (i * NCB + rr).to(tl.int64)
        m = (cc < NC - 1)[:, None] & cm[None, :]
        o = cc[:, None] * M + col[None, :]
        a = tl.load(ws + o, mask=m, other=1.)
        bk = tl.load(ws + plane + o, mask=m, other=0.)
        bv = tl.load(ws + 2 * plane + o, mask=m, other=0.)
        A, Bk, Bv = tl.associative_scan((a, bk, bv), axis=0, combine_fn=_affine_combine)
        xk = A * hk[None, :] + Bk
        xv = A * hv[None, :] + Bv
        tl.store(ws + plane + o, xk, mask=m)
        tl.store(ws + 2 * plane + o, xv, mask=m)
        hk = _row(xk, rr, NCB - 1)
        hv = _row(xv, rr, NCB - 1)
        i += 1


# --------------------------------------------------------------------------------------------
# forward: the "seq" kernel (one launch, each program walks the whole sequence of its lanes)
# A tile is W segments x 2 steps over the program's L lanes, held as [W, S, C]: S sub-blocks of
# C = 256 / W lanes, so that one sub-block's W segments x C / 8 threads fill exactly one warp and
# the scan over the segments never leaves it (no shared memory, no barriers); a tile row still
# reads the program's L contiguous lanes. (Axis order matters: Triton ranks the two
# non-contiguous axes by index, and W must come first to get the threads.) A segment's two
# steps compose in registers.


@triton.jit
def _pair_combine(fa1, fk1, fv1, ea1, ek1, ev1, fa2, fk2, fv2, ea2, ek2, ev2):
    # pairs (F, E): F = a range's affine map, E = the same range without its last element;
    # (F1, E1) then (F2, E2) -> (F1 F2, F1 E2). Scanned inclusively from (seg_w, identity), the
    # E part at w is the exclusive prefix: the map from the tile's start to segment w's start.
    fa, fk, fv = _affine_combine(fa1, fk1, fv1, fa2, fk2, fv2)
    ea, ek, ev = _affine_combine(fa1, fk1, fv1, ea2, ek2, ev2)
    return fa, fk, fv, ea, ek, ev


@triton.jit
def _fwd_seq_load_row(z, k, v, oz, okx, ovx, szt, skt, svt, t, T, lm3):
    """Row t ([W, 1, 1] steps) of z, k, v as [W, S, C] tiles; nothing loaded past T."""
    io = (t < T) & lm3
    return (tl.load(z + (oz + t * szt), mask=io, other=0.), tl.load(k + (okx + t * skt), mask=io, other=0.),
            tl.load(v + (ovx + t * svt), mask=io, other=0.))


@triton.jit
def _fwd_seq_load(z, k, v, oz, okx, ovx, szt, skt, svt, t, T, lm3):
    """Rows t and t + 1 of z, k, v (a tile's two steps per segment)."""
    z0, k0, v0 = _fwd_seq_load_row(z, k, v, oz, okx, ovx, szt, skt, svt, t, T, lm3)
    z1, k1, v1 = _fwd_seq_load_row(z, k, v, oz, okx, ovx, szt, skt, svt, t + 1, T, lm3)
    return z0, k0, v0, z1, k1, v1


@triton.jit
def _fwd_seq_row(zl, kx, vx, t, h0k, h0v, cu, seq_idx, b, hh, d, T, H, D, lm3,
                 HAS_H0: tl.constexpr, VARLEN: tl.constexpr, MASKED: tl.constexpr):
    """One row's map h -> a h + (bk | bv); MASKED: resets, h0 and steps past T."""
    g, omg = _sig2(zl.to(tl.float32))
    bk = omg * kx.to(tl.float32)
    bv = omg * vx.to(tl.float32)
    n = t * 0  # unmasked tiles: n and is_end are only read under VARLEN, whose tiles are masked
    is_end = t < 0
    if MASKED:
        tm = t < T
        n, is_start, is_end = _row_info(cu, seq_idx, t, tm, b, T, VARLEN)
        if HAS_H0:
            sidx = (n * H + hh).to(tl.int64) * D + d
            smask = is_start & lm3
            bk += g * tl.load(h0k + sidx, mask=smask, other=0.)
            bv += g * tl.load(h0v + sidx, mask=smask, other=0.)
        g = tl.where(is_start, 0., g)
        g = tl.where(tm, g, 1.)  # steps past the end: identity
        bk = tl.where(tm, bk, 0.)
        bv = tl.where(tm, bv, 0.)
    return g, bk, bv, n, is_end


@triton.jit
def _fwd_seq_store(ok, ov, ook, oov, sokt, sovt, hTk, hTv, xk, xv, t, n, is_end, hh, d, T, H, D, lm3,
                   VARLEN: tl.constexpr):
    io = (t < T) & lm3
    tl.store(ok + (ook + t * sokt), xk.to(ok.dtype.element_ty), mask=io)
    tl.store(ov + (oov + t * sovt), xv.to(ov.dtype.element_ty), mask=io)
    if VARLEN:
        sidx = (n * H + hh).to(tl.int64) * D + d
        tl.store(hTk + sidx, xk, mask=is_end & lm3)
        tl.store(hTv + sidx, xv, mask=is_end & lm3)


@triton.jit
def _fwd_seq_tile(z0, k0, v0, z1, k1, v1, hk, hv, t, ok, ov, ook, oov, sokt, sovt, h0k, h0v, hTk, hTv,
                  cu, seq_idx, b, hh, d, T, H, D, lm3, w3, S: tl.constexpr, W: tl.constexpr,
                  C: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr, MASKED: tl.constexpr):
    """A tile of W segments x 2 steps from its entering state ([1, S, C]): writes k~, v~,
    returns the state after it. A segment's two rows compose in registers."""
    a0, bk0, bv0, n0, e0 = _fwd_seq_row(z0, k0, v0, t, h0k, h0v, cu, seq_idx, b, hh, d, T, H, D, lm3,
                                        HAS_H0, VARLEN, MASKED)
    a1, bk1, bv1, n1, e1 = _fwd_seq_row(z1, k1, v1, t + 1, h0k, h0v, cu, seq_idx, b, hh, d, T, H, D,
                                        lm3, HAS_H0, VARLEN, MASKED)
    one = tl.full([W, S, C], 1.0, tl.float32)
    nil = tl.zeros([W, S, C], tl.float32)
    FA, FK, FV, EA, EK, EV = tl.associative_scan((a0 * a1, a1 * bk0 + bk1, a1 * bv0 + bv1, one, nil, nil),
                                                 axis=0, combine_fn=_pair_combine)
    xk = a0 * (EA * hk + EK) + bk0
    xv = a0 * (EA * hv + EV) + bv0
    _fwd_seq_store(ok, ov, ook, oov, sokt, sovt, hTk, hTv, xk, xv, t, n0, e0, hh, d, T, H, D, lm3, VARLEN)
    xk = a1 * xk + bk1
    xv = a1 * xv + bv1
    _fwd_seq_store(ok, ov, ook, oov, sokt, sovt, hTk, hTv, xk, xv, t + 1, n1, e1, hh, d, T, H, D, lm3, VARLEN)
    end = w3 == W - 1
    hk = tl.sum(tl.where(end, FA * hk + FK, 0.), axis=0, keep_dims=True)
    hv = tl.sum(tl.where(end, FA * hv + FV, 0.), axis=0, keep_dims=True)
    return hk, hv


@triton.jit
def _fwd_seq_kernel(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx,
                     T, H, D, NDB, NHG,
                     szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                     sokb, sokt, sokh, sokd, sovb, sovt, sovh, sovd,
                     W: tl.constexpr, S: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                     HAS_H0: tl.constexpr, VARLEN: tl.constexpr, OFF64: tl.constexpr):
    """One program per channel block (BH heads x BD channels = L lanes) walks all T steps in tiles
    of W segments x 2 steps (the [W, S, C] layout: see the section comment). Per tile: each
    segment's two-step map, one warp-local scan across the W segments of their maps (with the
    exclusive prefix carried along, see _pair_combine), every step's output from its segment's
    entering state. Inputs are read once and outputs written once (5 tensors of traffic); it
    needs many channel blocks (batch x heads) to fill the GPU. The next tile's loads go out
    before this tile's math; interior tiles skip the reset / h0 / past-T masks."""
    j = tl.program_id(0)
    L: tl.constexpr = BH * BD
    C: tl.constexpr = L // S
    lane = tl.arange(0, S)[None, :, None] * C + tl.arange(0, C)[None, None, :]  # [1, S, C]
    b, hh, d, lm3 = _fwd_lane_coords(j, lane, H, D, NDB, NHG, BH, BD)
    b64 = b.to(tl.int64)
    oz = _fwd_offsets(hh, d, szh, szd, OFF64)
    okx = _fwd_offsets(hh, d, skh, skd, OFF64)
    ovx = _fwd_offsets(hh, d, svh, svd, OFF64)
    ook = _fwd_offsets(hh, d, sokh, sokd, OFF64)
    oov = _fwd_offsets(hh, d, sovh, sovd, OFF64)
    z = z + b64 * szb
    k = k + b64 * skb
    v = v + b64 * svb
    ok = ok + b64 * sokb
    ov = ov + b64 * sovb
    w3 = tl.arange(0, W)[:, None, None]
    step = (w3 * 2).to(tl.int64)  # [W, 1, 1]: each segment's first step
    TT: tl.constexpr = 2 * W
    hk = tl.zeros([1, S, C], tl.float32)
    hv = tl.zeros([1, S, C], tl.float32)
    z0, k0, v0, z1, k1, v1 = _fwd_seq_load(z, k, v, oz, okx, ovx, szt, skt, svt, step, T, lm3)
    t0 = T * 0
    while t0 < T:
        t = t0 + step
        n0, n1, n2, n3, n4, n5 = _fwd_seq_load(z, k, v, oz, okx, ovx, szt, skt, svt, t + TT, T, lm3)
        # interior tiles (no resets, no initial state, no steps past T) skip the masks; with
        # cu_seqlens every tile may hold a reset
        if VARLEN or (t0 == 0) | (t0 + TT > T):
            hk, hv = _fwd_seq_tile(z0, k0, v0, z1, k1, v1, hk, hv, t, ok, ov, ook, oov, sokt, sovt,
                                   h0k, h0v, hTk, hTv, cu, seq_idx, b, hh, d, T, H, D, lm3, w3, S, W, C,
                                   HAS_H0, VARLEN, True)
        else:
            hk, hv = _fwd_seq_tile(z0, k0, v0, z1, k1, v1, hk, hv, t, ok, ov, ook, oov, sokt, sovt,
                                   h0k, h0v, hTk, hTv, cu, seq_idx, b, hh, d, T, H, D, lm3, w3, S, W, C,
                                   HAS_H0, VARLEN, False)
        z0, k0, v0, z1, k1, v1 = n0, n1, n2, n3, n4, n5
        t0 += TT
    if not VARLEN:
        sidx = (b * H + hh).to(tl.int64) * D + d
        tl.store(hTk + sidx, hk, mask=lm3)
        tl.store(hTv + sidx, hv, mask=lm3)


# --------------------------------------------------------------------------------------------
# backward


@triton.jit
def _lookback(flags, ws_agg, ws_inc, slot, NCH, lane, BD: tl.constexpr, c):
    """Decoupled look-back: the state entering tile c of this channel block ([BD] k and v)."""
    acc_a = tl.full([BD], 1.0, tl.float32)
    acc_k = tl.zeros([BD], tl.float32)
    acc_v = tl.zeros([BD], tl.float32)
    state_k = tl.zeros([BD], tl.float32)
    state_v = tl.zeros([BD], tl.float32)
    done = tl.zeros([BD], tl.int32)
    p = c - 1
    while tl.min(done, axis=0) == 0:
        ps = (slot - (c - p) * NCH).to(tl.int64) * BD + lane
        f = tl.atomic_add(flags + ps, 0, sem="acquire")
        while tl.min(f, axis=0) == 0:
            f = tl.atomic_add(flags + ps, 0, sem="acquire")
        live = done == 0
        inc = live & (f == 2)
        agg = live & (f == 1)
        ik = tl.load(ws_inc + 2 * ps, mask=inc, other=0., volatile=True)
        iv = tl.load(ws_inc + 2 * ps + 1, mask=inc, other=0., volatile=True)
        pa = tl.load(ws_agg + 3 * ps, mask=agg, other=1., volatile=True)
        pk = tl.load(ws_agg + 3 * ps + 1, mask=agg, other=0., volatile=True)
        pv = tl.load(ws_agg + 3 * ps + 2, mask=agg, other=0., volatile=True)
        state_k = tl.where(inc, acc_a * ik + acc_k, state_k)
        state_v = tl.where(inc, acc_a * iv + acc_v, state_v)
        acc_k = tl.where(agg, acc_a * pk + acc_k, acc_k)
        acc_v = tl.where(agg, acc_a * pv + acc_v, acc_v)
        acc_a = tl.where(agg, acc_a * pa, acc_a)
        done = tl.where(inc, 1, done)
        p -= 1
    return state_k, state_v


@triton.jit
def _bwd_tile(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr,
              szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd, sdkt, sdkd, sdvt, sdvd,
              dhTk, dhTv, cu, seq_idx, c, b, hh, H, T, D, d, dm,
              BT: tl.constexpr, HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr):
    """Reverse affine scan of tile c, rows in reversed time order: delta = A carry + B."""
    r = tl.arange(0, BT)
    t = (c * BT + (BT - 1) - r).to(tl.int64)
    tm = t < T
    io = tm[:, None] & dm[None, :]
    zn = tl.load(z_ptr + (t + 1)[:, None] * szt + d[None, :] * szd,
                 mask=(t + 1 < T)[:, None] & dm[None, :], other=0.).to(tl.float32)
    dhk = tl.load(dok_ptr + t[:, None] * sdkt + d[None, :] * sdkd, mask=io, other=0.).to(tl.float32)
    dhv = tl.load(dov_ptr + t[:, None] * sdvt + d[None, :] * sdvd, mask=io, other=0.).to(tl.float32)
    n, is_start, is_end = _row_info(cu, seq_idx, t, tm, b, T, VARLEN)
    if HAS_DFINAL:
        sidx = (n * H + hh).to(tl.int64)[:, None] * D + d[None, :]
        fmask = is_end[:, None] & dm[None, :]
        dhk += tl.load(dhTk + sidx, mask=fmask, other=0.)
        dhv += tl.load(dhTv + sidx, mask=fmask, other=0.)
    a = tl.where(is_end[:, None], 0., tl.sigmoid(zn))
    a = tl.where(tm[:, None], a, 1.)
    A, Bk, Bv = tl.associative_scan((a, dhk, dhv), axis=0, combine_fn=_affine_combine)
    return A, Bk, Bv, n, is_start, t, io


@triton.jit
def _bwd_store(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dz_ptr, dk_ptr, dv_ptr,
               szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd,
               sgzt, sgzd, sgkt, sgkd, sgvt, sgvd, dh0k, dh0v, delk, delv, n, is_start, t, io, hh, H, D, d, dm,
               HAS_H0: tl.constexpr):
    zl = tl.load(z_ptr + t[:, None] * szt + d[None, :] * szd, mask=io, other=0.).to(tl.float32)
    kx = tl.load(k_ptr + t[:, None] * skt + d[None, :] * skd, mask=io, other=0.).to(tl.float32)
    vx = tl.load(v_ptr + t[:, None] * svt + d[None, :] * svd, mask=io, other=0.).to(tl.float32)
    hk = tl.load(ok_ptr + t[:, None] * sokt + d[None, :] * sokd, mask=io, other=0.).to(tl.float32)
    hv = tl.load(ov_ptr + t[:, None] * sovt + d[None, :] * sovd, mask=io, other=0.).to(tl.float32)
    omg = tl.sigmoid(-zl)
    dz = omg * (delk * (hk - kx) + delv * (hv - vx))
    tl.store(dz_ptr + t[:, None] * sgzt + d[None, :] * sgzd, dz.to(dz_ptr.dtype.element_ty),
             mask=io)
    tl.store(dk_ptr + t[:, None] * sgkt + d[None, :] * sgkd,
             (omg * delk).to(dk_ptr.dtype.element_ty), mask=io)
    tl.store(dv_ptr + t[:, None] * sgvt + d[None, :] * sgvd,
             (omg * delv).to(dv_ptr.dtype.element_ty), mask=io)
    if HAS_H0:
        g = tl.sigmoid(zl)
        sidx = (n * H + hh).to(tl.int64)[:, None] * D + d[None, :]
        smask = is_start[:, None] & dm[None, :]
        tl.store(dh0k + sidx, g * delk, mask=smask)
        tl.store(dh0v + sidx, g * delv, mask=smask)


@triton.jit
def _bwd_loop_body(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr, dz_ptr, dk_ptr, dv_ptr,
                   szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd, sdkt, sdkd, sdvt, sdvd,
                   sgzt, sgzd, sgkt, sgkd, sgvt, sgvd, dhTk, dhTv, dh0k, dh0v, cu, seq_idx,
                   c, b, hh, H, T, D, d, dm, ck, cv, r, BT: tl.constexpr, HAS_H0: tl.constexpr,
                   HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr):
    A, Bk, Bv, n, is_start, t, io = _bwd_tile(
        z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr,
        szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd, sdkt, sdkd, sdvt, sdvd,
        dhTk, dhTv, cu, seq_idx, c, b, hh, H, T, D, d, dm, BT, HAS_DFINAL, VARLEN)
    delk = A * ck[None, :] + Bk
    delv = A * cv[None, :] + Bv
    _bwd_store(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dz_ptr, dk_ptr, dv_ptr,
               szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd,
               sgzt, sgzd, sgkt, sgkd, sgvt, sgvd, dh0k, dh0v, delk, delv, n, is_start, t, io,
               hh, H, D, d, dm, HAS_H0)
    return _row(delk, r, BT - 1), _row(delv, r, BT - 1)


@triton.jit
def _bwd_kernel(z, k, v, ok, ov, dok, dov, dz, dk, dv, dhTk, dhTv, dh0k, dh0v, cu, seq_idx,
                flags, ws_agg, ws_inc,
                T, H, D, NDB, NT,
                szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                sokb, sokt, sokh, sokd, sovb, sovt, sovh, sovd,
                sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd,
                sgzb, sgzt, sgzh, sgzd, sgkb, sgkt, sgkh, sgkd, sgvb, sgvt, sgvh, sgvd,
                BT: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr,
                HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr, CHAINED: tl.constexpr,
                WHILE_LOOP: tl.constexpr):
    if CHAINED:
        NCH = tl.num_programs(0) // NT
        tid = tl.atomic_add(flags + NT * NCH * BD, 1)  # the ticket counter sits after the flags
        co = tid // NCH
        j = tid % NCH
    else:
        NCH = tl.num_programs(0)
        co = 0
        j = tl.program_id(0)
    db = j % NDB
    bh = j // NDB
    b = bh // H
    hh = bh % H
    lane = tl.arange(0, BD)
    d = db * BD + lane
    dm = d < D
    b64 = b.to(tl.int64)
    h64 = hh.to(tl.int64)
    z_ptr = z + b64 * szb + h64 * szh
    k_ptr = k + b64 * skb + h64 * skh
    v_ptr = v + b64 * svb + h64 * svh
    ok_ptr = ok + b64 * sokb + h64 * sokh
    ov_ptr = ov + b64 * sovb + h64 * sovh
    dok_ptr = dok + b64 * sdkb + h64 * sdkh
    dov_ptr = dov + b64 * sdvb + h64 * sdvh
    dz_ptr = dz + b64 * sgzb + h64 * sgzh
    dk_ptr = dk + b64 * sgkb + h64 * sgkh
    dv_ptr = dv + b64 * sgvb + h64 * sgvh
    r = tl.arange(0, BT)
    if CHAINED:
        c = NT - 1 - co
        A, Bk, Bv, n, is_start, t, io = _bwd_tile(
            z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr,
            szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd, sdkt, sdkd, sdvt, sdvd,
            dhTk, dhTv, cu, seq_idx, c, b, hh, H, T, D, d, dm, BT, HAS_DFINAL, VARLEN)
        ek = _row(Bk, r, BT - 1)
        ev = _row(Bv, r, BT - 1)
        slot = tid
        ps = slot.to(tl.int64) * BD + lane
        if co == 0:
            delk = Bk
            delv = Bv
        else:
            tl.store(ws_agg + 3 * ps, _row(A, r, BT - 1))
            tl.store(ws_agg + 3 * ps + 1, ek)
            tl.store(ws_agg + 3 * ps + 2, ev)
            tl.atomic_xchg(flags + ps, 1, sem="release")
            sk, sv = _lookback(flags, ws_agg, ws_inc, slot, NCH, lane, BD, co)
            delk = A * sk[None, :] + Bk
            delv = A * sv[None, :] + Bv
            ek = _row(delk, r, BT - 1)
            ev = _row(delv, r, BT - 1)
        if co < NT - 1:
            tl.store(ws_inc + 2 * ps, ek)
            tl.store(ws_inc + 2 * ps + 1, ev)
            tl.atomic_xchg(flags + ps, 2, sem="release")
        _bwd_store(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dz_ptr, dk_ptr, dv_ptr,
                   szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd,
                   sgzt, sgzd, sgkt, sgkd, sgvt, sgvd, dh0k, dh0v, delk, delv, n, is_start, t, io, hh, H, D, d, dm, HAS_H0)
    else:
        ck = tl.zeros([BD], tl.float32)
        cv = tl.zeros([BD], tl.float32)
        if WHILE_LOOP:
            c = NT - 1
            while c >= 0:
                ck, cv = _bwd_loop_body(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr, dz_ptr, dk_ptr, dv_ptr,
                                        szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd,
                                        sdkt, sdkd, sdvt, sdvd, sgzt, sgzd, sgkt, sgkd, sgvt,
                                        sgvd, dhTk, dhTv, dh0k, dh0v, cu, seq_idx, c, b, hh, H,
                                        T, D, d, dm, ck, cv, r, BT, HAS_H0, HAS_DFINAL, VARLEN)
                c -= 1
        else:
            for co in range(0, NT):
                c = NT - 1 - co
                ck, cv = _bwd_loop_body(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr, dz_ptr, dk_ptr, dv_ptr,
                                        szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd,
                                        sdkt, sdkd, sdvt, sdvd, sgzt, sgzd, sgkt, sgkd, sgvt,
                                        sgvd, dhTk, dhTv, dh0k, dh0v, cu, seq_idx, c, b, hh, H,
                                        T, D, d, dm, ck, cv, r, BT, HAS_H0, HAS_DFINAL, VARLEN)


# --------------------------------------------------------------------------------------------
# decode step


@triton.jit
def _step_kernel(z, k, v, sk, sv, ok, ov, nk, nv, H, D,
                 szb, szh, szd, skb, skh, skd, svb, svh, svd,
                 ssb, ssh, ssd, stb, sth, std_, sokb, sokh, sokd, sovb, sovh, sovd,
                 BD: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    hh = (bh % H).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    m = d < D
    zl = tl.load(z + b * szb + hh * szh + d * szd, mask=m, other=0.).to(tl.float32)
    kx = tl.load(k + b * skb + hh * skh + d * skd, mask=m, other=0.).to(tl.float32)
    vx = tl.load(v + b * svb + hh * svh + d * svd, mask=m, other=0.).to(tl.float32)
    hk = tl.load(sk + b * ssb + hh * ssh + d * ssd, mask=m, other=0.).to(tl.float32)
    hv = tl.load(sv + b * stb + hh * sth + d * std_, mask=m, other=0.).to(tl.float32)
    g = tl.sigmoid(zl)
    omg = tl.sigmoid(-zl)
    hk = g * hk + omg * kx
    hv = g * hv + omg * vx
    tl.store(ok + b * sokb + hh * sokh + d * sokd, hk.to(ok.dtype.element_ty), mask=m)
    tl.store(ov + b * sovb + hh * sovh + d * sovd, hv.to(ov.dtype.element_ty), mask=m)
    o = (b * H + hh) * D + d
    tl.store(nk + o, hk, mask=m)
    tl.store(nv + o, hv, mask=m)


# --------------------------------------------------------------------------------------------
# launchers

# Forward defaults, from the H200 sweep of 2026-11-30 (bench/results/scan_sweep.json; bf16, 32
# heads x 128; batch 1 and 8, seq 4096..32768). Tile: BH=4 heads (L = 512 lanes), BT=2 rows,
# 2 warps was the best tile at 7 of the 8 shapes; at B=1 T=4096 BH2 BT2 w1 beat it by 2.8 %
# (0.117 vs 0.120 ms, within run-to-run noise), not worth a second rule. Chunk length CT: the
# power of two that gives about 8 programs per SM, kept within [64, 512]; it picks the measured
# best CT at every shape (ms; the old "scan" forward in brackets):
#   B=1: T=4096 CT64 0.120 [0.154], T=8192 CT64 0.158 [0.294], T=16384 CT128 0.288 [0.572],
#        T=32768 CT256 0.552 [1.131];
#   B=8: T=4096 CT256 0.543 [0.998], T=8192/16384/32768 CT512 1.07/2.11/4.21 [1.98/3.95/7.87]
#        (59-60 % of copy bandwidth).
# The floor of 64: CT32 was 7 % slower than CT64 at B=1 T=8192 (0.169 vs 0.158 ms).
_FWD_DEFAULTS = {"BH": 4, "BT": 2, "BD": 128, "CT": "auto", "num_warps": None, "prefetch": True,
                 "stages": 0, "kernel": "auto", "W": 8}
_CT_MIN, _CT_MAX, _PROGRAMS_PER_SM = 64, 512, 8
# "seq" (one launch, inputs read once) over "chunk" when there are at least this many single-head
# channel blocks per SM. H200, bf16, 32 heads x 128 (bench/NOTES-scan.md, 2026-12-01, session 22):
# at batch 8 (1.94 blocks per SM) seq took 0.433 / 0.864 / 1.73 / 3.56-3.64 ms at T = 4096 / 8192 /
# 16384 / 32768 (69-73 % of copy) against 0.474 / 0.946 / 1.87 / 3.72 ms for the chunk plan; at
# batch 4 (0.97 per SM) 0.290 against 0.282 ms (CUDA graphs), at batch 2 0.269 against 0.153.
_SEQ_BLOCKS_PER_SM = 1.5
# Between 0.8 and 1.5 blocks per SM "seq" still wins over 64-channel blocks with 16-segment tiles
# (BH1 BD64 W16: twice the programs, one wave up to 1.5 per SM). H200 CUDA graphs, bf16 x 128
# (bench/results/reruns/scan_seq_narrow_855269b.json, NOTES-scan.md session 31), ms chunk -> seq:
# 128 heads (4 x 32, 8 x 16 at T 4096) 0.281 -> 0.251, 0.288 -> 0.253; 4 x 32 at T 16384
# 1.070 -> 0.971 (at T 8192 BD32 W16 0.541 -> 0.494; BD64 not timed there); 160 heads 0.389 ->
# 0.342; 192 heads 0.421 -> 0.353; 112 and 120 heads 4 and 7 % faster; 104 heads equal; 96 heads
# (3 x 32, 6 x 16) chunk ahead by 8 %; at 4 x 32768 within run-to-run noise (2.06-2.11 against
# 2.11). At 256 heads (2 per SM) the W16 tiles take two waves and lose (0.572 against 0.435 ms),
# hence the upper bound.
_SEQ_NARROW_BLOCKS_PER_SM, _SEQ_NARROW_TILE = 0.8, {"BD": 64, "W": 16}
# With fewer chunk programs than this per SM (1 x 4096 at 32 heads x 128: 3.9), the default chunk
# plan takes BT 4 with its loads pipelined 3 stages deep. H200 CUDA graphs (NOTES-scan.md,
# 2026-12-01): 1 x 4096 0.0884 / 0.0888 / 0.0879 ms in three runs against 0.100 for BT 2
# unpipelined; at 7.8 programs per SM (2 x 4096) it lost (0.192 vs 0.153 ms).
_FEW_PROGRAMS_PER_SM, _FEW_PROGRAMS_TILE = 4, (4, 3)
# Backward defaults from bench/results/scan.json (run 1, H200): BT64 BD32 w4, chained at batch 1
# and loop at batch 8 (chain_below = 4 x SMs channel blocks). The 2026-11-30 sweep timed no
# other backward (its fwd+bwd rows all ran this one).
_BWD_DEFAULTS = {"BT": 64, "BD": 32, "num_warps": 4, "schedule": "auto", "chain_below": 4}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H200's count: the interpreter then plans what the GPU would


def _strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def _empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor with x's shape and x's dimension order (a transposed view stays one)."""
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), -i))
    y = torch.empty([x.shape[i] for i in order], dtype=dtype or x.dtype, device=x.device)
    inv = [order.index(i) for i in range(x.dim())]
    return y.permute(inv)


def _options(opts: dict | None, defaults: dict, direction: str) -> dict:
    """defaults overridden by the options given (None counts as not given)."""
    given = {k: v for k, v in (opts or {}).items() if v is not None}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {direction} options {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _fwd_plan(B: int, T: int, H: int, D: int, device, opts: dict | None = None) -> dict:
    """The forward launch: the options given over _FWD_DEFAULTS, CT 'auto' resolved, and the
    derived sizes (NSUB tiles per chunk, NC chunks, NCHB channel blocks of BH heads x BD)."""
    cfg = _options(opts, _FWD_DEFAULTS, "forward")
    given = {k for k, x in (opts or {}).items() if x is not None}
    if cfg["kernel"] not in ("auto", "chunk", "seq"):
        raise ValueError(f"forward kernel must be 'auto', 'chunk' or 'seq', got {cfg['kernel']!r}")
    if cfg["kernel"] == "seq" and cfg["stages"]:
        raise ValueError(f"forward option stages={cfg['stages']} is for kernel='chunk' only")
    auto = cfg["kernel"] == "auto"
    if auto:  # "seq" once single-head channel blocks (nearly) fill the GPU (see above)
        per_sm = B * H * triton.cdiv(D, min(cfg["BD"], triton.next_power_of_2(D))) / _num_sms(device)
        narrow = _SEQ_NARROW_BLOCKS_PER_SM <= per_sm < _SEQ_BLOCKS_PER_SM
        seq = narrow or per_sm >= _SEQ_BLOCKS_PER_SM
        cfg["kernel"] = "seq" if seq else "chunk"
        if seq and "BH" not in given:
            cfg["BH"] = 1
        if narrow:  # half-width blocks, 16-segment tiles: twice the programs (see above)
            cfg.update({k: x for k, x in _SEQ_NARROW_TILE.items() if k not in given})
    BD = min(cfg["BD"], triton.next_power_of_2(D))
    BH = max(1, min(cfg["BH"], triton.next_power_of_2(H)))
    BT = cfg["BT"]
    NDB = triton.cdiv(D, BD)
    NHG = triton.cdiv(H, BH)
    NCHB = B * NHG * NDB
    CT = cfg["CT"]
    if CT == "auto":
        want = triton.cdiv(T * NCHB, _PROGRAMS_PER_SM * _num_sms(device))
        CT = min(max(triton.next_power_of_2(max(want, 1)), _CT_MIN), _CT_MAX)
    if (auto and cfg["kernel"] == "chunk" and not given & {"BT", "stages"}
            and NCHB * triton.cdiv(T, CT) < _FEW_PROGRAMS_PER_SM * _num_sms(device)):
        BT, cfg["stages"] = _FEW_PROGRAMS_TILE  # more loads in flight per program (see above)
    CT = max(BT, (CT // BT) * BT)
    L = BH * BD
    S = max(1, L * cfg["W"] // 256)  # seq: sub-blocks of 256 / W lanes, one warp each
    warps = S if cfg["kernel"] == "seq" else max(1, min(4, L // 256))
    return dict(cfg, S=S, BT=BT, BD=BD, BH=BH, CT=CT, NSUB=CT // BT, NC=max(1, triton.cdiv(T, CT)),
                NDB=NDB, NHG=NHG, NCHB=NCHB, num_warps=cfg["num_warps"] or warps)


def _bwd_plan(batch: int, T: int, H: int, D: int, device, opts: dict | None = None):
    cfg = _options(opts, _BWD_DEFAULTS, "backward")
    BD = min(cfg["BD"], triton.next_power_of_2(D))
    BT = cfg["BT"]
    NDB = triton.cdiv(D, BD)
    NCH = batch * H * NDB
    NT = max(1, triton.cdiv(T, BT))
    schedule = cfg["schedule"]
    if schedule not in ("auto", "loop", "chained"):
        raise ValueError(f"schedule must be 'auto', 'loop' or 'chained', got {schedule!r}")
    if schedule == "auto":
        schedule = "chained" if (NT > 1 and NCH < cfg["chain_below"] * _num_sms(device)) else "loop"
    if NT == 1:
        schedule = "loop"
    return BT, BD, NDB, NCH, NT, schedule == "chained", cfg["num_warps"]


_DUMMIES: dict = {}


def _dummy(device, dtype):
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


def _workspace(device, chained: bool, NT: int, NCH: int, BD: int):
    """(flags, ws_agg, ws_inc): per-lane status words with the ticket counter after them, and the
    published aggregates / inclusive states. One memset per launch."""
    if not chained:
        return _dummy(device, torch.int32), _dummy(device, torch.float32), _dummy(device, torch.float32)
    slots = NT * NCH * BD
    flags = torch.zeros(slots + 1, dtype=torch.int32, device=device)
    ws_agg = torch.empty(3 * slots, dtype=torch.float32, device=device)
    ws_inc = torch.empty(2 * slots, dtype=torch.float32, device=device)
    return flags, ws_agg, ws_inc


def _varlen_index(cu_seqlens: torch.Tensor | None, batch: int, T: int, device):
    if cu_seqlens is None:
        dummy = _dummy(device, torch.int32)
        return dummy, dummy, batch, None
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got batch {batch}")
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    if cu.device.type != "cuda":  # on CPU a check costs no device sync
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(e < s for s, e in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to seq={T}, got {bounds}")
    pos = torch.arange(T, device=device, dtype=torch.int32)
    seq_idx = torch.searchsorted(cu[1:], pos, right=True).to(torch.int32)
    empty = (cu[1:] == cu[:-1])
    return cu, seq_idx, cu.numel() - 1, empty


def scan_fwd(z, k, v, h0k=None, h0v=None, cu_seqlens=None, **opts):
    """Launch the forward (``opts`` over _FWD_DEFAULTS: kernel 'chunk' (three launches; BH, BT,
    BD, CT (int or 'auto'), num_warps, prefetch, stages) or 'seq' (one launch; BH, BD, W,
    num_warps)); chunk's stages > 0 pipelines its tile loads through shared memory.
    Returns (k~, v~, final_k, final_v, aux for the backward)."""
    B, T, H, D = k.shape
    dev = k.device
    p = _fwd_plan(B, T, H, D, dev, opts)
    cu, seq_idx, N, empty = _varlen_index(cu_seqlens, B, T, dev)
    ok = _empty_like_layout(k)
    ov = _empty_like_layout(v)
    has_h0 = h0k is not None
    if has_h0:
        h0k = h0k.to(device=dev, dtype=torch.float32).contiguous()
        h0v = h0v.to(device=dev, dtype=torch.float32).contiguous()
        hTk, hTv = h0k.clone(), h0v.clone()  # empty packed sequences hand h0 through
    else:
        h0k = h0v = _dummy(dev, torch.float32)
        # every final state is written by the kernel unless a packed sequence is empty
        alloc = torch.zeros if (cu_seqlens is not None or T == 0) else torch.empty
        hTk = alloc(N, H, D, dtype=torch.float32, device=dev)
        hTv = alloc(N, H, D, dtype=torch.float32, device=dev)
    if T > 0:
        tensors = (z, k, v, ok, ov)
        span = max((p["NHG"] * p["BH"] - 1) * x.stride(2) + (p["NDB"] * p["BD"] - 1) * x.stride(3)
                   for x in tensors)  # padded lanes included
        args = (z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx)
        strides = [s for x in tensors for s in _strides4(x)]
        NC, NCHB = p["NC"], p["NCHB"]
        if p["kernel"] == "seq":
            _fwd_seq_kernel[(NCHB,)](*args, T, H, D, p["NDB"], p["NHG"], *strides, W=p["W"], S=p["S"],
                                      BD=p["BD"], BH=p["BH"], HAS_H0=has_h0, VARLEN=cu_seqlens is not None,
                                      OFF64=span >= 2**31, num_warps=p["num_warps"])
        else:
            sizes = (T, H, D, p["NDB"], p["NHG"], NCHB, NC)
            meta = dict(BT=p["BT"], BD=p["BD"], BH=p["BH"], NSUB=p["NSUB"], HAS_H0=has_h0,
                        VARLEN=cu_seqlens is not None, PREFETCH=bool(p["prefetch"]), STAGES=p["stages"],
                        OFF64=span >= 2**31, num_warps=p["num_warps"])
            ws = _dummy(dev, torch.float32)
            if NC > 1:
                M = NCHB * p["BH"] * p["BD"]
                ws = torch.empty(3 * NC * M, dtype=torch.float32, device=dev)
                _fwd_chunk_scan_kernel[(NCHB, NC - 1)](*args, ws, *sizes, *strides, WRITE=False, **meta)
                CH = 64
                NCB = min(64, triton.next_power_of_2(NC - 1))
                _fwd_carry_scan_kernel[(triton.cdiv(M, CH),)](ws, M, NC, NCB=NCB, CH=CH, num_warps=4)
            _fwd_chunk_scan_kernel[(NCHB, NC)](*args, ws, *sizes, *strides, WRITE=True, **meta)
    return ok, ov, hTk, hTv, (cu, seq_idx, N, empty)


def scan_bwd(z, k, v, ok, ov, dok, dov, dhTk, dhTv, has_h0, aux, cu_seqlens=None, **opts):
    """Launch the backward ("scan" kernel; ``opts``: BT, BD, num_warps, schedule ('auto' |
    'loop' | 'chained'), chain_below, over _BWD_DEFAULTS). Returns (dz, dk, dv, dh0k, dh0v)."""
    B, T, H, D = k.shape
    dev = k.device
    cu, seq_idx, N, empty = aux
    BT, BD, NDB, NCH, NT, chained, warps = _bwd_plan(B, T, H, D, dev, opts)
    if dok is None:
        dok = torch.zeros((), dtype=k.dtype, device=dev).expand(k.shape)
    if dov is None:
        dov = torch.zeros((), dtype=v.dtype, device=dev).expand(v.shape)
    has_dfinal = dhTk is not None or dhTv is not None
    if has_dfinal:
        dhTk = (torch.zeros(N, H, D, device=dev) if dhTk is None else dhTk).float().contiguous()
        dhTv = (torch.zeros(N, H, D, device=dev) if dhTv is None else dhTv).float().contiguous()
    else:
        dhTk = dhTv = _dummy(dev, torch.float32)
    dz = _empty_like_layout(z)
    dk = _empty_like_layout(k)
    dv = _empty_like_layout(v)
    if has_h0:
        if has_dfinal and empty is not None:  # an empty sequence passes dfinal straight to dh0
            dh0k = torch.where(empty[:, None, None], dhTk, 0.)
            dh0v = torch.where(empty[:, None, None], dhTv, 0.)
        elif has_dfinal and T == 0:
            dh0k, dh0v = dhTk.clone(), dhTv.clone()
        else:
            dh0k = torch.zeros(N, H, D, dtype=torch.float32, device=dev)
            dh0v = torch.zeros(N, H, D, dtype=torch.float32, device=dev)
    else:
        dh0k = dh0v = _dummy(dev, torch.float32)
    if T > 0:
        flags, ws_agg, ws_inc = _workspace(dev, chained, NT, NCH, BD)
        grid = (NCH * NT,) if chained else (NCH,)
        _bwd_kernel[grid](z, k, v, ok, ov, dok, dov, dz, dk, dv, dhTk, dhTv, dh0k, dh0v, cu,
                          seq_idx, flags, ws_agg, ws_inc, T, H, D, NDB, NT,
                          *_strides4(z), *_strides4(k), *_strides4(v), *_strides4(ok),
                          *_strides4(ov), *_strides4(dok), *_strides4(dov), *_strides4(dz),
                          *_strides4(dk), *_strides4(dv), BT=BT, BD=BD, HAS_H0=has_h0,
                          HAS_DFINAL=has_dfinal, VARLEN=cu_seqlens is not None, CHAINED=chained,
                          WHILE_LOOP=_interpreting(), num_warps=warps)
    if not has_h0:
        dh0k = dh0v = None
    return dz, dk, dv, dh0k, dh0v



class MemoryScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, k, v, h0k, h0v, cu_seqlens, fwd_opts, bwd_opts):
        ok, ov, hTk, hTv, aux = scan_fwd(z, k, v, h0k, h0v, cu_seqlens, **fwd_opts)
        ctx.save_for_backward(z, k, v, ok, ov)
        ctx.aux, ctx.has_h0, ctx.cu_seqlens = aux, h0k is not None, cu_seqlens
        ctx.bwd_opts = bwd_opts
        ctx.set_materialize_grads(False)
        return ok, ov, hTk, hTv

    @staticmethod
    def backward(ctx, dok, dov, dhTk, dhTv):
        z, k, v, ok, ov = ctx.saved_tensors
        dz, dk, dv, dh0k, dh0v = scan_bwd(z, k, v, ok, ov, dok, dov, dhTk, dhTv, ctx.has_h0,
                                          ctx.aux, ctx.cu_seqlens, **ctx.bwd_opts)
        return dz, dk, dv, dh0k, dh0v, None, None, None


def memory_scan_fused(g_logits, k, v, initial_state: State | None = None, cu_seqlens=None,
                      output_final_state: bool = False, fwd: dict | None = None,
                      bwd: dict | None = None):
    """Triton twin of ``memory_scan_torch`` (same arguments and returns). ``fwd`` / ``bwd`` tune
    the launch of each direction (see scan_fwd / scan_bwd); without them each direction takes
    its measured defaults (_FWD_DEFAULTS with the CT rule, _BWD_DEFAULTS)."""
    if g_logits.shape != k.shape or v.shape != k.shape or k.dim() != 4:
        raise ValueError(f"g_logits, k and v must share one [batch, seq, heads, dim] shape, got "
                         f"{tuple(g_logits.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _options(fwd, _FWD_DEFAULTS, "forward")  # a misspelt option fails here, not in the backward
    _options(bwd, _BWD_DEFAULTS, "backward")
    h0k, h0v = (None, None) if initial_state is None else initial_state
    ok, ov, hTk, hTv = MemoryScanFunction.apply(g_logits, k, v, h0k, h0v, cu_seqlens, fwd or {},
                                                bwd or {})
    if output_final_state:
        return ok, ov, (hTk, hTv)
    return ok, ov


def memory_scan_step_fused(g_logits, k, v, state: State):
    """One decoding step (inputs [batch, heads, dim]); returns (k~_t, v~_t, (k_state, v_state))."""
    B, H, D = k.shape
    sk, sv = state
    ok = torch.empty_like(k)
    ov = torch.empty_like(v)
    nk = torch.empty(B, H, D, dtype=torch.float32, device=k.device)
    nv = torch.empty_like(nk)
    BD = min(128, triton.next_power_of_2(D))
    grid = (B * H, triton.cdiv(D, BD))
    _step_kernel[grid](g_logits, k, v, sk, sv, ok, ov, nk, nv, H, D, *g_logits.stride(),
                       *k.stride(), *v.stride(), *sk.stride(), *sv.stride(), *ok.stride(),
                       *ov.stride(), BD=BD, num_warps=1)
    return ok, ov, (nk, nv)


