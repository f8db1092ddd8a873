"""Fused Triton kernels for the decaying-memory scan (equations in naive.py).

One pass does everything: sigmoid of the gate logits in fp32, the (1 - g) scaling, the
recurrence for k and v with an fp32 state, outputs in the input dtype, resets at packed-sequence
starts (``cu_seqlens``), initial and final state.

Work split: a *channel block* is one (batch, head, BD channels) column of the input; time is
cut into tiles of BT steps. Inside a tile the recurrence h_t = a_t h_{t-1} + b_t is solved by
``tl.associative_scan`` over the tile's rows (pairs (a, b) compose as affine maps), so a tile
costs one [BT, BD] load per input and one store per output. Two schedules:

* ``loop``: one program per channel block walks its tiles in order, carrying the state in
  registers. Enough when there are many channel blocks (batch * heads * dim / BD >> SMs).
* ``chained``: one program per (tile, channel block). Programs take a ticket from an atomic
  counter (time-major), so a tile's predecessors were started before it; each tile publishes its
  affine aggregate, then looks back over its predecessors (decoupled look-back) until it meets
  one that published its inclusive state. The chain lets a batch-1 sequence use the whole GPU
  with each byte still read once. Flags are per channel (lane) so that every lane orders its
  own data with its own release / acquire pair.

Backward: the same machinery on the reversed sequence. With delta_t = dL/dh_t (through the
whole future), delta_t = dh_t + g_{t+1} delta_{t+1} (cut at sequence ends) and
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
def _fwd_tile(z_ptr, k_ptr, v_ptr, szt, szd, skt, skd, svt, svd, h0k, h0v, cu, seq_idx,
              c, b, hh, H, T, D, d, dm,
              BT: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr):
    """Affine scan of one tile: returns (A, Bk, Bv, n, is_end, t, io_mask) with h = A h_in + B."""
    r = tl.arange(0, BT)
    t = (c * BT + r).to(tl.int64)
    tm = t < T
    io = tm[:, None] & dm[None, :]
    zl = tl.load(z_ptr + t[:, None] * szt + d[None, :] * szd, mask=io, other=0.).to(tl.float32)
    kx = tl.load(k_ptr + t[:, None] * skt + d[None, :] * skd, mask=io, other=0.).to(tl.float32)
    vx = tl.load(v_ptr + t[:, None] * svt + d[None, :] * svd, mask=io, other=0.).to(tl.float32)
    g = tl.sigmoid(zl)
    omg = tl.sigmoid(-zl)  # 1 - g without cancellation for gates near 1
    n, is_start, is_end = _row_info(cu, seq_idx, t, tm, b, T, VARLEN)
    bk = omg * kx
    bv = omg * vx
    if HAS_H0:
        sidx = (n * H + hh).to(tl.int64)[:, None] * D + d[None, :]
        smask = is_start[:, None] & dm[None, :]
        bk += g * tl.load(h0k + sidx, mask=smask, other=0.)
        bv += g * tl.load(h0v + sidx, mask=smask, other=0.)
    a = tl.where(is_start[:, None], 0., g)
    # rows past the end are the identity map, so the last row carries the last real state
    a = tl.where(tm[:, None], a, 1.)
    bk = tl.where(tm[:, None], bk, 0.)
    bv = tl.where(tm[:, None], bv, 0.)
    A, Bk, Bv = tl.associative_scan((a, bk, bv), axis=0, combine_fn=_affine_combine)
    return A, Bk, Bv, n, is_end, t, io


@triton.jit
def _fwd_store(ok_ptr, ov_ptr, sokt, sokd, sovt, sovd, hTk, hTv, hk, hv, n, is_end, t, io,
               hh, H, D, d, dm, STORE_FINAL: tl.constexpr):
    tl.store(ok_ptr + t[:, None] * sokt + d[None, :] * sokd, hk.to(ok_ptr.dtype.element_ty), mask=io)
    tl.store(ov_ptr + t[:, None] * sovt + d[None, :] * sovd, hv.to(ov_ptr.dtype.element_ty), mask=io)
    if STORE_FINAL:
        sidx = (n * H + hh).to(tl.int64)[:, None] * D + d[None, :]
        fmask = is_end[:, None] & dm[None, :]
        tl.store(hTk + sidx, hk, mask=fmask)
        tl.store(hTv + sidx, hv, mask=fmask)


@triton.jit
def _fwd_loop_body(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, szt, szd, skt, skd, svt, svd,
                   sokt, sokd, sovt, sovd, h0k, h0v, hTk, hTv, cu, seq_idx, c, b, hh, H, T, D,
                   d, dm, ck, cv, r, BT: tl.constexpr, HAS_H0: tl.constexpr,
                   VARLEN: tl.constexpr, STORE_FINAL: tl.constexpr):
    A, Bk, Bv, n, is_end, t, io = _fwd_tile(z_ptr, k_ptr, v_ptr, szt, szd, skt, skd, svt, svd,
                                            h0k, h0v, cu, seq_idx, c, b, hh, H, T, D, d, dm,
                                            BT, HAS_H0, VARLEN)
    hk = A * ck[None, :] + Bk
    hv = A * cv[None, :] + Bv
    _fwd_store(ok_ptr, ov_ptr, sokt, sokd, sovt, sovd, hTk, hTv, hk, hv, n, is_end, t, io,
               hh, H, D, d, dm, STORE_FINAL)
    return _row(hk, r, BT - 1), _row(hv, r, BT - 1)


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


# --------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, flags, ws_agg, ws_inc,
                T, H, D, NDB, NT,
                szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                sokb, sokt, sokh, sokd, sovb, sovt, sovh, sovd,
                BT: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr,
                STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr, CHAINED: tl.constexpr,
                WHILE_LOOP: tl.constexpr):
    if CHAINED:
        NCH = tl.num_programs(0) // NT
        tid = tl.atomic_add(flags + NT * NCH * BD, 1)  # the ticket counter sits after the flags
        c = tid // NCH
        j = tid % NCH
    else:
        NCH = tl.num_programs(0)
        c = 0
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
    r = tl.arange(0, BT)
    if CHAINED:
        A, Bk, Bv, n, is_end, t, io = _fwd_tile(z_ptr, k_ptr, v_ptr, szt, szd, skt, skd, svt, svd,
                                                h0k, h0v, cu, seq_idx, c, b, hh, H, T, D, d, dm,
                                                BT, HAS_H0, VARLEN)
        ek = _row(Bk, r, BT - 1)
        ev = _row(Bv, r, BT - 1)
        slot = tid
        ps = slot.to(tl.int64) * BD + lane
        if c == 0:
            hk = Bk
            hv = Bv
        else:
            tl.store(ws_agg + 3 * ps, _row(A, r, BT - 1))
            tl.store(ws_agg + 3 * ps + 1, ek)
            tl.store(ws_agg + 3 * ps + 2, ev)
            tl.atomic_xchg(flags + ps, 1, sem="release")
            sk, sv = _lookback(flags, ws_agg, ws_inc, slot, NCH, lane, BD, c)
            hk = A * sk[None, :] + Bk
            hv = A * sv[None, :] + Bv
            ek = _row(hk, r, BT - 1)
            ev = _row(hv, r, BT - 1)
        if c < NT - 1:
            tl.store(ws_inc + 2 * ps, ek)
            tl.store(ws_inc + 2 * ps + 1, ev)
            tl.atomic_xchg(flags + ps, 2, sem="release")
        _fwd_store(ok_ptr, ov_ptr, sokt, sokd, sovt, sovd, hTk, hTv, hk, hv, n, is_end, t, io,
                   hh, H, D, d, dm, STORE_FINAL)
    else:
        ck = tl.zeros([BD], tl.float32)
        cv = tl.zeros([BD], tl.float32)
        if WHILE_LOOP:  # the interpreter cannot index range() with numpy >= 2.5 scalars
            c = 0
            while c < NT:
                ck, cv = _fwd_loop_body(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, szt, szd, skt, skd,
                                        svt, svd, sokt, sokd, sovt, sovd, h0k, h0v, hTk, hTv, cu,
                                        seq_idx, c, b, hh, H, T, D, d, dm, ck, cv, r, BT,
                                        HAS_H0, VARLEN, STORE_FINAL)
                c += 1
        else:
            for c in range(0, NT):
                ck, cv = _fwd_loop_body(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, szt, szd, skt, skd,
                                        svt, svd, sokt, sokd, sovt, sovd, h0k, h0v, hTk, hTv, cu,
                                        seq_idx, c, b, hh, H, T, D, d, dm, ck, cv, r, BT,
                                        HAS_H0, VARLEN, STORE_FINAL)


# --------------------------------------------------------------------------------------------
# backward


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

# Defaults from bench/results/scan.json (H200, bf16, 32 heads x 128): the "scan" kernel is the
# one measured there; forward: chained BT32 BD64 w2 was fastest at batch 1 and 8; backward:
# BT64 BD32 w4, chained at batch 1 and loop at batch 8 (chain_below = 4 x SMs channel blocks).
# The "rows" kernels pass every CPU test and ran on the GPU (forward) but are not yet timed there.
# fwd_kernel: the forward's kernel when opts name none ('scan' | 'rows' | 'chunk' | 'chunklb');
# the wide kernels ('chunk', 'chunklb', forward only) are not the default until timed on the GPU.
_DEFAULTS = {"kernel": "scan", "fwd_kernel": "scan", "schedule": "auto", "chain_below": 4}
_KERNEL_DEFAULTS = {
    ("rows", "fwd"): {"BT": 16, "BD": 32, "num_warps": 1},
    ("rows", "bwd"): {"BT": 16, "BD": 32, "num_warps": 1},
    ("scan", "fwd"): {"BT": 32, "BD": 64, "num_warps": 2, "schedule": "chained"},
    ("scan", "bwd"): {"BT": 64, "BD": 32, "num_warps": 4},
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def _empty_like_layout(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A dense tensor with x's shape and x's dimension order (a transposed view stays one)."""
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), -i))
    y = torch.empty([x.shape[i] for i in order], dtype=dtype or x.dtype, device=x.device)
    inv = [order.index(i) for i in range(x.dim())]
    return y.permute(inv)


