"""Decode-attention benchmark of the sparse ops (kernels/sparse) against dense SDPA decode.

32 heads x 128 (MHA, OLMo2-7B's attention), bf16, batch 1 and 8, contexts 32K and 128K, budgets
1/8, 1/16, 1/32 of the context:

* quest: page_minmax metadata precomputed (page 16); timed: quest_scores + select_topk (our
  bisection top-k; torch.topk as a variant) + block_sparse_decode (per-query-head pages);
* moba: block means precomputed (block 512); timed: moba_gate_topk (own block + top-(k-1)) +
  block_sparse_decode;
* attention alone: block_sparse_decode over a fixed selection (no selection cost), and our
  split-K kernel run densely (dilated_decode with chunk=1) as a bandwidth check;
* dense: torch.nn.functional.scaled_dot_product_attention on [B, 32, 1, 128] against the cache.
* SnapKV vote at 128K (window 64): time and peak extra memory of snapkv_votes (two passes)
  against the materialised softmax (einsum + softmax + sum), when that fits.

Times: triton.testing.do_bench medians (L2 flushed before each call), eager and, for the
pipelines, replayed from a CUDA graph (launch gaps removed). Correctness first: at full budget
the sparse paths equal dense; Triton equals the torch twins.

    python bench/sparse_decode.py --out bench/results/sparse_decode.json

``--sweep`` (about 2-3 minutes on one H200): for B x T in --sweep-shapes and the budgets, the
Quest decode components timed separately (score launch configs; top-k variants bisect /
bisect32 / radix / torch.topk; score + top-k fused in one launch; block-sparse attention variants split / gdot / gsum x tile,
warps, stages, waves, fused merge; the merge alone), each checked against a torch reference on
the GPU first, then end-to-end Quest with the current defaults vs the best components, all
against dense SDPA. The variants are in kernels/sparse/triton_ops.py (BSD_VARIANT, BSD_CFG,
TOPK_VARIANT; env SPARSE_DECODE_VARIANT / SPARSE_TOPK_VARIANT override the defaults).

    python bench/sparse_decode.py --sweep --out bench/results/sparse_sweep.json
    TRITON_INTERPRET=1 python bench/sparse_decode.py --sweep --smoke --out /tmp/s.json  # CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels.sparse as sp  # noqa: E402

H, D = 32, 128
PAGE, MOBA_BLOCK = 16, 512


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except Exception:
        return os.environ.get("GIT_COMMIT", "unknown")


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _bench(fn, graph=False, warmup=25, rep=100):
    import triton.testing as tt
    if graph:
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
        return tt.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")
    return tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


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
    res["ok"] = all((v is True) or (isinstance(v, float) and v < tol) for v in res.values())
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
    kmin, kmax = sp.page_minmax(k, PAGE)
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

        def quest():
            s = sp.quest_scores(q, kmin, kmax)
            return sp.block_sparse_decode(q, k, v, sp.select_topk(s, n_pages), PAGE)

        def quest_torchtopk():
            s = sp.quest_scores(q, kmin, kmax)
            idx = torch.topk(s, n_pages, dim=-1, sorted=False).indices.int()
            return sp.block_sparse_decode(q, k, v, idx, PAGE)

        def quest_select():
            return sp.select_topk(sp.quest_scores(q, kmin, kmax), n_pages)

        def quest_scores_only():
            return sp.quest_scores(q, kmin, kmax)

        def moba():
            idx = sp.moba_gate_topk(q4, km, MOBA_BLOCK, topk, pos)[:, :, 0]
            return sp.block_sparse_decode(q, k, v, idx, MOBA_BLOCK)

        sel = quest_select()
        midx = sp.moba_gate_topk(q4, km, MOBA_BLOCK, topk, pos)[:, :, 0].contiguous()
        entries = [("quest_total", quest), ("quest_total_torch_topk", quest_torchtopk),
                   ("quest_select_only", quest_select), ("quest_scores_only", quest_scores_only),
                   ("moba_total", moba),
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
            else:
                row.update(topk=topk, block=MOBA_BLOCK)
            rows.append(row)
    del k, v, kmin, kmax
    torch.cuda.empty_cache()
    return rows


def sweep_decode_cfg(dev, dtype):
    """Graph-replay times of our split-K decode under launch configs; returns the best."""
    from kernels.sparse import triton_ops as to
    g = torch.Generator(device=dev).manual_seed(3)
    cases = []
    for B, T in ((1, 131072), (8, 32768)):
        k = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g)
        q = torch.randn(B, H, D, device=dev, dtype=dtype, generator=g)
        n = T // 16 // PAGE
        idx = torch.randperm(T // PAGE, device=dev)[:n].sort().values.int().expand(B, H, n)
        idx = idx.contiguous()
        cases.append((lambda q=q, k=k, v=v: sp.dilated_decode(q, k, v, 1, 0, 0)))
        cases.append((lambda q=q, k=k, v=v, idx=idx: sp.block_sparse_decode(q, k, v, idx, PAGE)))
    base = dict(to.DECODE_CFG)
    out = []
    def trial(**cfg):
        to.DECODE_CFG.update(cfg)
        try:
            out.append(dict(cfg=dict(to.DECODE_CFG), ms=[_bench(c, graph=True) for c in cases]))
        except Exception as e:  # noqa: BLE001
            out.append(dict(cfg=dict(to.DECODE_CFG), error=repr(e)[:120]))

    def best_now():
        ok = [r for r in out if "ms" in r]
        ref = ok[0]["ms"]
        for r in ok:
            r["score"] = sum(t / t0 for t, t0 in zip(r["ms"], ref)) / len(ref)
        return min(ok, key=lambda r: r["score"])

    trial(**base)
    for bt in (32, 64, 128):
        for nw in (4, 8):
            for ns in (2, 3):
                if dict(base, bt=bt, num_warps=nw, num_stages=ns) != base:
                    trial(bt=bt, num_warps=nw, num_stages=ns, waves=base["waves"])
    b = best_now()["cfg"]
    for waves in (2, 8):
        trial(**dict(b, waves=waves))
    best = best_now()
    to.DECODE_CFG.update(best["cfg"])
    del cases
    torch.cuda.empty_cache()
    return dict(cases=["dense B1 128K", "quest1/16 B1 128K", "dense B8 32K", "quest1/16 B8 32K"],
                default=base, best=best, all=out)


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
    """(variant, cfg) pairs timed at budget 1/16 of every shape. 'split' is the current kernel
    (cfg goes to DECODE_CFG); 'gdot'/'gsum' the grouped kernel (cfg passed through)."""
    from kernels.sparse import triton_ops as to
    if smoke:
        return [("split", dict(to.DECODE_CFG)), ("gdot", dict(bt=16, num_warps=4, num_stages=2, waves=4)),
                ("gsum", dict(bt=16, num_warps=4, num_stages=2, waves=4))]
    grid = [("split", dict(to.DECODE_CFG))]
    for bt, ns in ((32, 2), (128, 2), (64, 3)):
        grid.append(("split", dict(to.DECODE_CFG, bt=bt, num_stages=ns)))
    for bt in (32, 64, 128):
        for nw in (4, 8):
            grid.append(("gdot", dict(bt=bt, num_warps=nw, num_stages=3, waves=4)))
    for bt, nw, ns in ((64, 4, 2), (64, 4, 4), (128, 8, 2), (128, 8, 4)):
        grid.append(("gdot", dict(bt=bt, num_warps=nw, num_stages=ns, waves=4)))
    for bt, nw in ((16, 4), (32, 4), (64, 4), (32, 8)):
        grid.append(("gsum", dict(bt=bt, num_warps=nw, num_stages=3, waves=4)))
    return grid


def _attn_fn(to, variant, cfg, q, k, v, idx, page):
    if variant == "split":
        def fn():
            old = dict(to.DECODE_CFG)
            to.DECODE_CFG.update(cfg)
            try:
                return to.block_sparse_decode(q, k, v, idx, page, variant="split")
            finally:
                to.DECODE_CFG.clear()
                to.DECODE_CFG.update(old)
        return fn
    return lambda: to.block_sparse_decode(q, k, v, idx, page, variant=variant, cfg=cfg)


def run_sweep(dev, dtype, shapes, budgets, deadline_s, smoke=False, log=print):
    """Per shape: dense SDPA; Quest score configs; top-k variants; attention variants x configs
    (full grid at budget 1/16, the best few at the other budgets); merge alone; end-to-end
    Quest (current default vs the best components). Each candidate is checked against a torch
    reference on the device before it is timed; failures are recorded, not timed."""
    from kernels.sparse import naive
    from kernels.sparse import triton_ops as to
    tm = _timer(dev)
    t_start = time.time()
    out = dict(shapes=[], notes="ms = CUDA-graph replay medians, L2 flushed; rel = rel. L2 error "
                                "vs fp32 torch reference on the device; x_sdpa = dense_sdpa_ms / ms")
    tol = 2e-2
    grid = _attn_grid(smoke)
    topk_vars = [("bisect", 8), ("bisect", 16), ("bisect32", 16), ("radix", 8), ("radix", 16),
                 ("torch", None)]
    if smoke:
        topk_vars = [("bisect", 4), ("bisect32", 4), ("radix", 4), ("torch", None)]
    score_cfgs = [(bp, nw) for bp in (32, 64, 128) for nw in (4, 8)] if not smoke else [(16, 4)]

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
        NP = kmin.shape[2]
        shp = dict(B=B, T=T, components={}, attention={}, end_to_end={})
        q4 = q[:, :, None]
        shp["dense_sdpa_ms"] = t_dense = tm(lambda: F.scaled_dot_product_attention(q4, k, v))
        log(f"[sweep {time.time() - t_start:6.1f}s] B={B} T={T} dense sdpa {t_dense:.4f} ms")
        # score
        s_ref = naive.quest_scores_torch(q, kmin, kmax)
        rows = []
        for bp, nw in score_cfgs:
            rows.append(trial(dict(bp=bp, num_warps=nw), f"score bp={bp} nw={nw}",
                              lambda bp=bp, nw=nw: to.quest_scores(q, kmin, kmax, bp=bp, num_warps=nw),
                              lambda r: (_rel(r, s_ref) < 1e-5, _rel(r, s_ref))))
        shp["components"]["score"] = rows
        okr = [r for r in rows if "ms" in r]
        best_score = min(okr, key=lambda r: r["ms"]) if okr else dict(bp=None, num_warps=None)
        log(f"[sweep {time.time() - t_start:6.1f}s]   score best {best_score}")
        scores = to.quest_scores(q, kmin, kmax)
        best_per = {}
        for bud in budgets:
            n = max(1, int(T * bud) // PAGE)
            comp = shp["components"].setdefault(f"{bud:.4g}", {})
            # top-k
            sel_ref = naive.select_topk_torch(scores, n)
            ref_sum = torch.gather(scores, -1, sel_ref.long().clamp_min(0)).sum()

            def chk_topk(r, exact):
                if exact:
                    return bool(torch.equal(r, sel_ref)), 0.0
                e = abs((torch.gather(scores, -1, r.long().clamp_min(0)).sum() - ref_sum).item())
                e /= max(abs(ref_sum.item()), 1e-9)
                return e < 1e-6, e

            trows = []
            for var, nw in topk_vars:
                trows.append(trial(dict(variant=var, num_warps=nw), f"topk {var} nw={nw}",
                                   lambda var=var, nw=nw: to.select_topk(scores, n, variant=var, num_warps=nw),
                                   lambda r, var=var: chk_topk(r, var != "torch")))
            comp["topk"] = trows
            frows = []  # score + top-k fused in one launch
            for var, bp, nw in (("radix", 64, 8), ("radix", 128, 8), ("bisect32", 64, 8)):
                if smoke:
                    bp, nw = 16, 4
                frows.append(trial(dict(variant=var, bp=bp, num_warps=nw),
                                   f"score+topk fused {var} bp={bp} nw={nw}",
                                   lambda var=var, bp=bp, nw=nw: to.quest_select_fused(
                                       q, kmin, kmax, n, variant=var, bp=bp, num_warps=nw)[0],
                                   lambda r: chk_topk(r, True)))
                if smoke:
                    break
            comp["score_topk_fused"] = frows
            okf = [r for r in frows if "ms" in r]
            best_fused = min(okf, key=lambda r: r["ms"]) if okf else None
            okt = [r for r in trows if "ms" in r]
            best_topk = min(okt, key=lambda r: r["ms"]) if okt else dict(variant="bisect", num_warps=None)
            # attention
            idx = sel_ref.contiguous()
            a_ref = _ref_gather_decode(q, k, v, idx, PAGE)
            cands = grid if (bud == budgets[0] or not best_per) else \
                [("split", dict(to.DECODE_CFG))] + [c for c in best_per.values()]
            arows = []
            for var, cfg in cands:
                if left() < 0 and not (var == "split" and cfg == to.DECODE_CFG):
                    arows.append(dict(variant=var, cfg=cfg, skipped="sweep time budget"))
                    continue
                fn = _attn_fn(to, var, cfg, q, k, v, idx, PAGE)
                arows.append(trial(dict(variant=var, cfg=cfg), f"attn {var} {cfg}", fn,
                                   lambda r: (_rel(r, a_ref) < tol, _rel(r, a_ref))))
                if "ms" in arows[-1]:
                    arows[-1]["x_sdpa"] = t_dense / arows[-1]["ms"]
            # waves (runtime only) around the best grouped config of this budget, then the
            # fused merge (last split merges) on the best config of each grouped variant
            okg = [r for r in arows if "ms" in r and r["variant"] != "split"]
            if okg and bud == budgets[0] and left() > 0:
                bg = min(okg, key=lambda r: r["ms"])
                for w in (2, 8, 16):
                    cfg = dict(bg["cfg"], waves=w)
                    fn = _attn_fn(to, bg["variant"], cfg, q, k, v, idx, PAGE)
                    arows.append(trial(dict(variant=bg["variant"], cfg=cfg), f"attn waves {w}", fn,
                                       lambda r: (_rel(r, a_ref) < tol, _rel(r, a_ref))))
                    if "ms" in arows[-1]:
                        arows[-1]["x_sdpa"] = t_dense / arows[-1]["ms"]
                for var in ("gdot", "gsum"):
                    rv = [r for r in arows if "ms" in r and r["variant"] == var]
                    if rv:
                        cfg = dict(min(rv, key=lambda r: r["ms"])["cfg"], fuse_merge=True)
                        fn = _attn_fn(to, var, cfg, q, k, v, idx, PAGE)
                        arows.append(trial(dict(variant=var, cfg=cfg), f"attn {var} fused merge", fn,
                                           lambda r: (_rel(r, a_ref) < tol, _rel(r, a_ref))))
                        if "ms" in arows[-1]:
                            arows[-1]["x_sdpa"] = t_dense / arows[-1]["ms"]
            comp["attention"] = arows
            oka = [r for r in arows if "ms" in r]
            if bud == budgets[0]:
                for var in ("split", "gdot", "gsum"):
                    rv = [r for r in oka if r["variant"] == var]
                    if rv and var != "split":
                        b_ = min(rv, key=lambda r: r["ms"])
                        best_per[var] = (var, b_["cfg"])
            best_attn = min(oka, key=lambda r: r["ms"]) if oka else dict(variant="split", cfg=dict(to.DECODE_CFG))
            # merge alone, and the grouped kernel's partials alone (best grouped config)
            okg = [r for r in oka if r["variant"] != "split"]
            if okg:
                bg = min(okg, key=lambda r: r["ms"])
                comp["merge_of"] = dict(variant=bg["variant"], cfg=bg["cfg"])
                try:
                    m_, l_, acc_, S_ = to._bsd_group(q, k, v, idx, PAGE, None, None, bg["variant"],
                                                     parts=True, **bg["cfg"])
                    o_ = torch.empty_like(q)
                    comp["merge"] = dict(splits=S_, ms=tm(lambda: to._merge_kernel[(B * H,)](
                        m_, l_, acc_, o_, S_, D, *o_.stride(), H, BS_=to._p2(S_), BD=to._p2(D))))
                    comp["attention_partials_only_ms"] = tm(lambda: to._bsd_group(
                        q, k, v, idx, PAGE, None, None, bg["variant"], parts=True, **bg["cfg"]))
                except Exception as e:  # noqa: BLE001
                    comp["merge"] = dict(error=repr(e)[:300])
            # end to end: current default vs best components
            def e2e_default():
                return sp.block_sparse_decode(q, k, v, sp.select_topk(sp.quest_scores(q, kmin, kmax), n), PAGE)

            bs_, bt_, ba_ = best_score, best_topk, best_attn

            def e2e_best():
                s = to.quest_scores(q, kmin, kmax, bp=bs_.get("bp"), num_warps=bs_.get("num_warps"))
                i = to.select_topk(s, n, variant=bt_["variant"], num_warps=bt_.get("num_warps"))
                return _attn_fn(to, ba_["variant"], ba_["cfg"], q, k, v, i, PAGE)()

            bf_ = best_fused

            def e2e_best_fused():
                i = to.quest_select_fused(q, kmin, kmax, n, variant=bf_["variant"], bp=bf_["bp"],
                                          num_warps=bf_["num_warps"])[0]
                return _attn_fn(to, ba_["variant"], ba_["cfg"], q, k, v, i, PAGE)()

            e2e = {}
            runs = [("default", e2e_default), ("best", e2e_best)]
            if bf_ is not None:
                runs.append(("best_fused_select", e2e_best_fused))
            for nm, fn in runs:
                r = trial(dict(), nm, fn, lambda r: (_rel(r, a_ref) < tol, _rel(r, a_ref)))
                if "ms" in r:
                    r["x_sdpa"] = t_dense / r["ms"]
                e2e[nm] = r
            e2e["best_components"] = dict(score=dict(bp=bs_.get("bp"), num_warps=bs_.get("num_warps")),
                                          topk=dict(variant=bt_["variant"], num_warps=bt_.get("num_warps")),
                                          attention=dict(variant=ba_["variant"], cfg=ba_["cfg"]),
                                          fused_select=None if bf_ is None else dict(
                                              variant=bf_["variant"], bp=bf_["bp"],
                                              num_warps=bf_["num_warps"]))
            shp["end_to_end"][f"{bud:.4g}"] = e2e
            log(f"[sweep {time.time() - t_start:6.1f}s]   budget {bud:.4g}: pages {n}, "
                f"topk best {bt_['variant']}/{bt_.get('num_warps')} {bt_.get('ms', float('nan')):.4f} ms, "
                f"attn best {ba_['variant']} {ba_['cfg']} {ba_.get('ms', float('nan')):.4f} ms, "
                f"e2e default {e2e['default'].get('ms', float('nan')):.4f} ms "
                f"(x{e2e['default'].get('x_sdpa', float('nan')):.2f}), best "
                f"{e2e['best'].get('ms', float('nan')):.4f} ms (x{e2e['best'].get('x_sdpa', float('nan')):.2f}), "
                f"best with fused select {e2e.get('best_fused_select', {}).get('ms', float('nan')):.4f} ms "
                f"(x{e2e.get('best_fused_select', {}).get('x_sdpa', float('nan')):.2f})")
            del a_ref
        out["shapes"].append(shp)
        del k, v, kmin, kmax, scores
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["ranking_budget_1_16"] = _rank_attention(out["shapes"])
    out["wall_s"] = time.time() - t_start
    return out


def _rank_attention(shapes):
    """Attention configs timed on every shape at budget 1/16, ranked by the geometric mean of
    their time relative to the current default (split, DECODE_CFG) of the same shape."""
    per = {}
    for s in shapes:
        rows = s["components"].get(f"{1 / 16:.4g}", {}).get("attention", [])
        base = next((r["ms"] for r in rows if "ms" in r and r["variant"] == "split"), None)
        if base is None:
            continue
        for r in rows:
            if "ms" in r:
                key = json.dumps([r["variant"], r["cfg"]], sort_keys=True)
                per.setdefault(key, []).append(r["ms"] / base)
    n = max((len(v) for v in per.values()), default=0)
    ranked = sorted(((math.exp(sum(map(math.log, v)) / len(v)), k) for k, v in per.items()
                     if len(v) == n))
    return [dict(variant=json.loads(k)[0], cfg=json.loads(k)[1], rel_to_default=g)
            for g, k in ranked[:8]]


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
                  python=platform.python_version(), git_commit=_git_commit(),
                  command=" ".join([sys.executable] + sys.argv), dtype=str(dtype), heads=H,
                  head_dim=D, page=PAGE, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  shapes=shapes, budgets=budgets)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result["sweep"] = run_sweep(dev, dtype, shapes, budgets, args.sweep_budget_s, smoke=smoke)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\nsummary (end to end Quest, ms and x dense SDPA):")
    for s in result["sweep"]["shapes"]:
        for bud, e in s["end_to_end"].items():
            d, b, f = e["default"], e["best"], e.get("best_fused_select", {})
            print(f"B={s['B']} T={s['T']} budget={bud}: sdpa {s['dense_sdpa_ms']:.4f}  default "
                  f"{d.get('ms', float('nan')):.4f} (x{d.get('x_sdpa', float('nan')):.2f})  best "
                  f"{b.get('ms', float('nan')):.4f} (x{b.get('x_sdpa', float('nan')):.2f})  fused-select "
                  f"{f.get('ms', float('nan')):.4f} (x{f.get('x_sdpa', float('nan')):.2f})  "
                  f"{json.dumps(e['best_components'])}")
    print("attention configs at budget 1/16 (geomean time / current default over the shapes):")
    for r in result["sweep"]["ranking_budget_1_16"]:
        print(f"  {r['rel_to_default']:.3f}  {r['variant']} {json.dumps(r['cfg'])}")
    print(f"wrote {args.out} ({result['sweep']['wall_s']:.0f} s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/sparse_decode.json")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--budgets", default="1/8,1/16,1/32")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="time every Quest-decode variant x launch configs, components separately")
    ap.add_argument("--sweep-shapes", default="1x131072,8x131072,1x32768,8x32768",
                    help="BxT list for --sweep")
    ap.add_argument("--sweep-budget-s", type=float, default=150.0,
                    help="--sweep stops trying new attention configs after this many seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="--sweep on tiny shapes (CPU under TRITON_INTERPRET=1: code paths only)")
    args = ap.parse_args()
    if args.sweep:
        if args.out == "bench/results/sparse_decode.json":
            args.out = "bench/results/sparse_sweep.json"
        return sweep_main(args)
    if not torch.cuda.is_available():
        sys.exit("bench/sparse_decode.py needs a CUDA GPU")
    import triton
    dev, dtype = torch.device("cuda"), torch.bfloat16
    budgets = [eval(b, {}) for b in args.budgets.split(",")]  # "1/16" -> 0.0625
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(),
                  git_commit=_git_commit(), command=" ".join([sys.executable] + sys.argv),
                  dtype="bfloat16", heads=H, head_dim=D, page=PAGE, moba_block=MOBA_BLOCK,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save():
        Path(args.out).write_text(json.dumps(result, indent=1))

    t0 = time.time()
    result["correctness"] = correctness(dev, dtype)
    print("correctness:", json.dumps(result["correctness"]), flush=True)
    save()
    if not args.no_sweep:
        result["decode_cfg_sweep"] = sweep_decode_cfg(dev, dtype)
        print("decode cfg:", json.dumps(result["decode_cfg_sweep"]["best"]), flush=True)
        save()
    result["decode"] = []
    for T in [int(x) for x in args.contexts.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
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
