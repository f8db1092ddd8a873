"""Where the Quest top-k's time goes at batch 1 (32 rows of 8192 page scores, k = 512): the
production kernel against copies of it with parts cut out or changed, all on the scores of one
B=1 128K Quest step (int8 or exact bounds), CUDA-graph medians with a read flush.

    python bench/topk_probe.py --out bench/results/reruns/topk_probe.json

Variants:
* prod: kernels.sparse's select_topk as it is (4 / 8 / 16 warps);
* rowsC: a candidate holding the row as a row-major [N / C, C] tile in the loads' natural layout
  (ranks: a scan along each C-row plus one over the row totals);
* old_1d: the kernel before bench/NOTES-sparse.md's session 27 (one 1-D row of 8192), through
  this file's _probe_kernel, whose constexpr switches also cut it into parts (timed only, wrong
  outputs): old_no_epilogue (load, min / max / count, the threshold passes; stores the threshold
  and the pass count), old_no_search (the epilogue from a threshold read from memory),
  old_load_only (load, one count, one store); and old_one_layout (loads through a runtime stride,
  so that they share the scattered stores' register layout).
Then the timing floor (an empty kernel in a graph), the attention with and without its merge, and
the merge at 1 / 2 / 4 / 8 warps, at B=1 128K 1/16.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels.sparse as sp  # noqa: E402
from kernels.sparse import naive  # noqa: E402
from kernels.sparse import triton_ops as to  # noqa: E402
from kernels.sparse.triton_ops import _key_value, _value_key  # noqa: E402
from _runs import commit, write_json  # noqa: E402
from _timing import time_ms  # noqa: E402


@triton.jit
def _empty_kernel(o_ptr):
    tl.store(o_ptr + tl.program_id(0), 1)


@triton.jit
def _cmb3(c0, lo0, hi0, c1, lo1, hi1):
    return c0 + c1, tl.minimum(lo0, lo1), tl.maximum(hi0, hi1)


@triton.jit(do_not_specialize=["STRIDE"])
def _probe_kernel(s_ptr, o_ptr, thr_ptr, N, K, STRIDE, BN: tl.constexpr, PROBE: tl.constexpr,
                  FUSED: tl.constexpr, STRIDED: tl.constexpr):
    row = tl.program_id(0)
    n = tl.arange(0, BN)
    nm = n < N
    if STRIDED:  # the compiler cannot prove contiguity: scalar loads in the store's layout
        x = tl.load(s_ptr + row.to(tl.int64) * N + n * STRIDE, mask=nm, other=float("-inf"))
    else:
        x = tl.load(s_ptr + row.to(tl.int64) * N + n, mask=nm, other=float("-inf"))
    valid = nm & (x > float("-inf"))
    o_ptr += row.to(tl.int64) * K
    key = tl.where(valid, _value_key(x), -2147483647 - 1)
    if PROBE == 3:  # load_only
        tl.store(o_ptr, tl.sum(valid.to(tl.int32), axis=0))
        return
    if FUSED:
        n_valid, lo, hi = tl.reduce((valid.to(tl.int32), tl.where(valid, key, 2147483647), key), 0, _cmb3)
    else:
        n_valid = tl.sum(valid.to(tl.int32), axis=0)
        lo = tl.min(tl.where(valid, key, 2147483647), axis=0)
        hi = tl.max(key, axis=0)
    need = tl.minimum(K, n_valid)
    hi = tl.where((need > 0) & (need < n_valid), hi, lo)
    passes = 0
    if PROBE == 2:  # no_search
        lo = tl.load(thr_ptr + row)
    else:
        while lo < hi:
            t = _value_key(_key_value(lo) * 0.5 + _key_value(hi) * 0.5)
            t = tl.where((t <= lo) | (t > hi),
                         (lo.to(tl.int64) + ((hi.to(tl.int64) - lo) >> 1) + 1).to(tl.int32), t)
            cnt = tl.sum((key >= t).to(tl.int32), axis=0)
            ok = cnt >= need
            lo = tl.where(ok, t, lo)
            hi = tl.where(ok, tl.where(cnt == need, t, hi), t - 1)
            passes += 1
    if PROBE == 1:  # no_epilogue
        tl.store(thr_ptr + row, lo)
        tl.store(o_ptr, passes)
        return
    thr32 = lo
    sel = (key >= thr32) & valid
    n_ge = tl.sum(sel.to(tl.int32), axis=0)
    if n_ge > need:
        gt = (key > thr32) & valid
        eq_rank = tl.cumsum(((key == thr32) & valid).to(tl.int32), axis=0)
        sel = gt | ((key == thr32) & valid & (eq_rank <= need - tl.sum(gt.to(tl.int32), axis=0)))
    sel = sel & (need > 0)
    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(o_ptr + rank, n.to(tl.int32), mask=sel & (rank < K))
    for p0 in range(0, K, BN):
        if STRIDED:
            pad = p0 + n * STRIDE
        else:
            pad = p0 + n
        tl.store(o_ptr + pad, tl.full([BN], -1, tl.int32), mask=(pad >= need) & (pad < K))


@triton.jit
def _rows_kernel(s_ptr, o_ptr, N, K, BN: tl.constexpr, C: tl.constexpr):
    """Candidate: the row as a row-major [BN // C, C] tile in the loads' natural (vectorised)
    layout; ranks = a scan along each C-row plus one over the row totals."""
    row = tl.program_id(0)
    n = tl.arange(0, BN // C)[:, None] * C + tl.arange(0, C)[None, :]
    nm = n < N
    x = tl.load(s_ptr + row.to(tl.int64) * N + n, mask=nm, other=float("-inf"))
    valid = nm & (x > float("-inf"))
    o_ptr += row.to(tl.int64) * K
    key = tl.where(valid, _value_key(x), -2147483647 - 1)
    n_valid = tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0)
    need = tl.minimum(K, n_valid)
    lo = tl.min(tl.min(tl.where(valid, key, 2147483647), axis=1), axis=0)
    hi = tl.max(tl.max(key, axis=1), axis=0)
    hi = tl.where((need > 0) & (need < n_valid), hi, lo)
    n_ge = n_valid
    while lo < hi:
        t = _value_key(_key_value(lo) * 0.5 + _key_value(hi) * 0.5)
        t = tl.where((t <= lo) | (t > hi),
                     (lo.to(tl.int64) + ((hi.to(tl.int64) - lo) >> 1) + 1).to(tl.int32), t)
        cnt = tl.sum(tl.sum((key >= t).to(tl.int32), axis=1), axis=0)
        ok = cnt >= need
        lo = tl.where(ok, t, lo)
        n_ge = tl.where(ok, cnt, n_ge)
        hi = tl.where(ok, tl.where(cnt == need, t, hi), t - 1)
    sel = key >= lo
    if n_ge > need:
        gt = key > lo
        eq = (key == lo).to(tl.int32)
        n_gt = tl.sum(tl.sum(gt.to(tl.int32), axis=1), axis=0)
        eq_row = tl.sum(eq, axis=1)
        eq_rank = (tl.cumsum(eq_row, axis=0) - eq_row)[:, None] + tl.cumsum(eq, axis=1)
        sel = gt | ((eq > 0) & (eq_rank <= need - n_gt))
    sel = sel & valid & (need > 0)
    m = sel.to(tl.int32)
    per_row = tl.sum(m, axis=1)
    rank = (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(m, axis=1) - 1
    tl.store(o_ptr + rank, n.to(tl.int32), mask=sel & (rank < K))
    for p0 in range(0, K, BN):
        pad = p0 + n
        tl.store(o_ptr + pad, tl.full([BN // C, C], -1, tl.int32), mask=(pad >= need) & (pad < K))


def rows_topk(s, k, c, num_warps=8):
    out = torch.empty(s.shape[0], k, device=s.device, dtype=torch.int32)
    _rows_kernel[(s.shape[0],)](s, out, s.shape[1], k, BN=triton.next_power_of_2(s.shape[1]), C=c,
                                num_warps=num_warps)
    return out


def probe(s, k, probe_id, fused=False, strided=False, num_warps=8, thr=None):
    R, N = s.shape
    out = torch.empty(R, k, device=s.device, dtype=torch.int32)
    thr = torch.empty(R, device=s.device, dtype=torch.int32) if thr is None else thr
    _probe_kernel[(R,)](s, out, thr, N, k, 1, BN=triton.next_power_of_2(N), PROBE=probe_id,
                        FUSED=fused, STRIDED=strided, num_warps=num_warps)
    return out, thr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/reruns/topk_probe.json")
    ap.add_argument("--bounds", default="int8,exact")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(1)
    B, H, T, D, PAGE = 1, 32, 131072, 128, 16
    k = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    n = T // 16 // PAGE
    rows = []
    for bounds in args.bounds.split(","):
        bd = sp.page_minmax(k, PAGE, quant=None if bounds == "exact" else "int8")
        s = sp.quest_scores(q, *bd[:2], scale=bd[2] if len(bd) == 3 else None).reshape(B * H, -1).contiguous()
        ref = naive.select_topk_torch(s, n)
        passes_t, thr = probe(s, n, 1)
        passes = passes_t[:, 0].tolist()

        variants = [  # name, function of num_warps, checked against the torch twin, warps timed
            ("prod", lambda nw: to.select_topk(s, n, num_warps=nw), True, (4, 8, 16)),
            ("rows32", lambda nw: rows_topk(s, n, 32, nw), True, (8,)),
            ("rows64", lambda nw: rows_topk(s, n, 64, nw), True, (8,)),
            ("rows128", lambda nw: rows_topk(s, n, 128, nw), True, (8, 16)),
            ("rows256", lambda nw: rows_topk(s, n, 256, nw), True, (8,)),
            ("old_1d", lambda nw: probe(s, n, 0, num_warps=nw)[0], True, (8,)),
            ("old_no_epilogue", lambda nw: probe(s, n, 1, num_warps=nw)[0], False, (8,)),
            ("old_no_search", lambda nw: probe(s, n, 2, thr=thr.clone(), num_warps=nw)[0], True, (8,)),
            ("old_load_only", lambda nw: probe(s, n, 3, num_warps=nw)[0], False, (8,)),
            ("old_one_layout", lambda nw: probe(s, n, 0, strided=True, num_warps=nw)[0], True, (8,)),
        ]
        for name, fn, checked, warps in variants:
            for nw in warps:
                try:
                    ok = None
                    if checked:
                        ok = bool(torch.equal(fn(nw), ref))
                    ms = time_ms(lambda: fn(nw), graph=True, flush="read")
                    row = dict(bounds=bounds, variant=name, num_warps=nw, us=round(ms * 1e3, 2), correct=ok)
                except Exception as e:  # noqa: BLE001 - report and go on to the next variant
                    row = dict(bounds=bounds, variant=name, num_warps=nw, error=str(e).splitlines()[-1][:200])
                print(row, flush=True)
                rows.append(row)
        rows.append(dict(bounds=bounds, passes_min=min(passes), passes_max=max(passes),
                         passes_mean=sum(passes) / len(passes)))
        print(rows[-1], flush=True)
    # the timing floor and the attention's fixed costs (B=1 128K 1/16, exact-bounds selection)
    flag = torch.zeros(1024, device="cuda", dtype=torch.int32)
    v = torch.randn_like(k)
    bd = sp.page_minmax(k, PAGE)
    idx = to.select_topk(to.quest_scores(q, *bd), n)
    parts = to._decode_parts(q, k, v, n * PAGE, None, None, idx=idx, bs=PAGE)
    m, l, acc, S = parts
    ref = to._merge(q, *parts)
    extra = {
        "empty_1_program": lambda: _empty_kernel[(1,)](flag),
        "empty_512_programs": lambda: _empty_kernel[(512,)](flag),
        "decode_parts": lambda: to._decode_parts(q, k, v, n * PAGE, None, None, idx=idx, bs=PAGE),
        "decode_parts_and_merge": lambda: to.block_sparse_decode(q, k, v, idx, PAGE),
    }
    for nw in (1, 2, 4, 8):
        def merge(nw=nw):
            out = torch.empty_like(q)
            to._merge_kernel[(H,)](m, l, acc, out, S, D, *out.stride(), H, BS_=triton.next_power_of_2(S),
                                   BD=D, num_warps=nw)
            return out
        assert torch.allclose(merge().float(), ref.float(), atol=1e-2), nw
        extra[f"merge_nw{nw}"] = merge
    for name, fn in extra.items():
        row = dict(variant=name, flush="read", us=round(time_ms(fn, graph=True, flush="read") * 1e3, 2))
        print(row, flush=True)
        rows.append(row)
    write_json(args.out, dict(device=torch.cuda.get_device_name(), commit=commit(), torch=torch.__version__,
                              triton=triton.__version__, command=" ".join(sys.argv), rows=rows))


if __name__ == "__main__":
    main()