def _plan(batch: int, T: int, H: int, D: int, device, opts: dict, direction: str):
    given = {k: v for k, v in opts.items() if v is not None}
    if direction == "bwd" and given.get("kernel") in _WIDE_KERNELS:
        given = {}  # forward-only kernels: the backward takes its own defaults
    kernel = given.get("kernel", _DEFAULTS["kernel"])
    if (kernel, direction) not in _KERNEL_DEFAULTS:
        raise ValueError(f"kernel must be 'scan' or 'rows', got {kernel!r}")
    cfg = {**_DEFAULTS, **_KERNEL_DEFAULTS[(kernel, direction)], **given}
    BD = min(cfg["BD"], triton.next_power_of_2(D))
    BT = cfg["BT"]
    NDB = triton.cdiv(D, BD)
    NCH = batch * H * NDB
    NT = max(1, triton.cdiv(T, BT))
    schedule = cfg["schedule"]
    if schedule == "auto":
        schedule = "chained" if (NT > 1 and NCH < cfg["chain_below"] * _num_sms(device)) else "loop"
    if NT == 1:
        schedule = "loop"
    return BT, BD, NDB, NCH, NT, schedule == "chained", cfg["num_warps"], kernel == "rows"


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
    """Launch the forward kernel. Returns (k~, v~, final_k, final_v, aux for the backward)."""
    B, T, H, D = k.shape
    dev = k.device
    cu, seq_idx, N, empty = _varlen_index(cu_seqlens, B, T, dev)
    fkernel = opts.get("kernel") or _DEFAULTS["fwd_kernel"]
    wide = fkernel in _WIDE_KERNELS
    if wide:
        opts = {**opts, "kernel": fkernel}
    else:
        BT, BD, NDB, NCH, NT, chained, warps, rows = _plan(B, T, H, D, dev, opts, "fwd")
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
    if T > 0 and wide:
        _wide_fwd(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, has_h0,
                  cu_seqlens is not None, fkernel, opts)
    elif T > 0:
        flags, ws_agg, ws_inc = _workspace(dev, chained, NT, NCH, BD)
        grid = (NCH * NT,) if chained else (NCH,)
        kern = _fwd_rows_kernel if rows else _fwd_kernel
        kern[grid](z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, flags, ws_agg,
                          ws_inc, T, H, D, NDB, NT, *_strides4(z), *_strides4(k), *_strides4(v),
                          *_strides4(ok), *_strides4(ov), BT=BT, BD=BD, HAS_H0=has_h0,
                          STORE_FINAL=True, VARLEN=cu_seqlens is not None, CHAINED=chained,
                          WHILE_LOOP=_interpreting(), num_warps=warps)
    return ok, ov, hTk, hTv, (cu, seq_idx, N, empty)


