"""TP=2 and PP=2 against TP=1 on GPUs with NCCL, memory on and off; checkpoints across layouts.

1. One initial model per memory setting, saved at TP=1 (a model-only dist checkpoint).
2. The real trainer from that checkpoint at TP=1, TP=2 and PP=2 (DP=1 each: the same batches,
   the same math up to reduction order), K steps in bf16; the per-step losses are compared with
   TP=1's.
3. The TP=2 run's final checkpoint is loaded at TP=1, TP=2 and PP=2, and the PP=2 run's at TP=2:
   the forward loss on fixed held-out batches must agree across layouts.
4. Training resumed across layouts: one run's final checkpoint (--resume-from, default TP=2; model
   + distributed optimizer, saved fully_reshardable) is resumed at --resume-at (default TP=2, TP=1,
   PP=2) for a few more steps. Each resumed curve must follow the same layout's uninterrupted run
   (trained K + more steps from the start: nothing lost by stopping) within bf16 tolerance.

    python bench/parallel_check.py --data .carry/data/essays_text_document --out bench/results/parallel_check.json
    # one GPU: the TP=1 run stopped and resumed at TP=1 only
    python bench/parallel_check.py --data ... --layouts tp1 --load-checks '' --resume-from tp1 --resume-at tp1

Worker modes (run by the driver): `_init` builds and saves the initial model; `_loss` loads a
checkpoint at a layout and prints the loss as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (REPO, child_env, environment, launcher, link_checkpoint, loss_curve,  # noqa: E402
                   max_rel_diff, run_all, train_records, write_json)

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
STEP_TOLERANCE = 2e-2  # bf16: relative loss difference over the first steps
LOAD_TOLERANCE = 5e-3  # bf16: the same weights at another layout, forward only


def _cfg(config, overrides):
    from ratplus_megatron.train.config import load_config

    return load_config(config, overrides)


def worker_init(config: str, overrides: list[str], out: str) -> None:
    """Build the model at TP=1 with the recipe's seed and save it (what `checkpoint.init_from` reads)."""
    import torch
    from megatron.core import dist_checkpointing

    from ratplus_megatron.model import build_model, to_transformer_config
    from ratplus_megatron.parallel import destroy_parallel, init_parallel

    cfg = _cfg(config, overrides)
    init_parallel(tp=1, pp=1, seed=cfg.train.seed)
    mcfg = cfg.model.build()
    model = build_model(mcfg, to_transformer_config(mcfg, cfg.precision), use_te=cfg.model.use_te)
    if torch.cuda.is_available():
        model.cuda()
    os.makedirs(out, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), out)
    destroy_parallel()


def worker_loss(config: str, overrides: list[str], ckpt: str, batches: int) -> None:
    """Forward-only mean loss of the first `batches` global batches of the validation split."""
    import torch
    from megatron.core import parallel_state as ps

    from ratplus_megatron.parallel import destroy_parallel, init_parallel
    from ratplus_megatron.train import checkpoint
    from ratplus_megatron.train.data import build_datasets, micro_batches
    from ratplus_megatron.train.loop import build_gpu, gpu_step, reduce_loss

    cfg = _cfg(config, overrides + ["train.eval_interval=1", f"train.eval_iters={batches}"])
    rank, _ = init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.train.seed)
    model, optimizer, tconfig = build_gpu(cfg, cfg.model.build())
    checkpoint.load_model_only(ckpt, [m.module for m in model])
    _, valid = build_datasets(cfg, 1, rank, torch.distributed.barrier)
    pair = torch.zeros(2, dtype=torch.float64, device="cuda")
    for i in range(batches):
        mbs = micro_batches(valid, i, cfg.batch.global_batch_size, cfg.batch.micro_batch_size,
                            ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), "cuda")
        pair += gpu_step(mbs, lr=None, mask=None, model=model, optimizer=optimizer, tconfig=tconfig, cfg=cfg)["pair"]
    loss = reduce_loss(pair)
    if rank == 0:
        print("LOSS_JSON " + json.dumps({"loss": loss}), flush=True)
    destroy_parallel()


