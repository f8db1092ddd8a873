"""Sparse-attention ops (kernels/sparse): torch twins and Triton kernels (TRITON_INTERPRET=1 on
CPU) against float64 references built from explicit masks. Small shapes: the interpreter is slow.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.sparse as sp  # noqa: E402
from kernels.sparse import naive  # noqa: E402

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CAN_TRITON = HAVE_TRITON and (INTERPRETED or torch.cuda.is_available()) and \
    os.path.exists(os.path.join(os.path.dirname(sp.__file__), "triton_ops.py"))
DEV = "cuda" if (not INTERPRETED and torch.cuda.is_available()) else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not CAN_TRITON, reason="Triton needs CUDA or TRITON_INTERPRET=1"))]
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _ref_decode(q, k, v, allowed, scale=None):
    """float64 decoding attention with an explicit [B, Hq, T] mask."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhd,bhtd->bht", q, k) * scale
    s = s.masked_fill(~allowed.cpu(), float("-inf"))
    return torch.einsum("bht,bhtd->bhd", torch.softmax(s, -1), v)


# --------------------------------------------------------------------------------------------
# metadata


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_page_minmax(backend, dtype):
    B, H, T, D, page = 2, 3, 37, 16, 8
    k = _rand(B, H, T, D, dtype=dtype)
    sl = torch.tensor([37, 19], device=DEV)
    for seq_len in (None, sl):
        kmin, kmax = sp.page_minmax(k, page, seq_len, backend=backend)
        assert kmin.shape == (B, H, 5, D) and kmin.dtype == dtype
        lens = [T, T] if seq_len is None else sl.tolist()
        for b in range(B):
            for p in range(5):
                s0, s1 = p * page, min((p + 1) * page, lens[b])
                if s1 <= s0:
                    assert (kmin[b, :, p] == 0).all() and (kmax[b, :, p] == 0).all()
                    continue
                assert torch.equal(kmin[b, :, p], k[b, :, s0:s1].amin(1))
                assert torch.equal(kmax[b, :, p], k[b, :, s0:s1].amax(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_page_minmax_int8(backend, dtype):
    """int8 bounds: equal to the twin's, rounded outward (int * step brackets the exact bounds,
    within about two steps), the step a little over max|bound| / 127; a channel far above the
    others and an all-zero page included."""
    B, H, T, D, page = 2, 3, 45, 16, 8
    k = _rand(B, H, T, D, dtype=dtype, seed=11, scale=3.0)
    k[0, 1, 8:16] = 0  # an all-zero page
    k[1, 2, :, 3] = 1e4  # one channel far larger than the rest
    sl = torch.tensor([45, 30], device=DEV)
    lq, hq, st = sp.page_minmax(k, page, sl, quant="int8", backend=backend)
    assert lq.dtype == hq.dtype == torch.int8 and st.dtype == torch.float32 and st.shape == (B, H, 6)
    tq = naive.page_minmax_torch(k, page, sl, quant="int8")
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip((lq, hq, st), tq))
    kmin, kmax = naive.page_minmax_torch(k, page, sl)
    s64 = st.double()[..., None]
    assert (lq.double() * s64 <= kmin.double()).all() and (hq.double() * s64 >= kmax.double()).all()
    assert (kmin.double() - lq.double() * s64 <= 2.01 * s64).all()
    assert (hq.double() * s64 - kmax.double() <= 2.01 * s64).all()
    amax = torch.maximum(kmin.abs(), kmax.abs()).double().amax(-1)
    torch.testing.assert_close(st.double(), amax / 127, rtol=5e-3, atol=0)
    assert (st[0, 1, 1] == 0) and (lq[0, 1, 1] == 0).all() and (hq[0, 1, 1] == 0).all()  # zero page
    with pytest.raises(ValueError, match="bad page-bounds quant 'fp8'"):
        sp.page_minmax(k, page, sl, quant="fp8", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 2])