def scan_bwd(z, k, v, ok, ov, dok, dov, dhTk, dhTv, has_h0, aux, cu_seqlens=None, **opts):
    B, T, H, D = k.shape
    dev = k.device
    cu, seq_idx, N, empty = aux
    BT, BD, NDB, NCH, NT, chained, warps, rows = _plan(B, T, H, D, dev, opts, "bwd")
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
        kern = _bwd_rows_kernel if rows else _bwd_kernel
        kern[grid](z, k, v, ok, ov, dok, dov, dz, dk, dv, dhTk, dhTv, dh0k, dh0v, cu,
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
    def forward(ctx, z, k, v, h0k, h0v, cu_seqlens, opts):
        ok, ov, hTk, hTv, aux = scan_fwd(z, k, v, h0k, h0v, cu_seqlens, **opts)
        ctx.save_for_backward(z, k, v, ok, ov)
        ctx.aux, ctx.has_h0, ctx.cu_seqlens, ctx.opts = aux, h0k is not None, cu_seqlens, opts
        ctx.set_materialize_grads(False)
        return ok, ov, hTk, hTv

    @staticmethod
    def backward(ctx, dok, dov, dhTk, dhTv):
        z, k, v, ok, ov = ctx.saved_tensors
        dz, dk, dv, dh0k, dh0v = scan_bwd(z, k, v, ok, ov, dok, dov, dhTk, dhTv, ctx.has_h0,
                                          ctx.aux, ctx.cu_seqlens, **ctx.opts)
        return dz, dk, dv, dh0k, dh0v, None, None


def memory_scan_fused(g_logits, k, v, initial_state: State | None = None, cu_seqlens=None,
                      output_final_state: bool = False, **opts):
    """Triton twin of ``memory_scan_torch`` (same arguments and returns); ``opts`` tune the
    launch of both directions: kernel ('scan' | 'rows'), BT, BD, num_warps, schedule
    ('auto' | 'loop' | 'chained'), chain_below. Without opts each direction takes its measured
    defaults (_KERNEL_DEFAULTS)."""
    if g_logits.shape != k.shape or v.shape != k.shape or k.dim() != 4:
        raise ValueError(f"g_logits, k and v must share one [batch, seq, heads, dim] shape, got "
                         f"{tuple(g_logits.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    h0k, h0v = (None, None) if initial_state is None else initial_state
    ok, ov, hTk, hTv = MemoryScanFunction.apply(g_logits, k, v, h0k, h0v, cu_seqlens, opts)
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


# --------------------------------------------------------------------------------------------
# "rows" kernels: the same two schedules, but each thread owns whole channels and walks the
# tile's rows one after another (unrolled), so the recurrence is a plain FMA chain in registers:
# no cross-thread scan, no shuffles, no shared memory. The chained schedule reads a tile twice
# (aggregate pass, then output pass once the carry is known); the second read hits L1/L2.


@triton.jit
def _sig2(zl):
    """(sigmoid(z), 1 - sigmoid(z)) with one exp and one reciprocal, both accurate."""
    e = tl.exp(-tl.abs(zl))
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = zl >= 0
    return tl.where(pos, r, er), tl.where(pos, er, r)


@triton.jit
def _scalar_row_info(cu, seq_idx, t, b, T, VARLEN: tl.constexpr):
    if VARLEN:
        tt = tl.minimum(t, T - 1)
        n = tl.load(seq_idx + tt)
        s = tl.load(cu + n)
        e = tl.load(cu + n + 1)
        return n, (t == s) & (t < T), (t == e - 1) & (t < T)
    else:
        return b, t == 0, t == T - 1


@triton.jit
def _fwd_row(z_ptr, k_ptr, v_ptr, szt, szd, skt, skd, svt, svd, h0k, h0v, cu, seq_idx,
             t, b, hh, H, T, D, d, dm, HAS_H0: tl.constexpr, VARLEN: tl.constexpr):
    """Coefficients of one row: h_t = a h_{t-1} + (bk | bv); identity past the end."""
    t64 = t.to(tl.int64)
    valid = t < T
    m = dm & valid
    zl = tl.load(z_ptr + t64 * szt + d * szd, mask=m, other=0.).to(tl.float32)
    kx = tl.load(k_ptr + t64 * skt + d * skd, mask=m, other=0.).to(tl.float32)
    vx = tl.load(v_ptr + t64 * svt + d * svd, mask=m, other=0.).to(tl.float32)
    g, omg = _sig2(zl)
    n, is_start, is_end = _scalar_row_info(cu, seq_idx, t, b, T, VARLEN)
    bk = omg * kx
    bv = omg * vx
    if HAS_H0:
        sidx = (n * H + hh).to(tl.int64) * D + d
        bk += g * tl.load(h0k + sidx, mask=m & is_start, other=0.)
        bv += g * tl.load(h0v + sidx, mask=m & is_start, other=0.)
    a = tl.where(is_start, 0., g)
    a = tl.where(valid, a, 1.)
    return a, bk, bv, n, is_end, t64, m


@triton.jit
def _fwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, szt, szd, skt, skd, svt, svd,
                  sokt, sokd, sovt, sovd, h0k, h0v, hTk, hTv, cu, seq_idx, c, b, hh, H, T, D,
                  d, dm, hk, hv, BT: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr):
    for i in tl.static_range(BT):
        a, bk, bv, n, is_end, t64, m = _fwd_row(z_ptr, k_ptr, v_ptr, szt, szd, skt, skd, svt,
                                                 svd, h0k, h0v, cu, seq_idx, c * BT + i, b, hh,
                                                 H, T, D, d, dm, HAS_H0, VARLEN)
        hk = a * hk + bk
        hv = a * hv + bv
        tl.store(ok_ptr + t64 * sokt + d * sokd, hk.to(ok_ptr.dtype.element_ty), mask=m)
        tl.store(ov_ptr + t64 * sovt + d * sovd, hv.to(ov_ptr.dtype.element_ty), mask=m)
        sidx = (n * H + hh).to(tl.int64) * D + d
        tl.store(hTk + sidx, hk, mask=m & is_end)
        tl.store(hTv + sidx, hv, mask=m & is_end)
    return hk, hv


@triton.jit
def _fwd_rows_kernel(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, flags, ws_agg, ws_inc,
                     T, H, D, NDB, NT,
                     szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                     sokb, sokt, sokh, sokd, sovb, sovt, sovh, sovd,
                     BT: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr,
                     STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr, CHAINED: tl.constexpr,
                     WHILE_LOOP: tl.constexpr):
    if CHAINED:
        NCH = tl.num_programs(0) // NT
        tid = tl.atomic_add(flags + NT * NCH * BD, 1)
        c = tid // NCH
        j = tid % NCH
    else:
        NCH = tl.num_programs(0)
        c = 0
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
    if CHAINED:
        sk = tl.zeros([BD], tl.float32)
        sv = tl.zeros([BD], tl.float32)
        ps = tid.to(tl.int64) * BD + lane
        if c > 0:
            A = tl.full([BD], 1.0, tl.float32)
            Bk = tl.zeros([BD], tl.float32)
            Bv = tl.zeros([BD], tl.float32)
            for i in tl.static_range(BT):
                a, bk, bv, n, is_end, t64, m = _fwd_row(z_ptr, k_ptr, v_ptr, szt, szd, skt, skd,
                                                         svt, svd, h0k, h0v, cu, seq_idx,
                                                         c * BT + i, b, hh, H, T, D, d, dm,
                                                         HAS_H0, VARLEN)
                A = a * A
                Bk = a * Bk + bk
                Bv = a * Bv + bv
            tl.store(ws_agg + 3 * ps, A)
            tl.store(ws_agg + 3 * ps + 1, Bk)
            tl.store(ws_agg + 3 * ps + 2, Bv)
            tl.atomic_xchg(flags + ps, 1, sem="release")
            sk, sv = _lookback(flags, ws_agg, ws_inc, tid, NCH, lane, BD, c)
        hk, hv = _fwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, szt, szd, skt, skd, svt, svd,
                               sokt, sokd, sovt, sovd, h0k, h0v, hTk, hTv, cu, seq_idx, c, b, hh,
                               H, T, D, d, dm, sk, sv, BT, HAS_H0, VARLEN)
        if c < NT - 1:
            tl.store(ws_inc + 2 * ps, hk)
            tl.store(ws_inc + 2 * ps + 1, hv)
            tl.atomic_xchg(flags + ps, 2, sem="release")
    else:
        hk = tl.zeros([BD], tl.float32)
        hv = tl.zeros([BD], tl.float32)
        if WHILE_LOOP:
            c = 0
            while c < NT:
                hk, hv = _fwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, szt, szd, skt, skd,
                                       svt, svd, sokt, sokd, sovt, sovd, h0k, h0v, hTk, hTv, cu,
                                       seq_idx, c, b, hh, H, T, D, d, dm, hk, hv, BT, HAS_H0,
                                       VARLEN)
                c += 1
        else:
            for c in range(0, NT):
                hk, hv = _fwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, szt, szd, skt, skd,
                                       svt, svd, sokt, sokd, sovt, sovd, h0k, h0v, hTk, hTv, cu,
                                       seq_idx, c, b, hh, H, T, D, d, dm, hk, hv, BT, HAS_H0,
                                       VARLEN)


