"""Where the Quest top-k's time goes at batch 1 (32 rows of 8192 page scores, k = 512): the
production kernel against copies of it with parts cut out or changed, all on the scores of one
B=1 128K Quest step (int8 or exact bounds), CUDA-graph medians with a read flush.

    python bench/topk_probe.py --out bench/results/reruns/topk_probe.json

Variants (constexpr switches of this file's _probe_kernel, which follows select_topk's kernel
with its search pass shared; the cut ones give wrong outputs and are timed only):
* prod: kernels.sparse's select_topk as it is (4 / 8 / 16 warps);
* copy: _probe_kernel whole (checks that it times like prod);
* vectorised: its loads and -1 fill through specialised strides, so vectorised: the kernel
  before session 27 (bench/NOTES-sparse.md), which ran the rank scan twice, once per layout;
* no_epilogue: load, min / max / count, the threshold passes; stores the threshold and passes;
* no_search: load, min / max / count, the epilogue from a threshold read from memory;
* load_only: load, one count, one store.
Then the timing floor (an empty kernel in a graph), the attention with and without its merge, and
the merge at 1 / 2 / 4 / 8 warps, at B=1 128K 1/16.
Session 27's runs of earlier versions of this file (bench/results/reruns/topk_probe_*.json) also
time a [32, N/32] register tile and row-major [N/C, C] tiles, which lost; topk_probe_f6e492f.json
times "slot" variants (the store's address and mask as one int32 tensor), which gained nothing.
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
from kernels.sparse.triton_ops import _topk_search_pass, _value_key  # noqa: E402
from _runs import commit, write_json  # noqa: E402
from _timing import time_ms  # noqa: E402


@triton.jit
def _empty_kernel(o_ptr):
    tl.store(o_ptr + tl.program_id(0), 1)


@triton.jit(do_not_specialize=["SN", "SO"])
def _probe_kernel(s_ptr, o_ptr, thr_ptr, N, SN, SO, K, BN: tl.constexpr, PROBE: tl.constexpr,
                  VECTORISED: tl.constexpr):
    row = tl.program_id(0)
    n = tl.arange(0, BN)
    nm = n < N
    if VECTORISED:
        x = tl.load(s_ptr + row.to(tl.int64) * N + n, mask=nm, other=float("-inf"))
        o_ptr += row.to(tl.int64) * K
    else:
        x = tl.load(s_ptr + row.to(tl.int64) * N * SN + n * SN, mask=nm, other=float("-inf"))
        o_ptr += row.to(tl.int64) * K * SO
    valid = nm & (x > float("-inf"))
    key = tl.where(valid, _value_key(x), -2147483647 - 1)
    if PROBE == 3:  # load_only
        tl.store(o_ptr, tl.sum(valid.to(tl.int32), axis=0))
        return
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    need = tl.minimum(K, n_valid)
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0)
    hi = tl.max(key, axis=0)
    hi = tl.where((need > 0) & (need < n_valid), hi, lo)
    n_ge = n_valid
    passes = 0
    if PROBE == 2:  # no_search: the threshold from memory, its count by one reduction
        lo = tl.load(thr_ptr + row)
        n_ge = tl.sum((key >= lo).to(tl.int32), axis=0)
    else:
        while lo < hi:
            lo, hi, n_ge = _topk_search_pass(key, lo, hi, n_ge, need)
            passes += 1
    if PROBE == 1:  # no_epilogue
        tl.store(thr_ptr + row, lo)
        tl.store(o_ptr, passes)
        return
    sel = key >= lo
    if n_ge > need:
        gt = key > lo
        eq = key == lo
        sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need - tl.sum(gt.to(tl.int32), axis=0)))
    sel = sel & valid & (need > 0)
    rank = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    if VECTORISED:
        tl.store(o_ptr + rank, n.to(tl.int32), mask=sel & (rank < K))
    else:
        tl.store(o_ptr + rank * SO, n.to(tl.int32), mask=sel & (rank < K))
    for p0 in range(0, K, BN):
        pad = p0 + n
        if VECTORISED:
            tl.store(o_ptr + pad, tl.full([BN], -1, tl.int32), mask=(pad >= need) & (pad < K))
        else:
            tl.store(o_ptr + pad * SO, tl.full([BN], -1, tl.int32), mask=(pad >= need) & (pad < K))


def probe(s, k, probe_id, vectorised=False, num_warps=8, thr=None):
    R, N = s.shape
    out = torch.empty(R, k, device=s.device, dtype=torch.int32)
    thr = torch.empty(R, device=s.device, dtype=torch.int32) if thr is None else thr
    _probe_kernel[(R,)](s, out, thr, N, s.stride(1), out.stride(1), k, BN=triton.next_power_of_2(N),
                        PROBE=probe_id, VECTORISED=vectorised, num_warps=num_warps)
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
            ("copy", lambda nw: probe(s, n, 0, num_warps=nw)[0], True, (8,)),
            ("vectorised", lambda nw: probe(s, n, 0, vectorised=True, num_warps=nw)[0], True, (8,)),
            ("no_epilogue", lambda nw: probe(s, n, 1, num_warps=nw)[0], False, (8,)),
            ("no_search", lambda nw: probe(s, n, 2, thr=thr.clone(), num_warps=nw)[0], True, (8,)),
            ("load_only", lambda nw: probe(s, n, 3, num_warps=nw)[0], False, (8,)),
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
            return to._merge(q, m, l, acc, S, num_warps=nw)
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
