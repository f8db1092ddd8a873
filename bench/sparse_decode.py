"""Decode-attention benchmark of the sparse ops (kernels/sparse) against dense SDPA decode.

32 heads x 128 (MHA, OLMo2-7B's attention), bf16, batch 1 and 8, contexts 32K and 128K, budgets
1/8, 1/16, 1/32 of the context:

* quest: page_minmax metadata precomputed (page 16); timed: quest_scores + select_topk +
  block_sparse_decode (per-query-head pages), all with the kernels' defaults (below); the same
  with int8 page bounds (``quest_i8_*`` rows: page_minmax(..., quant="int8"), with the share of
  the exact bounds' pages they pick, ``overlap_vs_exact``);
* moba: block means precomputed (block 512); timed: moba_gate_topk (own block + top-(k-1)) +
  block_sparse_decode;
* attention alone: block_sparse_decode over a fixed selection (no selection cost), and our
  split-K decode kernel run densely (dilated_decode with chunk=1) as a bandwidth check;
* dense: torch.nn.functional.scaled_dot_product_attention on [B, 32, 1, 128] against the cache.
* SnapKV vote at 128K (window 64): time and peak extra memory of snapkv_votes (two passes)
  against the materialised softmax (einsum + softmax + sum), when that fits.

Defaults (kernels/sparse/triton_ops.py, set from the 2026-11-30 sweeps, bench/NOTES-sparse.md):
quest_scores 64 pages x 8 warps (int8 bounds: I8_SCORE_CFG, 4 programs per SM looping over
32-page tiles); select_topk's bisection for the threshold (value midpoints,
early exit), 8 warps; the decode kernel's launch config DECODE_CFG (64-token tiles, 4 warps, 2
stages, splits for one round of resident programs). The JSON records them under "defaults".

Times: medians of CUDA-event times with the L2 flushed before each call (``--flush``: "write",
triton.testing.do_bench's zeroing, leaves dirty lines the timed call must write back; "read" leaves
clean ones; bench/_timing.py), eager and, for the pipelines, replayed from a CUDA graph (launch
gaps removed). Correctness first: at full budget the sparse paths equal dense; Triton equals the
torch twins.

    python bench/sparse_decode.py --out bench/results/sparse_decode.json
    python bench/sparse_decode.py --flush read --out bench/results/sparse_decode_read.json

``--sweep`` (about 2-3 minutes on one H200): for B x T in --sweep-shapes and the budgets, the
Quest decode components timed separately (score launch configs incl. grid order; top-k warps;
decode launch configs: tile, warps, stages, waves, grid order, against the default;
the merge alone), each checked against a torch reference on the GPU first, then end-to-end Quest
with the current defaults vs the best components, all against dense SDPA.

    python bench/sparse_decode.py --sweep --out bench/results/sparse_sweep.json
    TRITON_INTERPRET=1 python bench/sparse_decode.py --sweep --smoke --out /tmp/s.json  # CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels.sparse as sp  # noqa: E402
from _runs import commit, write_json  # noqa: E402  (COMMIT first: the GPU machine runs an archive of HEAD)
from _timing import FLUSHES, time_ms  # noqa: E402

H, D = 32, 128
PAGE, MOBA_BLOCK = 16, 512


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


FLUSH = "write"  # --flush: the L2 state each timed call starts from (bench/_timing.py)


def _bench(fn, graph=False, warmup=25, rep=100):
    return time_ms(fn, graph=graph, flush=FLUSH, warmup=warmup, rep=rep)


def correctness(dev, dtype):
    """Full-budget sparse == dense, Triton == torch twin, on the GPU (bf16)."""
    res = {}
    g = torch.Generator(device=dev).manual_seed(0)
    B, T = 2, 4096 + 37
    q = torch.randn(B, H, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
    sl = torch.tensor([T, T - 1000], device=dev)
    dense = sp.dense_decode_reference(q, k, v, seq_len=sl)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
    res["ref_vs_sdpa_full"] = _rel(sp.dense_decode_reference(q, k, v), sdpa)
    NP = math.ceil(T / PAGE)
    idx = torch.arange(NP, device=dev, dtype=torch.int32).expand(B, H, NP).contiguous()
    res["block_sparse_full_vs_dense"] = _rel(sp.block_sparse_decode(q, k, v, idx, PAGE, sl), dense)
    res["dilated_chunk1_vs_dense"] = _rel(sp.dilated_decode(q, k, v, 1, 64, 4, sl), dense)
    res["dilated_vs_twin"] = _rel(sp.dilated_decode(q, k, v, 16, 256, 4, sl),
                                  sp.dilated_decode(q, k, v, 16, 256, 4, sl, backend="torch"))
    kmin, kmax = sp.page_minmax(k, PAGE, sl)
    tmin, tmax = sp.page_minmax(k, PAGE, sl, backend="torch")
    res["page_minmax_exact"] = bool(torch.equal(kmin, tmin) and torch.equal(kmax, tmax))
    s = sp.quest_scores(q, kmin, kmax)
    res["quest_scores_vs_twin"] = _rel(s, sp.quest_scores(q, kmin, kmax, backend="torch"))
    # int8 bounds: the GPU's division is approximate, so ints may differ from the twin's by one
    qb = sp.page_minmax(k, PAGE, sl, quant="int8")
    tb = sp.page_minmax(k, PAGE, sl, quant="int8", backend="torch")
    res["page_minmax_int8_max_int_diff"] = max(int((a.int() - b.int()).abs().max()) for a, b in zip(qb[:2], tb[:2]))
    res["page_minmax_int8_step_vs_twin"] = _rel(qb[2], tb[2])
    si = sp.quest_scores(q, *qb[:2], scale=qb[2])
    res["quest_i8_scores_vs_twin"] = _rel(si, sp.quest_scores(q, *qb[:2], scale=qb[2], backend="torch"))
    res["quest_i8_scores_upper_bound"] = bool((si >= s - 1e-3 * s.abs().clamp_min(1)).all())
    res["quest_i8_scores_vs_exact"] = _rel(si, s)
    sel = torch.topk(s, 40, dim=-1).indices.int()
    res["quest_decode_vs_twin"] = _rel(sp.block_sparse_decode(q, k, v, sel, PAGE, sl),
                                       sp.block_sparse_decode(q, k, v, sel, PAGE, sl,
                                                              backend="torch"))
    km = sp.block_means(k, 256, sl)
    res["block_means_vs_twin"] = _rel(km, sp.block_means(k, 256, sl, backend="torch"))
    pos = torch.tensor([T - 1], device=dev)
    i1 = sp.moba_gate_topk(q[:, :, None], km, 256, 4, pos)
    i2 = sp.moba_gate_topk(q[:, :, None], km, 256, 4, pos, backend="torch")
    res["moba_gate_equal_twin"] = bool(torch.equal(i1, i2))
    # prefill: full top-k equals causal dense; small top-k equals the twin
    Tp = 2048 + 19
    qp = torch.randn(1, 8, Tp, D, device=dev, dtype=dtype, generator=g)
    kp = torch.randn(1, 8, Tp, D, device=dev, dtype=dtype, generator=g)
    vp = torch.randn(1, 8, Tp, D, device=dev, dtype=dtype, generator=g)
    res["moba_prefill_fulltopk_vs_causal"] = _rel(
        sp.moba_prefill(qp, kp, vp, 256, 9), F.scaled_dot_product_attention(qp, kp, vp,
                                                                            is_causal=True))
    res["moba_prefill_vs_twin"] = _rel(sp.moba_prefill(qp, kp, vp, 256, 3),
                                       sp.moba_prefill(qp, kp, vp, 256, 3, backend="torch"))
    qw = torch.randn(B, H, 64, D, device=dev, dtype=dtype, generator=g)
    res["snapkv_vs_twin"] = _rel(sp.snapkv_votes(qw, k), sp.snapkv_votes(qw, k, backend="torch"))
    tol = 2e-2
    res["ok"] = all((v is True) or (isinstance(v, float) and v < tol) for k_, v in res.items()
                    if k_ not in ("page_minmax_int8_max_int_diff", "quest_i8_scores_vs_exact")) \
        and res["page_minmax_int8_max_int_diff"] <= 1 and res["quest_i8_scores_vs_exact"] < 0.1
    return res


def run_decode(dev, dtype, B, T, budgets, graphs):
    g = torch.Generator(device=dev).manual_seed(1)
    k = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
    q = torch.randn(B, H, D, device=dev, dtype=dtype, generator=g)
    q4 = q[:, :, None]
    rows = []
    kv_bytes = 2 * k.numel() * k.element_size()
    t_dense = _bench(lambda: F.scaled_dot_product_attention(q4, k, v))
    rows.append(dict(B=B, T=T, method="dense_sdpa", budget=1.0, ms=t_dense,
                     GBps=kv_bytes / t_dense / 1e6))
    t_dense_g = _bench(lambda: F.scaled_dot_product_attention(q4, k, v), graph=True)
    rows.append(dict(B=B, T=T, method="dense_sdpa_graph", budget=1.0, ms=t_dense_g,
                     GBps=kv_bytes / t_dense_g / 1e6))
    t_ours = _bench(lambda: sp.dilated_decode(q, k, v, 1, 0, 0), graph=True)
    rows.append(dict(B=B, T=T, method="dense_ours_splitk_graph", budget=1.0, ms=t_ours,
                     GBps=kv_bytes / t_ours / 1e6))
    exact = sp.page_minmax(k, PAGE)
    int8 = sp.page_minmax(k, PAGE, quant="int8")
    km = sp.block_means(k, MOBA_BLOCK)
    pos = torch.tensor([T - 1], device=dev)
    full = torch.arange(T // PAGE, device=dev, dtype=torch.int32).expand(B, H, -1).contiguous()
    # correctness at the real shape: all pages == dense
    dense_out = F.scaled_dot_product_attention(q4, k, v)[:, :, 0]
    err_full = _rel(sp.block_sparse_decode(q, k, v, full, PAGE), dense_out)
    rows.append(dict(B=B, T=T, method="check_full_budget_rel_err", budget=1.0, value=err_full))
    for bud in budgets:
        n_pages = int(T * bud) // PAGE
        topk = max(1, int(T * bud) // MOBA_BLOCK)

        def quest_fns(bounds):
            """Quest's pipeline on these page bounds: (scores, + top-k, + attention)."""
            def scores():
                return sp.quest_scores(q, *bounds[:2], scale=bounds[2] if len(bounds) == 3 else None)

            def select():
                return sp.select_topk(scores(), n_pages)

            return scores, select, lambda: sp.block_sparse_decode(q, k, v, select(), PAGE)

        quest_scores_only, quest_select, quest = quest_fns(exact)
        quest_i8_scores_only, quest_i8_select, quest_i8 = quest_fns(int8)

        def moba():
            idx = sp.moba_gate_topk(q4, km, MOBA_BLOCK, topk, pos)[:, :, 0]
            return sp.block_sparse_decode(q, k, v, idx, MOBA_BLOCK)

        sel = quest_select()
        midx = sp.moba_gate_topk(q4, km, MOBA_BLOCK, topk, pos)[:, :, 0].contiguous()
        # the int8 bounds' choice against the exact one (random keys: near-tied bounds)
        chosen = torch.zeros(*sel.shape[:2], T // PAGE, device=dev)
        chosen.scatter_(-1, sel.long(), 1.0)  # share of the int8 choice that the exact one also made
        overlap = chosen.gather(-1, quest_i8_select().long()).mean().item()
        entries = [("quest_total", quest), ("quest_select_only", quest_select),
                   ("quest_scores_only", quest_scores_only),
                   ("quest_i8_total", quest_i8), ("quest_i8_select_only", quest_i8_select),
                   ("quest_i8_scores_only", quest_i8_scores_only), ("moba_total", moba),
                   ("quest_attn_only", lambda: sp.block_sparse_decode(q, k, v, sel, PAGE)),
                   ("moba_attn_only", lambda: sp.block_sparse_decode(q, k, v, midx, MOBA_BLOCK))]
        for name, fn in entries:
            t = _bench(fn)
            row = dict(B=B, T=T, method=name, budget=bud, ms=t, speedup_vs_sdpa=t_dense / t)
            if graphs:
                try:
                    tg = _bench(fn, graph=True)
                    row.update(ms_graph=tg, speedup_vs_sdpa_graph=t_dense / tg)
                except Exception as e:  # noqa: BLE001
                    row["graph_error"] = repr(e)[:200]
            if name.startswith("quest"):
                row["pages"] = n_pages
                if name.startswith("quest_i8"):
                    row.update(bounds="int8", overlap_vs_exact=overlap)
            else:
                row.update(topk=topk, block=MOBA_BLOCK)
            rows.append(row)
    del k, v, exact, int8
    torch.cuda.empty_cache()
    return rows


def run_snapkv(dev, dtype, B, T, W=64):
    g = torch.Generator(device=dev).manual_seed(2)
    k = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
    qw = torch.randn(B, H, W, D, device=dev, dtype=dtype, generator=g)
    torch.cuda.synchronize()
    out = {}
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    votes = sp.snapkv_votes(qw, k)
    torch.cuda.synchronize()
    out["ours_peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["votes_MiB"] = votes.numel() * 4 / 2**20
    out["ours_ms"] = _bench(lambda: sp.snapkv_votes(qw, k))

    def naive():
        s = torch.einsum("bhwd,bhtd->bhwt", qw.float(), k.float()) * D ** -0.5
        s = s.masked_fill(torch.arange(T, device=dev)[None, :] > torch.arange(T - W, T, device=dev)[:, None],
                          float("-inf"))
        return torch.softmax(s, -1).sum(2)

    try:
        del votes
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ref = naive()
        torch.cuda.synchronize()
        out["materialised_peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["rel_err_vs_materialised"] = _rel(sp.snapkv_votes(qw, k), ref)
        del ref
        out["materialised_ms"] = _bench(naive)
    except torch.cuda.OutOfMemoryError:
        out["materialised"] = "out of memory"
    torch.cuda.empty_cache()
    return dict(B=B, T=T, W=W, **out)


# --------------------------------------------------------------------------------------------
# --sweep: every Quest-decode variant x a small launch-config grid, components timed separately


def _timer(dev):
    """Graph-replay median (L2 flushed before each replay) on CUDA; one wall-clock run on CPU
    (the --smoke path under TRITON_INTERPRET=1, which only exercises the code)."""
    if dev.type != "cuda":
        def t_cpu(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return t_cpu

    def t_gpu(fn):
        return _bench(fn, graph=True, warmup=5, rep=25)
    return t_gpu


def _ref_gather_decode(q, k, v, idx, page):
    """fp32 reference of block_sparse_decode for per-query-head indices (MHA) without -1:
    gather the selected pages, softmax over them."""
    B, H, Dh = q.shape
    tok = (idx.long()[..., None] * page + torch.arange(page, device=q.device)).flatten(2)
    tok = tok.clamp(0, k.shape[2] - 1)
    ks = torch.gather(k, 2, tok[..., None].expand(-1, -1, -1, Dh)).float()
    vs = torch.gather(v, 2, tok[..., None].expand(-1, -1, -1, Dh)).float()
    ok = (idx.long()[..., None] >= 0).expand(-1, -1, -1, page).flatten(2)
    s = torch.einsum("bhd,bhtd->bht", q.float(), ks) * Dh ** -0.5
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
    return torch.einsum("bht,bhtd->bhd", p, vs)


def _attn_grid(smoke):
    """Launch configs of the decode kernel timed at budget 1/16 of every shape (None: the
    default, DECODE_CFG)."""
    if smoke:
        return [None, dict(bt=16, num_warps=4, num_stages=2, waves=4),
                dict(bt=16, num_warps=4, num_stages=2, waves="fill"),
                dict(bt=16, num_warps=4, num_stages=2, waves="fill", splits_first=True)]
    grid = [None]
    for bt in (32, 64, 128):
        for nw in (4, 8):
            grid.append(dict(bt=bt, num_warps=nw, num_stages=3, waves=4))
    for bt, nw, ns in ((64, 4, 2), (64, 4, 4), (128, 8, 2), (128, 8, 4)):
        grid.append(dict(bt=bt, num_warps=nw, num_stages=ns, waves=4))
    # splits sized to one round of resident programs (occupancy of the compiled kernel)
    for bt, nw, ns in ((32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2)):
        grid.append(dict(bt=bt, num_warps=nw, num_stages=ns, waves="fill"))
    # the split as the grid's fastest axis (neighbouring programs read one row's nearby pages)
    for bt, nw, ns in ((32, 4, 2), (64, 4, 2), (64, 4, 3)):
        grid.append(dict(bt=bt, num_warps=nw, num_stages=ns, waves="fill", splits_first=True))
    return grid


def _attn_fn(to, cfg, q, k, v, idx, page):
    return lambda: to.block_sparse_decode(q, k, v, idx, page, cfg=cfg)


def run_sweep(dev, dtype, shapes, budgets, deadline_s, smoke=False, log=print):
    """Per shape: dense SDPA; Quest score configs; top-k variants; decode launch configs (full
    grid at budget 1/16, the default and the best few at the other budgets); merge alone;
    end-to-end Quest (current defaults vs the best components). Each candidate is checked against
    a torch reference on the device before it is timed; failures are recorded, not timed."""
    from kernels.sparse import naive
    from kernels.sparse import triton_ops as to
    tm = _timer(dev)
    t_start = time.time()
    out = dict(shapes=[], notes="ms = CUDA-graph replay medians, L2 flushed; rel = rel. L2 error "
                                "vs fp32 torch reference on the device; x_sdpa = dense_sdpa_ms / ms; "
                                "attention cfg null = the default (DECODE_CFG)",
               decode_cfg=to.DECODE_CFG)
    tol = 2e-2
    grid = _attn_grid(smoke)
    topk_warps = [8, 4, 16] if not smoke else [4]
    score_cfgs = [(bp, nw, pf) for bp in (32, 64, 128) for nw in (4, 8) for pf in (False, True)] \
        if not smoke else [(16, 4, False), (16, 4, True)]

    def left():
        return deadline_s - (time.time() - t_start)

    def trial(rec, name, fn, check):
        try:
            res = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ok, err = check(res)
            rec.update(name=name, ok=bool(ok), rel=err)
            if ok:
                rec["ms"] = tm(fn)
        except Exception as e:  # noqa: BLE001
            rec.update(name=name, ok=False, error=repr(e)[:300])
        return rec

    for (B, T) in shapes:
        g = torch.Generator(device=dev).manual_seed(5)
        k = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
        q = torch.randn(B, H, D, device=dev, dtype=dtype, generator=g)
        kmin, kmax = sp.page_minmax(k, PAGE)
        shp = dict(B=B, T=T, components={}, end_to_end={},
                   decode_cfg_default=to.DECODE_CFG)
        q4 = q[:, :, None]
        shp["dense_sdpa_ms"] = t_dense = tm(lambda: F.scaled_dot_product_attention(q4, k, v))
        log(f"[sweep {time.time() - t_start:6.1f}s] B={B} T={T} dense sdpa {t_dense:.4f} ms")
        # score
        s_ref = naive.quest_scores_torch(q, kmin, kmax)
        rows = []
        for bp, nw, pf in score_cfgs:
            rows.append(trial(dict(bp=bp, num_warps=nw, pages_first=pf), f"score bp={bp} nw={nw} pages_first={pf}",
                              lambda bp=bp, nw=nw, pf=pf: to.quest_scores(q, kmin, kmax, bp=bp, num_warps=nw,
                                                                          pages_first=pf),
                              lambda r: (_rel(r, s_ref) < 1e-5, _rel(r, s_ref))))
        shp["components"]["score"] = rows
        # int8 bounds: half the bytes per page, so larger page tiles may pay
        qb = sp.page_minmax(k, PAGE, quant="int8")
        si_ref = naive.quest_scores_torch(q, *qb[:2], scale=qb[2])
        irows = []
        # one program per tile (per_sm None) or per_sm programs per SM looping, loads pipelined
        icfgs = [dict(bp=bp, num_warps=nw, cvt=cvt) for cvt in (0, 1, 2) for bp, nw in ((64, 8), (128, 8), (256, 8))]
        icfgs += [dict(bp=bp, num_warps=nw, per_sm=ps, stages=st, cvt=2) for bp in (32, 64, 128) for nw in (4, 8)
                  for ps in (4, 8, 16) for st in (2, 3, 4)]
        if smoke:
            icfgs = [dict(bp=16, num_warps=4, cvt=0), dict(bp=16, num_warps=4, cvt=1, per_sm=1)]
        for c in icfgs:
            irows.append(trial(dict(c), f"score int8 {c}",
                               lambda c=c: to.quest_scores(q, *qb[:2], scale=qb[2], **c),
                               lambda r: (_rel(r, si_ref) < 1e-5, _rel(r, si_ref))))
        shp["components"]["score_int8"] = irows
        oki = sorted((r for r in irows if "ms" in r), key=lambda r: r["ms"])
        log(f"[sweep {time.time() - t_start:6.1f}s]   int8 score best: " +
            ", ".join(f"{ {k_: r[k_] for k_ in r if k_ in ('bp', 'num_warps', 'cvt', 'per_sm', 'stages')} } "
                      f"{r['ms']:.4f}" for r in oki[:4]) +
            "; one tile per program, cvt 2: " + ", ".join(f"bp{r['bp']}/{r['num_warps']}w {r.get('ms', float('nan')):.4f}"
                                                          for r in irows if r.get("cvt") == 2 and "per_sm" not in r))
        lrows = []  # the same loop for the exact bounds
        for c in ([dict(bp=bp, num_warps=nw, per_sm=ps, stages=st) for bp in (32, 64) for nw in (4, 8)
                   for ps in (4, 8) for st in (2, 3, 4)] if not smoke else [dict(bp=16, num_warps=4, per_sm=1)]):
            lrows.append(trial(dict(c), f"score loop {c}", lambda c=c: to.quest_scores(q, kmin, kmax, **c),
                               lambda r: (_rel(r, s_ref) < 1e-5, _rel(r, s_ref))))
        shp["components"]["score_loop"] = lrows
        okl = sorted((r for r in lrows if "ms" in r), key=lambda r: r["ms"])
        if okl:
            log(f"[sweep {time.time() - t_start:6.1f}s]   exact score, looped, best: {okl[0]}")
        okr = [r for r in rows if "ms" in r]
        best_score = min(okr, key=lambda r: r["ms"]) if okr else dict(bp=None, num_warps=None)
        log(f"[sweep {time.time() - t_start:6.1f}s]   score best {best_score}")
        scores = to.quest_scores(q, kmin, kmax)
        best_cfgs = []
        for bud in budgets:
            n = max(1, int(T * bud) // PAGE)
            comp = shp["components"].setdefault(f"{bud:.4g}", {})
            # top-k (all variants are exact: ties to the lower index)
            sel_ref = naive.select_topk_torch(scores, n)
            trows = []
            for nw in topk_warps:
                trows.append(trial(dict(num_warps=nw), f"topk nw={nw}",
                                   lambda nw=nw: to.select_topk(scores, n, num_warps=nw),
                                   lambda r: (bool(torch.equal(r, sel_ref)), 0.0)))
            comp["topk"] = trows
            okt = [r for r in trows if "ms" in r]
            best_topk = min(okt, key=lambda r: r["ms"]) if okt else dict(num_warps=None)
            # attention
            idx = sel_ref.contiguous()
            a_ref = _ref_gather_decode(q, k, v, idx, PAGE)
            cands = grid if (bud == budgets[0] or not best_cfgs) else [None] + best_cfgs
            arows = []

            def attn_trial(cfg, name):
                r = trial(dict(cfg=cfg), name, _attn_fn(to, cfg, q, k, v, idx, PAGE),
                          lambda r: (_rel(r, a_ref) < tol, _rel(r, a_ref)))
                if "ms" in r:
                    r["x_sdpa"] = t_dense / r["ms"]
                arows.append(r)

            for cfg in cands:
                if left() < 0 and cfg is not None:
                    arows.append(dict(cfg=cfg, skipped="sweep time budget"))
                    continue
                attn_trial(cfg, f"attn {cfg or 'default'}")
            # waves (runtime only) around the best config of this budget
            oka = [r for r in arows if "ms" in r]
            if oka and bud == budgets[0] and left() > 0:
                bc = min(oka, key=lambda r: r["ms"])["cfg"] or to.DECODE_CFG
                for w in (2, 3, "fill", 8, 16):
                    attn_trial(dict(bc, waves=w), f"attn waves {w}")
                oka = [r for r in arows if "ms" in r]
                bc = min(oka, key=lambda r: r["ms"])["cfg"]
                if bc is not None:
                    best_cfgs.append(bc)
            comp["attention"] = arows
            best_attn = min(oka, key=lambda r: r["ms"]) if oka else dict(cfg=None)
            # merge alone, and the decode kernel's partials alone (best config)
            try:
                parts = lambda: to._decode_parts(q, k, v, idx.shape[2] * PAGE, None, None, idx=idx,
                                                 bs=PAGE, cfg=best_attn["cfg"])
                m_, l_, acc_, S_ = parts()
                comp["merge"] = dict(cfg=best_attn["cfg"], splits=S_,
                                     ms=tm(lambda: to._merge(q, m_, l_, acc_, S_)))
                comp["attention_partials_only_ms"] = tm(parts)
            except Exception as e:  # noqa: BLE001
                comp["merge"] = dict(error=repr(e)[:300])
            # end to end: current defaults vs best components
            def e2e_default():  # the Triton ops (the public ones take the torch twins on CPU)
                return to.block_sparse_decode(q, k, v, to.select_topk(to.quest_scores(q, kmin, kmax), n), PAGE)

            bs_, bt_, ba_ = best_score, best_topk, best_attn

            def e2e_best():
                s = to.quest_scores(q, kmin, kmax, bp=bs_.get("bp"), num_warps=bs_.get("num_warps"),
                                    pages_first=bool(bs_.get("pages_first")))
                i = to.select_topk(s, n, num_warps=bt_.get("num_warps"))
                return _attn_fn(to, ba_["cfg"], q, k, v, i, PAGE)()

            def e2e_int8():  # int8 page bounds, the defaults otherwise
                return to.block_sparse_decode(q, k, v, to.select_topk(to.quest_scores(q, *qb[:2], scale=qb[2]), n), PAGE)

            i8_ref = _ref_gather_decode(q, k, v, naive.select_topk_torch(si_ref, n).contiguous(), PAGE)
            e2e = {}
            for nm, fn, ref in (("default", e2e_default, a_ref), ("best", e2e_best, a_ref),
                                ("default_int8_bounds", e2e_int8, i8_ref)):
                r = trial(dict(), nm, fn, lambda r, ref=ref: (_rel(r, ref) < tol, _rel(r, ref)))
                if "ms" in r:
                    r["x_sdpa"] = t_dense / r["ms"]
                e2e[nm] = r
            e2e["best_components"] = dict(score=dict(bp=bs_.get("bp"), num_warps=bs_.get("num_warps"),
                                                     pages_first=bs_.get("pages_first")),
                                          topk=dict(num_warps=bt_.get("num_warps")),
                                          attention=dict(cfg=ba_["cfg"]))
            shp["end_to_end"][f"{bud:.4g}"] = e2e
            log(f"[sweep {time.time() - t_start:6.1f}s]   budget {bud:.4g}: pages {n}, "
                f"topk best {bt_.get('num_warps')}w {bt_.get('ms', float('nan')):.4f} ms, "
                f"attn best {ba_['cfg'] or 'default'} {ba_.get('ms', float('nan')):.4f} ms, "
                f"e2e default {e2e['default'].get('ms', float('nan')):.4f} ms "
                f"(x{e2e['default'].get('x_sdpa', float('nan')):.2f}), best "
                f"{e2e['best'].get('ms', float('nan')):.4f} ms (x{e2e['best'].get('x_sdpa', float('nan')):.2f}), "
                f"int8 bounds {e2e['default_int8_bounds'].get('ms', float('nan')):.4f} ms "
                f"(x{e2e['default_int8_bounds'].get('x_sdpa', float('nan')):.2f})")
            del a_ref, i8_ref
        out["shapes"].append(shp)
        del k, v, kmin, kmax, scores, qb
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["ranking_budget_1_16"] = _rank_attention(out["shapes"])
    out["resident_programs_per_sm"] = [dict(config=dict(k[1]), programs=v)
                                       for k, v in to._RESIDENT.items()]
    out["wall_s"] = time.time() - t_start
    return out


def _rank_attention(shapes):
    """Attention configs timed on every shape at budget 1/16, ranked by the geometric mean of
    their time relative to the default (DECODE_CFG) of the same shape."""
    per = {}
    for s in shapes:
        rows = s["components"].get(f"{1 / 16:.4g}", {}).get("attention", [])
        base = next((r["ms"] for r in rows if "ms" in r and r["cfg"] is None), None)
        if base is None:
            continue
        for r in rows:
            if "ms" in r:
                key = json.dumps(r["cfg"], sort_keys=True)
                per.setdefault(key, []).append(r["ms"] / base)
    n = max((len(v) for v in per.values()), default=0)
    ranked = sorted(((math.exp(sum(map(math.log, v)) / len(v)), k) for k, v in per.items()
                     if len(v) == n))
    return [dict(cfg=json.loads(k), rel_to_default=g) for g, k in ranked[:8]]


def sweep_main(args):
    import triton
    smoke = args.smoke
    dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--sweep needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if smoke:  # interpreter: few heads, small head dim
        global H, D
        H, D = 4, 16
        shapes, budgets = [(1, 512), (2, 256)], [1 / 16, 1 / 8]
    else:
        shapes = [(int(b), int(t)) for b, t in (x.split("x") for x in args.sweep_shapes.split(","))]
        budgets = [eval(b, {}) for b in args.budgets.split(",")]
        budgets = sorted(budgets, key=lambda b: abs(b - 1 / 16))  # 1/16 first: the full grid
    result = dict(mode="sweep", device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                  torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), git_commit=commit(),
                  command=" ".join([sys.executable] + sys.argv), dtype=str(dtype), heads=H,
                  head_dim=D, page=PAGE, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  shapes=shapes, budgets=budgets, flush=FLUSH)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result["sweep"] = run_sweep(dev, dtype, shapes, budgets, args.sweep_budget_s, smoke=smoke)
    write_json(args.out, result)
    print("\nsummary (end to end Quest, ms and x dense SDPA):")
    for s in result["sweep"]["shapes"]:
        for bud, e in s["end_to_end"].items():
            d, b = e["default"], e["best"]
            print(f"B={s['B']} T={s['T']} budget={bud}: sdpa {s['dense_sdpa_ms']:.4f}  default "
                  f"{d.get('ms', float('nan')):.4f} (x{d.get('x_sdpa', float('nan')):.2f})  best "
                  f"{b.get('ms', float('nan')):.4f} (x{b.get('x_sdpa', float('nan')):.2f})  "
                  f"{json.dumps(e['best_components'])}")
    print("attention configs at budget 1/16 (geomean time / default over the shapes; null = default):")
    for r in result["sweep"]["ranking_budget_1_16"]:
        print(f"  {r['rel_to_default']:.3f}  {json.dumps(r['cfg'])}")
    print(f"wrote {args.out} ({result['sweep']['wall_s']:.0f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/sparse_decode.json")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--budgets", default="1/8,1/16,1/32")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="time the Quest-decode components (score configs, top-k variants, decode "
                         "launch configs) separately, and end to end")
    ap.add_argument("--sweep-shapes", default="1x131072,8x131072,1x32768,8x32768",
                    help="BxT list for --sweep")
    ap.add_argument("--sweep-budget-s", type=float, default=150.0,
                    help="--sweep stops trying new attention configs after this many seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="--sweep on tiny shapes (CPU under TRITON_INTERPRET=1: code paths only)")
    ap.add_argument("--flush", default="write", choices=FLUSHES,
                    help="L2 state before each timed call (bench/_timing.py): write = triton's "
                         "do_bench (dirty lines), read = clean lines, none = warm")
    args = ap.parse_args()
    global FLUSH
    FLUSH = args.flush
    if args.sweep:
        if args.out == "bench/results/sparse_decode.json":
            args.out = "bench/results/sparse_sweep.json"
        return sweep_main(args)
    if not torch.cuda.is_available():
        sys.exit("bench/sparse_decode.py needs a CUDA GPU")
    import triton
    from kernels.sparse import triton_ops as to
    dev, dtype = torch.device("cuda"), torch.bfloat16
    budgets = [eval(b, {}) for b in args.budgets.split(",")]  # "1/16" -> 0.0625
    batches = [int(x) for x in args.batches.split(",")]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(),
                  git_commit=commit(), command=" ".join([sys.executable] + sys.argv),
                  dtype="bfloat16", heads=H, head_dim=D, page=PAGE, moba_block=MOBA_BLOCK,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), flush=FLUSH,
                  defaults=dict(decode_cfg=to.DECODE_CFG,
                                topk=dict(num_warps="8 from 2048 pages, else 4")))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save():
        write_json(args.out, result, quiet=True)

    t0 = time.time()
    result["correctness"] = correctness(dev, dtype)
    print("correctness:", json.dumps(result["correctness"]), flush=True)
    save()
    result["decode"] = []
    for T in [int(x) for x in args.contexts.split(",")]:
        for B in batches:
            rows = run_decode(dev, dtype, B, T, budgets, not args.no_graphs)
            result["decode"].extend(rows)
            save()
            for r in rows:
                print(json.dumps(r), flush=True)
    result["snapkv"] = []
    for B in (1, 8):
        try:
            r = run_snapkv(dev, dtype, B, 131072)
        except torch.cuda.OutOfMemoryError as e:
            r = dict(B=B, T=131072, error=repr(e)[:200])
        result["snapkv"].append(r)
        print(json.dumps(r), flush=True)
        save()
    result["wall_s"] = time.time() - t0
    save()
    # table
    print(f"\n{'B':>2} {'T':>7} {'method':<24} {'budget':>7} {'ms':>8} {'ms_graph':>9} {'x dense':>8}")
    for r in result["decode"]:
        if "ms" not in r:
            print(f"{r['B']:>2} {r['T']:>7} {r['method']:<24} {r['budget']:>7.4f} {r['value']:.2e}")
            continue
        print(f"{r['B']:>2} {r['T']:>7} {r['method']:<24} {r['budget']:>7.4f} {r['ms']:>8.4f} "
              f"{r.get('ms_graph', float('nan')):>9.4f} {r.get('speedup_vs_sdpa', 1.0):>8.2f}")
    for r in result["snapkv"]:
        print("snapkv", json.dumps(r))


if __name__ == "__main__":
    main()
