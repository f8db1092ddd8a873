"""Torch twins of the sparse-attention kernels (readable, CPU-friendly, the tests' references).

Layout: HF's [batch, heads, seq, dim]. K/V have Hkv heads, queries Hq = G * Hkv heads; query
head h reads KV head h // G. Scores and softmax in fp32; outputs in the input dtype.

Conventions shared with the Triton kernels (kernels/sparse/triton_ops.py):
* ``seq_len`` [B] (int) gives each row's valid length; positions >= seq_len are ignored. For a
  decoding query the query sits at position seq_len - 1 and its own key is already in the cache.
* Empty pages / blocks (entirely at or beyond seq_len) get zeros in page_minmax / block_means;
  ``quest_scores(..., seq_len=, page_size=)`` gives them -inf so they are never picked.
* Index lists (block_idx, moba_gate_topk's output) are int32, valid entries ascending first,
  -1 padding last. -1 entries are skipped; duplicate entries would be counted twice (do not
  pass duplicates).
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def _seq_len(seq_len, B, T, device):
    if seq_len is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    if not torch.is_tensor(seq_len):
        seq_len = torch.as_tensor(seq_len)
    seq_len = seq_len.to(device=device, dtype=torch.long).reshape(-1)
    if seq_len.numel() == 1 and B > 1:
        seq_len = seq_len.expand(B)
    return seq_len


def _group(Hq, Hkv):
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    return Hq // Hkv


def _expand_kv(x, G):
    """[B, Hkv, ...] -> [B, Hkv*G, ...] (query head h reads KV head h // G)."""
    return x if G == 1 else x.repeat_interleave(G, dim=1)


# --------------------------------------------------------------------------------------------
# metadata: Quest page min/max, MoBA block means


# int8 page bounds (``quant="int8"``): per (row, head, page) a step s = max|bound| * I8_STEP and
# the bounds as floor(min / s) and ceil(max / s) (nudged outward past fp32 division error), so
# q_min * s <= min and q_max * s >= max: the Quest score stays an upper bound of q.k over the
# page, from half the bytes. I8_STEP keeps |bound / s| below 127 for the nudge; zeros stay 0.
QUANTS = (None, "int8")
I8_STEP = (1.0 + 2.0 ** -8) / 127.0
I8_NUDGE = 1e-3


def check_quant(quant):
    if quant not in QUANTS:
        raise ValueError(f"bad page-bounds quant {quant!r}: use None (the keys' dtype) or 'int8'")


def check_bounds_scale(kmin, scale):
    if (scale is None) != (kmin.dtype != torch.int8):
        raise ValueError("int8 page bounds need their scale (page_minmax(..., quant='int8')'s third output), "
                         "and only they take one")


def quantize_bounds_torch(kmin, kmax):
    """(kmin, kmax) [..., D] -> (int8 kmin, int8 kmax, fp32 step [...]) as described above."""
    lo, hi = kmin.float(), kmax.float()
    s = torch.maximum(lo.abs().amax(-1), hi.abs().amax(-1)) * I8_STEP  # 0 for an all-zero page
    d = torch.where(s > 0, s, 1.0)[..., None]
    lq = torch.floor(lo / d - I8_NUDGE).clamp(-127, 127)
    hq = torch.ceil(hi / d + I8_NUDGE).clamp(-127, 127)
    # zeros stay exact (empty pages hold zeros and step 0, as never-written ones)
    lq, hq = (torch.where(x == 0, 0.0, y).to(torch.int8) for x, y in ((lo, lq), (hi, hq)))
    return lq, hq, s


def page_minmax_torch(k, page_size, seq_len=None, quant=None):
    check_quant(quant)
    B, H, T, D = k.shape
    P = math.ceil(T / page_size)
    sl = _seq_len(seq_len, B, T, k.device)
    pad = P * page_size - T
    kf = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, P, page_size, D)
    pos = torch.arange(P * page_size, device=k.device).view(P, page_size)
    valid = (pos[None] < sl[:, None, None])[:, None, :, :, None]  # [B,1,P,page,1]
    kmin = torch.where(valid, kf, torch.full_like(kf, float("inf"))).amin(3)
    kmax = torch.where(valid, kf, torch.full_like(kf, NEG_INF)).amax(3)
    empty = ~valid.any(3)  # [B,1,P,1]
    kmin = torch.where(empty, torch.zeros_like(kmin), kmin)
    kmax = torch.where(empty, torch.zeros_like(kmax), kmax)
    return quantize_bounds_torch(kmin, kmax) if quant else (kmin, kmax)