def test_quest_scores_int8(backend, G):
    """Scores from int8 bounds: the twin's, at or above the exact bounds' scores (still an upper
    bound of every q.k in the page), and close to them."""
    B, Hkv, T, D, page = 2, 2, 45, 16, 8
    k = _rand(B, Hkv, T, D, seed=12)
    q = _rand(B, Hkv * G, D, seed=13)
    sl = torch.tensor([45, 20], device=DEV)
    exact = naive.quest_scores_torch(q, *naive.page_minmax_torch(k, page, sl), sl, page)
    bounds = sp.page_minmax(k, page, sl, quant="int8", backend=backend)
    s = sp.quest_scores(q, *bounds[:2], seq_len=sl, page_size=page, scale=bounds[2], backend=backend)
    twin = naive.quest_scores_torch(q, *bounds[:2], sl, page, scale=bounds[2])
    assert torch.equal(torch.isinf(s), torch.isinf(exact))
    ok = torch.isfinite(exact)
    assert _rel(s[ok], twin[ok]) < 1e-6
    assert (s[ok].double() >= exact[ok].double() - 1e-5).all()
    assert _rel(s[ok], exact[ok]) < 0.05
    with pytest.raises(ValueError, match="int8 page bounds need their scale"):
        sp.quest_scores(q, *bounds[:2], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 2])
def test_quest_scores(backend, G):
    B, Hkv, T, D, page = 2, 2, 45, 16, 8
    k = _rand(B, Hkv, T, D, seed=1)
    q = _rand(B, Hkv * G, D, seed=2)
    sl = torch.tensor([45, 20], device=DEV)
    kmin, kmax = naive.page_minmax_torch(k, page, sl)
    s = sp.quest_scores(q, kmin, kmax, backend=backend)
    ref = torch.maximum(q.double()[:, :, None] * kmax.double().repeat_interleave(G, 1)[:, :, :],
                        q.double()[:, :, None] * kmin.double().repeat_interleave(G, 1)).sum(-1)
    assert s.dtype == torch.float32 and s.shape == (B, Hkv * G, 6)
    assert _rel(s, ref) < 1e-5
    # an upper bound of every q.k in the page
    qk = torch.einsum("bhd,bhtd->bht", q.double(), k.double().repeat_interleave(G, 1))
    for p in range(6):
        for b in range(B):
            s1 = min((p + 1) * page, int(sl[b]))
            if s1 > p * page:
                assert (qk[b, :, p * page:s1].amax(-1) <= s[b, :, p].double() + 1e-4).all()
    s2 = sp.quest_scores(q, kmin, kmax, seq_len=sl, page_size=page, backend=backend)
    assert torch.isinf(s2[1, :, 3:]).all() and torch.isfinite(s2[1, :, :3]).all()
    if backend == "triton":  # launch options (grid order, programs looping over tiles) agree
        from kernels.sparse import triton_ops as to
        assert torch.equal(to.quest_scores(q, kmin, kmax, seq_len=sl, page_size=page, pages_first=True), s2)
        s4 = to.quest_scores(q, kmin, kmax, seq_len=sl, page_size=page, bp=2)  # same tile as the loop
        for opts in (dict(per_sm=1), dict(per_sm=1, pages_first=True), dict(per_sm=64, stages=3)):
            assert torch.equal(to.quest_scores(q, kmin, kmax, seq_len=sl, page_size=page, bp=2, **opts), s4), opts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 2])
