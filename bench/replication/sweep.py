"""Pretraining arms side by side on the GPUs, to find a recipe under which recall forms (issue #9).

    python bench/replication/sweep.py --work /tmp/sweep --deadline 540 --results $OUT/sweep \
        --arm "name=lr3e-3 kind=attention optimizer.lr=3e-3" \
        --arm "name=copy25 kind=attention recipe.blend=[0.6,0.13,0.02,0.25]" \
        --arm "name=seq1024 kind=attention data.seq_length=1024 batch.global_batch_size=32"
    python bench/replication/sweep.py --arms bench/replication/arms/explore1.txt --work /tmp/sweep ...
    python bench/replication/sweep.py plot RESULTS/sweep.json ... --out curves.png

Every arm is the replication recipe (`run.py`'s pretraining overrides, `--set` for its fields) plus
the arm's trainer overrides, trained from scratch in WORK/runs/NAME on GPU (i mod #GPUs); the data
is prepared once (`run.py prep`). The recall probe is rebuilt at an arm's own sequence length when
it differs. At the deadline the trainers checkpoint and stop (SIGTERM), so `run.py` can continue a
winning arm. Writes RESULTS/sweep.json (device, versions, commit, command; each arm's overrides, probe and validation curves, speed)
and a table; RESULTS/NAME.jsonl are the trainers' metrics.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as rp  # noqa: E402  (the replication driver: sizes, prep, recipe overrides; puts bench/ on the path)
from _runs import environment, trainer_command, write_json  # noqa: E402


def parse_arm(text: str) -> dict:
    fields = text.split()
    head = dict(f.split("=", 1) for f in fields if f.startswith(("name=", "kind=")))
    if "name" not in head or head.get("kind") not in rp.KINDS:
        raise SystemExit(f"--arm {text!r}: needs name=NAME and kind=attention|memory first")
    return {"name": head["name"], "kind": head["kind"],
            # recipe.KEY=VALUE: a replication-recipe field for this arm only (one that needs no prep, e.g. blend)
            "sets": [f[len("recipe."):] for f in fields if f.startswith("recipe.")],
            "overrides": [f for f in fields if not f.startswith(("name=", "kind=", "recipe."))]}


def arm_command(arm: dict, work: Path, size: dict) -> list[str]:
    from ratplus_megatron.train.config import load_config

    ov = rp.pretrain_overrides(rp.apply_sets(size, arm["sets"]), work, arm["kind"], short=False) + arm["overrides"]
    ov.append(f"checkpoint.save={work / 'runs' / arm['name']}")
    cfg = load_config(rp.recipe(arm["kind"]), ov)
    seq = cfg.data.seq_length
    if seq != size["length"]:  # the probes' rows have the sequence length baked in
        ov += rp.probe_overrides(work, seq)
    return trainer_command(rp.recipe(arm["kind"]), ov, nproc=1)


def curves(metrics: Path) -> dict:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = [r for r in rows if r.get("kind") == "train"]
    pick = lambda key: [(r["iteration"], round(r[key], 4)) for r in rows if key in r]  # noqa: E731
    return {"probe_loss": pick("probe_loss"), "copy_loss": pick("copy_loss"), "val_loss": pick("val_loss"),
            "last_iteration": train[-1]["iteration"] if train else 0,
            "train_loss": round(train[-1]["loss"], 4) if train else None,
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in train[-5:]) / len(train[-5:])) if train else None}


def plot(reports: list[dict], dest: Path) -> bool:
    """The probes against tokens seen, one line per arm (32K tokens per step here). An arm started
    from another arm's weights (checkpoint.init_from=.../runs/NAME) continues that arm's line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib is not installed: no plot", file=sys.stderr)
        return False
    arms = {r["name"]: r for rep in reports for r in rep["arms"]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {name: f"C{i % 10}" for i, name in enumerate(arms)}  # one colour per arm in both panels
    for ax, key, title in zip(axes, ("probe_loss", "copy_loss"), ("recall probe", "copy probe")):
        for r in arms.values():
            start = [o.split("=", 1)[1].rstrip("/").rsplit("/", 1)[-1] for o in r["overrides"]
                     if o.startswith("checkpoint.init_from=")]
            parent = arms.get(start[0]) if start else None
            offset = parent["last_iteration"] if parent else 0
            pts = r.get(key) or []
            if pts:
                ax.plot([offset + it for it, _ in pts], [v for _, v in pts], label=r["name"], color=colors[r["name"]],
                        linestyle="-" if r["kind"] == "memory" else "--", marker=".")
        ax.set_title(f"{title} (answer-only loss, nats/token)")
        ax.set_xlabel("optimizer steps (continued arms after their parent's)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)  # the copy probe has every arm (the recall probe may not fit short ones)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    return True


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["plot"]:  # sweep.py plot SWEEP_JSON... --out PNG
        q = argparse.ArgumentParser(prog="sweep.py plot")
        q.add_argument("reports", nargs="+", type=Path)
        q.add_argument("--out", type=Path, required=True)
        b = q.parse_args(argv[1:])
        missing = [str(x) for x in b.reports if not x.is_file()]
        if missing:
            raise SystemExit(f"sweep.py plot: no such file {missing[0]}")
        return 0 if plot([json.loads(x.read_text()) for x in b.reports], b.out) else 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", action="append", default=[], type=parse_arm,
                   help='"name=NAME kind=attention|memory KEY=VALUE ..." (trainer overrides)')
    p.add_argument("--arms", help="a file of --arm lines (# comments)")
    p.add_argument("--work", default="/tmp/sweep")
    p.add_argument("--results", required=True)
    p.add_argument("--deadline", type=float, default=None, help="seconds this command may use")
    p.add_argument("--size", choices=sorted(rp.SIZES), default="full")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="replication recipe fields")
    p.add_argument("--workers", type=int, default=15)
    a = p.parse_args(argv)
    if a.arms:
        lines = (x.split("#", 1)[0].strip() for x in Path(a.arms).read_text().splitlines())
        a.arm += [parse_arm(x) for x in lines if x]
    if not a.arm:
        raise SystemExit("sweep: no arms (--arm or --arms FILE)")
    names = [arm["name"] for arm in a.arm]
    if len(set(names)) != len(names):
        raise SystemExit(f"--arm: names must be distinct, got {names}")
    size, work, results = rp.apply_sets(dict(rp.SIZES[a.size]), a.set), Path(a.work), Path(a.results)
    clock = rp.Clock(a.deadline)
    rp.stage_prep(work, size, clock, a.workers)
    gpus = rp.cuda_count()
    commands = [arm_command(arm, work, size) for arm in a.arm]  # every probe built before any trainer starts
    procs = []
    for i, (arm, cmd) in enumerate(zip(a.arm, commands)):
        run = work / "runs" / arm["name"]
        run.mkdir(parents=True, exist_ok=True)
        out = open(run / "train.log", "a")
        gpu = i % gpus if gpus else None
        rp.log(f"sweep: {arm['name']} ({arm['kind']}) on GPU {gpu}: {' '.join(arm['overrides'])}")
        procs.append((arm, subprocess.Popen(cmd, cwd=rp.REPO, env=rp.env_for(gpu), stdout=out,
                                            stderr=subprocess.STDOUT), out))
    while any(proc.poll() is None for _, proc, _ in procs) and clock.left() > 45:
        time.sleep(2)
    for _, proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits
    for _, proc, out in procs:
        proc.wait()
        out.close()
    results.mkdir(parents=True, exist_ok=True)
    report = {**environment(), "sets": a.set, "arms": []}
    for arm, proc, _ in procs:
        run = work / "runs" / arm["name"]
        if (run / "metrics.jsonl").is_file():
            shutil.copy(run / "metrics.jsonl", results / f"{arm['name']}.jsonl")
        if proc.returncode not in (0, -signal.SIGTERM):
            print((run / "train.log").read_text()[-2000:], file=sys.stderr)
        report["arms"].append({**arm, "exit": proc.returncode, **curves(run / "metrics.jsonl")})
    write_json(results / "sweep.json", report)
    plot([report], results / "curves.png")
    for r in report["arms"]:
        curve = lambda key: " ".join(f"{it}:{v:.2f}" for it, v in r[key])  # noqa: E731
        print(f"{r['name']:>12} {r['kind']:>9} it {r['last_iteration']:>5} tok/s {r['tokens_per_s']}\n"
              f"{'':>14}probe {curve('probe_loss')}\n{'':>14}copy  {curve('copy_loss')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
