"""Triton kernels of the sparse-attention ops (torch twins and conventions in naive.py).

* ``_meta_kernel``: one program per (row, page/block): min/max (Quest metadata) or fp32 mean
  (MoBA block representative) over the valid keys, the page walked in tiles of BT tokens.
* ``_meta_update_kernel``: decoding's incremental metadata, one program per (row, head): folds
  the new key into the min/max or running fp32 mean of the page/block holding its position.
* ``_quest_kernel``: one program per (query head, tile of pages): the channel-wise upper bound.
* ``_gate_topk_kernel``: MoBA selection for one query row: mask non-past blocks, pick the
  top (topk-1) by repeated arg-max (ties to the lower block), add the own block, write the chosen
  blocks in ascending order (prefix sum of the chosen mask), -1 elsewhere. The gate scores
  themselves are one fp32 matmul (cuBLAS).
* ``_select_topk_kernel`` / ``_select_topk2_kernel``: Quest's top-k by threshold bisection over
  the int32 image of the scores (int64 or int32 compares) or by radix select (4 x 8-bit
  histograms); ties to the lower index, ascending output, -1 padding.
* ``_bsd_group_kernel``: grouped block-sparse decode (variants "gdot"/"gsum", see there): one
  program per (row, selection head, split) serves all query heads sharing that selection; the
  last split can merge all splits itself (fused merge).
* ``_decode_kernel`` + ``_merge_kernel``: split-K decoding over a *virtual token list*: the flat
  list of candidate positions of one query row (selected blocks in block_idx order, or the
  RAT+ dilated set: prefix, chunk ends, local window) is cut into splits; each split runs an
  online softmax over its tiles of gathered keys and writes (max, sum, acc); the merge combines
  the splits by log-sum-exp. Masked loads fetch nothing, so -1 slots and masked tokens cost no
  memory traffic.
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

from .naive import _group, _q_pos, _seq_len

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
def _meta_kernel(k_ptr, sl_ptr, o1_ptr, o2_ptr, H, T, D, NP, PAGE,
                 skb, skh, skt, skd,
                 MEAN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(0)
    p = tl.program_id(1)
    b = bh // H
    hh = bh % H
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
    o = (bh.to(tl.int64) * NP + p) * D + d
    if MEAN:
        tl.store(o1_ptr + o, acc / tl.maximum(cnt, 1.0), mask=dm)
    else:
        empty = s1 <= s0
        tl.store(o1_ptr + o, tl.where(empty, 0.0, lo).to(o1_ptr.dtype.element_ty), mask=dm)
        tl.store(o2_ptr + o, tl.where(empty, 0.0, hi).to(o2_ptr.dtype.element_ty), mask=dm)


def _meta(k, page, seq_len, mean):
    B, H, T, D = k.shape
    NP = math.ceil(T / page)
    sl = _seq_len(seq_len, B, T, k.device).to(torch.int32).contiguous()
    if mean:
        o1 = torch.empty(B, H, NP, D, device=k.device, dtype=torch.float32)
        o2 = o1
    else:
        o1 = torch.empty(B, H, NP, D, device=k.device, dtype=k.dtype)
        o2 = torch.empty_like(o1)
    BT = min(64, _p2(page))
    _meta_kernel[(B * H, NP)](k, sl, o1, o2, H, T, D, NP, page, *k.stride(),
                              MEAN=mean, BT=BT, BD=_p2(D))
    return o1 if mean else (o1, o2)


def page_minmax(k, page_size, seq_len=None):
    return _meta(k, page_size, seq_len, mean=False)


def block_means(k, block_size, seq_len=None):
    return _meta(k, block_size, seq_len, mean=True)


@triton.jit
def _meta_update_kernel(k_ptr, pos_ptr, o1_ptr, o2_ptr, H, D, PAGE,
                        skb, skh, skd, sob, soh, sop, sod,
                        MEAN: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    hh = bh % H
    pos = tl.load(pos_ptr + b)
    p = pos // PAGE
    c = pos - p * PAGE
    d = tl.arange(0, BD)
    dm = d < D
    x = tl.load(k_ptr + b.to(tl.int64) * skb + hh.to(tl.int64) * skh + d * skd, mask=dm, other=0.).to(tl.float32)
    o = b.to(tl.int64) * sob + hh.to(tl.int64) * soh + p.to(tl.int64) * sop + d * sod
    if MEAN:
        m = tl.load(o1_ptr + o, mask=dm, other=0.).to(tl.float32)
        cf = c.to(tl.float32)
        new = tl.where(c == 0, x, (m * cf + x) / (cf + 1.0))
        tl.store(o1_ptr + o, new.to(o1_ptr.dtype.element_ty), mask=dm)
    else:
        lo = tl.load(o1_ptr + o, mask=dm, other=0.).to(tl.float32)
        hi = tl.load(o2_ptr + o, mask=dm, other=0.).to(tl.float32)
        lo = tl.where(c == 0, x, tl.minimum(lo, x))
        hi = tl.where(c == 0, x, tl.maximum(hi, x))
        tl.store(o1_ptr + o, lo.to(o1_ptr.dtype.element_ty), mask=dm)
        tl.store(o2_ptr + o, hi.to(o2_ptr.dtype.element_ty), mask=dm)


def _meta_update(o1, o2, k_new, pos, page, mean):
    B, H, NP, D = o1.shape
    if k_new.shape != (B, H, D):
        raise ValueError(f"k_new {tuple(k_new.shape)} does not match metadata {tuple(o1.shape)}")
    if not mean and o2.stride() != o1.stride():
        raise ValueError("kmin and kmax need the same strides")
    p = _seq_len(pos, B, 0, o1.device).to(torch.int32).contiguous()
    _meta_update_kernel[(B * H,)](k_new, p, o1, o2, H, D, page, *k_new.stride(), *o1.stride(),
                                  MEAN=mean, BD=_p2(D))
    return o1 if mean else (o1, o2)


def page_minmax_update(kmin, kmax, k_new, pos, page_size):
    return _meta_update(kmin, kmax, k_new, pos, page_size, mean=False)


def block_means_update(kmeans, k_new, pos, block_size):
    return _meta_update(kmeans, kmeans, k_new, pos, block_size, mean=True)


# --------------------------------------------------------------------------------------------
# Quest bound


@triton.jit
def _quest_kernel(q_ptr, lo_ptr, hi_ptr, np_ptr, o_ptr, Hq, G, Hkv, D, NP,
                  sqb, sqh, sqd, slb, slh, slp, sld,
                  HAS_NP: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(0)
    pt = tl.program_id(1)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    d = tl.arange(0, BD)
    dm = d < D
    p = pt * BP + tl.arange(0, BP)
    pm = p < NP
    q = tl.load(q_ptr + b * sqb + hq * sqh + d * sqd, mask=dm, other=0.).to(tl.float32)
    off = b.to(tl.int64) * slb + hk.to(tl.int64) * slh + p.to(tl.int64)[:, None] * slp \
        + d[None, :] * sld
    m2 = pm[:, None] & dm[None, :]
    lo = tl.load(lo_ptr + off, mask=m2, other=0.).to(tl.float32)
    hi = tl.load(hi_ptr + off, mask=m2, other=0.).to(tl.float32)
    s = tl.sum(tl.maximum(q[None, :] * hi, q[None, :] * lo), axis=1)
    if HAS_NP:
        n = tl.load(np_ptr + b)
        s = tl.where(p < n, s, float("-inf"))
    tl.store(o_ptr + bh.to(tl.int64) * NP + p, s, mask=pm)


def quest_scores(q, kmin, kmax, seq_len=None, page_size=None, *, bp=None, num_warps=None):
    B, Hq, D = q.shape
    Hkv, NP = kmin.shape[1], kmin.shape[2]
    G = _group(Hq, Hkv)
    assert kmin.stride() == kmax.stride()
    out = torch.empty(B, Hq, NP, device=q.device, dtype=torch.float32)
    if seq_len is not None:
        if page_size is None:
            raise ValueError("quest_scores: seq_len needs page_size")
        sl = _seq_len(seq_len, B, NP * page_size, q.device)
        n_pages = ((sl + page_size - 1) // page_size).to(torch.int32).contiguous()
    else:
        n_pages = out  # unused
    BP = bp or (64 if not INTERPRET else 16)
    _quest_kernel[(B * Hq, triton.cdiv(NP, BP))](
        q, kmin, kmax, n_pages, out, Hq, G, Hkv, D, NP, *q.stride(), *kmin.stride(),
        HAS_NP=seq_len is not None, BP=BP, BD=_p2(D), num_warps=num_warps or 4)
    return out


# --------------------------------------------------------------------------------------------
# MoBA gate: scores by matmul, selection in Triton


@triton.jit
def _gate_topk_kernel(s_ptr, own_ptr, o_ptr, NB, TOPK, Tq, Hq,
                      BN: tl.constexpr):
    row = tl.program_id(0)  # over B * Hq * Tq
    b = row // (Hq * Tq)
    t = row % Tq
    own = tl.load(own_ptr + b * Tq + t)
    n = tl.arange(0, BN)
    s = tl.load(s_ptr + row.to(tl.int64) * NB + n, mask=n < NB, other=float("-inf"))
    s = tl.where(n < own, s, float("-inf"))
    sel = n == own
    for _ in range(TOPK - 1):
        m = tl.max(s, axis=0)
        first = tl.min(tl.where((s == m) & (s > float("-inf")), n, BN), axis=0)
        hit = n == first  # nothing when only -inf is left (first == BN)
        sel = sel | hit
        s = tl.where(hit, float("-inf"), s)
    sel = sel & (n < NB)
    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(o_ptr + row.to(tl.int64) * TOPK + rank, n.to(tl.int32), mask=sel & (rank < TOPK))


def moba_gate_topk(q, kmeans, block_size, topk, q_pos):
    B, Hq, Tq, D = q.shape
    Hkv, NB = kmeans.shape[1], kmeans.shape[2]
    G = _group(Hq, Hkv)
    pos = _q_pos(q_pos, B, Tq, q.device)
    own = (pos // block_size).to(torch.int32).contiguous()
    qg = q.float().view(B, Hkv, G * Tq, D)
    s = torch.matmul(qg, kmeans.float().transpose(-1, -2)).view(B, Hq, Tq, NB).contiguous()
    out = torch.full((B, Hq, Tq, topk), -1, device=q.device, dtype=torch.int32)
    _gate_topk_kernel[(B * Hq * Tq,)](s, own, out, NB, topk, Tq, Hq, BN=_p2(NB))
    return out


# --------------------------------------------------------------------------------------------
# top-k selection by threshold bisection (Quest pages)


@triton.jit
def _select_topk_kernel(s_ptr, o_ptr, N, K, BN: tl.constexpr):
    """Indices of the K largest finite entries of one row, ascending, by bisection on the
    order-preserving int32 image of the fp32 scores (32 counting passes over registers);
    ties at the threshold go to the lower indices."""
    row = tl.program_id(0)
    n = tl.arange(0, BN)
    nm = n < N
    x = tl.load(s_ptr + row.to(tl.int64) * N + n, mask=nm, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(nm & (x > float("-inf")), key, -2147483647 - 1)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    key64 = key.to(tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        cnt = tl.sum((key64 >= mid).to(tl.int32), axis=0)
        ok = cnt >= K
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    gt = key64 > lo
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq = key64 == lo
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
    sel = (gt | (eq & (eq_rank <= K - n_gt))) & nm & (x > float("-inf"))
    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(o_ptr + row.to(tl.int64) * K + rank, n.to(tl.int32), mask=sel & (rank < K))


@triton.jit
def _topk_row(s_ptr, o_ptr, row, N, K, RADIX: tl.constexpr, BN: tl.constexpr):
    """Indices of the K largest finite entries of score row ``row`` (ascending, -1 padded).
    RADIX=False: bisection on int32 keys (int32 compares instead of _select_topk_kernel's int64).
    RADIX=True: radix select, 4 passes of 8 bits, each a 256-bin histogram (tl.histogram) of the
    candidates sharing the threshold's prefix so far. Ties at the threshold to the lower index.
    Scores are read with .cg (they may have just been written by other programs)."""
    n = tl.arange(0, BN)
    nm = n < N
    x = tl.load(s_ptr + row.to(tl.int64) * N + n, mask=nm, other=float("-inf"),
                cache_modifier=".cg")
    valid = nm & (x > float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed, order-preserving
    key = tl.where(valid, key, -2147483647 - 1)
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    need = tl.minimum(K, n_valid)
    if RADIX:
        u = key ^ (-2147483647 - 1)  # the unsigned order as a bit pattern
        bins = tl.arange(0, 256)
        prefix = tl.full([], 0, tl.int64)
        cand = valid
        rem = need
        for j in tl.static_range(4):
            sh = 24 - 8 * j
            byte = (u >> sh) & 0xFF
            if j > 0:
                hi_bits = (u >> (sh + 8)) & ((1 << (8 * j)) - 1)
                cand = valid & (hi_bits == prefix.to(tl.int32))
            hist = tl.histogram(byte, 256, mask=cand)
            ge = tl.sum(hist) - tl.cumsum(hist, axis=0) + hist  # candidates in bins >= b
            bstar = tl.max(tl.where(ge >= rem, bins, 0), axis=0)
            above = tl.sum(tl.where(bins > bstar, hist, 0), axis=0)
            rem = rem - above
            prefix = prefix * 256 + bstar.to(tl.int64)
        thr = (prefix - 2147483648).to(tl.int32)
    else:
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            cnt = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
            ok = cnt >= need
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        thr = lo.to(tl.int32)
    gt = (key > thr) & valid
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq = (key == thr) & valid
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
    sel = (gt | (eq & (eq_rank <= need - n_gt))) & (need > 0)
    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(o_ptr + row.to(tl.int64) * K + rank, n.to(tl.int32), mask=sel & (rank < K))
    # the -1 padding (slots need..K-1) is written here too: no separate fill of the output
    for p0 in range(0, K, BN):
        pad = p0 + n
        tl.store(o_ptr + row.to(tl.int64) * K + pad, tl.full([BN], -1, tl.int32),
                 mask=(pad >= need) & (pad < K))


@triton.jit
def _select_topk2_kernel(s_ptr, o_ptr, N, K, RADIX: tl.constexpr, BN: tl.constexpr):
    _topk_row(s_ptr, o_ptr, tl.program_id(0), N, K, RADIX, BN)


@triton.jit
def _quest_select_kernel(q_ptr, lo_ptr, hi_ptr, np_ptr, s_ptr, cnt_ptr, o_ptr, Hq, G, D, NP, K,
                         sqb, sqh, sqd, slb, slh, slp, sld,
                         HAS_NP: tl.constexpr, RADIX: tl.constexpr, BP: tl.constexpr,
                         BD: tl.constexpr, BN: tl.constexpr):
    """Quest score + top-k in one launch: each program scores a tile of BP pages of one row (as
    _quest_kernel); the last program of the row to finish (per-row counter, reset by it) runs
    the row's top-k (_topk_row) on the scores the others wrote."""
    bh = tl.program_id(0)
    pt = tl.program_id(1)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    d = tl.arange(0, BD)
    dm = d < D
    p = pt * BP + tl.arange(0, BP)
    pm = p < NP
    q = tl.load(q_ptr + b * sqb + hq * sqh + d * sqd, mask=dm, other=0.).to(tl.float32)
    off = b.to(tl.int64) * slb + hk.to(tl.int64) * slh + p.to(tl.int64)[:, None] * slp \
        + d[None, :] * sld
    m2 = pm[:, None] & dm[None, :]
    lo = tl.load(lo_ptr + off, mask=m2, other=0.).to(tl.float32)
    hi = tl.load(hi_ptr + off, mask=m2, other=0.).to(tl.float32)
    s = tl.sum(tl.maximum(q[None, :] * hi, q[None, :] * lo), axis=1)
    if HAS_NP:
        n = tl.load(np_ptr + b)
        s = tl.where(p < n, s, float("-inf"))
    tl.store(s_ptr + bh.to(tl.int64) * NP + p, s, mask=pm)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(1) - 1:
        tl.debug_barrier()
        _topk_row(s_ptr, o_ptr, bh, NP, K, RADIX, BN)
        tl.store(cnt_ptr + bh, 0)


def quest_select_fused(q, kmin, kmax, k, seq_len=None, page_size=None, *, variant="radix",
                       bp=None, num_warps=None):
    """select_topk(quest_scores(q, kmin, kmax, seq_len, page_size), k) in one launch
    (_quest_select_kernel); variant "radix" or "bisect32". Returns (idx [B, Hq, k], scores)."""
    B, Hq, D = q.shape
    Hkv, NP = kmin.shape[1], kmin.shape[2]
    G = _group(Hq, Hkv)
    assert kmin.stride() == kmax.stride()
    BN = _p2(NP)
    if BN > 32768 or k <= 0 or variant not in ("radix", "bisect32"):
        sc = quest_scores(q, kmin, kmax, seq_len, page_size)
        return select_topk(sc, k, variant=variant if variant != "radix" or BN <= 32768 else None), sc
    sc = torch.empty(B, Hq, NP, device=q.device, dtype=torch.float32)
    if seq_len is not None:
        if page_size is None:
            raise ValueError("quest_select_fused: seq_len needs page_size")
        sl = _seq_len(seq_len, B, NP * page_size, q.device)
        n_pages = ((sl + page_size - 1) // page_size).to(torch.int32).contiguous()
    else:
        n_pages = sc  # unused
    out = torch.empty(B, Hq, k, device=q.device, dtype=torch.int32)
    BP = bp or (64 if not INTERPRET else 16)
    cnt = _merge_counters(q.device, B * Hq, "select")
    _quest_select_kernel[(B * Hq, triton.cdiv(NP, BP))](
        q, kmin, kmax, n_pages, sc, cnt, out, Hq, G, D, NP, k, *q.stride(), *kmin.stride(),
        HAS_NP=seq_len is not None, RADIX=variant == "radix", BP=BP, BD=_p2(D), BN=BN,
        num_warps=num_warps or 8)
    return out, sc


# top-k variants: "bisect" (_select_topk_kernel), "bisect32" / "radix" (_select_topk2_kernel),
# "torch" (torch.topk, then ascending order, -1 for non-finite picks).
TOPK_VARIANT = os.environ.get("SPARSE_TOPK_VARIANT", "bisect")


def select_topk(scores, k, *, variant=None, num_warps=None):
    """[..., N] fp32 -> [..., k] int32: the k best finite entries ascending, -1 padded."""
    shape = scores.shape
    N = shape[-1]
    variant = variant or TOPK_VARIANT
    if variant == "torch":
        return _select_topk_torchtopk(scores, k)
    s = scores.float().reshape(-1, N).contiguous()
    BN = _p2(N)
    if BN > 32768 or k <= 0:
        from .naive import select_topk_torch
        return select_topk_torch(scores, k)
    nw = num_warps or (8 if BN >= 2048 else 4)
    if variant == "bisect":
        out = torch.full((s.shape[0], k), -1, device=s.device, dtype=torch.int32)
        _select_topk_kernel[(s.shape[0],)](s, out, N, k, BN=BN, num_warps=nw)
    elif variant in ("bisect32", "radix"):
        out = torch.empty((s.shape[0], k), device=s.device, dtype=torch.int32)
        _select_topk2_kernel[(s.shape[0],)](s, out, N, k, RADIX=variant == "radix", BN=BN,
                                            num_warps=nw)
    else:
        raise ValueError(f"select_topk: unknown variant {variant!r}")
    return out.view(*shape[:-1], k)


def _select_topk_torchtopk(scores, k):
    """torch.topk picks (ties to any index), then ascending with -inf picks as -1 at the end."""
    s = scores.float()
    kk = min(k, s.shape[-1])
    val, idx = torch.topk(s, kk, dim=-1, sorted=False)
    big = torch.iinfo(torch.int32).max
    idx = torch.where(val > float("-inf"), idx.int(), big).sort(dim=-1).values
    idx = torch.where(idx == big, -1, idx)
    if kk < k:
        idx = torch.nn.functional.pad(idx, (0, k - kk), value=-1)
    return idx


# --------------------------------------------------------------------------------------------
# split-K decoding over a virtual token list


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, sl_ptr, m_ptr, l_ptr, acc_ptr,
                   Hq, G, HSG, D, NSEL, BS, TPS, S, scale,
                   CHUNK, WINDOW, PREFIX,
                   sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sib, sih, sin,
                   DILATED: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    L = tl.load(sl_ptr + b)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + b * sqb + hq * sqh + d * sqd, mask=dm, other=0.).to(tl.float32)
    q = q * scale
    kb = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    vb = v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    if DILATED:
        t = L - 1
        p_end = tl.minimum(PREFIX, t + 1)
        wstart = tl.maximum(t - WINDOW, p_end)
        c0 = (p_end + CHUNK) // CHUNK  # first c with c * CHUNK - 1 >= p_end
        n_c = tl.maximum(wstart // CHUNK - c0 + 1, 0)
        n_tok = p_end + n_c + tl.maximum(t - wstart + 1, 0)
    else:
        ib = idx_ptr + b.to(tl.int64) * sib + (hq // HSG).to(tl.int64) * sih
        n_tok = NSEL * BS
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BD], tl.float32)
    for i in range(TPS):
        f = (sp * TPS + i) * BT + tl.arange(0, BT)
        fm = f < n_tok
        if DILATED:
            pos = tl.where(f < p_end, f,
                           tl.where(f < p_end + n_c, (c0 + f - p_end) * CHUNK - 1,
                                    wstart + f - p_end - n_c))
            ok = fm
        else:
            slot = f // BS
            blk = tl.load(ib + slot * sin, mask=fm, other=-1)
            pos = blk * BS + f % BS
            ok = fm & (blk >= 0)
        ok = ok & (pos < L) & (pos >= 0)
        pos64 = pos.to(tl.int64)
        kt = tl.load(kb + pos64[:, None] * skt + d[None, :] * skd,
                     mask=ok[:, None] & dm[None, :], other=0.).to(tl.float32)
        s = tl.sum(kt * q[None, :], axis=1)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        vt = tl.load(vb + pos64[:, None] * svt + d[None, :] * svd,
                     mask=ok[:, None] & dm[None, :], other=0.).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    o = bh.to(tl.int64) * S + sp
    tl.store(m_ptr + o, m_i)
    tl.store(l_ptr + o, l_i)
    tl.store(acc_ptr + o * D + d, acc, mask=dm)


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


# decode launch config (BT tokens per tile, warps, pipeline stages, programs per SM);
# bench/sparse_decode.py sweeps these on the GPU and records the choice.
DECODE_CFG = dict(bt=64, num_warps=4, num_stages=2, waves=8)  # best of the H200 sweep


def _split_decode(q, k, v, n_max, seq_len, scale, *, idx=None, bs=1, dilated=None,
                  num_splits=None, bt=None):
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = _group(Hq, Hkv)
    scale = D ** -0.5 if scale is None else float(scale)
    sl = _seq_len(seq_len, B, T, q.device).to(torch.int32).contiguous()
    cfg = DECODE_CFG
    BT = bt or (16 if INTERPRET else cfg["bt"])
    tiles = max(1, triton.cdiv(n_max, BT))
    if num_splits is None:
        target = cfg["waves"] * _n_sms(q.device)
        num_splits = max(1, min(tiles, triton.cdiv(target, B * Hq)))
    TPS = triton.cdiv(tiles, num_splits)
    S = triton.cdiv(tiles, TPS)
    m = torch.empty(B * Hq * S, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * Hq * S, D, device=q.device, dtype=torch.float32)
    if dilated is None:
        Hsel, NSEL = idx.shape[1], idx.shape[2]
        if Hsel not in (Hq, Hkv):
            raise ValueError(f"block_idx has {Hsel} heads; expected {Hkv} (KV) or {Hq} (query)")
        HSG = Hq // Hsel
        istr = idx.stride()
        chunk = window = prefix = 0
    else:
        idx, HSG, NSEL, istr = sl, 1, 0, (0, 0, 0)
        chunk, window, prefix = dilated
    _decode_kernel[(B * Hq, S)](
        q, k, v, idx, sl, m, l, acc, Hq, G, HSG, D, NSEL, bs, TPS, S, scale,
        chunk, window, prefix, *q.stride(), *k.stride(), *v.stride(), *istr,
        DILATED=dilated is not None, BT=BT, BD=_p2(D), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    _merge_kernel[(B * Hq,)](m, l, acc, out, S, D, *out.stride(), Hq, BS_=_p2(S), BD=_p2(D))
    return out


# Grouped variants of the block-sparse decode ("gdot" / "gsum"). One program per
# (row, selection head, split) serves every query head that shares the selection (the G heads of
# a KV group when block_idx is per KV head, one head when it is per query head), so a gathered K/V
# tile is read from memory once per group. Tiles of BT gathered tokens; the loop is a tl.range
# with num_stages so the compiler can software-pipeline the (indirect) K/V loads. "gdot" scores
# and accumulates with tl.dot (query rows padded to 16: tensor cores, loads staged through shared
# memory by the pipeliner); "gsum" with broadcast-multiply-reduce on CUDA cores. Splits per
# (row, selection head) are sized so that the grid holds ``waves`` programs per SM. Partials go
# to the same (max, sum, acc) buffers as _decode_kernel and are merged by _merge_kernel.


@triton.jit(do_not_specialize=["Hq", "Hsel", "G", "HSG", "NSEL", "BS", "TPS", "S", "sob", "soh"])
def _bsd_group_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, sl_ptr, m_ptr, l_ptr, acc_ptr,
                      Hq, Hsel, G, HSG, D, NSEL, BS, TPS, S, scale,
                      sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sib, sih, sin,
                      cnt_ptr, o_ptr, sob, soh, sod,
                      USE_DOT: tl.constexpr, EVEN_D: tl.constexpr, NUM_STAGES: tl.constexpr,
                      BM: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                      PREC: tl.constexpr, FUSE_MERGE: tl.constexpr):
    r = tl.program_id(0)
    sp = tl.program_id(1)
    b = r // Hsel
    hs = r % Hsel
    h0 = hs * HSG
    hk = h0 // G
    L = tl.load(sl_ptr + b)
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
    ib = idx_ptr + b.to(tl.int64) * sib + hs.to(tl.int64) * sih
    n_tok = NSEL * BS
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    if not USE_DOT:
        qf = q.to(tl.float32) * scale
    t_beg = sp * TPS
    for i in tl.range(0, TPS, num_stages=NUM_STAGES):
        f = (t_beg + i) * BT + tl.arange(0, BT)
        fm = f < n_tok
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
        if USE_DOT:
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
        else:
            s = tl.sum(qf[:, None, :] * kt.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        if USE_DOT:
            pv = tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        else:
            pv = tl.sum(p[:, :, None] * vt.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    o = (b.to(tl.int64) * Hq + hq.to(tl.int64)) * S + sp
    tl.store(m_ptr + o, m_i, mask=rm)
    tl.store(l_ptr + o, l_i, mask=rm)
    tl.store(acc_ptr + o[:, None] * D + d[None, :], acc, mask=rm[:, None] & dm[None, :])
    if FUSE_MERGE:
        # the last split of this (row, selection head) to finish merges all splits (counter per
        # (row, selection head), reset by that program for the next call)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel", scope="gpu")
        if done == S - 1:
            tl.debug_barrier()
            o0 = (b.to(tl.int64) * Hq + hq.to(tl.int64)) * S
            mx = tl.full([BM], float("-inf"), tl.float32)
            for j in range(S):
                mx = tl.maximum(mx, tl.load(m_ptr + o0 + j, mask=rm, other=float("-inf"),
                                            cache_modifier=".cg"))
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            num = tl.zeros([BM, BD], tl.float32)
            den = tl.zeros([BM], tl.float32)
            for j in range(S):
                mj = tl.load(m_ptr + o0 + j, mask=rm, other=float("-inf"), cache_modifier=".cg")
                lj = tl.load(l_ptr + o0 + j, mask=rm, other=0., cache_modifier=".cg")
                aj = tl.load(acc_ptr + (o0 + j)[:, None] * D + d[None, :],
                             mask=rm[:, None] & dm[None, :], other=0., cache_modifier=".cg")
                w = tl.exp(mj - mx)
                num += aj * w[:, None]
                den += lj * w
            res = num / tl.where(den > 0, den, 1.0)[:, None]
            tl.store(o_ptr + b.to(tl.int64) * sob + hq.to(tl.int64)[:, None] * soh + d[None, :] * sod,
                     res.to(o_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])
            tl.store(cnt_ptr + r, 0)


# launch configs of the block-sparse decode variants: "split" is _decode_kernel (one program per
# query head and split, DECODE_CFG); "gdot"/"gsum" are _bsd_group_kernel.
# default; bench/sparse_decode.py --sweep measures the others. SPARSE_DECODE_VARIANT overrides.
BSD_VARIANT = os.environ.get("SPARSE_DECODE_VARIANT", "split")
BSD_CFG = {"gdot": dict(bt=64, num_warps=4, num_stages=3, waves=4),
           "gsum": dict(bt=32, num_warps=4, num_stages=3, waves=4)}


_MERGE_COUNTERS = {}


def _merge_counters(device, n, name="merge"):
    """Zeroed int32 counters for the fused merge / fused Quest select, kept per (device, user)
    (each launch leaves them at zero again). One launch at a time per device: not for
    concurrent streams."""
    buf = _MERGE_COUNTERS.get((device, name))
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
        _MERGE_COUNTERS[(device, name)] = buf
    return buf


def _bsd_group(q, k, v, idx, bs, seq_len, scale, variant, *, num_splits=None, bt=None,
               num_warps=None, num_stages=None, waves=None, fuse_merge=False, parts=False):
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = _group(Hq, Hkv)
    Hsel, NSEL = idx.shape[1], idx.shape[2]
    if Hsel not in (Hq, Hkv):
        raise ValueError(f"block_idx has {Hsel} heads; expected {Hkv} (KV) or {Hq} (query)")
    HSG = Hq // Hsel
    scale = D ** -0.5 if scale is None else float(scale)
    sl = _seq_len(seq_len, B, T, q.device).to(torch.int32).contiguous()
    cfg = BSD_CFG[variant]
    use_dot = variant == "gdot"
    BT = bt or (16 if INTERPRET else cfg["bt"])
    BD = _p2(D)
    if use_dot:
        BT, BD = max(16, BT), max(16, BD)
    BM = max(16, _p2(HSG)) if use_dot else _p2(HSG)
    tiles = max(1, triton.cdiv(NSEL * bs, BT))
    if num_splits is None:
        target = (waves or cfg["waves"]) * _n_sms(q.device)
        num_splits = max(1, min(tiles, triton.cdiv(target, B * Hsel)))
    TPS = triton.cdiv(tiles, num_splits)
    S = triton.cdiv(tiles, TPS)
    m = torch.empty(B * Hq * S, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * Hq * S, D, device=q.device, dtype=torch.float32)
    ns = num_stages or cfg["num_stages"]
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    fuse = bool(fuse_merge) and not parts
    cnt = _merge_counters(q.device, B * Hsel) if fuse else sl
    _bsd_group_kernel[(B * Hsel, S)](
        q, k, v, idx, sl, m, l, acc, Hq, Hsel, G, HSG, D, NSEL, bs, TPS, S, scale,
        *q.stride(), *k.stride(), *v.stride(), *idx.stride(), cnt, out, *out.stride(),
        USE_DOT=use_dot, EVEN_D=BD == D, NUM_STAGES=ns, BM=BM, BT=BT, BD=BD,
        PREC=_prec(q.dtype), FUSE_MERGE=fuse, num_warps=num_warps or cfg["num_warps"],
        num_stages=ns)
    if parts:
        return m, l, acc, S
    if fuse:
        return out
    _merge_kernel[(B * Hq,)](m, l, acc, out, S, D, *out.stride(), Hq, BS_=_p2(S), BD=_p2(D))
    return out


def block_sparse_decode(q, k, v, block_idx, block_size, seq_len=None, scale=None, *,
                        num_splits=None, bt=None, variant=None, cfg=None):
    """``variant``: "split" (_decode_kernel), "gdot" or "gsum" (_bsd_group_kernel); None takes
    BSD_VARIANT. ``cfg`` overrides the variant's launch config (bt, num_warps, num_stages, waves)."""
    if block_idx.dtype != torch.int32:
        block_idx = block_idx.to(torch.int32)
    variant = variant or BSD_VARIANT
    if variant in BSD_CFG:
        kw = dict(cfg or {})
        if bt:
            kw["bt"] = bt
        return _bsd_group(q, k, v, block_idx, block_size, seq_len, scale, variant,
                          num_splits=num_splits, **kw)
    if variant != "split":
        raise ValueError(f"block_sparse_decode: unknown variant {variant!r}")
    n_max = block_idx.shape[2] * block_size
    return _split_decode(q, k, v, n_max, seq_len, scale, idx=block_idx, bs=block_size,
                         num_splits=num_splits, bt=bt)


def dilated_decode(q, k, v, chunk, window, prefix, seq_len=None, scale=None, *,
                   num_splits=None, bt=None):
    if chunk < 1 or window < 0 or prefix < 0:
        raise ValueError("dilated_decode: chunk >= 1, window >= 0, prefix >= 0")
    T = k.shape[2]
    n_max = min(T, prefix + T // chunk + window + 1)
    return _split_decode(q, k, v, n_max, seq_len, scale, dilated=(chunk, window, prefix),
                         num_splits=num_splits, bt=bt)


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
def _vote_lse_kernel(q_ptr, k_ptr, m_ptr, l_ptr, Hq, G, T, W, D, TPS, S, scale,
                     sqb, sqh, sqw, sqd, skb, skh, skt, skd,
                     CAUSAL: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
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
    b = bh // Hq
    hq = bh % Hq
    hk = hq // G
    w = tl.arange(0, BW)
    wm = w < W
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + w[:, None] * sqw
                + d[None, :] * sqd, mask=wm[:, None] & dm[None, :], other=0.)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * BW + w)
    j = jt * BN + tl.arange(0, BN)
    jm = j < T
    kt = tl.load(k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + j.to(tl.int64)[:, None] * skt
                 + d[None, :] * skd, mask=jm[:, None] & dm[None, :], other=0.)
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
