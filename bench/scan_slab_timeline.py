"""Where the streamed slab forward loses its time (NOTES-scan session 30): per-kernel GPU start and
end times of CUDA-graph replays from torch.profiler's trace, for the whole-sequence chunk plan and
slab configs. The "slabs" plan exists only at commit 545d83c (reverted on main), so the default
configs are the two chunk plans; the recorded run (bench/results/reruns/scan_slab_timeline_545d83c.json)
ran on a tree with the slabs plan, when the defaults were the chunk plans plus SLAB_CONFIGS (to repeat it
there: --configs with both as JSON). Inside a graph replay the trace's stream ids are
not the capture streams, so for slab configs the launch1 / launch3 split below is wrong (the
first_replay rows show the real order; NOTES-scan reads it by hand); spans, busy and idle times
and the whole-plan roles are right.

    python bench/scan_slab_timeline.py --out $OUT/scan_slab_timeline.json

Per config and shape (medians over the profiled replays, each after a read flush): the replay's
span (first scan kernel start to last end), each role's summed kernel time (launch 1, carry,
launch 3), the busy time (union of the kernel intervals) and the idle gaps inside the span, and
how much two kernels ran at once (sum of durations / busy time). Launch 3 at or under launch 1's
time per slab means its re-reads came from L2 (launch 3 moves 5/3 of launch 1's bytes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kernels.memory_scan.fused import scan_fwd  # noqa: E402
from _runs import environment, write_json  # noqa: E402
from _timing import _flush_fn, capture_graph, time_ms  # noqa: E402

H, D = 32, 128
CONFIGS = {
    "whole (default plan)": {},
    "whole CT16 (slab tile)": dict(kernel="chunk", BH=4, BT=4, stages=3, CT=16),
}
SLAB_CONFIGS = {  # needs the "slabs" plan of 545d83c
    "slabs CT16 slab1024": dict(kernel="slabs", BH=4, BT=4, stages=3, CT=16, slab=1024),
    "slabs CT16 slab512": dict(kernel="slabs", BH=4, BT=4, stages=3, CT=16, slab=512),
}


def roles(kernels: list[dict]) -> list[str]:
    """launch1 / carry / launch3 for the scan kernels of one replay (sorted by start). The slab
    plan puts launch 1 on its own stream (the stream of the earliest chunk kernel); the whole
    plan has one stream, launch 1 before the carry and launch 3 after it."""
    chunk = [k for k in kernels if "_fwd_chunk_scan_kernel" in k["name"]]
    streams = {k["stream"] for k in chunk}
    first_carry = min((k["ts"] for k in kernels if "_fwd_carry_scan_kernel" in k["name"]), default=None)
    out = []
    for k in kernels:
        if "_fwd_carry_scan_kernel" in k["name"]:
            out.append("carry")
        elif len(streams) > 1:
            out.append("launch1" if k["stream"] == chunk[0]["stream"] else "launch3")
        else:
            out.append("launch1" if first_carry is not None and k["ts"] < first_carry else "launch3")
    return out


def summarize(kernels: list[dict]) -> dict:
    kernels = sorted(kernels, key=lambda k: k["ts"])
    r = roles(kernels)
    span = max(k["ts"] + k["dur"] for k in kernels) - kernels[0]["ts"]
    busy, cur_s, cur_e = 0.0, None, None  # union of the intervals
    for k in kernels:
        s, e = k["ts"], k["ts"] + k["dur"]
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    total = sum(k["dur"] for k in kernels)
    by = {x: sum(k["dur"] for k, y in zip(kernels, r) if y == x) for x in ("launch1", "carry", "launch3")}
    n = {x: r.count(x) for x in ("launch1", "carry", "launch3")}
    return dict(span_us=span, busy_us=busy, idle_us=span - busy, concurrency=total / busy, kernels=len(kernels),
                **{f"{x}_us": by[x] for x in by}, **{f"{x}_n": n[x] for x in n},
                l3_over_l1=by["launch3"] / by["launch1"] if by["launch1"] else None)


def trace_replays(fn, reps: int, graph: bool = True) -> list[dict]:
    """Profile `reps` replays of fn captured as a CUDA graph (or eager calls); the scan kernels of
    each replay."""
    call = capture_graph(fn).replay if graph else fn
    flush = _flush_fn("read", torch.device("cuda", torch.cuda.current_device()))
    for _ in range(3):
        flush()
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush()
            torch.cuda.synchronize()
            call()
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    ks = sorted(({"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"]),
                  "stream": e.get("args", {}).get("stream"), "grid": e.get("args", {}).get("grid")}
                 for e in events if e.get("cat") == "kernel"), key=lambda k: k["ts"])
    replays, cur = [], []
    for k in ks:  # the flush kernel separates the replays
        if "_scan_kernel" in k["name"]:
            cur.append(k)
        elif cur:
            replays.append(cur)
            cur = []
    if cur:
        replays.append(cur)
    return replays


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench/results/reruns/scan_slab_timeline.json"))
    ap.add_argument("--shapes", default="1x4096,1x32768")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", type=json.loads, default=CONFIGS)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        z, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for name, opts in args.configs.items():
            fn = lambda: scan_fwd(z, k, v, **opts)  # noqa: E731
            graph_ms = time_ms(fn, graph=True, flush="read")
            mode = "graph"
            replays = trace_replays(fn, args.reps)
            if not replays:  # the profiler saw no kernels inside the graph: eager calls instead
                mode, replays = "eager", trace_replays(fn, args.reps, graph=False)
            sums = [summarize(r) for r in replays]
            med = {key: statistics.median(s[key] for s in sums) for key in sums[0] if sums[0][key] is not None}
            row = dict(shape=shape, config=name, opts=opts, graph_ms=graph_ms, traced=mode, replays=len(sums), median=med,
                       first_replay=[dict(k, role=r) for k, r in zip(sorted(replays[0], key=lambda x: x["ts"]),
                                                                      roles(sorted(replays[0], key=lambda x: x["ts"])))]
                       if len(replays[0]) <= 200 else None)
            rows.append(row)
            print(f"{shape:8s} {name:24s} [{mode}] graph {graph_ms * 1e3:7.1f} us | span {med['span_us']:7.1f} busy "
                  f"{med['busy_us']:7.1f} idle {med['idle_us']:6.1f} conc {med['concurrency']:.2f} | L1 "
                  f"{med['launch1_us']:6.1f} ({med['launch1_n']:.0f}) carry {med['carry_us']:5.1f} L3 "
                  f"{med['launch3_us']:6.1f} ({med['launch3_n']:.0f}) L3/L1 {med.get('l3_over_l1', 0):.2f}", flush=True)
    write_json(args.out, dict(environment(), rows=rows))


if __name__ == "__main__":
    main()