@triton.jit
def _bwd_row_coef(z_ptr, dok_ptr, dov_ptr, szt, szd, sdkt, sdkd, sdvt, sdvd, dhTk, dhTv, cu,
                  seq_idx, t, b, hh, H, T, D, d, dm, HAS_DFINAL: tl.constexpr,
                  VARLEN: tl.constexpr):
    """delta_t = dh_t + u (u: what flows in from t+1); u_out = m_t g_t delta_t, m_t = 0 at starts."""
    t64 = t.to(tl.int64)
    valid = t < T
    m = dm & valid
    zl = tl.load(z_ptr + t64 * szt + d * szd, mask=m, other=0.).to(tl.float32)
    dhk = tl.load(dok_ptr + t64 * sdkt + d * sdkd, mask=m, other=0.).to(tl.float32)
    dhv = tl.load(dov_ptr + t64 * sdvt + d * sdvd, mask=m, other=0.).to(tl.float32)
    g, omg = _sig2(zl)
    n, is_start, is_end = _scalar_row_info(cu, seq_idx, t, b, T, VARLEN)
    if HAS_DFINAL:
        sidx = (n * H + hh).to(tl.int64) * D + d
        dhk += tl.load(dhTk + sidx, mask=m & is_end, other=0.)
        dhv += tl.load(dhTv + sidx, mask=m & is_end, other=0.)
    a = tl.where(is_start, 0., g)
    a = tl.where(valid, a, 1.)
    return a, dhk, dhv, g, omg, n, is_start, t64, m, valid


@triton.jit
def _bwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr, dz_ptr, dk_ptr, dv_ptr,
                  szt, szd, skt, skd, svt, svd, sokt, sokd, sovt, sovd, sdkt, sdkd, sdvt, sdvd,
                  sgzt, sgzd, sgkt, sgkd, sgvt, sgvd, dhTk, dhTv, dh0k, dh0v, cu, seq_idx,
                  c, b, hh, H, T, D, d, dm, uk, uv, BT: tl.constexpr, HAS_H0: tl.constexpr,
                  HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr):
    for i in tl.static_range(BT):
        t = c * BT + (BT - 1 - i)
        a, dhk, dhv, g, omg, n, is_start, t64, m, valid = _bwd_row_coef(
            z_ptr, dok_ptr, dov_ptr, szt, szd, sdkt, sdkd, sdvt, sdvd, dhTk, dhTv, cu, seq_idx,
            t, b, hh, H, T, D, d, dm, HAS_DFINAL, VARLEN)
        delk = dhk + uk
        delv = dhv + uv
        kx = tl.load(k_ptr + t64 * skt + d * skd, mask=m, other=0.).to(tl.float32)
        vx = tl.load(v_ptr + t64 * svt + d * svd, mask=m, other=0.).to(tl.float32)
        hk = tl.load(ok_ptr + t64 * sokt + d * sokd, mask=m, other=0.).to(tl.float32)
        hv = tl.load(ov_ptr + t64 * sovt + d * sovd, mask=m, other=0.).to(tl.float32)
        dz = omg * (delk * (hk - kx) + delv * (hv - vx))
        tl.store(dz_ptr + t64 * sgzt + d * sgzd, dz.to(dz_ptr.dtype.element_ty), mask=m)
        tl.store(dk_ptr + t64 * sgkt + d * sgkd, (omg * delk).to(dk_ptr.dtype.element_ty), mask=m)
        tl.store(dv_ptr + t64 * sgvt + d * sgvd, (omg * delv).to(dv_ptr.dtype.element_ty), mask=m)
        if HAS_H0:
            sidx = (n * H + hh).to(tl.int64) * D + d
            tl.store(dh0k + sidx, g * delk, mask=m & is_start)
            tl.store(dh0v + sidx, g * delv, mask=m & is_start)
        uk = tl.where(valid, a * delk, uk)
        uv = tl.where(valid, a * delv, uv)
    return uk, uv