def quest_scores_torch(q, kmin, kmax, seq_len=None, page_size=None, scale=None):
    """q [B, Hq, D], kmin/kmax [B, Hkv, P, D] -> [B, Hq, P] fp32 upper bounds of q.k per page.
    ``scale`` [B, Hkv, P]: int8 bounds (page_minmax(..., quant="int8")), the sum times the step."""
    B, Hq, D = q.shape
    G = _group(Hq, kmin.shape[1])
    check_bounds_scale(kmin, scale)
    qf = q.float()[:, :, None, :]
    lo, hi = _expand_kv(kmin.float(), G), _expand_kv(kmax.float(), G)
    s = torch.maximum(qf * hi, qf * lo).sum(-1)
    if scale is not None:
        s = s * _expand_kv(scale.float(), G)
    if seq_len is not None:
        if page_size is None:
            raise ValueError("quest_scores: seq_len needs page_size")
        P = kmin.shape[2]
        sl = _seq_len(seq_len, B, P * page_size, q.device)
        n_pages = (sl + page_size - 1) // page_size
        ok = torch.arange(P, device=q.device)[None, :] < n_pages[:, None]
        s = s.masked_fill(~ok[:, None, :], NEG_INF)
    return s


def quest_select_torch(q, kmin, kmax, k, seq_len=None, page_size=None, force_last=False, scale=None):
    """quest_scores_torch then select_topk_torch; force_last gives the page holding position
    seq_len - 1 the largest finite score first (kept, and counted in k)."""
    s = quest_scores_torch(q, kmin, kmax, seq_len, page_size, scale)
    if force_last:
        if seq_len is None:
            raise ValueError("quest_select: force_last needs seq_len")
        B, P = s.shape[0], s.shape[2]
        last = (_seq_len(seq_len, B, P * page_size, q.device) - 1) // page_size
        s[torch.arange(B, device=s.device), :, last.long()] = torch.finfo(torch.float32).max
    return select_topk_torch(s, k)


def block_means_torch(k, block_size, seq_len=None):
    B, H, T, D = k.shape
    NB = math.ceil(T / block_size)
    sl = _seq_len(seq_len, B, T, k.device)
    pad = NB * block_size - T
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, H, NB, block_size, D)
    pos = torch.arange(NB * block_size, device=k.device).view(NB, block_size)
    valid = (pos[None] < sl[:, None, None])[:, None, :, :, None].float()
    cnt = valid.sum(3)
    return (kf * valid).sum(3) / cnt.clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# incremental metadata (decoding: one new key per row)


def _update_rows(meta, pos, block_size):
    B = meta.shape[0]
    pos = torch.as_tensor(pos, device=meta.device).long().reshape(-1)
    if pos.numel() == 1 and B > 1:
        pos = pos.expand(B)
    rows = torch.arange(B, device=meta.device)
    return rows, pos // block_size, (pos % block_size)


def page_minmax_refresh_torch(k, pos, page_size, kmin, kmax, scale=None):
    """In place: recompute the bounds of the page holding absolute position pos [B] from the cache
    k [B, Hkv, T, D] (keys up to and including pos; the page's later slots are not yet valid).
    With ``scale`` the bounds are int8 and quantized as page_minmax(..., quant="int8").
    Returns (kmin, kmax) or (kmin, kmax, scale)."""
    check_bounds_scale(kmin, scale)
    rows, p, off = _update_rows(kmin, pos, page_size)
    T = k.shape[2]
    t = p[:, None] * page_size + torch.arange(page_size, device=k.device)  # [B, page]
    ok = (t <= (p * page_size + off)[:, None]) & (t < T)
    kp = k[rows[:, None], :, t.clamp(max=T - 1)]  # [B, page, Hkv, D]
    okb = ok[:, :, None, None]
    lo = torch.where(okb, kp, torch.full_like(kp, float("inf"))).amin(1)
    hi = torch.where(okb, kp, torch.full_like(kp, NEG_INF)).amax(1)  # [B, Hkv, D]
    if scale is None:
        kmin[rows, :, p], kmax[rows, :, p] = lo.to(kmin.dtype), hi.to(kmax.dtype)
        return kmin, kmax
    lq, hq, s = quantize_bounds_torch(lo, hi)
    kmin[rows, :, p], kmax[rows, :, p], scale[rows, :, p] = lq, hq, s
    return kmin, kmax, scale


def block_means_update_torch(kmeans, k_new, pos, block_size):
    """In place: fold k_new [B, Hkv, D] (at absolute position pos [B]) into its block's fp32 mean
    ([B, Hkv, NB, D]): m <- (m * c + k) / (c + 1) with c = pos % block keys already in the block
    (c = 0: m <- k). Equals block_means over the block up to fp32 rounding. Returns kmeans."""
    rows, blk, off = _update_rows(kmeans, pos, block_size)
    c = off.to(torch.float32)[:, None, None]
    kn = k_new.to(torch.float32)
    m = kmeans[rows, :, blk].float()
    kmeans[rows, :, blk] = torch.where(c == 0, kn, (m * c + kn) / (c + 1)).to(kmeans.dtype)
    return kmeans


