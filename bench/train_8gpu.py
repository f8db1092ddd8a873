"""The OLMo2-7B + memory recipe at its multi-node layout on one 8-GPU node (issue 10).

`configs/olmo2_7b_ratplus_10b.yaml` at TP=2 x PP=2 x DP=2 with the distributed optimizer, on real
tokens, seq 4096, micro-batch 1:

1. bf16 for --iters steps, then a checkpoint (optimizer state `fully_reshardable`, the format
   that another TP/PP can resume);
2. FP8 (hybrid, --fp8-recipe) for the same steps, when Transformer Engine is importable;
3. the bf16 checkpoint resumed at --resume-layout (default TP=4 x PP=2) for --resume-iters steps,
   and, as its reference, resumed at the original layout for the same steps: the two loss curves
   must agree (bf16 tolerance), and each must start at the checkpoint's iteration.

    python bench/train_8gpu.py --data .carry/data/essays_text_document --out bench/results/train_8gpu.json

Rows: tokens/s per GPU, model TFLOP/s per GPU and MFU (of the H200's 989 dense bf16 TFLOP/s),
means over the logged intervals after the first. The global batch (--global-batch, default 32:
8 micro-batches per pipeline) is smaller than the recipe's 512 so that 50 steps fit in one call;
the pipeline bubble is then (pp-1)/(8+pp-1) = 11 % instead of 0.4 %, so MFU here is a lower bound
for the recipe's. --gpus 4 with --layout 2x2 --resume-layout 4x1 rehearses the same on 4 GPUs.
The JSON is rewritten after every run, so a time limit keeps what finished.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (H200_BF16_DENSE_TFLOPS, environment, link_checkpoint, loss_curve,  # noqa: E402
                   max_rel_diff, run_all, throughput, train_records, write_json)

RESUME_TOLERANCE = 2e-2  # bf16: relative loss difference between the two resumed runs


def _layout(text: str) -> tuple[int, int]:
    try:
        tp, pp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: layout {text!r}: expected TPxPP, e.g. 2x2") from None
    return tp, pp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="tokenized prefix (data_prep/tokenize.py output)")
    ap.add_argument("--tokenizer", default="data_prep/assets/tiny-bpe", help="the data's tokenizer")
    ap.add_argument("--config", default="configs/olmo2_7b_ratplus_10b.yaml")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--layout", default="2x2", help="TPxPP of the training runs (DP = gpus / (TP*PP))")
    ap.add_argument("--resume-layout", default="4x2", help="TPxPP the checkpoint is resumed at")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--resume-iters", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--fp8-recipe", default="delayed")
    ap.add_argument("--workdir", default="/tmp/train_8gpu")
    ap.add_argument("--out", default="bench/results/train_8gpu.json")
    args = ap.parse_args()
    import torch

    (tp, pp), (rtp, rpp) = _layout(args.layout), _layout(args.resume_layout)
    for name, (t, p) in (("--layout", (tp, pp)), ("--resume-layout", (rtp, rpp))):
        if args.gpus % (t * p):
            raise SystemExit(f"error: {name} {t}x{p} does not divide --gpus {args.gpus}")
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"error: --gpus {args.gpus}, but {torch.cuda.device_count()} GPUs are visible")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)  # old run directories would be resumed, not trained
    work.mkdir(parents=True)
    seq = 4096
    base = [f"data.prefixes=[{args.data}]", f"data.tokenizer={args.tokenizer}", f"data.seq_length={seq}",
            f"data.cache_dir={work / 'data_cache'}", "batch.micro_batch_size=1",
            f"batch.global_batch_size={args.global_batch}", "train.train_tokens=null", "train.log_interval=5",
            "train.eval_interval=0", "wandb.mode=disabled", "schedule.warmup_iters=5",
            "checkpoint.save_interval=0", "checkpoint.optimizer_sharding=fully_reshardable",
            "checkpoint.init_from=null"]

    def layout(t, p):
        return [f"parallel.tp={t}", f"parallel.pp={p}"]

    report = {"benchmark": "train_8gpu", **environment(), "config": args.config,
              "layout": {"tp": tp, "pp": pp, "dp": args.gpus // (tp * pp)},
              "resume_layout": {"tp": rtp, "pp": rpp, "dp": args.gpus // (rtp * rpp)},
              "seq": seq, "micro_batch": 1, "global_batch": args.global_batch, "iters": args.iters,
              "mfu_denominator_tflops": H200_BF16_DENSE_TFLOPS, "rows": [], "runs": []}
    tokens_per_step = args.global_batch * seq

    def record(results, rows):
        report["runs"] += [{k: v for k, v in r.items() if k != "metrics"} for r in results]
        report["rows"] += rows
        write_json(args.out, report)

    # 1-2. training at the layout: bf16 (saved) and FP8
    try:
        import transformer_engine  # noqa: F401
        have_te = True
    except ImportError:
        have_te = False
    for prec in args.precisions.split(","):
        if prec == "fp8" and not have_te:
            report["rows"].append({"run": "fp8", "skipped": "Transformer Engine is not importable"})
            continue
        ov = base + layout(tp, pp) + [f"train.train_iters={args.iters}", f"checkpoint.save={work / prec}"]
        if prec == "fp8":
            ov += ["precision.fp8=hybrid", f"precision.fp8_recipe={args.fp8_recipe}"]
        (r,) = run_all([(prec, args.config, ov, args.gpus)], gpu_count=args.gpus, workdir=work)
        row = {"run": prec, "returncode": r["returncode"],
               "last_iteration": (train_records(r) or [{}])[-1].get("iteration"),
               "fp8_recipe": args.fp8_recipe if prec == "fp8" else None,
               **throughput(r, args.gpus, tokens_per_step)}
        record([r], [row])

    # 3. the bf16 checkpoint resumed at the other layout, and at its own as the reference
    if not (work / "bf16").is_dir():
        report["resume"] = {"skipped": "no bf16 checkpoint"}
        write_json(args.out, report)
        return
    curves = {}
    for name, (t, p) in (("resumed_at_original", (tp, pp)), ("resumed_at_new", (rtp, rpp))):
        save = link_checkpoint(work / "bf16", args.iters, work / name)
        ov = base + layout(t, p) + [f"train.train_iters={args.iters + args.resume_iters}", f"checkpoint.save={save}"]
        (r,) = run_all([(name, args.config, ov, args.gpus)], gpu_count=args.gpus, workdir=work)
        curves[name] = loss_curve(r)
        record([r], [{"run": name, "tp": t, "pp": p, "returncode": r["returncode"],
                      **throughput(r, args.gpus, tokens_per_step)}])
    want = [i for i in range(args.iters + 1, args.iters + args.resume_iters + 1) if i % 5 == 0]
    ref, new = curves["resumed_at_original"], curves["resumed_at_new"]
    rel = max_rel_diff(new, ref, want)
    report["resume"] = {"logged_iterations": want, "losses_original_layout": [ref.get(i) for i in want],
                        "losses_new_layout": [new.get(i) for i in want], "max_rel_diff": rel,
                        "tolerance": RESUME_TOLERANCE,
                        "ok": rel is not None and rel <= RESUME_TOLERANCE
                        and all(sorted(c) == want for c in (ref, new))}
    write_json(args.out, report)
    for row in report["rows"]:
        if "tokens_per_s_per_gpu" in row:
            print(f"{row['run']:22s} {row['tokens_per_s_per_gpu']:9.0f} tok/s/GPU  {row['tflops_per_gpu']:6.1f} "
                  f"TFLOP/s/GPU  MFU {row['mfu']:.1%}  step {row['step_s']:.2f} s  {row['memory_gib']:.1f} GiB")
    print("resume:", report["resume"])


if __name__ == "__main__":
    main()
