"""Selectors: which pages/blocks/tokens each method keeps. Pure functions over tensors, built on
the ``kernels.sparse`` ops (metadata, scores, votes); only top-k, masking and pooling are done
here. Index lists follow the kernels' convention: int32, valid entries ascending, -1 last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels.sparse as ks


def group_mean(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, ..., D] -> [B, Hkv, ..., D]: the mean of each KV head's group of query heads."""
    B, Hq = q.shape[:2]
    return q.reshape(B, hkv, Hq // hkv, *q.shape[2:]).mean(2)


def topk_blocks(scores: torch.Tensor, nsel: int, force: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B, H, NB] fp32 (-inf = not selectable) -> [B, H, nsel] int32 index list (the
    kernels' ``select_topk``). ``force`` [B] long: a block per row always selected (and counted)."""
    s = scores.float()
    if force is not None:  # the largest finite score: select_topk keeps it (a fill, so CUDA graphs capture it)
        forced = torch.arange(s.shape[-1], device=s.device)[None, :] == force[:, None]  # [B, NB]
        s = s.masked_fill(forced[:, None], torch.finfo(torch.float32).max)
    return ks.select_topk(s, max(1, min(nsel, s.shape[-1])))


def quest_select(q, bounds, seq_len, page_size, nsel, force_current=True, per_query_head=False,
                 min_pages=0):
    """Quest: pages by the upper bound sum_d max(q_d min_d, q_d max_d) of q.k over the page.

    q [B, Hq, D]; bounds (kmin, kmax) [B, Hkv, P, D], plus the step [B, Hkv, P] for int8 bounds;
    seq_len [B] (the decoding query is at seq_len - 1).
    Per KV head (default) the group's queries are averaged first. ``min_pages``: keep at least
    that many pages (rows with fewer valid pages keep all of theirs, -1 padded); Quest's
    evaluation code uses 3 with ``force_current=False``. Returns [B, Hkv|Hq, max(nsel, min_pages)].
    """
    kmin, kmax, *scale = bounds
    nsel = max(1, min(max(nsel, min_pages), kmin.shape[2]))
    qs = q if per_query_head else group_mean(q, kmin.shape[1])
    return ks.quest_select(qs, kmin, kmax, nsel, seq_len=seq_len, page_size=page_size,
                           force_last=force_current, scale=scale[0] if scale else None)


def moba_select(q, kmeans, seq_len, block_size, nsel, per_query_head=False):
    """MoBA decode rule: the query's own block plus the top (nsel - 1) past blocks by <q, mean k>.
    q [B, Hq, D]; kmeans [B, Hkv, NB, D]. Returns [B, Hkv|Hq, nsel]."""
    qs = q if per_query_head else group_mean(q, kmeans.shape[1])
    pos = (seq_len - 1).view(-1, 1)
    idx = ks.moba_gate_topk(qs[:, :, None], kmeans, block_size, nsel, pos)
    return idx[:, :, 0].contiguous()


def random_select(generator, shape, seq_len, block_size, nsel, force_current=True):
    """The selector ablation: nsel random valid blocks ([B, H, NB] shape), current block forced."""
    B, H, NB = shape
    scores = torch.rand(shape, generator=generator, device=generator.device)
    nvalid = (seq_len + block_size - 1) // block_size  # [B]
    valid = torch.arange(NB, device=scores.device)[None, :] < nvalid[:, None]
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    force = (seq_len - 1) // block_size if force_current else None
    return topk_blocks(scores, nsel, force)


def snapkv_keep(q_win, k, capacity, kernel=7, pool="avg", scale=None, per_query_head=False):
    """SnapKV for one prompt: indices [Hkv, C] (or [Hq, C] per query head), ascending, of the
    tokens to keep.

    q_win [1, Hq, W, D]: the last W prompt queries; k [1, Hkv, T, D]: the prompt's keys.
    Votes (softmax of the window queries over all keys, summed over the window) of the prefix
    T - W are averaged over each KV head's query group (kvpress; default) or kept per query head
    (``per_query_head``: the original SnapKV, whose K/V are repeated to Hq heads first), smoothed
    by a 1-D pool, and the top C - W prefix tokens kept together with the whole window. T <= C
    keeps everything.
    """
    T, W = k.shape[2], q_win.shape[2]
    h = q_win.shape[1] if per_query_head else k.shape[1]
    if T <= capacity:
        return torch.arange(T, device=k.device).expand(h, T)
    votes = ks.snapkv_votes(q_win, k, scale=scale, window_causal=True)  # [1, Hq, T]
    votes = (votes if per_query_head else group_mean(votes, h))[0, :, : T - W]  # [h, T - W]
    pad = kernel // 2
    if pool == "avg":
        votes = F.avg_pool1d(votes[:, None], kernel, stride=1, padding=pad)[:, 0]
    else:
        votes = F.max_pool1d(votes[:, None], kernel, stride=1, padding=pad)[:, 0]
    top = votes.topk(capacity - W, dim=-1).indices.sort(dim=-1).values
    window = torch.arange(T - W, T, device=k.device).expand(h, W)
    return torch.cat([top, window], dim=-1)
