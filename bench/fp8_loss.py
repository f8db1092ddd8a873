"""FP8 vs bf16 with the Transformer Engine layer spec: the same short run on real tokens, each recipe.

The real trainer (`configs/gpu_small_ratplus.yaml`: 8 layers, d 1024, seq 1024; TE linears
including the memory gate, TEDotProductAttention, TE post-norms), the same data, seed and
schedule, once in bf16 and once per FP8 recipe (hybrid format: E4M3 forward, E5M2 gradients).
Issue #8's bar: FP8's loss within 2 % of bf16's. Runs are packed onto the visible GPUs.

    python bench/fp8_loss.py --data .carry/data/essays_text_document --out bench/results/fp8_loss.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import environment, run_all, train_records, write_json  # noqa: E402

RECIPES = ["delayed", "tensorwise", "blockwise"]


def summarize(result: dict) -> dict:
    train = train_records(result)
    evals = [m for m in result["metrics"] if m.get("kind") == "eval"]
    tail = train[-max(1, len(train) // 4):]
    return {"final_train_loss": train[-1]["loss"] if train else None,
            "mean_train_loss_last_quarter": statistics.fmean(m["loss"] for m in tail) if tail else None,
            "final_valid_loss": evals[-1]["val_loss"] if evals else None,
            "tokens_per_s": statistics.fmean(m["tokens_per_s"] for m in train[1:]) if len(train) > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="PREFIX_text_document of tokenized text")
    ap.add_argument("--config", default="configs/gpu_small_ratplus.yaml")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--memory", default="on,off", help="on, off or both (on,off)")
    ap.add_argument("--workdir", default="/tmp/fp8_loss")
    ap.add_argument("--out", default="bench/results/fp8_loss.json")
    args = ap.parse_args()
    import torch

    common = [f"data.prefixes=[{args.data}]", f"train.train_iters={args.iters}", "model.use_te=true",
              "train.log_interval=10", f"train.eval_interval={args.iters // 2}", "train.eval_iters=4",
              "checkpoint.save_interval=0", "checkpoint.save=null"]
    runs = []
    for mem in args.memory.split(","):
        base = common + [f"model.memory.enabled={'true' if mem == 'on' else 'false'}"]
        runs.append((f"mem_{mem}_bf16", args.config, base, 1))
        for recipe in args.recipes.split(","):
            runs.append((f"mem_{mem}_fp8_{recipe}", args.config,
                         base + ["precision.fp8=hybrid", f"precision.fp8_recipe={recipe}"], 1))
    results = run_all(runs, gpu_count=torch.cuda.device_count(), workdir=Path(args.workdir))
    rows = []
    for r in results:
        s = summarize(r) if r["returncode"] == 0 else {}
        mem, _, prec = r["name"][4:].partition("_")
        rows.append({"run": r["name"], "memory": mem, "precision": prec, "returncode": r["returncode"], **s})
    for row in rows:  # relative to bf16 with the same memory setting
        ref = next((x for x in rows if x["memory"] == row["memory"] and x["precision"] == "bf16"), None)
        for key in ("mean_train_loss_last_quarter", "final_valid_loss"):
            if ref and ref.get(key) and row.get(key):
                row[f"{key}_rel_to_bf16"] = row[key] / ref[key] - 1
    print(f"\n{'run':28s} {'rc':>4s} {'train(last 1/4)':>16s} {'valid':>8s} {'rel':>8s} {'tok/s':>9s}")
    for row in rows:
        rel = row.get("final_valid_loss_rel_to_bf16")
        print(f"{row['run']:28s} {str(row['returncode']):>4s} {row.get('mean_train_loss_last_quarter') or float('nan'):16.4f} "
              f"{row.get('final_valid_loss') or float('nan'):8.4f} {(rel if rel is not None else float('nan')):+8.2%} "
              f"{row.get('tokens_per_s') or float('nan'):9.0f}")
    write_json(args.out, {"benchmark": "fp8_loss", **environment(), "config": args.config,
                          "iters": args.iters, "target": "FP8 loss within 2% of bf16", "rows": rows,
                          "runs": results})


if __name__ == "__main__":
    main()
