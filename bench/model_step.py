"""Forward+backward step time of an OLMo2-7B-shaped stack on one GPU, memory off vs on.

A 4-layer stack of the real OLMo2-7B layer shape (d 4096, 32 heads x 128, SwiGLU 11008,
vocab 100352), seq 4096, bf16, TP=1, megatron-core with our layer spec (TE modules when TE is
installed, otherwise local linears + torch SDPA). Same run, same inputs, both models.

    python bench/model_step.py --layers 4 --seq 4096 --out bench/results/model_step.json
    python bench/model_step.py --use-te true --fp8 tensorwise --profile --out bench/results/model_step_te_fp8.json

--profile adds a CUDA kernel-time breakdown per model (GEMM, attention, norms, the scan, FP8
casts, elementwise...) from torch.profiler over a few steps: where the step time goes.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import commit, write_json  # noqa: E402


def _time(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def model_flops_per_step(cfg, batch: int, seq: int) -> float:
    """Matmul FLOPs of forward+backward (3x forward): projections, causal attention, LM head."""
    h, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv, f = cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    per_token_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * f)
    if cfg.memory.enabled:
        per_token_layer += 2 * h * kv + (2 * h * q if cfg.memory.output_gate else 0)
    attention = 2 * 2 * seq * q / 2  # QK^T and AV per token, causal half
    per_token = cfg.num_layers * (per_token_layer + attention) + 2 * h * cfg.vocab_size
    return 3 * per_token * batch * seq


# kernel-name substrings -> category, first match wins (cuBLAS/cutlass/TE names on Hopper)
CATEGORIES = [
    ("nccl", ("nccl",)),
    ("fp8 cast/amax", ("cast", "quantize", "amax", "fp8", "transpose_optimized")),
    ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa", "softmax")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "matmul", "wgmma")),
    ("memory scan", ("_fwd_kernel", "_bwd_kernel", "_decode", "scan")),
    ("norm", ("norm", "rms")),
    ("rope", ("rope", "rotary")),
    ("optimizer/elementwise", ("elementwise", "vectorized", "reduce", "copy", "fill", "mul", "add", "cat")),
]


def kernel_breakdown(step, iters: int = 3) -> dict:
    """CUDA time per kernel category and the top kernels over `iters` profiled steps (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0 and evt.key:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + t / 1e3 / iters
    cats = {}
    for name, ms in kernels.items():
        low = name.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {"ms_per_step_by_category": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "total_kernel_ms_per_step": sum(kernels.values()),
            "top_kernels_ms_per_step": [{"kernel": k[:160], "ms": v} for k, v in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--use-te", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--fp8", default=None, choices=["delayed", "tensorwise", "blockwise"],
                    help="FP8 recipe (hybrid format; needs Transformer Engine)")
    ap.add_argument("--profile", action="store_true", help="add a kernel-time breakdown per model")
    ap.add_argument("--out", default="bench/results/model_step.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench/model_step.py needs a CUDA GPU")

    import megatron.core
    import triton

    from kernels import memory_scan
    from ratplus_megatron.config import MemoryConfig, PrecisionConfig, preset
    from ratplus_megatron.model import HAVE_TE, build_model, to_transformer_config
    from ratplus_megatron.parallel import init_parallel

    init_parallel(tp=1, pp=1, seed=1234)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for memory in (False, True):
        cfg = preset("olmo2-7b", num_layers=args.layers, memory=MemoryConfig(enabled=memory))
        use_te = HAVE_TE if args.use_te == "auto" else args.use_te == "true"
        precision = PrecisionConfig(bf16=True, fp8="hybrid" if args.fp8 else None, fp8_recipe=args.fp8 or "delayed")
        model = build_model(cfg, to_transformer_config(cfg, precision), use_te=use_te).cuda()
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda", generator=gen)
        pos = torch.arange(args.seq, device="cuda")[None].expand_as(ids)
        labels = torch.roll(ids, -1, dims=1)

        def step():
            loss = model(ids, pos, None, labels=labels).float().mean()
            loss.backward()
            return loss

        def forward():
            with torch.no_grad():
                model(ids, pos, None, labels=labels)

        loss = step().item()
        torch.cuda.reset_peak_memory_stats()
        step_ms = _time(step, args.warmup, args.iters)
        fwd_ms = _time(forward, args.warmup, args.iters)
        med = statistics.median(step_ms)
        flops = model_flops_per_step(cfg, args.batch, args.seq)
        rows.append({
            "memory": memory, "layers": args.layers, "seq": args.seq, "batch": args.batch,
            "dtype": "bf16", "fp8": args.fp8, "te": use_te,
            "core_attention": "TEDotProductAttention" if use_te else "torch SDPA",
            "first_loss": loss, "step_ms_median": med, "step_ms_all": step_ms,
            "forward_ms_median": statistics.median(fwd_ms),
            "tokens_per_s": args.batch * args.seq / (med / 1e3),
            "model_tflops_per_s": flops / (med / 1e3) / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "params": sum(p.numel() for p in model.parameters()),
        })
        if args.profile:
            rows[-1]["profile"] = kernel_breakdown(step, iters=3)
        del model
        torch.cuda.empty_cache()

    # The scan alone, at this model's shape (k and v of every layer), forward+backward.
    B, T, H, D = args.batch, args.seq, 32, 128
    g, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def scan_step():
        kt, vt = memory_scan(g, k, v)
        (kt.float().sum() + vt.float().sum()).backward()

    scan_ms = statistics.median(_time(scan_step, 3, 20))
    off, on = rows
    result = {
        "benchmark": "model_step", "command": " ".join([sys.executable] + sys.argv),
        "device": torch.cuda.get_device_name(), "commit": commit(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "megatron_core": megatron.core.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "memory_overhead_pct": 100 * (on["step_ms_median"] / off["step_ms_median"] - 1),
        "scan_fwd_bwd_ms_one_layer": scan_ms,
    }
    write_json(args.out, result)
    print(f"{'memory':>7} {'step ms':>9} {'fwd ms':>8} {'tok/s':>9} {'TFLOP/s':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{str(r['memory']):>7} {r['step_ms_median']:9.1f} {r['forward_ms_median']:8.1f} "
              f"{r['tokens_per_s']:9.0f} {r['model_tflops_per_s']:8.1f} {r['peak_memory_gib']:9.1f}")
    print(f"memory overhead {result['memory_overhead_pct']:.1f} %; scan fwd+bwd per layer {scan_ms:.3f} ms")
    for r in rows:
        if "profile" in r:
            cats = ", ".join(f"{c} {ms:.1f}" for c, ms in r["profile"]["ms_per_step_by_category"].items())
            print(f"memory={r['memory']}: kernel ms per step: {cats}")


if __name__ == "__main__":
    main()
