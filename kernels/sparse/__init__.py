"""Sparse-attention ops for query-aware KV sparsity (Quest, MoBA, SnapKV, RAT+ dilated).

Each public op has a Triton kernel (triton_ops.py) and a torch twin (naive.py). ``backend``:
"auto" (default) takes Triton for CUDA tensors and the torch twin otherwise; "triton" forces the
kernel (on CPU only under TRITON_INTERPRET=1, for tests); "torch" forces the twin.

Layout [batch, heads, seq, dim]; K/V with Hkv heads, queries with Hq = G * Hkv heads (query head
h reads KV head h // G). Scores and softmax in fp32, outputs in the input dtype, ``scale``
defaults to dim ** -0.5. Conventions (seq_len, -1 padding, empty pages) are in naive.py.
"""
from __future__ import annotations

from . import naive
from .._dispatch import use_triton as _use_triton
from .naive import (block_sparse_mask, dense_decode_reference, dilated_mask)

__all__ = ["page_minmax", "page_minmax_refresh", "quest_scores", "quest_select", "block_means", "block_means_update", "moba_gate_topk", "block_sparse_decode",
           "moba_prefill", "snapkv_votes", "dilated_decode", "dense_decode_reference",
           "block_sparse_mask", "dilated_mask", "select_topk"]


def _ops():
    from . import triton_ops
    return triton_ops


def page_minmax(k, page_size, seq_len=None, quant=None, backend: str = "auto"):
    """k [B, Hkv, T, D] -> (kmin, kmax), each [B, Hkv, ceil(T/page), D] in k's dtype.

    ``quant="int8"`` -> (kmin, kmax, scale): int8 bounds rounded outward and a fp32 step
    [B, Hkv, P] per page (bound ~= int * step), half the bytes for Quest's scores; the score
    stays an upper bound of q.k over the page (naive.quantize_bounds_torch).
    """
    if _use_triton(backend, k):
        return _ops().page_minmax(k, page_size, seq_len, quant)
    return naive.page_minmax_torch(k, page_size, seq_len, quant)


def page_minmax_refresh(k, pos, page_size, kmin, kmax, scale=None, backend: str = "auto"):
    """Decoding's Quest metadata, in place: the bounds of the page holding absolute position
    pos [B] (int) are recomputed from the cache k [B, Hkv, T, D], whose keys up to pos are
    written (O(page * D) per row and head). ``scale`` given: int8 bounds (page_minmax's quant).
    Returns the bounds tuple, equal to ``page_minmax`` over the cache up to pos + 1."""
    if _use_triton(backend, k, kmin, kmax):
        return _ops().page_minmax_refresh(k, pos, page_size, kmin, kmax, scale)
    return naive.page_minmax_refresh_torch(k, pos, page_size, kmin, kmax, scale)


def quest_scores(q, kmin, kmax, seq_len=None, page_size=None, scale=None, backend: str = "auto"):
    """q [B, Hq, D] -> [B, Hq, P] fp32: sum_d max(q_d kmax_d, q_d kmin_d) (times ``scale``, the
    page's step, for int8 bounds).

    Optional ``seq_len`` (with ``page_size``) sets pages at or beyond seq_len to -inf.
    """
    if _use_triton(backend, q, kmin, kmax):
        return _ops().quest_scores(q, kmin, kmax, seq_len, page_size, scale)
    return naive.quest_scores_torch(q, kmin, kmax, seq_len, page_size, scale)


def quest_select(q, kmin, kmax, k, seq_len=None, page_size=None, force_last=False, scale=None,
                 backend: str = "auto"):
    """Quest's selection in one op: ``select_topk(quest_scores(...), k)`` -> [B, Hq, k] int32.

    ``force_last`` (needs ``seq_len``): the page holding position seq_len - 1 (the decoding
    query's own page) is always kept and counts toward k (the score kernel gives it the largest
    finite score, so the Triton path is two launches: scores, top-k). ``scale``: int8 bounds.
    """
    if _use_triton(backend, q, kmin, kmax):
        return _ops().quest_select(q, kmin, kmax, k, seq_len, page_size, force_last, scale)
    return naive.quest_select_torch(q, kmin, kmax, k, seq_len, page_size, force_last, scale)


