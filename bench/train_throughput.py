"""Training throughput of the OLMo2-7B shape: tokens/s per GPU and MFU, attention vs memory, bf16 vs FP8.

The real trainer (megatron DDP, distributed optimizer, schedules) on the `olmo2_7b_ratplus_10b`
model shape (32 layers, d 4096, 32 heads x 128, SwiGLU 11008, vocab 100352) at seq 4096,
micro-batch 1, on real tokens, for a few steps; steady-state numbers come from the logging
intervals after the first. Every row is one configuration; the same run holds all of them.

    python bench/train_throughput.py --data .carry/data/essays_text_document --tp 2 --layers 32 \
        --out bench/results/train_throughput.json

MFU = model TFLOP/s per GPU (ratplus_megatron/train/flops.py) / 989.4 (H200 dense bf16 spec);
FP8 rows use the same bf16 denominator, so their MFU shows the speed-up, not FP8 utilisation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import H200_BF16_DENSE_TFLOPS, environment, run_all, throughput, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/olmo2_7b_ratplus_10b.yaml")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--precisions", default="bf16,fp8", help="bf16 and/or fp8 (hybrid, --fp8-recipe)")
    ap.add_argument("--fp8-recipe", default="tensorwise")
    ap.add_argument("--memory", default="off,on")
    ap.add_argument("--sequence-parallel", action="store_true", help="megatron sequence parallelism (tp > 1)")
    ap.add_argument("--use-te", default="true", choices=["true", "false"])
    ap.add_argument("--tokenizer", default="data_prep/assets/tiny-bpe", help="the data's tokenizer")
    ap.add_argument("--workdir", default="/tmp/train_throughput")
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    args = ap.parse_args()
    import torch

    gpus = args.tp * args.pp
    base = [f"data.prefixes=[{args.data}]", f"data.seq_length={args.seq}", f"model.num_layers={args.layers}",
            f"model.use_te={args.use_te}", f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
            "batch.micro_batch_size=1", f"batch.global_batch_size={args.global_batch}",
            f"train.train_iters={args.iters}", "train.train_tokens=null", "train.log_interval=2",
            "train.eval_interval=0", "checkpoint.save=null", "checkpoint.save_interval=0",
            "checkpoint.init_from=null", "wandb.mode=disabled", "schedule.warmup_iters=1",
            f"parallel.sequence_parallel={'true' if args.sequence_parallel else 'false'}",
            f"data.cache_dir={args.workdir}/data_cache", f"data.tokenizer={args.tokenizer}"]
    runs = []
    for prec in args.precisions.split(","):
        for mem in args.memory.split(","):
            ov = base + [f"model.memory.enabled={'true' if mem == 'on' else 'false'}"]
            if prec == "fp8":
                ov += ["precision.fp8=hybrid", f"precision.fp8_recipe={args.fp8_recipe}"]
            runs.append((f"{prec}_mem_{mem}", args.config, ov, gpus))
    results = run_all(runs, gpu_count=torch.cuda.device_count(), workdir=Path(args.workdir))
    rows = []
    for r, (_, _, ov, _) in zip(results, runs):
        row = {"run": r["name"], "returncode": r["returncode"], "tp": args.tp, "pp": args.pp,
               "sequence_parallel": args.sequence_parallel,
               "layers": args.layers, "seq": args.seq, "micro_batch": 1, "global_batch": args.global_batch,
               "use_te": args.use_te, "precision": r["name"].split("_")[0],
               "fp8_recipe": args.fp8_recipe if r["name"].startswith("fp8") else None,
               "memory": r["name"].endswith("on"), "overrides": ov}
        row.update(throughput(r, gpus, args.global_batch * args.seq))
        rows.append(row)
    for row in rows:  # the memory's cost and FP8's gain in the same run
        if row["memory"]:
            off = next((x for x in rows if x["precision"] == row["precision"] and not x["memory"]), None)
            if off and off.get("step_s") and row.get("step_s"):
                row["memory_step_overhead"] = row["step_s"] / off["step_s"] - 1
        if row["precision"] == "fp8":
            bf = next((x for x in rows if x["precision"] == "bf16" and x["memory"] == row["memory"]), None)
            if bf and bf.get("tokens_per_s") and row.get("tokens_per_s"):
                row["fp8_speedup"] = row["tokens_per_s"] / bf["tokens_per_s"]
    print(f"\n{'run':16s} {'tok/s/GPU':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'step s':>7s} {'mem GiB':>8s} {'+memory':>8s} {'fp8 x':>6s}")
    for row in rows:
        if "tokens_per_s" not in row:
            print(f"{row['run']:16s} failed (rc {row['returncode']})")
            continue
        print(f"{row['run']:16s} {row['tokens_per_s_per_gpu']:10.0f} {row['tflops_per_gpu']:8.1f} {row['mfu']:6.1%} "
              f"{row['step_s']:7.2f} {row['memory_gib']:8.1f} {row.get('memory_step_overhead', float('nan')):+8.1%} "
              f"{row.get('fp8_speedup', float('nan')):6.2f}")
    write_json(args.out, {"benchmark": "train_throughput", **environment(), "mfu_denominator_tflops": H200_BF16_DENSE_TFLOPS,
                          "targets": {"memory_step_overhead_max": 0.05, "bf16_mfu_min": 0.45, "fp8_speedup_min": 1.3},
                          "rows": rows, "runs": results})


if __name__ == "__main__":
    main()