def _python(args: list[str], nproc: int, gpus: str, log: Path) -> tuple[int, str]:
    try:
        proc = subprocess.run(launcher(nproc) + [str(Path(__file__).resolve()), *args], cwd=REPO,
                              env=child_env(gpus), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"timeout after 300 s\n{e.stdout or ''}{e.stderr or ''}")
        print(f"TIMEOUT: {' '.join(args[:3])}", flush=True)
        return 124, ""
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}): {' '.join(args[:3])}\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]),
              flush=True)
    return proc.returncode, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="configs/gpu_small_ratplus.yaml")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--use-te", default="false", choices=["true", "false"])
    ap.add_argument("--memory", default="on,off")
    ap.add_argument("--load-checks", default="on", help="memory settings whose checkpoints are loaded at other layouts")
    ap.add_argument("--resume-checks", default="on",
                    help="memory settings whose TP=2 run is resumed at other layouts ('' for none)")
    ap.add_argument("--resume-iters", type=int, default=6, help="steps trained after each resume")
    ap.add_argument("--resume-from", default="tp2", choices=list(LAYOUTS), help="the run whose checkpoint is resumed")
    ap.add_argument("--resume-at", default="tp2,tp1,pp2", help="layouts the checkpoint is resumed at")
    ap.add_argument("--layouts", default=",".join(LAYOUTS),
                    help="layouts trained in the step comparison (tp1 is its reference; the resume "
                         "check needs tp2)")
    ap.add_argument("--workdir", default="/tmp/parallel_check")
    ap.add_argument("--out", default="bench/results/parallel_check.json")
    ap.add_argument("overrides", nargs="*", help="extra trainer overrides for every run, e.g. optimizer.lr=3e-4")
    args = ap.parse_args()
    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = [f"data.prefixes=[{args.data}]", f"model.use_te={args.use_te}", "batch.micro_batch_size=4",
            "batch.global_batch_size=16", "train.log_interval=1", "train.eval_interval=0", "schedule.warmup_iters=5",
            "checkpoint.save_interval=0", "checkpoint.optimizer_sharding=fully_reshardable",
            f"data.cache_dir={work / 'data_cache'}", *args.overrides]
    report = {"benchmark": "parallel_check", **environment(), "config": args.config, "iters": args.iters,
              "overrides": args.overrides,
              "use_te": args.use_te, "step_tolerance": STEP_TOLERANCE, "load_tolerance": LOAD_TOLERANCE,
              "memory": {}}
    ok = True
    mems = args.memory.split(",")
    overrides = {mem: base + [f"model.memory.enabled={'true' if mem == 'on' else 'false'}"] for mem in mems}
    for mem in list(mems):
        rc, _ = _python(["_init", "--config", args.config, "--ckpt", str(work / f"init_{mem}"), *overrides[mem]],
                        1, "0", work / f"init_{mem}.log")
        if rc != 0:
            report["memory"][mem] = {"error": f"init failed, see {work}/init_{mem}.log"}
            ok = False
            mems.remove(mem)
    # layout-major order: the two single-GPU runs share the machine, then the two-GPU runs
    # every run is scheduled for iters + resume_iters steps and stops (with a checkpoint) after
    # iters: the resumed runs and the uninterrupted reference then share one LR schedule
    total = args.iters + args.resume_iters
    runs = [(f"{mem}_{name}", args.config,
             overrides[mem] + [f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.train_iters={total}",
                               f"train.exit_at_iter={args.iters}",
                               f"checkpoint.init_from={work / f'init_{mem}'}",
                               f"checkpoint.save={work / f'run_{mem}_{name}'}"], tp * pp)
            for name, (tp, pp) in LAYOUTS.items() if name in args.layouts.split(",") for mem in mems]
    for run in runs:  # a save directory left by an earlier call would be resumed, not trained
        shutil.rmtree(work / f"run_{run[0]}", ignore_errors=True)
    results = run_all(runs, gpu_count=torch.cuda.device_count(), workdir=work)
    for mem in mems:
        mine = [r for r in results if r["name"].startswith(mem + "_")]
        losses = {r["name"].split("_", 1)[1]: [m["loss"] for m in train_records(r)] for r in mine}
        ref = losses.get("tp1")
        steps = {}
        for name, curve in losses.items():
            if ref is None:  # not compared: the TP=1 reference was not asked for (--layouts)
                steps[name] = {"losses": curve, "max_rel_diff_to_tp1": None, "ok": None}
                continue
            n = min(len(curve), len(ref))
            rel = max((abs(a / b - 1) for a, b in zip(curve[:n], ref[:n])), default=None)
            steps[name] = {"losses": curve, "max_rel_diff_to_tp1": rel,
                           "ok": rel is not None and n == args.iters and rel <= STEP_TOLERANCE}
            ok &= steps[name]["ok"]
        report["memory"][mem] = {"steps": steps, "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in mine]}
        write_json(args.out, {**report, "ok": None, "partial": "checkpoint loads not run yet"})  # survives a timeout
        loads = {}
        if mem in args.load_checks.split(","):  # the same checkpoint loaded at other layouts
            for src, targets in (("tp2", ("tp1", "tp2", "pp2")), ("pp2", ("pp2", "tp2"))):
                for name in targets:
                    tp, pp = LAYOUTS[name]
                    rc, out = _python(["_loss", "--config", args.config, "--ckpt", str(work / f"run_{mem}_{src}"),
                                       *overrides[mem], f"parallel.tp={tp}", f"parallel.pp={pp}"], tp * pp,
                                      ",".join(str(i) for i in range(tp * pp)), work / f"loss_{mem}_{src}_at_{name}.log")
                    line = next((x for x in out.splitlines() if x.startswith("LOSS_JSON ")), None)
                    loads[f"{src}_ckpt_at_{name}"] = json.loads(line[10:])["loss"] if rc == 0 and line else None
                vals = [loads[f"{src}_ckpt_at_{name}"] for name in targets]
                spread = (max(vals) / min(vals) - 1) if None not in vals else None
                loads[f"{src}_ckpt_rel_spread"] = spread
                ok &= spread is not None and spread <= LOAD_TOLERANCE
        report["memory"][mem]["checkpoint_loads"] = loads
        if mem in args.resume_checks.split(","):
            resumes = resume_across_layouts(args, work, mem, overrides[mem])
            report["memory"][mem]["resumes"] = resumes
            ok &= all(r["ok"] for r in resumes.values())
            write_json(args.out, {**report, "ok": None, "partial": "other memory settings not done yet"})
        print(json.dumps({mem: {"steps": {k: v["max_rel_diff_to_tp1"] for k, v in steps.items()}, "loads": loads}},
                         indent=1), flush=True)
    report["ok"] = ok
    write_json(args.out, report)
    print("ALL OK" if ok else "SOME CHECKS FAILED")


def resume_across_layouts(args, work: Path, mem: str, overrides: list[str]) -> dict:
    """Resume the --resume-from run's final checkpoint at each --resume-at layout for --resume-iters
    more steps (each in its own save directory that links the checkpoint), beside an uninterrupted
    run of the source layout for all the steps: the reference every resumed curve must follow."""
    import torch

    src = args.resume_from
    targets = [t for t in args.resume_at.split(",") if t]
    unknown = [t for t in targets if t not in LAYOUTS]
    if unknown:
        raise SystemExit(f"parallel_check: --resume-at {','.join(unknown)}: unknown layout (known: {','.join(LAYOUTS)})")
    total = args.iters + args.resume_iters
    stp, spp = LAYOUTS[src]
    shutil.rmtree(work / f"straight_{mem}_{src}", ignore_errors=True)
    runs = [(f"straight_{mem}_{src}", args.config,
             overrides + [f"parallel.tp={stp}", f"parallel.pp={spp}", f"train.train_iters={total}",
                          f"checkpoint.init_from={work / f'init_{mem}'}",
                          f"checkpoint.save={work / f'straight_{mem}_{src}'}"], stp * spp)]
    for name in targets:
        dst = link_checkpoint(work / f"run_{mem}_{src}", args.iters, work / f"resume_{mem}_{src}_at_{name}")
        tp, pp = LAYOUTS[name]
        runs.append((f"resume_{mem}_at_{name}", args.config,
                     overrides + [f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.train_iters={total}",
                                  f"checkpoint.save={dst}"], tp * pp))
    results = run_all(runs, gpu_count=torch.cuda.device_count(), workdir=work)
    curves = {r["name"].rsplit("_", 1)[1] if r["name"].startswith("resume_") else "straight": loss_curve(r)
              for r in results}
    want = list(range(args.iters + 1, total + 1))
    ref = curves.get("straight", {})
    ref_ok = all(i in ref for i in want)
    out = {"straight": {"layout": src, "losses": [ref.get(i) for i in want], "ok": ref_ok}}
    for name in targets:
        curve = curves.get(name, {})
        resumed = sorted(curve) == want  # trained exactly the steps after the checkpoint
        rel = max_rel_diff(curve, ref, want)
        out[name] = {"losses": [curve.get(i) for i in want], "resumed_at": args.iters if resumed else None,
                     f"max_rel_diff_to_uninterrupted_{src}": rel,
                     "ok": resumed and ref_ok and rel is not None and rel <= STEP_TOLERANCE}
    print(json.dumps({mem: {"resumes_vs_uninterrupted": {k: v.get(f"max_rel_diff_to_uninterrupted_{src}")
                                                          for k, v in out.items()}}}), flush=True)
    return out


def _worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["_init", "_loss"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    if a.mode == "_init":
        worker_init(a.config, a.overrides, a.ckpt)
    else:
        worker_loss(a.config, a.overrides, a.ckpt, a.batches)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        _worker_main(sys.argv[1:])
    else:
        main()