# --------------------------------------------------------------------------------------------
# MoBA gate


def _q_pos(q_pos, B, Tq, device):
    q_pos = torch.as_tensor(q_pos, device=device).long()
    if q_pos.dim() == 0:
        q_pos = q_pos.view(1)
    if q_pos.dim() == 1:
        q_pos = q_pos[None].expand(B, Tq)
    return q_pos


def moba_gate_topk_torch(q, kmeans, block_size, topk, q_pos):
    """idx [B, Hq, Tq, topk] int32: own block + top (topk-1) strictly-past blocks by <q, mean>.

    Valid indices ascending, -1 padding last. Ties among equal scores go to the lower block.
    """
    B, Hq, Tq, D = q.shape
    NB = kmeans.shape[2]
    G = _group(Hq, kmeans.shape[1])
    pos = _q_pos(q_pos, B, Tq, q.device)  # [B, Tq]
    own = pos // block_size  # [B, Tq]
    s = torch.einsum("bhtd,bhnd->bhtn", q.float(), _expand_kv(kmeans.float(), G))
    nb = torch.arange(NB, device=q.device)
    past = nb[None, None, :] < own[:, :, None]  # [B, Tq, NB]
    s = s.masked_fill(~past[:, None], NEG_INF)
    sel = torch.zeros(B, Hq, Tq, NB, dtype=torch.bool, device=q.device)
    if topk > 1:
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : topk - 1]
        ok = torch.gather(s, -1, order) > NEG_INF
        sel.scatter_(-1, order, ok)
    sel |= (nb[None, None, :] == own[:, :, None])[:, None]
    # ascending valid entries, -1 after
    key = torch.where(sel, nb.expand_as(sel), torch.full_like(sel, NB, dtype=torch.long))
    idx = torch.sort(key, dim=-1).values[..., :topk]
    if idx.shape[-1] < topk:
        idx = torch.nn.functional.pad(idx, (0, topk - idx.shape[-1]), value=NB)
    idx = torch.where(idx >= NB, torch.full_like(idx, -1), idx)
    return idx.to(torch.int32)


def select_topk_torch(scores, k):
    """[..., N] -> [..., k] int32: indices of the k largest finite scores, ascending, -1 padded
    (fewer than k finite entries). Ties go to the lower index."""
    N = scores.shape[-1]
    kk = min(k, N)
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :kk]
    ok = torch.gather(scores.float(), -1, order) > NEG_INF
    order = torch.where(ok, order, torch.full_like(order, N))
    idx = torch.sort(order, dim=-1).values
    if kk < k:
        idx = torch.nn.functional.pad(idx, (0, k - kk), value=N)
    return torch.where(idx >= N, torch.full_like(idx, -1), idx).to(torch.int32)


# --------------------------------------------------------------------------------------------
# decoding


def _masked_decode(q, k, v, allowed, scale):
    """q [B, Hq, D], k/v [B, Hkv, T, D], allowed [B, Hq, T] bool -> [B, Hq, D]."""
    B, Hq, D = q.shape
    G = _group(Hq, k.shape[1])
    scale = D ** -0.5 if scale is None else scale
    kf, vf = _expand_kv(k, G).float(), _expand_kv(v, G).float()
    s = torch.einsum("bhd,bhtd->bht", q.float(), kf) * scale
    s = s.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with nothing allowed give zeros
    return torch.einsum("bht,bhtd->bhd", p, vf).to(q.dtype)


def dense_decode_reference(q, k, v, seq_len=None, scale=None):
    """Dense decoding attention of one query per row over keys < seq_len."""
    B, Hq, D = q.shape
    T = k.shape[2]
    sl = _seq_len(seq_len, B, T, q.device)
    allowed = torch.arange(T, device=q.device)[None, :] < sl[:, None]
    return _masked_decode(q, k, v, allowed[:, None, :].expand(B, Hq, T), scale)


def block_sparse_mask(block_idx, block_size, T, Hq):
    """[B, Hq, T] bool mask of the tokens in the selected blocks (-1 skipped)."""
    B, Hsel, NSEL = block_idx.shape
    if Hsel != Hq:
        block_idx = _expand_kv(block_idx, _group(Hq, Hsel))
    NB = math.ceil(T / block_size)
    bi = block_idx.long()
    blk = torch.zeros(B, Hq, NB + 1, dtype=torch.bool, device=block_idx.device)
    blk.scatter_(-1, torch.where(bi < 0, torch.full_like(bi, NB), bi.clamp_max(NB)), True)
    blk = blk[..., :NB]
    return blk.repeat_interleave(block_size, dim=-1)[..., :T]


