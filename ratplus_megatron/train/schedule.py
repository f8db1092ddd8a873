"""Learning rate as a pure function of the iteration (so a resumed run needs only the iteration).

cosine: linear warmup 0 -> lr, then half a cosine from lr to min_lr at the last iteration.
wsd: linear warmup, constant lr ("stable"), then a linear decay to min_lr over the final
     `wsd_decay_fraction` of the run.
constant: linear warmup, then lr.
"""
from __future__ import annotations

import math


def learning_rate(it: int, *, lr: float, min_lr: float, total: int, warmup: int, style: str,
                  wsd_decay_fraction: float = 0.2) -> float:
    """LR for optimizer iteration ``it`` (0-based) of a run of ``total`` iterations."""
    if warmup > 0 and it < warmup:
        return lr * (it + 1) / warmup
    if style == "constant":
        return lr
    if style == "cosine":
        span = max(total - warmup, 1)
        progress = min(max(it - warmup, 0) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if style == "wsd":
        decay = max(int(round(wsd_decay_fraction * total)), 1)
        start = total - decay
        if it < start:
            return lr
        progress = min((it - start + 1) / decay, 1.0)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule style {style!r}")
