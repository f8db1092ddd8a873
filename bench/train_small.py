"""The real trainer on one GPU: a small OLMo2-shaped memory model, a few hundred steps on real text.

Runs `python -m ratplus_megatron.train --config configs/gpu_small_ratplus.yaml` (megatron DDP,
distributed optimizer, schedules, bf16, checkpoints) and writes its loss curve, tokens/s and
TFLOP/s with device, versions and commit to bench/results/train_small.json.

    python bench/train_small.py --data PREFIX_text_document --save /tmp/run --out bench/results/train_small.json
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--save", required=True)
    ap.add_argument("--config", default="configs/gpu_small_ratplus.yaml")
    ap.add_argument("--out", default="bench/results/train_small.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "ratplus_megatron.train", "--config", args.config,
           f"data.prefixes=[{args.data}]", f"checkpoint.save={args.save}", *args.overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    wall = time.time() - t0
    metrics = [json.loads(line) for line in (Path(args.save) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    import torch
    import triton
    import megatron.core

    train = [m for m in metrics if "loss" in m and "val" not in " ".join(m)]
    result = {
        "benchmark": "train_small", "command": " ".join(cmd), "returncode": proc.returncode,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": os.environ.get("COMMIT", "unknown"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "megatron_core": megatron.core.__version__, "python": platform.python_version()},
        "config": args.config, "wall_s": wall, "metrics": metrics,
        "checkpoints": sorted(p.name for p in Path(args.save).glob("iter_*")),
    }
    write_json(args.out, result)
    print(f"returncode {proc.returncode}, {len(train)} logged steps, wall {wall:.0f} s")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