@triton.jit
def _bwd_rows_kernel(z, k, v, ok, ov, dok, dov, dz, dk, dv, dhTk, dhTv, dh0k, dh0v, cu, seq_idx,
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
        tid = tl.atomic_add(flags + NT * NCH * BD, 1)
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
    if CHAINED:
        c = NT - 1 - co
        uk = tl.zeros([BD], tl.float32)
        uv = tl.zeros([BD], tl.float32)
        ps = tid.to(tl.int64) * BD + lane
        if co > 0:
            A = tl.full([BD], 1.0, tl.float32)
            Bk = tl.zeros([BD], tl.float32)
            Bv = tl.zeros([BD], tl.float32)
            for i in tl.static_range(BT):
                a, dhk, dhv, g, omg, n, is_start, t64, m, valid = _bwd_row_coef(
                    z_ptr, dok_ptr, dov_ptr, szt, szd, sdkt, sdkd, sdvt, sdvd, dhTk, dhTv, cu,
                    seq_idx, c * BT + (BT - 1 - i), b, hh, H, T, D, d, dm, HAS_DFINAL, VARLEN)
                Bk = tl.where(valid, a * (Bk + dhk), Bk)
                Bv = tl.where(valid, a * (Bv + dhv), Bv)
                A = a * A
            tl.store(ws_agg + 3 * ps, A)
            tl.store(ws_agg + 3 * ps + 1, Bk)
            tl.store(ws_agg + 3 * ps + 2, Bv)
            tl.atomic_xchg(flags + ps, 1, sem="release")
            uk, uv = _lookback(flags, ws_agg, ws_inc, tid, NCH, lane, BD, co)
        uk, uv = _bwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr, dz_ptr,
                               dk_ptr, dv_ptr, szt, szd, skt, skd, svt, svd, sokt, sokd, sovt,
                               sovd, sdkt, sdkd, sdvt, sdvd, sgzt, sgzd, sgkt, sgkd, sgvt, sgvd,
                               dhTk, dhTv, dh0k, dh0v, cu, seq_idx, c, b, hh, H, T, D, d, dm,
                               uk, uv, BT, HAS_H0, HAS_DFINAL, VARLEN)
        if co < NT - 1:
            tl.store(ws_inc + 2 * ps, uk)
            tl.store(ws_inc + 2 * ps + 1, uv)
            tl.atomic_xchg(flags + ps, 2, sem="release")
    else:
        uk = tl.zeros([BD], tl.float32)
        uv = tl.zeros([BD], tl.float32)
        if WHILE_LOOP:
            c = NT - 1
            while c >= 0:
                uk, uv = _bwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr,
                                       dz_ptr, dk_ptr, dv_ptr, szt, szd, skt, skd, svt, svd,
                                       sokt, sokd, sovt, sovd, sdkt, sdkd, sdvt, sdvd, sgzt, sgzd,
                                       sgkt, sgkd, sgvt, sgvd, dhTk, dhTv, dh0k, dh0v, cu, seq_idx,
                                       c, b, hh, H, T, D, d, dm, uk, uv, BT, HAS_H0, HAS_DFINAL,
                                       VARLEN)
                c -= 1
        else:
            for co in range(0, NT):
                uk, uv = _bwd_rows_out(z_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, dok_ptr, dov_ptr,
                                       dz_ptr, dk_ptr, dv_ptr, szt, szd, skt, skd, svt, svd,
                                       sokt, sokd, sovt, sovd, sdkt, sdkd, sdvt, sdvd, sgzt, sgzd,
                                       sgkt, sgkd, sgvt, sgvd, dhTk, dhTv, dh0k, dh0v, cu, seq_idx,
                                       NT - 1 - co, b, hh, H, T, D, d, dm, uk, uv, BT, HAS_H0,
                                       HAS_DFINAL, VARLEN)


# --------------------------------------------------------------------------------------------
# "wide" forward kernels (issue 3, after run 3): time inside each thread.
#
# A program's lanes are BH heads x BD channels of one batch row, flattened (L = BH * BD lanes,
# each head's BD channels contiguous in memory). A tile is [BT, L]: with L >= 8 * 32 * num_warps
# (bf16) the compiler spreads the threads over the lanes only, so the BT rows of a lane sit in
# one thread and ``tl.associative_scan`` over time is a plain per-thread FMA chain (no shuffles,
# no shared memory); narrower tiles put a few threads along time (one or two shuffle rounds).
# A program owns a *chunk* of CT = NSUB * BT steps and walks its NSUB tiles in order, carrying
# the state in registers; chunks are tied together in one of two ways:
#
# * ``chunk`` (three launches, no atomics): (1) each chunk's affine aggregate (reads z, k, v),
#   (2) a scan over the chunk aggregates per lane (tiny), (3) each chunk again from its carry,
#   writing the outputs (reads z, k, v, writes k~, v~): 8 tensors of traffic instead of 5.
# * ``chunklb`` (one launch): programs take time-major tickets; pass A computes the chunk
#   aggregate and publishes it, a decoupled look-back (``_lookback`` above, per lane) gives the
#   carry, the inclusive state is published at once, then pass B re-reads the chunk (the program
#   just read it: mostly L2 hits) and writes. Chains are NC = T / CT chunks long, not T / BT.


