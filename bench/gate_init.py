"""Gate initialisation when adding the RAT+ memory to a pretrained OLMo2: `identity` vs `ratplus`.

    python bench/gate_init.py [--work /tmp/ratplus_gate_init] [--continue-iters 60]

The design doc (section "Decisions the seed paper leaves open") asks for the loss at step 0 and
after N steps of both gate initialisations. This measures it at tiny scale on CPU, through the
project's own user path, every step a subprocess of the real CLIs:

1. data: the 49 Paul Graham essays (paragraph chunks) + the synthetic corpus, tokenized with
   data_prep/tokenize.py (two prefixes, blended, split 95/5/0).
2. pretrain a small attention-only OLMo2 (python -m ratplus_megatron.train, memory off).
3. export it (convert mcore-to-hf), then import it three times (convert hf-to-mcore, fp32):
   `--memory --gate-init identity`, `--memory --gate-init ratplus`, and without --memory
   (the control: the same round trip, plain attention).
4. step-0 validation loss of each import. The trainer validates only after an iteration and
   refuses lr = 0, so this is a one-iteration run at lr = 1e-30: the update is below fp32
   resolution for every non-zero weight (|p| >= ~1e-20 is unchanged; only the identity gate's exact
   zeros move, by ~1e-30, which cannot change a logit) and the validation pass at iteration 1 sees the
   imported weights. The first logged training loss (iteration 1, computed before the update) is the
   step-0 loss on the first training batch, reported too.
5. continue each import for N iterations (same data order, seed and LR schedule), loss every
   step, validation at the end (same validation batches as step 0).
6. bench/results/gate_init_cpu.json (+ .png): command, commit, versions, configs, per-step losses.

Reruns reuse the tokenized data, the pretrained run and the conversions found in --work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
sys.path.insert(0, REPO)  # eval.ruler.haystacks (the essays) when run as python bench/gate_init.py
sys.path.insert(0, os.path.join(REPO, "bench"))
from _runs import write_json  # noqa: E402
TOKENIZER = "data_prep/assets/tiny-bpe"
BASE_CONFIG = "configs/tiny_attention_cpu.yaml"

# small attention-only OLMo2: 4 layers, d 128, 4 heads x 32, SwiGLU 512, vocab 2048 (tiny tokenizer)
MODEL = ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
         "model.num_kv_heads=4", "model.head_dim=32", "model.ffn_hidden_size=512"]
COMMON = ["data.seq_length=256", "batch.micro_batch_size=8", "batch.global_batch_size=8",
          "wandb.mode=disabled", "train.seed=1234", "train.eval_iters=4"]
RUNS = {  # name -> hf-to-mcore flags and trainer overrides
    "attention": ([], ["model.memory.enabled=false"]),
    "identity": (["--memory", "--gate-init", "identity"],
                 ["model.memory.enabled=true", "model.memory.gate_init=identity"]),
    "ratplus": (["--memory", "--gate-init", "ratplus"],
                ["model.memory.enabled=true", "model.memory.gate_init=ratplus"]),
}


def log(msg):
    print(f"[gate_init {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd, logfile):
    """Run one CLI as a subprocess (stdout+stderr to logfile); raise with its tail on failure."""
    t = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = open(logfile).read()[-3000:]
        raise SystemExit(f"failed (rc {rc}): {' '.join(cmd)}\n{tail}")
    log(f"  {os.path.basename(logfile)}: {time.time() - t:.0f}s")
    return time.time() - t


def train_cmd(overrides):
    return [sys.executable, "-m", "ratplus_megatron.train", "--config", BASE_CONFIG, *overrides]


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def make_data(work):
    """Essays as ~1000-character paragraph chunks + the synthetic corpus, tokenized."""
    from eval.ruler.haystacks import essay_dir

    tok = os.path.join(work, "tok")
    prefixes = [os.path.join(tok, "essays_text_document"), os.path.join(tok, "synthetic_text_document")]
    if all(os.path.isfile(p + ".bin") for p in prefixes):
        return prefixes
    os.makedirs(tok, exist_ok=True)
    essays = os.path.join(work, "essays.jsonl")
    d, n = essay_dir(), 0
    with open(essays, "w") as f:
        for name in sorted(os.listdir(d)):
            text = open(os.path.join(d, name), encoding="utf-8", errors="replace").read()
            chunk = ""
            for para in re.split(r"\n+", text):
                para = " ".join(para.split())
                if not para:
                    continue
                chunk = f"{chunk} {para}".strip()
                if len(chunk) >= 1000:
                    f.write(json.dumps({"text": chunk}) + "\n")
                    n, chunk = n + 1, ""
            if len(chunk) > 40:
                f.write(json.dumps({"text": chunk}) + "\n")
                n += 1
    log(f"essays: {n} documents")
    syn = os.path.join(work, "synthetic.jsonl")
    sh([sys.executable, "-m", "ratplus_megatron.data.synthetic_corpus", "--output", syn, "--documents", "2000"],
       os.path.join(work, "log_synthetic.txt"))
    for src, prefix in ((essays, prefixes[0]), (syn, prefixes[1])):
        sh([sys.executable, "data_prep/tokenize.py", "--input", src, "--tokenizer", TOKENIZER,
            "--output-prefix", prefix[: -len("_text_document")], "--quiet"],
           os.path.join(work, f"log_tokenize_{os.path.basename(prefix)}.txt"))
    return prefixes


def gate_stats(ckpt):
    """The memory gate's tensors in a dist checkpoint (read-only, torch.distributed.checkpoint): did it move?

    W_g is the gate rows of the fused linear_qkv (per query group [q, k, v, g]; the layout from the
    checkpoint's model config), the bias `memory_gate_bias`."""
    import torch
    import torch.distributed.checkpoint as dcp

    from ratplus_megatron.convert.cli import read_meta, model_config_from_dict
    from ratplus_megatron.qkv_layout import GATE, qkv_parts_for, split_groups

    cfg = model_config_from_dict(read_meta(Path(ckpt), Path(ckpt), None)["model"])
    if not cfg.memory.enabled:
        return {}
    reader = dcp.FileSystemReader(ckpt)
    md = reader.read_metadata().state_dict_metadata
    keys = [k for k in md if k.endswith(("self_attention.linear_qkv.weight", "self_attention.memory_gate_bias"))
            and hasattr(md[k], "size")]
    sd = {k: torch.empty(md[k].size) for k in keys}
    if sd:
        dcp.load(sd, storage_reader=reader, no_dist=True)
    out = {}
    for k, v in sd.items():
        if k.endswith("linear_qkv.weight"):  # [layers, rows, hidden]: keep the gate rows
            k, v = f"{k}[{GATE} rows]", split_groups(v, qkv_parts_for(cfg), dim=1)[GATE]
        g = torch.sigmoid(v) if k.endswith("bias") else None
        out[k] = {"mean": v.mean().item(), "std": v.std().item(), "absmax": v.abs().max().item(),
                  **({"mean_sigmoid": g.mean().item()} if g is not None else {})}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/ratplus_gate_init", help="work dir (data, runs; reused on rerun)")
    p.add_argument("--pretrain-iters", type=int, default=150)
    p.add_argument("--continue-iters", type=int, default=50, help="N: continued-training iterations")
    p.add_argument("--continue-lr", type=float, default=1e-3,
                   help="peak LR of the continued runs (a third of the pretraining peak, as in the 7B recipe)")
    p.add_argument("--out", default=os.path.join(RESULTS, "gate_init_cpu.json"))
    p.add_argument("--fresh-continue", action="store_true", help="redo the continued runs even if present")
    a = p.parse_args(argv)
    t_start = time.time()
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    prefixes = make_data(work)
    data = ["data.prefixes=[" + ",".join(prefixes) + "]"]

    # ---- pretraining (attention only)
    pre_dir = os.path.join(work, "pretrain")
    pretrain = data + MODEL + COMMON + [
        "model.memory.enabled=false", f"train.train_iters={a.pretrain_iters}", "optimizer.lr=3e-3",
        "optimizer.min_lr=3e-4", "schedule.warmup_iters=10", "train.log_interval=1",
        f"train.eval_interval={a.pretrain_iters}", "checkpoint.save_interval=0", f"checkpoint.save={pre_dir}"]
    done = os.path.join(pre_dir, "latest_checkpointed_iteration.txt")
    if not (os.path.isfile(done) and int(open(done).read().strip()) == a.pretrain_iters):
        shutil.rmtree(pre_dir, ignore_errors=True)
        log(f"pretraining {a.pretrain_iters} iterations (attention only)")
        sh(train_cmd(pretrain), os.path.join(work, "log_pretrain.txt"))
    else:
        log(f"reusing pretrained model {pre_dir}")
    pre_metrics = read_metrics(os.path.join(pre_dir, "metrics.jsonl"))

    # ---- export to HF, import three ways
    hf = os.path.join(work, "hf")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        sh([sys.executable, "-m", "ratplus_megatron.convert", "mcore-to-hf", "--ckpt-dir", pre_dir,
            "--out-dir", hf, "--tokenizer", TOKENIZER, "--overwrite", "--quiet"], os.path.join(work, "log_mcore_to_hf.txt"))
    imports = {}
    for name, (flags, _) in RUNS.items():
        out = os.path.join(work, f"import_{name}")
        if not os.path.isfile(os.path.join(out, "ratplus_meta.json")):
            sh([sys.executable, "-m", "ratplus_megatron.convert", "hf-to-mcore", "--hf-dir", hf, "--out-dir", out,
                "--dtype", "fp32", "--seed", "1234", "--overwrite", "--quiet", *flags],
               os.path.join(work, f"log_hf_to_mcore_{name}.txt"))
        imports[name] = out

    # ---- step 0 and N continued iterations
    n = a.continue_iters
    cont_common = data + MODEL + COMMON + [
        f"optimizer.lr={a.continue_lr}", f"optimizer.min_lr={a.continue_lr / 10}", "schedule.warmup_iters=3",
        "train.log_interval=1", "checkpoint.save_interval=0"]
    results, configs = {}, {"pretrain": pretrain}
    for name, (_, overrides) in RUNS.items():
        # step 0: one iteration at lr 1e-30 (weights unchanged in fp32), validation at iteration 1
        d0 = os.path.join(work, f"step0_{name}")
        step0 = data + MODEL + COMMON + overrides + [
            f"checkpoint.init_from={imports[name]}", "train.train_iters=1", "optimizer.lr=1e-30",
            "optimizer.min_lr=0", "schedule.warmup_iters=0", "train.log_interval=1", "train.eval_interval=1",
            "checkpoint.save_interval=0", f"train.metrics_file={d0}/metrics.jsonl"]
        if a.fresh_continue or not os.path.isfile(os.path.join(d0, "metrics.jsonl")):
            shutil.rmtree(d0, ignore_errors=True)
            log(f"{name}: step-0 validation")
            sh(train_cmd(step0), os.path.join(work, f"log_step0_{name}.txt"))
        m0 = read_metrics(os.path.join(d0, "metrics.jsonl"))
        d = os.path.join(work, f"continue_{name}")
        cont = cont_common + overrides + [f"checkpoint.init_from={imports[name]}", f"train.train_iters={n}",
                                          f"train.eval_interval={n}", f"checkpoint.save={d}"]
        done = os.path.join(d, "latest_checkpointed_iteration.txt")
        if a.fresh_continue or not (os.path.isfile(done) and int(open(done).read().strip()) == n):
            shutil.rmtree(d, ignore_errors=True)
            log(f"{name}: continuing {n} iterations")
            sh(train_cmd(cont), os.path.join(work, f"log_continue_{name}.txt"))
        m = read_metrics(os.path.join(d, "metrics.jsonl"))
        init_line = [line for line in open(os.path.join(work, f"log_continue_{name}.txt"))
                     if "initialised from" in line] if os.path.isfile(os.path.join(work, f"log_continue_{name}.txt")) else []
        train = [r for r in m if r["kind"] == "train"]
        results[name] = {
            "step0_val_loss": [r for r in m0 if r["kind"] == "eval"][0]["val_loss"],
            "step0_train_loss_first_batch": [r for r in m0 if r["kind"] == "train"][0]["loss"],
            "final_val_loss": [r for r in m if r["kind"] == "eval"][-1]["val_loss"],
            "final_train_loss": train[-1]["loss"],
            "mean_train_loss_last10": sum(r["loss"] for r in train[-10:]) / len(train[-10:]),
            "train_loss": [r["loss"] for r in train],  # index i: iteration i+1 (its loss is before that update)
            "lr": [r["lr"] for r in train],
            "grad_norm": [r["grad_norm"] for r in train],
            "init_log": init_line[0].strip() if init_line else None,
            "gate_at_import": gate_stats(imports[name]),
            "gate_after_continue": gate_stats(os.path.join(d, f"iter_{n:07d}")),
        }
        configs[f"step0_{name}"] = step0
        configs[f"continue_{name}"] = cont

    # ---- record
    import megatron.core
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    pre_train = [r for r in pre_metrics if r["kind"] == "train"]
    record = {
        "what": "gate initialisation when adding the RAT+ memory to a pretrained (attention-only) OLMo2: "
                "loss at step 0 and after N continued iterations; control = the same model continued without memory",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + (argv or sys.argv[1:])),
        "commit": commit + ("-dirty" if dirty else ""),
        "machine": "CPU",
        "cpu": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "2")},
        "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
                     "python": platform.python_version()},
        "model": "OLMo2 4 layers, d 128, 4 heads x 32, SwiGLU 512, vocab 2048 (tiny-bpe), fp32; seq 256, batch 8",
        "data": {"prefixes": prefixes, "split": "95,5,0", "validation": "4 batches x 8 x 256 tokens, same at step 0 and N"},
        "step0_method": "one iteration at lr 1e-30 (fp32 weights unchanged), trainer validation at iteration 1; "
                        "step0_train_loss_first_batch = the trainer's iteration-1 loss (forward before the update)",
        "pretrain": {"iters": a.pretrain_iters, "final_train_loss": pre_train[-1]["loss"],
                     "final_val_loss": [r for r in pre_metrics if r["kind"] == "eval"][-1]["val_loss"],
                     "train_loss": [r["loss"] for r in pre_train]},
        "continue_iters": n,
        "configs": {k: [BASE_CONFIG] + v for k, v in configs.items()},
        "runs": results,
        "seconds": round(time.time() - t_start, 1),
    }
    write_json(a.out, record)

    # ---- table and plot
    print(f"\npretrained attention-only model: {a.pretrain_iters} iterations, val loss "
          f"{record['pretrain']['final_val_loss']:.4f}\n")
    print(f"| run | val loss step 0 | train loss step 0 (batch 1) | val loss step {n} | "
          f"train loss step {n} | mean train loss last 10 |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step0_val_loss']:.4f} | {r['step0_train_loss_first_batch']:.4f} | "
              f"{r['final_val_loss']:.4f} | {r['final_train_loss']:.4f} | {r['mean_train_loss_last10']:.4f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in results.items():
            steps = list(range(1, len(r["train_loss"]) + 1))
            line, = ax.plot(steps, r["train_loss"], label=f"{name} (train)")
            ax.plot([0, n], [r["step0_val_loss"], r["final_val_loss"]], "o--", color=line.get_color(),
                    alpha=0.6, label=f"{name} (val, step 0 and {n})")
        ax.set_xlabel("continued-training iteration (train loss at i: forward before update i)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Adding the RAT+ memory to a pretrained tiny OLMo2 (CPU): gate init")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        png = os.path.splitext(a.out)[0] + ".png"
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        log(f"wrote {png}")
    except ImportError:
        log("matplotlib not installed: no plot")
    log(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