def block_sparse_decode_torch(q, k, v, block_idx, block_size, seq_len=None, scale=None):
    B, Hq, D = q.shape
    T = k.shape[2]
    sl = _seq_len(seq_len, B, T, q.device)
    allowed = block_sparse_mask(block_idx, block_size, T, Hq)
    allowed &= (torch.arange(T, device=q.device)[None, :] < sl[:, None])[:, None, :]
    return _masked_decode(q, k, v, allowed, scale)


def dilated_mask(t, T, chunk, window, prefix, keys=None):
    """[B, T] bool: keys j <= t with t - j <= window, or j < prefix, or (j + 1) % chunk == 0.
    ``keys`` (1-D positions, T ignored): the mask over those keys only."""
    j = (torch.arange(T, device=t.device) if keys is None else keys)[None, :]
    t = t[:, None]
    return (j <= t) & ((t - j <= window) | (j < prefix) | ((j + 1) % chunk == 0))


def dilated_decode_torch(q, k, v, chunk, window, prefix, seq_len=None, scale=None):
    B, Hq, D = q.shape
    T = k.shape[2]
    sl = _seq_len(seq_len, B, T, q.device)
    allowed = dilated_mask(sl - 1, T, chunk, window, prefix)
    return _masked_decode(q, k, v, allowed[:, None, :].expand(B, Hq, T), scale)


# --------------------------------------------------------------------------------------------
# MoBA prefill


def moba_prefill_torch(q, k, v, block_size, topk, scale=None, q_chunk=512):
    """Causal MoBA attention over a prompt: q/k/v cover the same T positions.

    Query i attends its top (topk-1) strictly-past blocks (gate: <q_i, block mean of k>) fully and
    its own block causally. Queries are processed in chunks of q_chunk to bound memory.
    """
    B, Hq, T, D = q.shape
    G = _group(Hq, k.shape[1])
    scale = D ** -0.5 if scale is None else scale
    kmeans = block_means_torch(k, block_size)
    NB = kmeans.shape[2]
    kf, vf = _expand_kv(k, G).float(), _expand_kv(v, G).float()
    out = torch.empty_like(q)
    j = torch.arange(T, device=q.device)
    for s0 in range(0, T, q_chunk):
        s1 = min(T, s0 + q_chunk)
        pos = torch.arange(s0, s1, device=q.device)
        idx = moba_gate_topk_torch(q[:, :, s0:s1], kmeans, block_size, topk, pos).long()
        blk = torch.zeros(B, Hq, s1 - s0, NB + 1, dtype=torch.bool, device=q.device)
        blk.scatter_(-1, torch.where(idx < 0, torch.full_like(idx, NB), idx), True)
        allowed = blk[..., :NB].repeat_interleave(block_size, dim=-1)[..., :T]
        allowed &= (j[None, :] <= pos[:, None])[None, None]
        s = torch.einsum("bhtd,bhsd->bhts", q[:, :, s0:s1].float(), kf) * scale
        p = torch.softmax(s.masked_fill(~allowed, NEG_INF), dim=-1)
        out[:, :, s0:s1] = torch.einsum("bhts,bhsd->bhtd", p, vf).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------
# SnapKV vote


def snapkv_votes_torch(q_win, k, scale=None, window_causal=True, k_chunk=8192):
    """votes [B, Hq, T] fp32: sum over the W window queries of softmax(q.k * scale) over keys.

    The window queries sit at positions T-W..T-1; with window_causal, window query w attends keys
    j <= T-W+w. Two passes over key chunks (row log-sum-exp, then column sums), so only
    [B, Hq, W, k_chunk] is alive at once.
    """
    B, Hq, W, D = q_win.shape
    T = k.shape[2]
    G = _group(Hq, k.shape[1])
    scale = D ** -0.5 if scale is None else scale
    qf = q_win.float()
    qpos = torch.arange(T - W, T, device=k.device)

    def scores(c0, c1):
        kc = _expand_kv(k[:, :, c0:c1], G).float()
        s = torch.einsum("bhwd,bhtd->bhwt", qf, kc) * scale
        if window_causal:
            j = torch.arange(c0, c1, device=k.device)
            s = s.masked_fill(j[None, :] > qpos[:, None], NEG_INF)
        return s

    m = torch.full((B, Hq, W), NEG_INF, device=k.device)
    l = torch.zeros(B, Hq, W, device=k.device)
    for c0 in range(0, T, k_chunk):
        s = scores(c0, min(T, c0 + k_chunk))
        m_new = torch.maximum(m, s.amax(-1))
        l = l * torch.exp(m - m_new) + torch.exp(s - m_new[..., None]).sum(-1)
        m = m_new
    lse = m + torch.log(l)
    votes = torch.empty(B, Hq, T, device=k.device)
    for c0 in range(0, T, k_chunk):
        c1 = min(T, c0 + k_chunk)
        votes[..., c0:c1] = torch.exp(scores(c0, c1) - lse[..., None]).sum(2)
    return votes