@triton.jit
def _lookback_window(flags, ws_agg, ws_inc, slot, NCH, lane, L: tl.constexpr, c,
                     W: tl.constexpr):
    """Decoupled look-back that reads W predecessors at once ([W, L] flags and data), so a chain
    of n chunks costs about n / W dependent round trips instead of n. Returns the state
    entering chunk c ([L] k and v). Rows are ordered farthest (row 0) to nearest (row W-1);
    predecessors before chunk 0 count as an inclusive zero state. Offsets are int32 relative to
    this program's own slot (few registers: [W, L] tiles are W values per lane and thread)."""
    rw = tl.arange(0, W)
    base = slot.to(tl.int64) * L
    fl = flags + base
    wa_p = ws_agg + 3 * base
    wi_p = ws_inc + 2 * base
    acc_a = tl.full([L], 1.0, tl.float32)  # acc: composition of the predecessors walked so far
    acc_k = tl.zeros([L], tl.float32)
    acc_v = tl.zeros([L], tl.float32)
    state_k = tl.zeros([L], tl.float32)
    state_v = tl.zeros([L], tl.float32)
    done = tl.zeros([L], tl.int32)
    hi = c - 1  # nearest predecessor not yet walked
    while tl.min(done, axis=0) == 0:
        p = hi - (W - 1) + rw  # [W] chunk indices, farthest first
        rel = ((p - c) * NCH)[:, None] * L + lane[None, :]  # slot offsets (negative)
        live = (done == 0)[None, :] & (p >= 0)[:, None]
        f = tl.where(live, tl.atomic_add(fl + rel, 0, mask=live, sem="acquire"), 2)
        while tl.min(tl.min(f, axis=1), axis=0) == 0:
            f = tl.where(live, tl.atomic_add(fl + rel, 0, mask=live, sem="acquire"), 2)
        agg = live & (f == 1)
        # an inclusive row (or one before chunk 0) is the map h -> inc: a = 0
        wa = tl.load(wa_p + 3 * rel, mask=agg, other=0., volatile=True)
        wk = tl.load(tl.where(agg, wa_p + 3 * rel + 1, wi_p + 2 * rel), mask=live, other=0.,
                     volatile=True)
        wv = tl.load(tl.where(agg, wa_p + 3 * rel + 2, wi_p + 2 * rel + 1), mask=live, other=0.,
                     volatile=True)
        A, Bk, Bv = tl.associative_scan((wa, wk, wv), axis=0, combine_fn=_affine_combine)
        ta = _row(A, rw, W - 1)
        tk = _row(Bk, rw, W - 1)
        tv = _row(Bv, rw, W - 1)
        hit = tl.max(tl.where(live & (f == 2), 1, 0), axis=0) > 0
        hit = hit | (hi - (W - 1) <= 0)  # the window reached chunk 0 (always inclusive)
        live1 = done == 0
        # state entering c = acc(window(h_before_window)); the window's map is a constant when
        # it holds an inclusive row
        state_k = tl.where(live1 & hit, acc_a * tk + acc_k, state_k)
        state_v = tl.where(live1 & hit, acc_a * tv + acc_v, state_v)
        acc_k = tl.where(live1, acc_a * tk + acc_k, acc_k)
        acc_v = tl.where(live1, acc_a * tv + acc_v, acc_v)
        acc_a = tl.where(live1, acc_a * ta, acc_a)
        done = tl.where(live1 & hit, 1, done)
        hi -= W
    return state_k, state_v


@triton.jit
def _wide_lanes(j, H, D, NDB, NHG, BH: tl.constexpr, BD: tl.constexpr):
    """Channel block j -> (batch, per-lane head, per-lane channel, lane mask, lane index)."""
    db = j % NDB
    rest = j // NDB
    hg = rest % NHG
    b = rest // NHG
    lane = tl.arange(0, BH * BD)
    hh = hg * BH + lane // BD
    d = db * BD + lane % BD
    lm = (hh < H) & (d < D)
    return b, hh, d, lm, lane


@triton.jit
def _wide_load(z, k, v, oz, okx, ovx, szt, skt, svt, t0, T, lm, ok_rows,
               BT: tl.constexpr):
    """Raw (input dtype) [BT, L] tiles of z, k, v from step t0; nothing loaded if not ok_rows."""
    t = t0.to(tl.int64) + tl.arange(0, BT)
    io = ((t < T) & ok_rows)[:, None] & lm[None, :]
    zl = tl.load(z + (oz[None, :] + t[:, None] * szt), mask=io, other=0.)
    kx = tl.load(k + (okx[None, :] + t[:, None] * skt), mask=io, other=0.)
    vx = tl.load(v + (ovx[None, :] + t[:, None] * svt), mask=io, other=0.)
    return zl, kx, vx


