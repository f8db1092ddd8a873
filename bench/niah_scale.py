"""The NIAH evaluator at OLMo2-7B size and long context on one GPU: time and memory per method.

What `python eval/niah.py --model <7B memory model> --lengths 32768,131072 ...` costs, measured on
a randomly initialised `Olmo2MemoryForCausalLM` with the released 7B shape (no weights can be
downloaded on the GPU machine; accuracy is not the point, cost is). The prompt is a real RULER
sample (eval.ruler, the shipped tiny BPE tokenizer) of each --lengths; the engine is eval.engine's,
as niah.py runs it. Per length and method (budget --budget, the memory's K~/V~ as K/V source):

* prefill_s: the prompt's forward, the selector's metadata and the first token, and
* decode_ms_per_token: the forwards after it, from `Engine.generate(..., stats=...)` (a device
  sync at each boundary), after one untimed call on the prompt's first 8192 tokens (Triton compiles;
  kernels whose launch parameters depend on the length may still compile in the timed call, hence
  also decode_ms_median, the median forward),
  for each decoding loop of --decode (CUDA graph replay, eager HF forwards); the rows keep the
  generated tokens, which the loops must agree on;
* peak_gib: the largest GPU memory allocated during the timed call.

    python bench/niah_scale.py --lengths 32768,131072 --out bench/results/niah_scale.json
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import REPO, environment, write_json  # noqa: E402

CONFIG = REPO / "tests" / "data" / "olmo2-7b-config.json"
TOKENIZER = REPO / "data_prep" / "assets" / "tiny-bpe"


def log(msg: str) -> None:
    print(f"[niah_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(config: Path, device: str):
    from ratplus_megatron.hf import Olmo2MemoryConfig, Olmo2MemoryForCausalLM

    raw = json.loads(config.read_text())
    raw.update(model_type="olmo2_memory", architectures=["Olmo2MemoryForCausalLM"], memory=True,
               memory_gate_bias=True, torch_dtype="bfloat16")
    cfg = Olmo2MemoryConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        model = Olmo2MemoryForCausalLM(cfg).to(torch.bfloat16)
    return model


def prompt_ids(task: str, length: int, tokenizer, work: Path) -> list[int]:
    from eval.report import read_jsonl
    from eval.ruler.generate import write_task_file

    path = write_task_file(task, length, 1, tokenizer, work, seed=42)
    s = read_jsonl(path)[0]
    return tokenizer(s["input"] + s["answer_prefix"], add_special_tokens=True)["input_ids"]


def profile(engine, ids, spec, device, decode: str, steps: int = 8) -> dict:
    """torch.profiler over one generation of 1 + steps tokens, the prompt's forward included
    (profile a short --lengths to see the decode steps): host ops and device kernels, as the
    profiler's top tables."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        engine.generate([ids], spec, 1 + steps, decode=decode)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    ka = prof.key_averages()
    return dict(steps=steps, by_device=ka.table(sort_by=sort, row_limit=20, max_name_column_width=60),
                by_host=ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(CONFIG), help="HF config.json of the model shape")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--methods", default="dense,quest,moba,snapkv,dilated",
                    help="eval.engine methods; quest+int8 = Quest with int8 page bounds")
    ap.add_argument("--budget", default="1/16")
    ap.add_argument("--task", default="niah_multikey_3")
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens timed after the first")
    ap.add_argument("--decode", default="graph,eager",
                    help="decoding loops to time, comma-separated (eval.engine: graph, eager, static)")
    ap.add_argument("--profile", default="", help="methods to profile (8 decode steps, torch.profiler) "
                                                  "at the first length: the top ops go into the JSON")
    ap.add_argument("--out", default="bench/results/niah_scale.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from eval.engine import Engine
    from eval.engine.spec import KVSource, MethodSpec, SpecError, parse_budgets, parse_method_name

    try:  # bad names and budgets before the model is built
        methods = {m: parse_method_name(m) for m in args.methods.split(",")}
        budget = parse_budgets(args.budget)[0]
    except SpecError as e:
        ap.error(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only for a small --config
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    result = dict(environment(), config=str(Path(args.config).resolve().relative_to(REPO))
                  if Path(args.config).resolve().is_relative_to(REPO) else args.config,
                  task=args.task, budget=args.budget, new_tokens=args.new_tokens,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[])

    def save():
        write_json(args.out, result)

    t0 = time.time()
    model = build_model(Path(args.config), device)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2) if device == "cuda" else None
    log(f"model: {result['params'] / 1e9:.2f}B parameters in {time.time() - t0:.0f} s")
    engine = Engine(model, tok)
    source = KVSource("mem", "mem")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as work:
        lengths = [int(x) for x in args.lengths.split(",")]
        for length in lengths:
            ids = prompt_ids(args.task, length, tok, Path(work))
            log(f"length {length}: prompt of {len(ids)} tokens")
            for method, decode in itertools.product(methods, args.decode.split(",")):
                base, fields = methods[method]
                spec = MethodSpec(method=base, source=source, **fields)
                if method != "dense":
                    spec = spec.with_budget(budget)
                row = dict(length=length, prompt_tokens=len(ids), method=method, label=spec.label, decode=decode)
                try:
                    engine.generate([ids[: min(len(ids), 8192)]], spec, 3, decode=decode)  # compiles the kernels
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    stats = {}
                    outs = engine.generate([ids], spec, 1 + args.new_tokens, stats=stats, decode=decode)
                    row["tokens"] = outs[0]["tokens"]  # the decoding loops must agree
                    row["prefill_s"] = round(stats["prefill_s"], 3)
                    row["generated"] = len(outs[0]["tokens"])
                    row["decode_ms_per_token"] = round(1e3 * stats["decode_s"] / max(1, stats["decode_steps"]), 2)
                    # steady state: a new length can compile kernels, and a graph's first steps capture
                    row["decode_ms_median"] = round(1e3 * statistics.median(stats["decode_step_s"]), 2)
                    if device == "cuda":
                        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if method in args.profile.split(",") and length == lengths[0]:
                        row["profile"] = profile(engine, ids, spec, device, decode)
                except torch.cuda.OutOfMemoryError as e:
                    row["error"] = f"out of memory: {str(e).splitlines()[0][:160]}"
                except (SpecError, ValueError) as e:
                    row["error"] = str(e)
                log(json.dumps(row))
                result["rows"].append(row)
                save()
    result["wall_s"] = round(time.time() - t0, 1)
    save()
    print(f"\n{'length':>7} {'method':<10} {'decode':<6} {'prefill s':>9} {'decode ms/tok':>13} {'median':>7} "
          f"{'peak GiB':>8}")
    for r in result["rows"]:
        print(f"{r['length']:>7} {r['method']:<10} {r['decode']:<6} {r.get('prefill_s', float('nan')):>9} "
              f"{r.get('decode_ms_per_token', float('nan')):>13} {r.get('decode_ms_median', float('nan')):>7} "
              f"{r.get('peak_gib', r.get('error', '')):>8}")


if __name__ == "__main__":
    main()
