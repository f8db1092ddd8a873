"""Row layout of the fused ``linear_qkv`` projection, shared by the model, the converter and checkpoints.

megatron fuses the q, k and v projections into one column-parallel ``linear_qkv`` whose output rows
are grouped by query group: per group [its q heads, (their output gate), k, v]. A tensor-parallel
shard is then a run of whole groups, holding everything its heads need. The RAT+ memory adds its
forget-gate rows to each group, after v and sized like k: per group [q, (og), k, v, g]. One GEMM
(and, under sequence parallelism, one all-gather of the input) then yields q, k, v and the gate
logits. HF keeps separate q/og/k/v/g projections; only megatron's side is fused.

Only torch here (no megatron import), so the converter and checkpoint tools can use it cheaply.
"""
from __future__ import annotations

import torch

GATE = "g"  # the memory's forget-gate rows


def qkv_parts(num_heads: int, num_groups: int, head_dim: int, output_gate: bool, memory: bool
              ) -> tuple[tuple[str, int], ...]:
    """(name, rows) of one query group's slice of the fused qkv, in order."""
    q = num_heads // num_groups * head_dim
    parts = [("q", q)] + ([("og", q)] if output_gate else []) + [("k", head_dim), ("v", head_dim)]
    if memory:
        parts.append((GATE, head_dim))
    return tuple(parts)


def qkv_parts_for(cfg) -> tuple[tuple[str, int], ...]:
    """The layout of a ModelConfig (the output gate exists only with the memory)."""
    mem = cfg.memory.enabled
    return qkv_parts(cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, mem and cfg.memory.output_gate, mem)


def describe(parts) -> str:
    """'[q, k, v, g]'"""
    return "[" + ", ".join(name for name, _ in parts) + "]"


def rows_per_group(parts) -> int:
    return sum(rows for _, rows in parts)


def split_groups(t: torch.Tensor, parts, dim: int = 0) -> dict[str, torch.Tensor]:
    """Views of each part of ``t``, whose ``dim`` holds whole groups of ``parts``.

    Each view has ``dim`` replaced by (groups, part rows), e.g. a weight [groups * rows, h] gives
    {"q": [groups, q rows, h], ...}; no copy, so writing into a view writes into ``t``.
    """
    dim = dim % t.dim()
    total = rows_per_group(parts)
    if t.shape[dim] % total:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not a whole number of {total}-row groups")
    grouped = t.view(*t.shape[:dim], t.shape[dim] // total, total, *t.shape[dim + 1:])
    return dict(zip((n for n, _ in parts), grouped.split([r for _, r in parts], dim=dim + 1)))


def copy_common_parts(dst: torch.Tensor, dst_parts, src: torch.Tensor, src_parts, dim: int = 0
                      ) -> tuple[list[str], list[str]]:
    """Copy every part the two layouts share (same name and size) from ``src`` into ``dst``, group by
    group (both hold the same groups). Returns (dst parts left untouched, src parts not used)."""
    d, s = split_groups(dst, dst_parts, dim), split_groups(src, src_parts, dim)
    groups = next(iter(d.values())).shape[dim]
    if next(iter(s.values())).shape[dim] != groups:
        raise ValueError(f"{groups} groups in the destination, {next(iter(s.values())).shape[dim]} in the source")
    with torch.no_grad():
        for name, view in d.items():
            if name in s and s[name].shape == view.shape:
                view.copy_(s[name])
    common = [n for n in d if n in s and s[n].shape == d[n].shape]
    return [n for n in d if n not in common], [n for n in s if n not in common]


def guess_parts(rows: int, num_heads: int, num_groups: int, head_dim: int, prefer=None):
    """The layout of a fused qkv with ``rows`` rows (a checkpoint's): ``prefer`` if it fits, else the
    first of attention [q, k, v], memory [q, k, v, g], memory + output gate [q, og, k, v, g] that
    does (an output gate exists only with the memory, which keeps these three sizes distinct).
    None when nothing fits."""
    candidates = ([prefer] if prefer else []) + [qkv_parts(num_heads, num_groups, head_dim, og, mem)
                                                 for og, mem in ((False, False), (False, True), (True, True))]
    for parts in candidates:
        if rows == num_groups * rows_per_group(parts):
            return parts
    return None


# Megatron checkpoints written before the gate rows moved into linear_qkv (ratplus-megatron commit
# 7d2edbb and earlier) hold the gate as its own `linear_gate` linear.
UNFUSED_GATE = ".linear_gate."


def unfused_gate_error(keys, where) -> str | None:
    """The message for a checkpoint that still has the separate `linear_gate` (None if it has not)."""
    old = sorted(k for k in keys if UNFUSED_GATE in k)
    if not old:
        return None
    return (f"{where} holds {old[0]}: it was written before the memory gate's rows moved into linear_qkv "
            "and cannot be loaded now. Export it to HF with ratplus-megatron at commit 7d2edbb (or earlier), "
            "`python -m ratplus_megatron.convert mcore-to-hf`, and import the HF model again with this "
            "version's `hf-to-mcore` (the HF layout did not change)")
