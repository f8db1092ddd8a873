"""Probe for a batch-1 forward idea (issue 3, NOTES-scan session 27): does the chunk plan's
launch 3 get its inputs from L2 when the sequence is cut into slabs small enough to stay there?

    python bench/scan_slab_probe.py --out $OUT/scan_slab_probe.json

For each shape and slab length S the existing forward (launches 1-3) runs slab after slab, the
state handed on through initial_state / the final state. Per config it records:
* the whole loop as a CUDA graph (read flush), ms;
* per-kernel GPU times from torch.profiler on the eager loop: launch 1 (reads g, k, v) and
  launch 3 (reads them again, writes k~, v~), summed over the slabs, and the bandwidth each
  would need to move its bytes from HBM. Launch 3 well above the copy bandwidth means L2 served
  its reads, which a fused slab kernel (launch 3 of slab s beside launch 1 of slab s+1) would
  turn into a single pass of HBM traffic.
The slab loop's output is checked against the whole-sequence forward first.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kernels.memory_scan.fused import scan_fwd  # noqa: E402
from _runs import environment, write_json  # noqa: E402
from _timing import _flush_fn, time_ms  # noqa: E402

H, D = 32, 128
CONFIGS = {
    "default": {},
    "BH4 BT4 s3 CT64": dict(kernel="chunk", BH=4, BT=4, stages=3, CT=64),
    "BH1 BT2 CT64": dict(kernel="chunk", BH=1, BT=2, CT=64),
    "BH4 BT2 CT64": dict(kernel="chunk", BH=4, BT=2, CT=64),
}


def slab_forward(z, k, v, S, opts):
    """The forward over slabs of S steps, the state handed on; returns (k~, v~)."""
    T = k.shape[1]
    outs_k, outs_v = [], []
    hk = hv = None
    for t0 in range(0, T, S):
        sl = slice(t0, min(T, t0 + S))
        ok, ov, hk, hv, _ = scan_fwd(z[:, sl], k[:, sl], v[:, sl], hk, hv, **opts)
        outs_k.append(ok)
        outs_v.append(ov)
    return outs_k, outs_v


def kernel_times(fn):
    """GPU microseconds per role, summed over one call of fn (eager, after a read flush)."""
    flush = _flush_fn("read", torch.device("cuda", torch.cuda.current_device()))
    fn()
    torch.cuda.synchronize()
    flush()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    roles = {"launch1": 0.0, "carry": 0.0, "launch3": 0.0, "other": 0.0}
    for i, e in enumerate(evs):
        dur = e.time_range.end - e.time_range.start
        if "_fwd_chunk_scan_kernel" in e.name:
            nxt = evs[i + 1].name if i + 1 < len(evs) else ""
            roles["launch1" if "_fwd_carry_scan_kernel" in nxt else "launch3"] += dur
        elif "_fwd_carry_scan_kernel" in e.name:
            roles["carry"] += dur
        else:
            roles["other"] += dur
    return roles


def copy_gbs():
    x = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), flush="read")
    return 2 * x.numel() * 2 / ms / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench/results/reruns/scan_slab_probe.json"))
    ap.add_argument("--shapes", default="1x4096,1x32768")
    ap.add_argument("--slabs", default="0,2048,1024,512,256", help="0 = the whole sequence")
    ap.add_argument("--configs", type=json.loads, default=CONFIGS,
                    help='JSON {name: forward options}, default: CONFIGS')
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    copy = copy_gbs()
    print(f"copy {copy:.0f} GB/s", flush=True)
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        z, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref_k, ref_v, *_ = scan_fwd(z, k, v)
        tensor_bytes = B * T * H * D * 2
        for name, opts in args.configs.items():
            for S in (int(s) or T for s in args.slabs.split(",")):
                if S > T:
                    continue
                ok, ov = slab_forward(z, k, v, S, opts)
                err = max((torch.cat(ok, 1).float() - ref_k.float()).abs().max().item(),
                          (torch.cat(ov, 1).float() - ref_v.float()).abs().max().item())
                graph = time_ms(lambda: slab_forward(z, k, v, S, opts), graph=True, flush="read")
                roles = kernel_times(lambda: slab_forward(z, k, v, S, opts))
                row = dict(shape=shape, config=name, opts=opts, slab=S, max_err=err, graph_ms=graph,
                           kernels_us=roles,
                           launch1_gbs=3 * tensor_bytes / roles["launch1"] / 1e3 if roles["launch1"] else None,
                           launch3_gbs=5 * tensor_bytes / roles["launch3"] / 1e3,
                           pct_copy_graph=100 * 5 * tensor_bytes / graph / 1e6 / copy)
                rows.append(row)
                print(f"{shape:8s} {name:18s} S={S:6d} err {err:.1e} graph {graph:.4f} ms "
                      f"({row['pct_copy_graph']:.0f} % copy)  L1 {roles['launch1']:.1f} us "
                      f"L3 {roles['launch3']:.1f} us carry {roles['carry']:.1f} other {roles['other']:.1f}  "
                      f"L3 {row['launch3_gbs']:.0f} GB/s", flush=True)
    write_json(args.out, dict(environment(), copy_gbs=copy, rows=rows))


if __name__ == "__main__":
    main()