@triton.jit
def _wide_scan(zl, kx, vx, h0k, h0v, cu, seq_idx, t0, b, hh, H, T, D, d, lm, BT: tl.constexpr,
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
def _wide_chunk_agg(z, k, v, oz, okx, ovx, szt, skt, svt, h0k, h0v, cu, seq_idx, c, b, hh, H, T,
                    D, d, lm, L: tl.constexpr, BT: tl.constexpr, NSUB: tl.constexpr,
                    HAS_H0: tl.constexpr, VARLEN: tl.constexpr, PREFETCH: tl.constexpr):
    """Affine aggregate (A, Bk, Bv) of chunk c, each [L]: state after = A * state before + B.
    PREFETCH: the next tile's loads are issued before this tile's scan (two tiles in flight)."""
    r = tl.arange(0, BT)
    ga = tl.full([L], 1.0, tl.float32)
    gk = tl.zeros([L], tl.float32)
    gv = tl.zeros([L], tl.float32)
    t0 = c * (NSUB * BT)
    if PREFETCH:
        zl, kx, vx = _wide_load(z, k, v, oz, okx, ovx, szt, skt, svt, t0, T, lm, True, BT)
    for s in range(0, NSUB):
        ts = t0 + s * BT
        if PREFETCH:
            zn, kn, vn = _wide_load(z, k, v, oz, okx, ovx, szt, skt, svt, ts + BT, T, lm,
                                    s + 1 < NSUB, BT)
        else:
            zl, kx, vx = _wide_load(z, k, v, oz, okx, ovx, szt, skt, svt, ts, T, lm, True, BT)
        A, Bk, Bv, n, is_end, t, io = _wide_scan(zl, kx, vx, h0k, h0v, cu, seq_idx, ts, b, hh, H,
                                                 T, D, d, lm, BT, HAS_H0, VARLEN)
        ta = _row(A, r, BT - 1)
        gk = ta * gk + _row(Bk, r, BT - 1)
        gv = ta * gv + _row(Bv, r, BT - 1)
        ga = ta * ga
        if PREFETCH:
            zl, kx, vx = zn, kn, vn
    return ga, gk, gv


@triton.jit
def _wide_chunk_out(z, k, v, ok, ov, oz, okx, ovx, ook, oov, szt, skt, svt, sokt, sovt, h0k, h0v,
                    hTk, hTv, cu, seq_idx, c, b, hh, H, T, D, d, lm, hk, hv, BT: tl.constexpr,
                    NSUB: tl.constexpr, HAS_H0: tl.constexpr, VARLEN: tl.constexpr,
                    PREFETCH: tl.constexpr):
    """Chunk c from the carry (hk, hv): writes k~, v~ and the final states that end inside it."""
    r = tl.arange(0, BT)
    t0 = c * (NSUB * BT)
    if PREFETCH:
        zl, kx, vx = _wide_load(z, k, v, oz, okx, ovx, szt, skt, svt, t0, T, lm, True, BT)
    for s in range(0, NSUB):
        ts = t0 + s * BT
        if PREFETCH:
            zn, kn, vn = _wide_load(z, k, v, oz, okx, ovx, szt, skt, svt, ts + BT, T, lm,
                                    s + 1 < NSUB, BT)
        else:
            zl, kx, vx = _wide_load(z, k, v, oz, okx, ovx, szt, skt, svt, ts, T, lm, True, BT)
        A, Bk, Bv, n, is_end, t, io = _wide_scan(zl, kx, vx, h0k, h0v, cu, seq_idx, ts, b, hh, H,
                                                 T, D, d, lm, BT, HAS_H0, VARLEN)
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
        if PREFETCH:
            zl, kx, vx = zn, kn, vn
    if not VARLEN:
        last = (c + 1) * (NSUB * BT) >= T  # rows past T are the identity: the carry is final
        sidx = (b * H + hh).to(tl.int64) * D + d
        tl.store(hTk + sidx, hk, mask=lm & last)
        tl.store(hTv + sidx, hv, mask=lm & last)
    return hk, hv


@triton.jit
def _wide_offsets(hh, d, sh, sd, OFF64: tl.constexpr):
    """Per-lane offset inside one (batch, step) row; int32 (half the registers) unless the
    launcher saw a row span of 2**31 elements or more. The batch and step offsets are int64,
    added to the scalar base pointers."""
    if OFF64:
        return hh.to(tl.int64) * sh + d.to(tl.int64) * sd
    else:
        return hh * sh + d * sd


@triton.jit
def _wide_agg_kernel(z, k, v, h0k, h0v, cu, seq_idx, ws, T, H, D, NDB, NHG, NCHB, NC,
                     szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                     BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NSUB: tl.constexpr,
                     HAS_H0: tl.constexpr, VARLEN: tl.constexpr, PREFETCH: tl.constexpr,
                     OFF64: tl.constexpr):
    """Launch 1 of ``chunk``: grid (channel blocks, NC - 1); ws[3, NC, NCHB, L] gets aggregates."""
    j = tl.program_id(0)
    c = tl.program_id(1)
    L: tl.constexpr = BH * BD
    b, hh, d, lm, lane = _wide_lanes(j, H, D, NDB, NHG, BH, BD)
    b64 = b.to(tl.int64)
    z = z + b64 * szb
    k = k + b64 * skb
    v = v + b64 * svb
    ga, gk, gv = _wide_chunk_agg(z, k, v, _wide_offsets(hh, d, szh, szd, OFF64),
                                 _wide_offsets(hh, d, skh, skd, OFF64),
                                 _wide_offsets(hh, d, svh, svd, OFF64), szt, skt, svt, h0k, h0v,
                                 cu, seq_idx, c, b, hh, H, T, D, d, lm, L, BT, NSUB, HAS_H0,
                                 VARLEN, PREFETCH)
    plane = NC.to(tl.int64) * NCHB * L
    o = (c.to(tl.int64) * NCHB + j) * L + lane
    tl.store(ws + o, ga)
    tl.store(ws + plane + o, gk)
    tl.store(ws + 2 * plane + o, gv)


@triton.jit
def _wide_carry_kernel(ws, M, NC, NCB: tl.constexpr, CH: tl.constexpr):
    """Launch 2 of ``chunk``: per lane, the inclusive states of chunks 0..NC-2 (in place of the
    aggregates' B planes). M = lanes per chunk; blocks of NCB chunks, scanned in order."""
    col = tl.program_id(0) * CH + tl.arange(0, CH)
    cm = col < M
    plane = NC.to(tl.int64) * M
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


@triton.jit
def _wide_out_kernel(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, ws, T, H, D, NDB, NHG,
                     NCHB, NC, szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                     sokb, sokt, sokh, sokd, sovb, sovt, sovh, sovd,
                     BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NSUB: tl.constexpr,
                     HAS_H0: tl.constexpr, VARLEN: tl.constexpr, PREFETCH: tl.constexpr,
                     OFF64: tl.constexpr):
    """Launch 3 of ``chunk``: grid (channel blocks, NC); chunk c starts from chunk c-1's state."""
    j = tl.program_id(0)
    c = tl.program_id(1)
    L: tl.constexpr = BH * BD
    b, hh, d, lm, lane = _wide_lanes(j, H, D, NDB, NHG, BH, BD)
    b64 = b.to(tl.int64)
    z = z + b64 * szb
    k = k + b64 * skb
    v = v + b64 * svb
    ok = ok + b64 * sokb
    ov = ov + b64 * sovb
    plane = NC.to(tl.int64) * NCHB * L
    o = ((c - 1).to(tl.int64) * NCHB + j) * L + lane
    cm = (lane < L) & (c > 0)
    hk = tl.load(ws + plane + o, mask=cm, other=0.)
    hv = tl.load(ws + 2 * plane + o, mask=cm, other=0.)
    _wide_chunk_out(z, k, v, ok, ov, _wide_offsets(hh, d, szh, szd, OFF64),
                    _wide_offsets(hh, d, skh, skd, OFF64), _wide_offsets(hh, d, svh, svd, OFF64),
                    _wide_offsets(hh, d, sokh, sokd, OFF64),
                    _wide_offsets(hh, d, sovh, sovd, OFF64), szt, skt, svt, sokt, sovt,
                    h0k, h0v, hTk, hTv, cu, seq_idx, c, b, hh, H, T, D, d, lm, hk, hv, BT, NSUB,
                    HAS_H0, VARLEN, PREFETCH)


@triton.jit
def _wide_lb_kernel(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, flags, ws_agg, ws_inc,
                    T, H, D, NDB, NHG, NCHB, NC,
                    szb, szt, szh, szd, skb, skt, skh, skd, svb, svt, svh, svd,
                    sokb, sokt, sokh, sokd, sovb, sovt, sovh, sovd,
                    BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NSUB: tl.constexpr,
                    HAS_H0: tl.constexpr, VARLEN: tl.constexpr, PREFETCH: tl.constexpr,
                    LBW: tl.constexpr, PUBLISH_INC: tl.constexpr, OFF64: tl.constexpr):
    """``chunklb``: one program per (chunk, channel block), chained by decoupled look-back."""
    L: tl.constexpr = BH * BD
    tid = tl.atomic_add(flags + NC * NCHB * L, 1)  # ticket counter after the per-lane flags
    c = tid // NCHB
    j = tid % NCHB
    b, hh, d, lm, lane = _wide_lanes(j, H, D, NDB, NHG, BH, BD)
    b64 = b.to(tl.int64)
    z = z + b64 * szb
    k = k + b64 * skb
    v = v + b64 * svb
    ok = ok + b64 * sokb
    ov = ov + b64 * sovb
    oz = _wide_offsets(hh, d, szh, szd, OFF64)
    okx = _wide_offsets(hh, d, skh, skd, OFF64)
    ovx = _wide_offsets(hh, d, svh, svd, OFF64)
    ps = tid.to(tl.int64) * L + lane
    hk = tl.zeros([L], tl.float32)
    hv = tl.zeros([L], tl.float32)
    if c < NC - 1:
        ga, gk, gv = _wide_chunk_agg(z, k, v, oz, okx, ovx, szt, skt, svt, h0k, h0v, cu, seq_idx,
                                     c, b, hh, H, T, D, d, lm, L, BT, NSUB, HAS_H0, VARLEN,
                                     PREFETCH)
        if c > 0:
            tl.store(ws_agg + 3 * ps, ga)
            tl.store(ws_agg + 3 * ps + 1, gk)
            tl.store(ws_agg + 3 * ps + 2, gv)
            tl.atomic_xchg(flags + ps, 1, sem="release")
            if LBW > 1:
                hk, hv = _lookback_window(flags, ws_agg, ws_inc, tid, NCHB, lane, L, c, LBW)
            else:
                hk, hv = _lookback(flags, ws_agg, ws_inc, tid, NCHB, lane, L, c)
        if PUBLISH_INC or c == 0:  # (tests turn it off to walk the aggregates on CPU)
            tl.store(ws_inc + 2 * ps, ga * hk + gk)
            tl.store(ws_inc + 2 * ps + 1, ga * hv + gv)
            tl.atomic_xchg(flags + ps, 2, sem="release")
    elif c > 0:
        if LBW > 1:
            hk, hv = _lookback_window(flags, ws_agg, ws_inc, tid, NCHB, lane, L, c, LBW)
        else:
            hk, hv = _lookback(flags, ws_agg, ws_inc, tid, NCHB, lane, L, c)
    _wide_chunk_out(z, k, v, ok, ov, oz, okx, ovx, _wide_offsets(hh, d, sokh, sokd, OFF64),
                    _wide_offsets(hh, d, sovh, sovd, OFF64), szt, skt, svt, sokt, sovt,
                    h0k, h0v, hTk, hTv, cu, seq_idx, c, b, hh, H, T, D, d, lm, hk, hv, BT, NSUB,
                    HAS_H0, VARLEN, PREFETCH)


_WIDE_KERNELS = ("chunk", "chunklb")


def _wide_plan(B: int, T: int, H: int, D: int, device, cfg: dict):
    """(BT, BD, BH, NSUB, NDB, NHG, NCHB, NC) for the wide kernels. CT 'auto' (or None) picks a
    power of two so that there are about 8 programs per SM (fewer, longer chunks beyond that)."""
    BD = min(cfg.get("BD") or 128, triton.next_power_of_2(D))
    BH = max(1, min(cfg.get("BH") or 2, triton.next_power_of_2(H)))
    BT = cfg.get("BT") or 4
    NDB = triton.cdiv(D, BD)
    NHG = triton.cdiv(H, BH)
    NCHB = B * NHG * NDB
    CT = cfg.get("CT")
    if CT in (None, "auto"):
        want = triton.cdiv(T * NCHB, 8 * _num_sms(device))
        CT = min(max(triton.next_power_of_2(max(want, 1)), BT), 512)
    CT = max(BT, (CT // BT) * BT)
    NSUB = CT // BT
    NC = max(1, triton.cdiv(T, CT))
    return BT, BD, BH, NSUB, NDB, NHG, NCHB, NC


def _wide_fwd(z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, has_h0, varlen, kernel, cfg):
    B, T, H, D = k.shape
    dev = k.device
    BT, BD, BH, NSUB, NDB, NHG, NCHB, NC = _wide_plan(B, T, H, D, dev, cfg)
    L = BH * BD
    warps = cfg.get("num_warps") or max(1, min(4, L // 256))
    strides = (*_strides4(z), *_strides4(k), *_strides4(v))
    ostrides = (*_strides4(ok), *_strides4(ov))
    span = max((NHG * BH - 1) * x.stride(2) + (NDB * BD - 1) * x.stride(3)
               for x in (z, k, v, ok, ov))  # padded lanes included
    meta = dict(BT=BT, BD=BD, BH=BH, NSUB=NSUB, HAS_H0=has_h0, VARLEN=varlen,
                PREFETCH=bool(cfg.get("prefetch", True)), OFF64=span >= 2**31,
                num_warps=warps)
    if cfg.get("num_stages"):
        meta["num_stages"] = cfg["num_stages"]
    if kernel == "chunklb" and NC > 1:
        flags, ws_agg, ws_inc = _workspace(dev, True, NC, NCHB, L)
        LBW = cfg.get("lbw") or 4  # look-back window (1: one predecessor per round trip)
        _wide_lb_kernel[(NC * NCHB,)](z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, flags,
                                      ws_agg, ws_inc, T, H, D, NDB, NHG, NCHB, NC, *strides,
                                      *ostrides, LBW=LBW,
                                      PUBLISH_INC=bool(cfg.get("publish_inclusive", True)),
                                      **meta)
        return
    ws = _dummy(dev, torch.float32)
    if NC > 1:
        M = NCHB * L
        ws = torch.empty(3 * NC * M, dtype=torch.float32, device=dev)
        _wide_agg_kernel[(NCHB, NC - 1)](z, k, v, h0k, h0v, cu, seq_idx, ws, T, H, D, NDB, NHG,
                                         NCHB, NC, *strides, **meta)
        CH = 64
        NCB = min(64, triton.next_power_of_2(NC - 1))
        _wide_carry_kernel[(triton.cdiv(M, CH),)](ws, M, NC, NCB=NCB, CH=CH, num_warps=4)
    _wide_out_kernel[(NCHB, NC)](z, k, v, ok, ov, h0k, h0v, hTk, hTv, cu, seq_idx, ws, T, H, D,
                                 NDB, NHG, NCHB, NC, *strides, *ostrides, **meta)
