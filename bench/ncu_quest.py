"""One Quest decode step at B=1, 32 heads x 128, 128K, 1/16 (bf16 or int8 page bounds), run a few
times eagerly: the target for Nsight Compute, which profiles each kernel of the pipeline.

    ncu --clock-control none --kernel-name regex:"_quest|_select_topk|_decode|_merge" \
        --launch-skip 8 --launch-count 4 --section SpeedOfLight --section Occupancy ... \
        python bench/ncu_quest.py --bounds int8
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels.sparse as sp  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bounds", choices=("exact", "int8"), default="int8")
ap.add_argument("--T", type=int, default=131072)
ap.add_argument("--B", type=int, default=1)
ap.add_argument("--budget", type=float, default=1 / 16)
ap.add_argument("--reps", type=int, default=4)
args = ap.parse_args()
g = torch.Generator(device="cuda").manual_seed(1)
B, H, T, D, PAGE = args.B, 32, args.T, 128, 16
k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
bounds = sp.page_minmax(k, PAGE, quant=None if args.bounds == "exact" else "int8")
n = int(T * args.budget) // PAGE
for _ in range(args.reps):
    s = sp.quest_scores(q, *bounds[:2], scale=bounds[2] if len(bounds) == 3 else None)
    out = sp.block_sparse_decode(q, k, v, sp.select_topk(s, n), PAGE)
torch.cuda.synchronize()
print("done", out.shape)