def test_quest_select(backend, G):
    """quest_select equals quest_scores + select_topk: odd page counts, seq_len masking, more
    pages asked for than a row has, the decoding query's page forced (in the score kernel)."""
    B, Hkv, T, D, page = 2, 2, 171, 16, 4  # 43 pages
    k = _rand(B, Hkv, T, D, seed=40)
    q = _rand(B, Hkv * G, D, seed=41)
    sl = torch.tensor([171, 50], device=DEV)  # row 1: 13 valid pages
    kmin, kmax = naive.page_minmax_torch(k, page, sl)
    for kk, seq_len, force in ((5, None, False), (5, sl, False), (5, sl, True), (20, sl, True),
                               (43, None, False)):
        s = naive.quest_scores_torch(q, kmin, kmax, seq_len, page if seq_len is not None else None)
        if force:
            s[torch.arange(B), :, ((sl - 1) // page).long()] = torch.finfo(torch.float32).max
        want = naive.select_topk_torch(s, kk).cpu()
        got = sp.quest_select(q, kmin, kmax, kk, seq_len=seq_len,
                              page_size=page if seq_len is not None else None, force_last=force,
                              backend=backend).cpu()
        assert got.dtype == torch.int32 and torch.equal(got, want), (kk, force)
        if force:  # the query's own page is kept even where its bound is low
            assert ((got == ((sl.cpu() - 1) // page)[:, None, None].int()).sum(-1) == 1).all()
    with pytest.raises(ValueError, match="force_last needs seq_len"):
        sp.quest_select(q, kmin, kmax, 3, force_last=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_means(backend, dtype):
    B, H, T, D, bs = 2, 2, 29, 16, 8
    k = _rand(B, H, T, D, dtype=dtype, seed=3)
    sl = torch.tensor([29, 9], device=DEV)
    m = sp.block_means(k, bs, sl, backend=backend)
    assert m.dtype == torch.float32 and m.shape == (B, H, 4, D)
    for b, L in enumerate(sl.tolist()):
        for n in range(4):
            s0, s1 = n * bs, min((n + 1) * bs, L)
            ref = k[b, :, s0:s1].double().mean(1) if s1 > s0 else torch.zeros(H, D)
            assert _rel(m[b, :, n], ref) < 1e-5 or s1 <= s0 and (m[b, :, n] == 0).all()


def _decode_starts(B):
    g = torch.Generator().manual_seed(3)
    return torch.tensor([1, 7, 8, 16, int(torch.randint(2, 20, (1,), generator=g))][:B], device=DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", [None, "int8"])
def test_page_minmax_refresh_equals_recompute(backend, dtype, quant):
    """Decoding's page refresh, one key per row per step (rows at and around page boundaries,
    empty pages ahead, keys past pos in the cache ignored), equals page_minmax recomputed."""
    B, H, T, D, page = 5, 2, 32, 24, 8
    k = _rand(B, H, T, D, dtype=dtype, seed=7)
    start = _decode_starts(B)
    meta = naive.page_minmax_torch(k, page, start, quant)
    for step in range(T - int(start.max())):
        pos = start + step
        out = sp.page_minmax_refresh(k, pos, page, *meta, backend=backend)
        assert all(a is b for a, b in zip(out, meta))
        ref = naive.page_minmax_torch(k, page, pos + 1, quant)
        assert all(torch.equal(a, b) for a, b in zip(meta, ref)), step
    assert meta[0].dtype == (torch.int8 if quant else dtype)
    with pytest.raises(ValueError, match="int8 page bounds need their scale"):  # bounds and step go together
        sp.page_minmax_refresh(k, pos, page, *meta[:2], None if quant else meta[0][..., 0].float(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_means_update_equals_recompute(backend, dtype):
    """Decoding's incremental block means equal the means recomputed (up to fp32 rounding)."""
    B, H, T, D, page = 5, 2, 32, 24, 8
    k = _rand(B, H, T, D, dtype=dtype, seed=7)
    start = _decode_starts(B)
    means = naive.block_means_torch(k, page, start)
    rows = torch.arange(B, device=DEV)
    for step in range(T - int(start.max())):
        pos = start + step
        assert sp.block_means_update(means, k[rows, :, pos], pos, page, backend=backend) is means
        ref = naive.block_means_torch(k, page, pos + 1)
        torch.testing.assert_close(means, ref, atol=1e-5, rtol=1e-5)
    assert means.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# MoBA gate


def _ref_gate(q, kmeans, bs, topk, pos):
    G = q.shape[1] // kmeans.shape[1]
    s = torch.einsum("bhtd,bhnd->bhtn", q.double().cpu(), kmeans.double().cpu().repeat_interleave(G, 1))
    B, Hq, Tq, NB = s.shape
    out = torch.full((B, Hq, Tq, topk), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hq):
            for t in range(Tq):
                own = int(pos[t]) // bs
                past = list(range(own))
                past.sort(key=lambda n: (-s[b, h, t, n].item(), n))
                sel = sorted(past[: topk - 1] + [own])
                out[b, h, t, : len(sel)] = torch.tensor(sel, dtype=torch.int32)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 2])
def test_moba_gate_topk(backend, G):
    B, Hkv, T, D, bs, topk = 2, 2, 50, 16, 8, 3
    k = _rand(B, Hkv, T, D, seed=4)
    q = _rand(B, Hkv * G, 9, D, seed=5)
    pos = torch.tensor([0, 3, 8, 15, 16, 23, 30, 41, 49], device=DEV)
    km = naive.block_means_torch(k, bs)
    idx = sp.moba_gate_topk(q, km, bs, topk, pos, backend=backend)
    assert idx.dtype == torch.int32 and idx.shape == (B, Hkv * G, 9, topk)
    assert torch.equal(idx.cpu(), _ref_gate(q, km, bs, topk, pos))


@pytest.mark.skipif(not CAN_TRITON, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("topk", [1, 2, 5, 9])
def test_moba_gate_topk_chunks(monkeypatch, topk):
    """The Triton path's gate scores in chunks of query positions (forced small here) give the
    twin's lists, for every topk up to more than the past blocks, positions past the last block
    (own block beyond the means: not selected) and tied scores (identical block means)."""
    from kernels.sparse import triton_ops as to

    B, Hkv, G, D, bs = 2, 2, 2, 16, 4
    km = naive.block_means_torch(_rand(B, Hkv, 29, D, seed=60), bs)  # 8 blocks
    km[:, :, 5] = km[:, :, 2]  # a tie: the lower block first
    q = _rand(B, Hkv * G, 13, D, seed=61)
    pos = torch.tensor([0, 2, 4, 7, 9, 13, 16, 20, 24, 27, 28, 31, 40], device=DEV)
    want = naive.moba_gate_topk_torch(q, km, bs, topk, pos)
    for chunk in (B * Hkv * G * 8 * 3, 1 << 26):  # 3 positions per chunk, then all at once
        monkeypatch.setattr(to, "_GATE_CHUNK_ELEMS", chunk)
        assert torch.equal(to.moba_gate_topk(q, km, bs, topk, pos).cpu(), want.cpu()), chunk


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_pick_planted_block(backend):
    """Quest and MoBA both pick a block whose keys align with the query."""
    B, H, T, D, bs = 1, 2, 64, 16, 8
    k = _rand(B, H, T, D, seed=6, scale=0.3)
    q = _rand(B, H, D, seed=7)
    k[:, :, 24:32] += 3 * q[:, :, None, :] / q.norm(dim=-1, keepdim=True)[..., None]  # block 3
    kmin, kmax = sp.page_minmax(k, bs, backend=backend)
    s = sp.quest_scores(q, kmin, kmax, backend=backend)
    assert (s.argmax(-1) == 3).all()
    km = sp.block_means(k, bs, backend=backend)
    idx = sp.moba_gate_topk(q[:, :, None], km, bs, 2, torch.tensor([T - 1]), backend=backend)
    assert (idx[:, :, 0] == torch.tensor([3, 7], dtype=torch.int32, device=DEV)).all()


# --------------------------------------------------------------------------------------------
# decoding


def _check_block_sparse_decode(out, q, k, v, idx, bs, sl):
    """`out` equals the float64 decode over the selected blocks below seq_len; rows with nothing
    selected are zeros."""
    B, Hq, D = q.shape
    T = k.shape[2]
    assert out.dtype == q.dtype and out.shape == (B, Hq, D)
    allowed = naive.block_sparse_mask(idx, bs, T, Hq).cpu() & \
        (torch.arange(T)[None, :] < sl.cpu()[:, None])[:, None]
    ref = _ref_decode(q, k, v, allowed)
    ok = allowed.any(-1)
    assert _rel(out.cpu()[ok], ref[ok]) < TOL[q.dtype]
    assert (out.cpu()[~ok] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,per_q", [(1, False), (2, False), (2, True)])
def test_block_sparse_decode(backend, dtype, G, per_q):
    B, Hkv, T, D, bs = 2, 2, 43, 16, 8
    Hq = Hkv * G
    q, k, v = _rand(B, Hq, D, dtype=dtype, seed=8), _rand(B, Hkv, T, D, dtype=dtype, seed=9), \
        _rand(B, Hkv, T, D, dtype=dtype, seed=10)
    sl = torch.tensor([43, 30], device=DEV)
    Hsel = Hq if per_q else Hkv
    gen = torch.Generator().manual_seed(11)
    idx = torch.full((B, Hsel, 4), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hsel):
            n = 1 + (b + h) % 4
            idx[b, h, :n] = torch.randperm(6, generator=gen)[:n].sort().values.int()
    idx[0, 0, :3] = torch.tensor([1, 3, 5], dtype=torch.int32)  # 5 is the partial last block
    idx = idx.to(DEV)
    out = sp.block_sparse_decode(q, k, v, idx, bs, seq_len=sl, backend=backend)
    _check_block_sparse_decode(out, q, k, v, idx, bs, sl)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 2])
def test_block_sparse_decode_full_budget_is_dense(backend, G):
    B, Hkv, T, D, bs = 2, 2, 37, 16, 8
    Hq = Hkv * G
    q, k, v = _rand(B, Hq, D, seed=12), _rand(B, Hkv, T, D, seed=13), _rand(B, Hkv, T, D, seed=14)
    idx = torch.arange(5, dtype=torch.int32, device=DEV).expand(B, Hkv, 5).contiguous()
    sl = torch.tensor([37, 21], device=DEV)
    out = sp.block_sparse_decode(q, k, v, idx, bs, seq_len=sl, backend=backend)
    dense = sp.dense_decode_reference(q, k, v, seq_len=sl)
    assert _rel(out, dense) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk,window,prefix", [(1, 4, 0), (4, 5, 3), (7, 2, 1), (16, 100, 0)])
def test_dilated_decode(backend, dtype, chunk, window, prefix):
    B, Hkv, G, T, D = 2, 2, 2, 41, 16
    Hq = Hkv * G
    q, k, v = _rand(B, Hq, D, dtype=dtype, seed=15), _rand(B, Hkv, T, D, dtype=dtype, seed=16), \
        _rand(B, Hkv, T, D, dtype=dtype, seed=17)
    sl = torch.tensor([41, 26], device=DEV)
    out = sp.dilated_decode(q, k, v, chunk, window, prefix, seq_len=sl, backend=backend)
    assert out.dtype == dtype
    t = sl.cpu() - 1
    j = torch.arange(T)
    allowed = torch.stack([(j <= tt) & ((tt - j <= window) | (j < prefix) | ((j + 1) % chunk == 0))
                           for tt in t.tolist()])
    ref = _ref_decode(q, k, v, allowed[:, None].expand(B, Hq, T))
    assert _rel(out, ref) < TOL[dtype]
    if chunk == 1:
        assert _rel(out, sp.dense_decode_reference(q, k, v, seq_len=sl)) < TOL[dtype]


# --------------------------------------------------------------------------------------------
# MoBA prefill


def _ref_moba_prefill(q, k, v, bs, topk):
    B, Hq, T, D = q.shape
    km = naive.block_means_torch(k.double().cpu(), bs)
    idx = _ref_gate(q, km, bs, topk, torch.arange(T)).long()
    NB = km.shape[2]
    blk = torch.zeros(B, Hq, T, NB + 1, dtype=torch.bool)
    blk.scatter_(-1, torch.where(idx < 0, NB, idx), True)
    allowed = blk[..., :NB].repeat_interleave(bs, -1)[..., :T] & \
        (torch.arange(T)[None, :] <= torch.arange(T)[:, None])
    G = Hq // k.shape[1]
    kd, vd = k.double().cpu().repeat_interleave(G, 1), v.double().cpu().repeat_interleave(G, 1)
    s = torch.einsum("bhtd,bhsd->bhts", q.double().cpu(), kd) * D ** -0.5
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(s.masked_fill(~allowed, -math.inf), -1), vd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 2])
def test_moba_prefill(backend, dtype, G):
    B, Hkv, T, D, bs, topk = 1, 2, 53, 16, 16, 2
    Hq = Hkv * G
    q, k, v = _rand(B, Hq, T, D, dtype=dtype, seed=18), _rand(B, Hkv, T, D, dtype=dtype, seed=19), \
        _rand(B, Hkv, T, D, dtype=dtype, seed=20)
    out = sp.moba_prefill(q, k, v, bs, topk, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, _ref_moba_prefill(q, k, v, bs, topk)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_moba_prefill_full_topk_is_causal_dense(backend):
    B, H, T, D, bs = 2, 2, 45, 16, 16
    q, k, v = _rand(B, H, T, D, seed=21), _rand(B, H, T, D, seed=22), _rand(B, H, T, D, seed=23)
    out = sp.moba_prefill(q, k, v, bs, topk=3, backend=backend)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           is_causal=True)
    assert _rel(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------
# SnapKV vote


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,causal", [(1, True), (2, True), (2, False)])
def test_snapkv_votes(backend, dtype, G, causal):
    B, Hkv, T, W, D = 2, 2, 70, 6, 16
    Hq = Hkv * G
    k = _rand(B, Hkv, T, D, dtype=dtype, seed=24)
    qw = _rand(B, Hq, W, D, dtype=dtype, seed=25)
    votes = sp.snapkv_votes(qw, k, window_causal=causal, backend=backend)
    assert votes.dtype == torch.float32 and votes.shape == (B, Hq, T)
    s = torch.einsum("bhwd,bhtd->bhwt", qw.double().cpu(),
                     k.double().cpu().repeat_interleave(G, 1)) * D ** -0.5
    if causal:
        s = s.masked_fill(torch.arange(T)[None, :] > torch.arange(T - W, T)[:, None], -math.inf)
    ref = torch.softmax(s, -1).sum(2)
    assert _rel(votes, ref) < TOL[dtype]
    assert abs(votes.sum().item() - B * Hq * W) < 1e-3 * B * Hq * W


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_topk(backend):
    g = torch.Generator().manual_seed(26)
    s = torch.randn(3, 2, 37, generator=g)
    s[0, 0, 5:9] = 2.5  # ties at the threshold go to the lower indices
    s[1, 1, :] = float("-inf")
    s[1, 1, 3] = -7.0  # fewer finite entries than k
    s[2, 0, 10] = float("-inf")
    s = s.to(DEV)
    for kk in (1, 6, 37):
        idx = sp.select_topk(s, kk, backend=backend).cpu()
        assert idx.dtype == torch.int32 and idx.shape == (3, 2, kk)
        for r in range(3):
            for h in range(2):
                row = s[r, h].cpu().double()
                fin = [i for i in range(37) if row[i] > -math.inf]
                want = sorted(sorted(fin, key=lambda i: (-row[i].item(), i))[:kk])
                got = idx[r, h].tolist()
                assert got == want + [-1] * (kk - len(want))


# --------------------------------------------------------------------------------------------
# Triton-only options: decode splits and launch configs, top-k thresholds per pass

TRITON_ONLY = pytest.mark.skipif(not CAN_TRITON, reason="Triton needs CUDA or TRITON_INTERPRET=1")


@TRITON_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,per_q", [(1, False), (2, False), (2, True), (4, False)])
@pytest.mark.parametrize("bs", [8, 32])
def test_block_sparse_decode_splits(dtype, G, per_q, bs):
    """The decode kernel equals the float64 reference: odd lengths, seq_len masking, -1 padding,
    a row with nothing selected, per-KV-head and per-query-head indices, blocks smaller and larger
    than the 16-token tile, the default and a forced number of splits."""
    from kernels.sparse import triton_ops as to
    B, Hkv, T, D = 2, 2, 83, 16
    Hq = Hkv * G
    q, k, v = _rand(B, Hq, D, dtype=dtype, seed=30), _rand(B, Hkv, T, D, dtype=dtype, seed=31), \
        _rand(B, Hkv, T, D, dtype=dtype, seed=32)
    sl = torch.tensor([83, 50], device=DEV)
    NB = math.ceil(T / bs)
    Hsel = Hq if per_q else Hkv
    gen = torch.Generator().manual_seed(33)
    idx = torch.full((B, Hsel, 5), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hsel):
            n = min(NB, 1 + (b + h) % 5)
            idx[b, h, :n] = torch.randperm(NB, generator=gen)[:n].sort().values.int()
    idx[0, 0, :2] = torch.tensor([0, NB - 1], dtype=torch.int32)  # the partial last block
    idx[1, Hsel - 1] = -1  # nothing selected: zeros
    idx = idx.to(DEV)
    for ns, cfg in ((None, None), (3, None), (None, dict(waves=2)), (3, dict(splits_first=True))):
        out = to.block_sparse_decode(q, k, v, idx, bs, seq_len=sl, num_splits=ns, cfg=cfg)
        _check_block_sparse_decode(out, q, k, v, idx, bs, sl)
    out = to.block_sparse_decode(q, k, v, idx, bs, num_splits=2)  # no seq_len: rows are T long
    _check_block_sparse_decode(out, q, k, v, idx, bs, torch.full((B,), T, device=DEV))
    out = to.block_sparse_decode(q, k, v, idx, bs, seq_len=sl)
    twin = naive.block_sparse_decode_torch(q, k, v, idx, bs, seq_len=sl)
    assert _rel(out, twin) < TOL[dtype]
    with pytest.raises(ValueError):  # selection heads neither Hkv nor Hq
        to.block_sparse_decode(q, k, v, idx[:, :1].expand(B, 3, 5), bs)


@TRITON_ONLY
def test_select_topk_search():
    """The Triton top-k's threshold search equals the torch twin: ties, all-equal rows, fewer
    finite entries than k, both ends of the float range, continuous scores at three scales."""
    from kernels.sparse import triton_ops as to
    g = torch.Generator().manual_seed(34)
    s = torch.randn(4, 2, 45, generator=g)
    s[0, 0, 5:9] = 2.5  # ties at the threshold
    s[1, 1, :] = float("-inf")
    s[1, 1, 3] = -7.0  # fewer finite entries than k
    s[2, 0, 10] = float("-inf")
    s[3, 0, :] = 0.0  # all tied
    s[3, 1, :10] = -1e-30
    s[3, 1, 10:20] = 1e30
    s[2, 1, 7] = torch.finfo(torch.float32).max  # a forced page (engine) beside the float range's
    s[2, 1, 9] = -torch.finfo(torch.float32).max  # other end: the value range overflows
    s = s.to(DEV)
    for kk in (1, 4, 6, 19, 45, 50):
        ref = naive.select_topk_torch(s, kk)
        got = to.select_topk(s, kk)
        assert got.dtype == torch.int32 and got.shape == ref.shape
        assert torch.equal(got.cpu(), ref.cpu()), kk
    # continuous scores of both signs (the search's early exit), a few ties, an odd length
    c = torch.randn(3, 1000, generator=g) * torch.tensor([[1e-3], [1.0], [1e4]])
    c[1, 100:110] = c[1, 5]
    c = c.to(DEV)
    for kk in (1, 63, 500, 999):
        ref = naive.select_topk_torch(c, kk)
        assert torch.equal(to.select_topk(c, kk).cpu(), ref.cpu()), kk
    # a long row (8229 entries: past 8192, so a 16384-wide block mostly masked) with a long tie run
    w = torch.randn(2, 8229, generator=g)
    w[0, 20:300] = 0.0  # about the median: k = 4100 takes some of them
    w[1, ::3] = float("-inf")
    w = w.to(DEV)
    for kk in (1, 600, 4100, 8229):
        ref = naive.select_topk_torch(w, kk)
        assert torch.equal(to.select_topk(w, kk).cpu(), ref.cpu()), kk
