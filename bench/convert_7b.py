"""The checkpoint converter at full OLMo2-7B size: HF -> megatron (adding the memory) -> HF.

No 7B weights can be downloaded on the GPU machine, so the source is a randomly initialised
`Olmo2ForCausalLM` with the released 7B config (`tests/data/olmo2-7b-config.json`), saved by
transformers in bf16. Then, each as its own process with the GPU hidden (the converter runs on CPU,
as on a login node):

    python -m ratplus_megatron.convert hf-to-mcore --hf-dir SRC --out-dir MCORE --memory --gate-init identity
    python -m ratplus_megatron.convert mcore-to-hf --ckpt-dir MCORE --out-dir EXPORT

Recorded per step: wall time and peak resident memory (the child's own, from wait4), and the sizes
on disk. Checked: every tensor of the source is in the export bit for bit; the export's new
tensors (the gate) are the identity start; transformers loads the export (`trust_remote_code`) and
its logits on GPU against the stock model's over --check-tokens random tokens: as exported (the
identity start, g = sigmoid(-6): k~ close to k) and with the gate shut (bias -1e4, g = 0: k~ = k,
so the two models must agree up to rounding; this is the pass criterion).

    python bench/convert_7b.py --work /tmp/c7b --out bench/results/convert_7b.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import REPO, child_env, environment, write_json  # noqa: E402

CONFIG = REPO / "tests" / "data" / "olmo2-7b-config.json"


def log(msg: str) -> None:
    print(f"[convert_7b {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dir_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def run_step(name: str, argv: list[str], logdir: Path) -> dict:
    """One converter process with the GPU hidden: wall seconds, peak RSS (GB), exit status."""
    env = child_env("")
    t0 = time.time()
    with open(logdir / f"{name}.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ratplus_megatron.convert", *argv], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    rec = dict(step=name, argv=argv, wall_s=round(time.time() - t0, 1),
               peak_rss_gb=round(usage.ru_maxrss / 1e6, 2), exit_status=os.waitstatus_to_exitcode(status))
    log(f"{name}: {rec}")
    if rec["exit_status"] != 0:
        tail = (logdir / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"{name} failed (exit {rec['exit_status']}):\n{tail}")
    return rec


def make_source(path: Path, config: Path, seed: int, device: str) -> dict:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config.from_dict(json.loads(config.read_text()))
    torch.manual_seed(seed)
    t0 = time.time()
    with torch.device(device):
        model = Olmo2ForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    return dict(params=n, wall_s=round(time.time() - t0, 1), gb=round(dir_gb(path), 2))


def compare_tensors(src: Path, export: Path) -> dict:
    """Source tensors bit for bit in the export; what the export adds."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b = index(src), index(export)
    missing = sorted(set(a) - set(b))
    mismatched = []
    for name, f in a.items():
        if name not in b:
            continue
        with safe_open(str(f), "pt") as ha, safe_open(str(b[name]), "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            mismatched.append(name)
    added = sorted(set(b) - set(a))
    gate = {}
    for name in added:
        with safe_open(str(b[name]), "pt") as hb:
            t = hb.get_tensor(name).float()
        kind = name.split(".")[-2] + "." + name.split(".")[-1]
        g = gate.setdefault(kind, dict(count=0, min=float("inf"), max=float("-inf")))
        g["count"] += 1
        g["min"], g["max"] = min(g["min"], t.min().item()), max(g["max"], t.max().item())
    return dict(source_tensors=len(a), export_tensors=len(b), missing_in_export=missing[:5],
                n_missing=len(missing), bit_mismatches=mismatched[:5], n_mismatched=len(mismatched),
                added=gate)


@torch.no_grad()
def compare_logits(src: Path, export: Path, n_tokens: int, seed: int, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (1, n_tokens), generator=g).to(device)
    t0 = time.time()
    # straight onto the GPU where accelerate is installed (it is not a dependency of ours)
    kw = dict(device_map=device) if importlib.util.find_spec("accelerate") else {}
    stock = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, **kw).to(device)
    a = stock(ids).logits.float()
    del stock
    torch.cuda.empty_cache()
    t1 = time.time()
    mem = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16, trust_remote_code=True, **kw).to(device)
    cls = type(mem).__name__
    b = mem(ids).logits.float()
    # the gate shut (g = sigmoid(-1e4) = 0 exactly): k~ = k, so the memory model is the stock one
    n_bias = 0
    for name, p in mem.named_parameters():
        if name.endswith("g_proj.bias"):
            p.fill_(-1e4)
            n_bias += 1
    c = mem(ids).logits.float()
    load_s = time.time() - t1
    del mem
    torch.cuda.empty_cache()

    def agree(x, y):
        d = (x - y).abs()
        return dict(top1_agreement=(x.argmax(-1) == y.argmax(-1)).float().mean().item(),
                    max_abs_logit_diff=d.max().item(), mean_abs_logit_diff=d.mean().item())

    return dict(tokens=n_tokens, export_class=cls, export_load_and_forward_s=round(load_s, 1),
                total_s=round(time.time() - t0, 1), logit_mean_abs=a.abs().mean().item(),
                as_exported=agree(a, b), gate_shut=dict(agree(a, c), biases_set=n_bias))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/convert_7b", help="scratch folder (about 50 GB)")
    ap.add_argument("--out", default="bench/results/convert_7b.json")
    ap.add_argument("--config", default=str(CONFIG), help="HF config.json of the source model")
    ap.add_argument("--check-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="leave the three checkpoints in --work")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only for a small --config
    config = Path(args.config)
    if not config.is_file():
        sys.exit(f"--config {config} does not exist")
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    free_gb = shutil.disk_usage(work).free / 1e9
    log(f"{work}: {free_gb:.0f} GB free")
    src, mcore, export = work / "hf_src", work / "mcore", work / "hf_export"
    result = dict(environment(), source_config=str(config), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  work_free_gb=round(free_gb, 1))

    def save():
        write_json(args.out, result)

    log(f"random source model from {config} (transformers, bf16, on {device})")
    result["source"] = make_source(src, config, args.seed, device)
    log(f"source: {result['source']}")
    save()
    result["steps"] = [
        run_step("hf-to-mcore", ["hf-to-mcore", "--hf-dir", str(src), "--out-dir", str(mcore), "--memory",
                                 "--gate-init", "identity", "--quiet"], work)]
    result["steps"][-1]["out_gb"] = round(dir_gb(mcore), 2)
    save()
    result["steps"].append(run_step("mcore-to-hf", ["mcore-to-hf", "--ckpt-dir", str(mcore), "--out-dir",
                                                    str(export), "--quiet"], work))
    result["steps"][-1]["out_gb"] = round(dir_gb(export), 2)
    save()
    log("comparing tensors")
    result["tensors"] = compare_tensors(src, export)
    log(f"tensors: {result['tensors']}")
    save()
    log("comparing logits on GPU")
    result["logits"] = compare_logits(src, export, args.check_tokens, args.seed, device)
    log(f"logits: {result['logits']}")
    t = result["tensors"]
    shut = result["logits"]["gate_shut"]
    result["ok"] = (t["n_missing"] == 0 and t["n_mismatched"] == 0 and shut["biases_set"] > 0
                    and shut["max_abs_logit_diff"] <= 1e-3 * max(1.0, result["logits"]["logit_mean_abs"]))
    save()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'step':<12} {'wall s':>7} {'peak RSS GB':>12} {'out GB':>7}")
    for s in result["steps"]:
        print(f"{s['step']:<12} {s['wall_s']:>7} {s['peak_rss_gb']:>12} {s['out_gb']:>7}")
    print(f"source {result['source']['params'] / 1e9:.2f}B params, {result['source']['gb']} GB; "
          f"tensors bit-equal: {t['n_mismatched'] == 0 and t['n_missing'] == 0}; "
          f"top-1 agreement with the stock model: as exported {result['logits']['as_exported']['top1_agreement']:.4f}, "
          f"gate shut {shut['top1_agreement']:.4f} (max |logit diff| {shut['max_abs_logit_diff']:.2e}); ok={result['ok']}")


if __name__ == "__main__":
    main()
