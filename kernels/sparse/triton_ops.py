"""Triton kernels of the sparse-attention ops (torch twins and conventions in naive.py).

* ``_meta_kernel``: one program per (row, page/block): min/max (Quest metadata, optionally int8
  with a step per page) or fp32 mean (MoBA block representative) over the valid keys, the page
  walked in tiles of BT tokens; in refresh mode one program per row, for the page being decoded.
* ``_mean_update_kernel``: decoding's incremental MoBA metadata, one program per (row, head):
  folds the new key into the running fp32 mean of the block holding its position.
* ``_quest_kernel``: one program per (query head, tile of pages): the channel-wise upper bound.
* MoBA selection (``moba_gate_topk``): the gate scores are fp32 matmuls (cuBLAS) over chunks of
  query positions; ``_select_topk_kernel`` below, told each row's own block, picks the past
  blocks' top (topk-1) and puts the own block after them.
* ``_select_topk_kernel``: Quest's top-k by a threshold search over the int32 image of the
  scores, from the row's [min, max], stopping once exactly k are at or above the threshold;
  ties to the lower index, ascending output, -1 padding.
* ``_decode_kernel`` + ``_merge_kernel``: split-K decoding over a *virtual token list*: the flat
  list of candidate positions of one query row (selected blocks in block_idx order, or the
  RAT+ dilated set: prefix, chunk ends, local window) is cut into splits; one program per (row,
  selection head, split) serves every query head sharing that list (tl.dot on the padded group),
  runs an online softmax over its tiles of gathered keys and writes (max, sum, acc); the merge
  combines the splits by log-sum-exp. Masked loads fetch nothing, so -1 slots and masked tokens
  cost no memory traffic. Launch config: DECODE_CFG (from the H200 sweep).
* ``_moba_prefill_kernel``: flash-attention style over query tiles that lie inside one block:
  every strictly-past block that some row of the tile selected is visited (rows that did not
  select it are masked), then the own block causally.
* ``_vote_lse_kernel`` / ``_vote_sum_kernel``: SnapKV's two passes; pass 1 splits the keys and
  keeps per-row (max, sum) partials (merged in torch, [B, H, S, W] only), pass 2 sums
  exp(s - lse) over the window rows per key tile. No [H, W, T] tensor exists.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .naive import I8_NUDGE, I8_STEP, _group, _q_pos, _seq_len, check_bounds_scale, check_quant

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_index_shim():
    """Under TRITON_INTERPRET=1 with numpy >= 2.5, ``range(n)`` over a runtime scalar fails
    (the interpreter's ``__index__`` calls int() on a 1-element array). Wrap the interpreter's
    tensor patch so that ``__index__`` takes the single element. Interpreter only; compiled
    kernels are untouched."""
    try:
        import numpy as np
        from triton.runtime import interpreter as itp
    except ImportError:  # pragma: no cover
        return
    orig = itp._patch_lang_tensor
    if getattr(orig, "_sparse_shim", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__",
                       lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._sparse_shim = True
    itp._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_index_shim()


def _p2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _pow2_divisor(n, cap):
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def _n_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# metadata


@triton.jit
def _meta_kernel(k_ptr, sl_ptr, o1_ptr, o2_ptr, sc_ptr, H, NP, D, PAGE,
                 skb, skh, skt, skd, sob, soh, sop, sod, ssb, ssh, ssp,
                 MEAN: tl.constexpr, QUANT: tl.constexpr, REFRESH: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr, STEP: tl.constexpr, NUDGE: tl.constexpr):
    """REFRESH: one program per row, the page holding position sl[b] (keys up to it); else
    page program_id(1) over the keys before sl[b]. QUANT: int8 bounds + fp32 step (naive.py)."""
    bh = tl.program_id(0)
    b = bh // H
    hh = bh % H
    if REFRESH:
        pos = tl.load(sl_ptr + b)
        p = pos // PAGE
        L = pos + 1
    else:
        p = tl.program_id(1)
        L = tl.load(sl_ptr + b)
    d = tl.arange(0, BD)
    dm = d < D
    base = k_ptr + b.to(tl.int64) * skb + hh.to(tl.int64) * skh
    lo = tl.full([BD], float("inf"), tl.float32)
    hi = tl.full([BD], float("-inf"), tl.float32)
    acc = tl.zeros([BD], tl.float32)
    cnt = 0.0
    s0 = p * PAGE
    s1 = tl.minimum(s0 + PAGE, L)
    for t0 in range(0, PAGE, BT):
        t = s0 + t0 + tl.arange(0, BT)
        tm = (t < s1) & (t < s0 + PAGE)
        x = tl.load(base + t.to(tl.int64)[:, None] * skt + d[None, :] * skd,
                    mask=tm[:, None] & dm[None, :], other=0.).to(tl.float32)
        if MEAN:
            acc += tl.sum(x, axis=0)
            cnt += tl.sum(tm.to(tl.float32), axis=0)
        else:
            lo = tl.minimum(lo, tl.min(tl.where(tm[:, None], x, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(tm[:, None], x, float("-inf")), axis=0))
    o = b.to(tl.int64) * sob + hh.to(tl.int64) * soh + p.to(tl.int64) * sop + d * sod
    if MEAN:
        tl.store(o1_ptr + o, acc / tl.maximum(cnt, 1.0), mask=dm)
    else:
        empty = s1 <= s0
        lo = tl.where(empty | (d >= D), 0.0, lo)
        hi = tl.where(empty | (d >= D), 0.0, hi)
        if QUANT:
            st = tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=0) * STEP
            dv = tl.where(st > 0, st, 1.0)
            lo = tl.where(lo == 0, 0.0, tl.minimum(tl.maximum(tl.floor(lo / dv - NUDGE), -127.0), 127.0))
            hi = tl.where(hi == 0, 0.0, tl.minimum(tl.maximum(tl.ceil(hi / dv + NUDGE), -127.0), 127.0))
            tl.store(sc_ptr + b.to(tl.int64) * ssb + hh.to(tl.int64) * ssh + p.to(tl.int64) * ssp, st)
        tl.store(o1_ptr + o, lo.to(o1_ptr.dtype.element_ty), mask=dm)
        tl.store(o2_ptr + o, hi.to(o2_ptr.dtype.element_ty), mask=dm)


def _meta_launch(k, sl, outs, page, grid, mean=False, refresh=False):
    o1, o2, sc = outs
    H, D = k.shape[1], k.shape[3]
    quant = sc is not None
    if not mean and o2.stride() != o1.stride():
        raise ValueError("kmin and kmax need the same strides")
    ss = sc.stride() if quant else (0, 0, 0)
    _meta_kernel[grid](k, sl, o1, o2, sc if quant else o1, H, o1.shape[2], D, page, *k.stride(),
                       *o1.stride(), *ss, MEAN=mean, QUANT=quant, REFRESH=refresh,
                       BT=min(64, _p2(page)), BD=_p2(D), STEP=I8_STEP, NUDGE=I8_NUDGE)


def _meta(k, page, seq_len, mean, quant=None):
    B, H, T, D = k.shape
    NP = math.ceil(T / page)
    sl = _seq_len(seq_len, B, T, k.device).to(torch.int32).contiguous()
    if mean:
        o1 = torch.empty(B, H, NP, D, device=k.device, dtype=torch.float32)
        outs = (o1, o1, None)
    else:
        dt = torch.int8 if quant else k.dtype
        o1 = torch.empty(B, H, NP, D, device=k.device, dtype=dt)
        sc = torch.empty(B, H, NP, device=k.device, dtype=torch.float32) if quant else None
        outs = (o1, torch.empty_like(o1), sc)
    _meta_launch(k, sl, outs, page, (B * H, NP), mean=mean)
    return o1 if mean else (outs if quant else outs[:2])


def page_minmax(k, page_size, seq_len=None, quant=None):
    check_quant(quant)
    return _meta(k, page_size, seq_len, mean=False, quant=quant)


def block_means(k, block_size, seq_len=None):
    return _meta(k, block_size, seq_len, mean=True)


def page_minmax_refresh(k, pos, page_size, kmin, kmax, scale=None):
    check_bounds_scale(kmin, scale)
    B, H = kmin.shape[:2]
    if k.shape[:2] != (B, H) or k.shape[3] != kmin.shape[3]:
        raise ValueError(f"cache {tuple(k.shape)} does not match page bounds {tuple(kmin.shape)}")
    p = _seq_len(pos, B, 0, k.device).to(torch.int32).contiguous()
    _meta_launch(k, p, (kmin, kmax, scale), page_size, (B * H,), refresh=True)
    return (kmin, kmax) if scale is None else (kmin, kmax, scale)


@triton.jit
def _mean_update_kernel(k_ptr, pos_ptr, o_ptr, H, D, BLOCK,
                        skb, skh, skd, sob, soh, sop, sod, BD: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    hh = bh % H
    pos = tl.load(pos_ptr + b)
    p = pos // BLOCK
    c = pos - p * BLOCK
    d = tl.arange(0, BD)
    dm = d < D
    x = tl.load(k_ptr + b.to(tl.int64) * skb + hh.to(tl.int64) * skh + d * skd, mask=dm, other=0.).to(tl.float32)
    o = b.to(tl.int64) * sob + hh.to(tl.int64) * soh + p.to(tl.int64) * sop + d * sod
    m = tl.load(o_ptr + o, mask=dm, other=0.).to(tl.float32)
    cf = c.to(tl.float32)
    new = tl.where(c == 0, x, (m * cf + x) / (cf + 1.0))
    tl.store(o_ptr + o, new.to(o_ptr.dtype.element_ty), mask=dm)


def block_means_update(kmeans, k_new, pos, block_size):
    B, H, NB, D = kmeans.shape
    if k_new.shape != (B, H, D):
        raise ValueError(f"k_new {tuple(k_new.shape)} does not match metadata {tuple(kmeans.shape)}")
    p = _seq_len(pos, B, 0, kmeans.device).to(torch.int32).contiguous()
    _mean_update_kernel[(B * H,)](k_new, p, kmeans, H, D, block_size, *k_new.stride(),
                                  *kmeans.stride(), BD=_p2(D))
    return kmeans


# --------------------------------------------------------------------------------------------
# Quest bound


@triton.jit
def _i8_to_f32(x, CVT: tl.constexpr):
    """int8 -> fp32 without the conversion unit (I2F runs at a quarter of the FP32 rate on sm_90,
    which made the int8 score kernel compute-bound): 2^23 + 128 + x as fp32 bits, minus the
    offset. CVT 0: plain cast; 1: sign extension + integer add; 2: PTX, 4 bytes per register
    (xor 0x80 per byte, prmt each byte under the exponent 0x4B)."""
    if CVT == 0:
        return x.to(tl.float32)
    elif CVT == 1:
        return (x.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, a;
            xor.b32 t, $4, 0x80808080;
            prmt.b32 a, t, 0x4B000000, 0x7540;
            sub.f32 $0, a, 0f4B000080;
            prmt.b32 a, t, 0x4B000000, 0x7541;
            sub.f32 $1, a, 0f4B000080;
            prmt.b32 a, t, 0x4B000000, 0x7542;
            sub.f32 $2, a, 0f4B000080;
            prmt.b32 a, t, 0x4B000000, 0x7543;
            sub.f32 $3, a, 0f4B000080;
            }""",
            constraints="=r,=r,=r,=r,r", args=[x], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _quest_tile(pt, lo_ptr, hi_ptr, sc_ptr, o_ptr, qp, qn, n, b, bh, hk, NP,
                slb, slh, slp, sld, ssb, ssh, ssp, HAS_NP: tl.constexpr, BP: tl.constexpr,
                BD: tl.constexpr, D, FORCE_LAST: tl.constexpr, SCALED: tl.constexpr,
                CVT: tl.constexpr):
    d = tl.arange(0, BD)
    p = pt * BP + tl.arange(0, BP)
    pm = p < NP
    off = b.to(tl.int64) * slb + hk.to(tl.int64) * slh + p.to(tl.int64)[:, None] * slp \
        + d[None, :] * sld
    m2 = pm[:, None] & (d < D)[None, :]
    if SCALED:
        lo = _i8_to_f32(tl.load(lo_ptr + off, mask=m2, other=0), CVT)
        hi = _i8_to_f32(tl.load(hi_ptr + off, mask=m2, other=0), CVT)
    else:
        lo = tl.load(lo_ptr + off, mask=m2, other=0.).to(tl.float32)
        hi = tl.load(hi_ptr + off, mask=m2, other=0.).to(tl.float32)
    # max(q hi, q lo) = q+ hi + q- lo (hi >= lo): one multiply-add per bound, no max
    s = tl.sum(qp[None, :] * hi + qn[None, :] * lo, axis=1)
    if SCALED:
        s = s * tl.load(sc_ptr + b.to(tl.int64) * ssb + hk.to(tl.int64) * ssh + p.to(tl.int64) * ssp,
                        mask=pm, other=0.)
    if HAS_NP:
        s = tl.where(p < n, s, float("-inf"))
        if FORCE_LAST:
            s = tl.where(p == n - 1, 3.4028234663852886e38, s)
    tl.store(o_ptr + bh.to(tl.int64) * NP + p, s, mask=pm)


@triton.jit
def _quest_kernel(q_ptr, lo_ptr, hi_ptr, sc_ptr, np_ptr, o_ptr, Hq, G, Hkv, D, NP,
                  sqb, sqh, sqd, slb, slh, slp, sld, ssb, ssh, ssp,
                  HAS_NP: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
                  PAGES_FIRST: tl.constexpr = False, FORCE_LAST: tl.constexpr = False,
                  SCALED: tl.constexpr = False, CVT: tl.constexpr = 0, LOOP: tl.constexpr = 0,
                  STAGES: tl.constexpr = 1):
    """Scores of one tile of pages, or with LOOP of every LOOP-th tile from this program's first
    (loads pipelined STAGES deep; LOOP 1: plain loop, for the interpreter). FORCE_LAST: the
    row's last valid page (the decoding query's own) gets the largest finite score, so that the
    top-k keeps it (and counts it). SCALED: int8 bounds, the sum times the page's step."""
    if PAGES_FIRST:  # consecutive programs read consecutive page tiles of one head
        pt = tl.program_id(0)
        bh = tl.program_id(1)
    else:
        bh = tl.program_id(0)
        pt = tl.program_id(1)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    d = tl.arange(0, BD)
    q = tl.load(q_ptr + b * sqb + hq * sqh + d * sqd, mask=d < D, other=0.).to(tl.float32)
    qp = tl.maximum(q, 0.0)
    qn = tl.minimum(q, 0.0)
    n = NP
    if HAS_NP:
        n = tl.load(np_ptr + b)
    if LOOP == 0:
        _quest_tile(pt, lo_ptr, hi_ptr, sc_ptr, o_ptr, qp, qn, n, b, bh, hk, NP, slb, slh, slp,
                    sld, ssb, ssh, ssp, HAS_NP, BP, BD, D, FORCE_LAST, SCALED, CVT)
    elif LOOP == 1:
        for t in range(pt, tl.cdiv(NP, BP), tl.num_programs(0 if PAGES_FIRST else 1)):
            _quest_tile(t, lo_ptr, hi_ptr, sc_ptr, o_ptr, qp, qn, n, b, bh, hk, NP, slb, slh, slp,
                        sld, ssb, ssh, ssp, HAS_NP, BP, BD, D, FORCE_LAST, SCALED, CVT)
    else:
        for t in tl.range(pt, tl.cdiv(NP, BP), tl.num_programs(0 if PAGES_FIRST else 1), num_stages=STAGES):
            _quest_tile(t, lo_ptr, hi_ptr, sc_ptr, o_ptr, qp, qn, n, b, bh, hk, NP, slb, slh, slp,
                        sld, ssb, ssh, ssp, HAS_NP, BP, BD, D, FORCE_LAST, SCALED, CVT)


I8_CVT = 2  # _i8_to_f32's variant on GPUs (the interpreter runs 1: no PTX there)
# int8 bounds: programs loop over 32-page tiles, 4 per SM, loads 3 deep: best geometric mean over
# B = 1 and 8 at 128K in the 2026-12-01 H200 sweep (22.8 / 143.5 us; one 64-page tile per program,
# the exact bounds' launch: 26.5 / 171.6; bench/results/sparse_sweep_int8.json)
I8_SCORE_CFG = dict(bp=32, num_warps=4, per_sm=4, stages=3)


def quest_scores(q, kmin, kmax, seq_len=None, page_size=None, scale=None, *, bp=None,
                 num_warps=None, pages_first=False, force_last=False, cvt=None, per_sm=None,
                 stages=2):
    """``per_sm``: that many programs per SM loop over the page tiles (loads pipelined ``stages``
    deep) instead of one program per tile."""
    B, Hq, D = q.shape
    Hkv, NP = kmin.shape[1], kmin.shape[2]
    G = _group(Hq, Hkv)
    assert kmin.stride() == kmax.stride()
    check_bounds_scale(kmin, scale)
    out = torch.empty(B, Hq, NP, device=q.device, dtype=torch.float32)
    if seq_len is not None:
        if page_size is None:
            raise ValueError("quest_scores: seq_len needs page_size")
        sl = _seq_len(seq_len, B, NP * page_size, q.device)
        n_pages = ((sl + page_size - 1) // page_size).to(torch.int32).contiguous()
    elif force_last:
        raise ValueError("quest_scores: force_last needs seq_len")
    else:
        n_pages = out  # unused
    cvt = I8_CVT if cvt is None else cvt
    if scale is not None and bp is None and num_warps is None and per_sm is None:
        bp, num_warps, per_sm, stages = (I8_SCORE_CFG[k] for k in ("bp", "num_warps", "per_sm", "stages"))
    # exact bounds, BP 64 pages x 8 warps: the fastest score config of the 2026-11-30 H200 sweep
    # on every shape (within 0.1 %; 4 warps: up to 2.5 % slower)
    BP = bp or (64 if not INTERPRET else 16)
    tiles = triton.cdiv(NP, BP)
    loop = 0
    if per_sm:
        tiles = max(1, min(tiles, per_sm * _n_sms(q.device) // (B * Hq)))
        loop = 1 if INTERPRET else 2
    grid = (tiles, B * Hq) if pages_first else (B * Hq, tiles)
    _quest_kernel[grid](
        q, kmin, kmax, kmin if scale is None else scale, n_pages, out, Hq, G, Hkv, D, NP,
        *q.stride(), *kmin.stride(), *(scale.stride() if scale is not None else (0, 0, 0)),
        HAS_NP=seq_len is not None, BP=BP, BD=_p2(D), PAGES_FIRST=pages_first,
        FORCE_LAST=force_last, SCALED=scale is not None, LOOP=loop, STAGES=stages,
        CVT=min(cvt, 1) if INTERPRET else cvt,
        num_warps=num_warps or 8)
    return out


def quest_select(q, kmin, kmax, k, seq_len=None, page_size=None, force_last=False, scale=None):
    """select_topk(quest_scores(...), k) with the query's own page forced in the score kernel."""
    return select_topk(quest_scores(q, kmin, kmax, seq_len, page_size, scale, force_last=force_last), k)


# --------------------------------------------------------------------------------------------
# MoBA gate: scores by matmul, selection in Triton


_GATE_CHUNK_ELEMS = 1 << 26  # fp32 gate scores held at once: 256 MB (not [B, H, T, NB] at 128K)


def moba_gate_topk(q, kmeans, block_size, topk, q_pos):
    """Gate scores by one fp32 matmul (cuBLAS) per chunk of query positions, then per row
    _select_topk_kernel with the own block: the past blocks' top (topk-1) by its threshold search
    (ties to the lower block, ascending) and the own block right after them, -1 padded."""
    B, Hq, Tq, D = q.shape
    Hkv, NB = kmeans.shape[1], kmeans.shape[2]
    G = _group(Hq, Hkv)
    BN = _p2(NB)
    if BN > 32768:
        from .naive import moba_gate_topk_torch
        return moba_gate_topk_torch(q, kmeans, block_size, topk, q_pos)
    own = (_q_pos(q_pos, B, Tq, q.device) // block_size).contiguous()  # [B, Tq] int64
    km = kmeans.float().transpose(-1, -2)  # [B, Hkv, D, NB]
    chunk = max(1, min(Tq, _GATE_CHUNK_ELEMS // max(1, B * Hq * NB)))
    out = torch.empty((B, Hq, Tq, topk), device=q.device, dtype=torch.int32)
    for t0 in range(0, Tq, chunk):
        tc = min(Tq, t0 + chunk) - t0
        s = torch.matmul(q[:, :, t0:t0 + tc].float().reshape(B, Hkv, G * tc, D), km)  # [B, Hq, tc, NB]
        # the kernel writes each chunk's rows into `out` itself (no per-chunk buffer and copy)
        _topk_launch(s, out[:, :, t0:], own[:, t0:], NB, topk - 1, Hq, tc, Tq, B * Hq * tc)
    return out


# --------------------------------------------------------------------------------------------
# top-k selection by a threshold search (Quest pages)


@triton.jit
def _value_key(x):
    """float32 -> int32 with the same order (negative floats: magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """The inverse of _value_key."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _topk_search_pass(key, lo, hi, n_ge, need):
    """One pass of the threshold search: count the keys at or above the bracket's midpoint (in
    value; in key when that does not split it) and keep the half that holds the k-th largest."""
    t = _value_key(_key_value(lo) * 0.5 + _key_value(hi) * 0.5)
    t = tl.where((t <= lo) | (t > hi),
                 (lo.to(tl.int64) + ((hi.to(tl.int64) - lo) >> 1) + 1).to(tl.int32), t)
    cnt = tl.sum((key >= t).to(tl.int32), axis=0)
    ok = cnt >= need
    return tl.where(ok, t, lo), tl.where(ok, tl.where(cnt == need, t, hi), t - 1), tl.where(ok, cnt, n_ge)


@triton.jit(do_not_specialize=["SN", "SO"])
def _select_topk_kernel(s_ptr, o_ptr, own_ptr, N, SR, SN, SO, K, HQ, TC, OWN_T, BN: tl.constexpr,
                        HAS_OWN: tl.constexpr = False):
    """Top-k of one row, ascending, -1 padded, ties to the lower index. The threshold (the k-th
    largest key of the scores' order-preserving int32 image) is bisected for inside the row's
    finite [min, max], one count (one block reduction) per pass, at the midpoint in value (in key
    when that does not split the bracket: -0/+0, or a range past float32), and the search stops
    as soon as the keys at or above the threshold are exactly the k needed (continuous scores:
    about a dozen passes). Score rows are SR apart and their entries SN; output slots are SO
    apart. SN and SO are never specialised (both are 1 in practice): the loads and the -1 fill
    are then not vectorised and share the scattered stores' register layout, so the rank scan
    runs once instead of once per layout, with no 8192-entry layout conversion. With the count
    at the threshold carried out of the search: 17.4 us against 20.1 for 32 rows of 8192 on the
    H200 (bench/topk_probe.py, graph floor of ~4 us included).

    HAS_OWN (MoBA's gate; rows [B, HQ, TC] = a chunk of TC query positions, own blocks [B, OWN_T]
    int64, output [B, HQ, OWN_T, K + 1] from the chunk's first position): only entries below the
    row's own block compete, and the own block (-1 if it is N or more) takes the slot after the
    chosen ones."""
    row = tl.program_id(0)
    n = tl.arange(0, BN)
    nm = n < N
    x = tl.load(s_ptr + row.to(tl.int64) * SR + n * SN, mask=nm, other=float("-inf"))
    valid = nm & (x > float("-inf"))
    if HAS_OWN:
        o_ptr += ((row // TC).to(tl.int64) * OWN_T + row % TC) * (K + 1) * SO
        own = tl.load(own_ptr + (row // (HQ * TC)).to(tl.int64) * OWN_T + row % TC)
        valid = valid & (n < own)
    else:
        o_ptr += row.to(tl.int64) * K * SO
    key = tl.where(valid, _value_key(x), -2147483647 - 1)
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    need = tl.minimum(K, n_valid)
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0)
    hi = tl.max(key, axis=0)
    hi = tl.where((need > 0) & (need < n_valid), hi, lo)  # everything valid is kept: lo = min
    n_ge = n_valid  # count(key >= lo); an invalid key is below every valid one
    while lo < hi:  # invariant: count(key >= lo) = n_ge >= need > count(key > hi)
        lo, hi, n_ge = _topk_search_pass(key, lo, hi, n_ge, need)
    sel = key >= lo
    if n_ge > need:  # ties at the threshold: the lower indices first
        gt = key > lo
        eq = key == lo
        n_gt = tl.sum(gt.to(tl.int32), axis=0)
        sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need - n_gt))
    sel = sel & valid & (need > 0)
    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(o_ptr + rank * SO, n.to(tl.int32), mask=sel & (rank < K))
    if HAS_OWN:  # the own block at slot need, then -1 (one store per slot: no two threads race)
        tl.store(o_ptr + need * SO, tl.where(own < N, own, -1).to(tl.int32))
        pad_lo, slots = need + 1, K + 1
    else:
        pad_lo, slots = need, K
    for p0 in range(0, slots, BN):  # the -1 padding
        pad = p0 + n
        tl.store(o_ptr + pad * SO, tl.full([BN], -1, tl.int32), mask=(pad >= pad_lo) & (pad < slots))


def _topk_launch(s, out, own, N, K, HQ, TC, OWN_T, rows, num_warps=None):
    """rows x N scores (s contiguous but for its last two strides) -> rows x K slots (out
    contiguous but for its last stride)."""
    BN = _p2(N)
    _select_topk_kernel[(rows,)](s, out, own, N, s.stride(-2), s.stride(-1), out.stride(-1), K, HQ, TC,
                                 OWN_T, BN=BN, HAS_OWN=own is not None,
                                 num_warps=num_warps or (8 if BN >= 2048 else 4))


# 8 warps: the fastest of 4 / 8 / 16 in the H200 sweeps (bench/NOTES-sparse.md): 17.4 us for 32
# rows of 8192 pages (int8-bound scores; CUDA graph, ~4 us of it the graph's own floor). Lost
# there: several thresholds per pass (WAYS 4 / 8, up to 27 us) and histogram passes (2 passes,
# but tl.histogram made each about 10x a count: 31 us).
def select_topk(scores, k, *, num_warps=None):
    """[..., N] fp32 -> [..., k] int32: the k best finite entries ascending, -1 padded."""
    shape = scores.shape
    N = shape[-1]
    s = scores.float().reshape(-1, N).contiguous()
    BN = _p2(N)
    if BN > 32768 or k <= 0:
        from .naive import select_topk_torch
        return select_topk_torch(scores, k)
    out = torch.empty((s.shape[0], k), device=s.device, dtype=torch.int32)
    _topk_launch(s, out, None, N, k, 1, 1, 0, s.shape[0], num_warps)
    return out.view(*shape[:-1], k)


# --------------------------------------------------------------------------------------------
# split-K decoding over a virtual token list


@triton.jit(do_not_specialize=["Hq", "Hsel", "G", "HSG", "NSEL", "BS", "TPS", "S",
                               "CHUNK", "WINDOW", "PREFIX", "T"])
def _decode_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, sl_ptr, m_ptr, l_ptr, acc_ptr,
                   Hq, Hsel, G, HSG, D, NSEL, BS, TPS, S, scale, CHUNK, WINDOW, PREFIX, T,
                   sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sib, sih, sin,
                   DILATED: tl.constexpr, EVEN_D: tl.constexpr, NUM_STAGES: tl.constexpr,
                   BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                   SPLITS_FIRST: tl.constexpr = False, HAS_SL: tl.constexpr = True):
    if SPLITS_FIRST:  # consecutive programs take consecutive stretches of one row's list
        sp = tl.program_id(0)
        r = tl.program_id(1)
    else:
        r = tl.program_id(0)
        sp = tl.program_id(1)
    b = r // Hsel
    hs = r % Hsel
    h0 = hs * HSG
    hk = h0 // G
    if HAS_SL:
        L = tl.load(sl_ptr + b)
    else:
        L = T
    rows = tl.arange(0, BM)
    rm = rows < HSG
    hq = h0 + rows
    d = tl.arange(0, BD)
    if EVEN_D:
        dm = d < BD
    else:
        dm = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + hq.to(tl.int64)[:, None] * sqh + d[None, :] * sqd,
                mask=rm[:, None] & dm[None, :], other=0.)
    kb = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    vb = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    if DILATED:
        # query at t = L - 1: prefix [0, p_end), chunk ends c * CHUNK - 1 for c0 <= c < c0 + n_c,
        # local window [wstart, t]
        t = L - 1
        p_end = tl.minimum(PREFIX, t + 1)
        wstart = tl.maximum(t - WINDOW, p_end)
        c0 = (p_end + CHUNK) // CHUNK  # first c with c * CHUNK - 1 >= p_end
        n_c = tl.maximum(wstart // CHUNK - c0 + 1, 0)
        n_tok = p_end + n_c + tl.maximum(t - wstart + 1, 0)
    else:
        ib = idx_ptr + b.to(tl.int64) * sib + hs.to(tl.int64) * sih
        n_tok = NSEL * BS
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    t_beg = sp * TPS
    for i in tl.range(0, TPS, num_stages=NUM_STAGES):
        f = (t_beg + i) * BT + tl.arange(0, BT)
        fm = f < n_tok
        if DILATED:
            pos = tl.where(f < p_end, f,
                           tl.where(f < p_end + n_c, (c0 + f - p_end) * CHUNK - 1,
                                    wstart + f - p_end - n_c))
            ok = fm & (pos >= 0) & (pos < L)
        else:
            slot = f // BS
            blk = tl.load(ib + slot * sin, mask=fm, other=-1)
            pos = blk * BS + (f - slot * BS)
            ok = fm & (blk >= 0) & (pos < L)
        pos64 = pos.to(tl.int64)
        if EVEN_D:
            lm = ok[:, None]
        else:
            lm = ok[:, None] & dm[None, :]
        kt = tl.load(kb + pos64[:, None] * skt + d[None, :] * skd, mask=lm, other=0.)
        vt = tl.load(vb + pos64[:, None] * svt + d[None, :] * svd, mask=lm, other=0.)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    o = (b.to(tl.int64) * Hq + hq.to(tl.int64)) * S + sp
    tl.store(m_ptr + o, m_i, mask=rm)
    tl.store(l_ptr + o, l_i, mask=rm)
    tl.store(acc_ptr + o[:, None] * D + d[None, :], acc, mask=rm[:, None] & dm[None, :])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, S, D, sob, soh, sod, Hq,
                  BS_: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hq
    hq = bh % Hq
    s = tl.arange(0, BS_)
    sm = s < S
    d = tl.arange(0, BD)
    dm = d < D
    o = bh.to(tl.int64) * S + s
    m = tl.load(m_ptr + o, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + o, mask=sm, other=0.)
    mx = tl.max(m, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(m - mx)
    acc = tl.load(acc_ptr + o[:, None] * D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l * w, axis=0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + b * sob + hq * soh + d * sod, out.to(o_ptr.dtype.element_ty), mask=dm)


# Launch config of _decode_kernel: BT gathered tokens per tile, warps, software-pipeline stages of
# the tile loop, and waves: the splits per (row, selection head) are sized so that the grid holds
# about waves x SMs programs; "fill" = one round of the programs that fit on the SMs at once
# (from the compiled kernel's registers and shared memory: 4 per SM for this config on the H200).
# From the 2026-11-30 H200 sweep (bench/NOTES-sparse.md; Quest, 32 heads x 128, bf16, page 16):
# the best config at B=8 (7.5 % ahead of the previous B=8 choice, bt 128 / 8 warps / 3 stages at
# 128K; 15 % at 32K) and equal to the previous B=1 choice at B=1 (same tile, same split count).
# Loading the next tile's block ids one iteration ahead gained nothing (within 1 % or up to 4 %
# slower; not kept).
DECODE_CFG = dict(bt=64, num_warps=4, num_stages=2, waves="fill")


def _decode_parts(q, k, v, n_max, seq_len, scale, *, idx=None, bs=1, dilated=None,
                  num_splits=None, cfg=None):
    """Split-K partials (max, sum, acc) of one decode query per row over its virtual token list
    (the selected blocks of ``idx``, or the ``dilated`` = (chunk, window, prefix) set), at most
    n_max tokens. One program per (row, selection head, split) serves every query head that shares
    the selection (the G heads of a KV group when the selection is per KV head, one head when it
    is per query head), so a gathered K/V tile is read once per group; scores and P @ V use
    tl.dot (query rows padded to 16), and the tile loop is a tl.range with num_stages so that the
    (indirect) K/V loads are software-pipelined. Returns (m, l, acc, S)."""
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = _group(Hq, Hkv)
    if dilated is None:
        Hsel, NSEL = idx.shape[1], idx.shape[2]
        if Hsel not in (Hq, Hkv):
            raise ValueError(f"block_idx has {Hsel} heads; expected {Hkv} (KV) or {Hq} (query)")
        istr = idx.stride()
        chunk = window = prefix = 0
    else:
        Hsel, NSEL, istr = Hkv, 0, (0, 0, 0)
        chunk, window, prefix = dilated
    HSG = Hq // Hsel
    scale = D ** -0.5 if scale is None else float(scale)
    # no seq_len: every row is T long (no tensor, no fill kernel before the launch)
    sl = None if seq_len is None else _seq_len(seq_len, B, T, q.device).to(torch.int32).contiguous()
    BD = max(16, _p2(D))
    c = dict(DECODE_CFG)
    # the configs were measured for bf16, D=128: a K tile of at most 32 KiB, so fp32 or wider heads
    # take fewer tokens per tile (fp32 dilated at 128 x 128 x 3 stages would need 272 KiB of shared
    # memory, over the H200's 227; at 64 tokens 140 KiB)
    c["bt"] = 16 if INTERPRET else min(c["bt"], max(16, 32768 // (BD * q.element_size())))
    c.update(cfg or {})
    BT = max(16, c["bt"])
    BM = max(16, _p2(HSG))
    tiles = max(1, triton.cdiv(n_max, BT))
    m = torch.empty(0, device=q.device, dtype=torch.float32)  # placeholders until S is known
    args = [q, k, v, idx if dilated is None else m, m if sl is None else sl, m, m, m,
            Hq, Hsel, G, HSG, D, NSEL, bs, 1, 1, scale, chunk, window, prefix, T,
            *q.stride(), *k.stride(), *v.stride(), *istr]
    meta = dict(DILATED=dilated is not None, EVEN_D=BD == D, NUM_STAGES=c["num_stages"], BM=BM,
                BT=BT, BD=BD, PREC=_prec(q.dtype), SPLITS_FIRST=bool(c.get("splits_first")),
                HAS_SL=sl is not None, num_warps=c["num_warps"], num_stages=c["num_stages"])
    if num_splits is None:
        if c["waves"] == "fill":  # one round of resident programs: no partial last wave
            slots = _resident_programs(_decode_kernel, args, meta, q.device) * _n_sms(q.device)
            num_splits = max(1, min(tiles, slots // (B * Hsel)))
        else:
            num_splits = max(1, min(tiles, triton.cdiv(c["waves"] * _n_sms(q.device), B * Hsel)))
    TPS = triton.cdiv(tiles, num_splits)
    S = triton.cdiv(tiles, TPS)
    m = torch.empty(B * Hq * S, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * Hq * S, D, device=q.device, dtype=torch.float32)
    args[5:8] = m, l, acc
    args[15:17] = TPS, S
    _decode_kernel[(S, B * Hsel) if meta["SPLITS_FIRST"] else (B * Hsel, S)](*args, **meta)
    return m, l, acc, S


_RESIDENT: dict = {}


def _resident_programs(kernel, args, meta, device):
    """How many programs of this launch config fit on one SM at once (warps, registers, shared
    memory of the compiled kernel); 4 under the interpreter. Cached per config."""
    if INTERPRET or device.type != "cuda":
        return 4
    key = (device.index, tuple(sorted((k, str(v)) for k, v in meta.items())),
           args[0].dtype, args[1].dtype)
    if key not in _RESIDENT:
        ck = kernel.warmup(*args, grid=(1,), **meta)
        ck._init_handles()
        p = torch.cuda.get_device_properties(device)
        nw = meta["num_warps"]
        regs_per_warp = -(-max(ck.n_regs, 1) * 32 // 256) * 256  # allocated per warp in 256s
        by_regs = p.regs_per_multiprocessor // (regs_per_warp * nw)
        by_warps = p.max_threads_per_multi_processor // (32 * nw)
        shared = ck.metadata.shared
        by_smem = p.shared_memory_per_multiprocessor // (shared + 1024) if shared else by_warps  # +1 KiB reserved per block
        _RESIDENT[key] = max(1, min(by_regs, by_warps, by_smem, 32))
    return _RESIDENT[key]


def _merge(q, m, l, acc, S, num_warps=2):
    """num_warps 2: 0.5 us under 4 at B=1 128K (one latency-bound program per head; topk_probe.py)."""
    B, Hq, D = q.shape
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    _merge_kernel[(B * Hq,)](m, l, acc, out, S, D, *out.stride(), Hq, BS_=_p2(S), BD=_p2(D),
                             num_warps=num_warps)
    return out


def block_sparse_decode(q, k, v, block_idx, block_size, seq_len=None, scale=None, *,
                        num_splits=None, cfg=None):
    """``cfg`` overrides DECODE_CFG's launch config (bt, num_warps, num_stages, waves,
    splits_first: the grid's fastest axis is the split instead of the row)."""
    if block_idx.dtype != torch.int32:
        block_idx = block_idx.to(torch.int32)
    n_max = block_idx.shape[2] * block_size
    return _merge(q, *_decode_parts(q, k, v, n_max, seq_len, scale, idx=block_idx, bs=block_size,
                                    num_splits=num_splits, cfg=cfg))


def dilated_decode(q, k, v, chunk, window, prefix, seq_len=None, scale=None, *,
                   num_splits=None, cfg=None):
    if chunk < 1 or window < 0 or prefix < 0:
        raise ValueError("dilated_decode: chunk >= 1, window >= 0, prefix >= 0")
    T = k.shape[2]
    n_max = min(T, prefix + T // chunk + window + 1)
    return _merge(q, *_decode_parts(q, k, v, n_max, seq_len, scale, dilated=(chunk, window, prefix),
                                    num_splits=num_splits, cfg=cfg))


# --------------------------------------------------------------------------------------------
# MoBA prefill


@triton.jit
def _moba_prefill_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, Hq, G, T, D, BSZ, TOPK, scale,
                         sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                         sob, soh, sot, sod,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                         BK: tl.constexpr, PREC: tl.constexpr):
    mt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    r = mt * BM + tl.arange(0, BM)
    rm = r < T
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + r.to(tl.int64)[:, None] * sqt
                + d[None, :] * sqd, mask=rm[:, None] & dm[None, :], other=0.)
    kb = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    vb = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    kk = tl.arange(0, BK)
    sel = tl.load(idx_ptr + (bh.to(tl.int64) * T + r.to(tl.int64))[:, None] * TOPK + kk[None, :],
                  mask=rm[:, None] & (kk[None, :] < TOPK), other=-1)
    own = (mt * BM) // BSZ
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    c = tl.arange(0, BN)
    for nb in range(0, own):
        row_sel = tl.sum((sel == nb).to(tl.int32), axis=1) > 0
        if tl.max(row_sel.to(tl.int32), axis=0) > 0:
            for j0 in range(nb * BSZ, nb * BSZ + BSZ, BN):
                j = (j0 + c).to(tl.int64)
                kt = tl.load(kb + j[:, None] * skt + d[None, :] * skd, mask=dm[None, :], other=0.)
                vt = tl.load(vb + j[:, None] * svt + d[None, :] * svd, mask=dm[None, :], other=0.)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                s = tl.where(row_sel[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
    hi = tl.minimum(mt * BM + BM, T)
    for j0 in range(own * BSZ, hi, BN):
        j = j0 + c
        jm = j < T
        j64 = j.to(tl.int64)
        kt = tl.load(kb + j64[:, None] * skt + d[None, :] * skd, mask=jm[:, None] & dm[None, :],
                     other=0.)
        vt = tl.load(vb + j64[:, None] * svt + d[None, :] * svd, mask=jm[:, None] & dm[None, :],
                     other=0.)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
        s = tl.where((j[None, :] <= r[:, None]) & jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b.to(tl.int64) * sob + hq.to(tl.int64) * soh + r.to(tl.int64)[:, None] * sot
             + d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])


def moba_prefill(q, k, v, block_size, topk, scale=None):
    B, Hq, T, D = q.shape
    G = _group(Hq, k.shape[1])
    tile = _pow2_divisor(block_size, 32 if INTERPRET else 64)
    if tile < 16 or D < 16:
        from .naive import moba_prefill_torch
        return moba_prefill_torch(q, k, v, block_size, topk, scale)
    scale = D ** -0.5 if scale is None else float(scale)
    km = block_means(k, block_size)
    idx = moba_gate_topk(q, km, block_size, topk, torch.arange(T, device=q.device)).contiguous()
    out = torch.empty_like(q)
    _moba_prefill_kernel[(triton.cdiv(T, tile), B * Hq)](
        q, k, v, idx, out, Hq, G, T, D, block_size, topk, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        BM=tile, BN=tile, BD=max(16, _p2(D)), BK=_p2(topk), PREC=_prec(q.dtype))
    return out


# --------------------------------------------------------------------------------------------
# SnapKV vote


@triton.jit
def _vote_window(q_ptr, k_ptr, bh, Hq, G, W, D, sqb, sqh, sqw, sqd, skb, skh,
                 BW: tl.constexpr, BD: tl.constexpr):
    """What both SnapKV passes start from: the window's queries of row bh, their offsets and
    masks, and the base pointer of the row's (KV-group) keys."""
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    w = tl.arange(0, BW)
    wm = w < W
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + w[:, None] * sqw
                + d[None, :] * sqd, mask=wm[:, None] & dm[None, :], other=0.)
    kb = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    return q, kb, w, wm, d, dm


@triton.jit
def _vote_lse_kernel(q_ptr, k_ptr, m_ptr, l_ptr, Hq, G, T, W, D, TPS, S, scale,
                     sqb, sqh, sqw, sqd, skb, skh, skt, skd,
                     CAUSAL: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    q, kb, w, wm, d, dm = _vote_window(q_ptr, k_ptr, bh, Hq, G, W, D, sqb, sqh, sqw, sqd, skb, skh,
                                       BW, BD)
    qpos = T - W + w
    m_i = tl.full([BW], float("-inf"), tl.float32)
    l_i = tl.zeros([BW], tl.float32)
    c = tl.arange(0, BN)
    for i in range(TPS):
        j = (sp * TPS + i) * BN + c
        jm = j < T
        kt = tl.load(kb + j.to(tl.int64)[:, None] * skt + d[None, :] * skd,
                     mask=jm[:, None] & dm[None, :], other=0.)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
        ok = jm[None, :] & wm[:, None]
        if CAUSAL:
            ok = ok & (j[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    o = (bh.to(tl.int64) * S + sp) * BW + w
    tl.store(m_ptr + o, m_i)
    tl.store(l_ptr + o, l_i)


@triton.jit
def _vote_sum_kernel(q_ptr, k_ptr, lse_ptr, o_ptr, Hq, G, T, W, D, scale,
                     sqb, sqh, sqw, sqd, skb, skh, skt, skd,
                     CAUSAL: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    jt = tl.program_id(1)
    q, kb, w, wm, d, dm = _vote_window(q_ptr, k_ptr, bh, Hq, G, W, D, sqb, sqh, sqw, sqd, skb, skh,
                                       BW, BD)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * BW + w)
    j = jt * BN + tl.arange(0, BN)
    jm = j < T
    kt = tl.load(kb + j.to(tl.int64)[:, None] * skt + d[None, :] * skd,
                 mask=jm[:, None] & dm[None, :], other=0.)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
    ok = jm[None, :] & wm[:, None]
    if CAUSAL:
        ok = ok & (j[None, :] <= (T - W + w)[:, None])
    p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
    tl.store(o_ptr + bh.to(tl.int64) * T + j, tl.sum(p, axis=0), mask=jm)


def snapkv_votes(q_win, k, scale=None, window_causal=True, *, num_splits=None):
    B, Hq, W, D = q_win.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = _group(Hq, Hkv)
    scale = D ** -0.5 if scale is None else float(scale)
    BW, BD = max(16, _p2(W)), max(16, _p2(D))
    BN = 16 if INTERPRET else 64
    tiles = triton.cdiv(T, BN)
    if num_splits is None:
        num_splits = max(1, min(tiles, triton.cdiv(4 * _n_sms(k.device), B * Hq)))
    TPS = triton.cdiv(tiles, num_splits)
    S = triton.cdiv(tiles, TPS)
    m = torch.empty(B * Hq, S, BW, device=k.device, dtype=torch.float32)
    l = torch.empty_like(m)
    prec = _prec(q_win.dtype)
    _vote_lse_kernel[(B * Hq, S)](q_win, k, m, l, Hq, G, T, W, D, TPS, S, scale,
                                  *q_win.stride(), *k.stride(), CAUSAL=window_causal,
                                  BW=BW, BN=BN, BD=BD, PREC=prec)
    lse = torch.logsumexp(m + torch.log(l), dim=1).contiguous()  # [B*Hq, BW]
    votes = torch.empty(B, Hq, T, device=k.device, dtype=torch.float32)
    _vote_sum_kernel[(B * Hq, tiles)](q_win, k, lse, votes, Hq, G, T, W, D, scale,
                                      *q_win.stride(), *k.stride(), CAUSAL=window_causal,
                                      BW=BW, BN=BN, BD=BD, PREC=prec)
    return votes