def block_means(k, block_size, seq_len=None, backend: str = "auto"):
    """k [B, Hkv, T, D] -> [B, Hkv, ceil(T/block), D] fp32 mean of each block's valid keys."""
    if _use_triton(backend, k):
        return _ops().block_means(k, block_size, seq_len)
    return naive.block_means_torch(k, block_size, seq_len)


def block_means_update(kmeans, k_new, pos, block_size, backend: str = "auto"):
    """Decoding's incremental MoBA metadata, in place: the fp32 mean of the block holding absolute
    position pos [B] takes in k_new [B, Hkv, D] (running mean over the pos % block_size keys
    before it). Returns kmeans, equal to ``block_means`` recomputed up to fp32 rounding."""
    if _use_triton(backend, kmeans, k_new):
        return _ops().block_means_update(kmeans, k_new, pos, block_size)
    return naive.block_means_update_torch(kmeans, k_new, pos, block_size)


def moba_gate_topk(q, kmeans, block_size, topk, q_pos, backend: str = "auto"):
    """q [B, Hq, Tq, D] at positions q_pos ([Tq] or [B, Tq]) -> idx [B, Hq, Tq, topk] int32.

    The query's own block is always selected and counts toward topk; the others are the top
    (topk-1) strictly-past blocks by <q, mean_k>; valid entries ascending, then -1 padding.
    """
    if _use_triton(backend, q, kmeans):
        return _ops().moba_gate_topk(q, kmeans, block_size, topk, q_pos)
    return naive.moba_gate_topk_torch(q, kmeans, block_size, topk, q_pos)


def select_topk(scores, k, backend: str = "auto"):
    """[..., N] scores -> [..., k] int32 indices of the k largest finite entries, ascending,
    -1 padded (for Quest: ``select_topk(quest_scores(...), n_pages)`` -> block_idx)."""
    if _use_triton(backend, scores):
        return _ops().select_topk(scores, k)
    return naive.select_topk_torch(scores, k)


def block_sparse_decode(q, k, v, block_idx, block_size, seq_len=None, scale=None,
                        backend: str = "auto"):
    """One query per row (q [B, Hq, D]) over the selected blocks of the cache (k/v [B, Hkv, T, D]).

    block_idx [B, Hsel, NSEL] int32, -1 padded; Hsel == Hkv (per KV head, shared by the group) or
    Hsel == Hq (per query head). Tokens >= seq_len are masked. Returns [B, Hq, D].
    """
    if _use_triton(backend, q, k, v):
        return _ops().block_sparse_decode(q, k, v, block_idx, block_size, seq_len, scale)
    return naive.block_sparse_decode_torch(q, k, v, block_idx, block_size, seq_len, scale)


def moba_prefill(q, k, v, block_size, topk, scale=None, backend: str = "auto"):
    """Causal MoBA attention over a prompt (q/k/v on the same T positions) -> [B, Hq, T, D]."""
    if _use_triton(backend, q, k, v):
        return _ops().moba_prefill(q, k, v, block_size, topk, scale)
    return naive.moba_prefill_torch(q, k, v, block_size, topk, scale)


def snapkv_votes(q_win, k, scale=None, window_causal=True, backend: str = "auto"):
    """q_win [B, Hq, W, D] (the last W prompt queries) -> votes [B, Hq, T] fp32."""
    if _use_triton(backend, q_win, k):
        return _ops().snapkv_votes(q_win, k, scale, window_causal)
    return naive.snapkv_votes_torch(q_win, k, scale, window_causal)


def dilated_decode(q, k, v, chunk, window, prefix, seq_len=None, scale=None,
                   backend: str = "auto"):
    """RAT+ dilated decoding: query at t = seq_len-1 attends j <= t with t - j <= window, or
    j < prefix, or (j + 1) % chunk == 0. chunk=1 is dense. Returns [B, Hq, D]."""
    if _use_triton(backend, q, k, v):
        return _ops().dilated_decode(q, k, v, chunk, window, prefix, seq_len, scale)
    return naive.dilated_decode_torch(q, k, v, chunk, window, prefix, seq_len, scale)
