"""What the GPU benchmarks share: launching the real trainer, reading its metrics, recording the run.

Every benchmark JSON carries `environment()` (device, versions, commit) and the exact commands.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H200_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's spec sheet (dense); the MFU denominator
H200_MEASURED_GEMM_TFLOPS = 792.0  # 8192^3 bf16 torch.matmul on our H200 (shared/design/platform.md)


def commit() -> str:
    """$COMMIT, else HEAD with '-dirty' when tracked files differ from it: the GPU machine's copy
    of the tree can sit on an older .git than its files (it reported the session's first HEAD for
    later trees), so export COMMIT there."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        args = ["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"]
        return subprocess.check_output(args, cwd=REPO, text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name, module in (("triton", "triton"), ("megatron_core", "megatron.core"),
                         ("transformer_engine", "transformer_engine")):
        try:
            versions[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:
            versions[name] = None
    n = torch.cuda.device_count()
    return {"device": torch.cuda.get_device_name(0) if n else "cpu", "gpus": n, "versions": versions,
            "commit": commit(), "command": " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])}


def launcher(nproc: int) -> list[str]:
    """Python, or torchrun for several processes on this machine."""
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            if nproc > 1 else [sys.executable])


def child_env(gpus: str) -> dict:
    """Our environment for a child on `gpus`, with the repo importable."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def trainer_command(config: str, overrides: list[str], nproc: int) -> list[str]:
    return launcher(nproc) + ["-m", "ratplus_megatron.train", "--config", config, *overrides]


class TrainerRun:
    """One trainer process (or torchrun group) in the background; `result()` waits and reads its metrics."""

    def __init__(self, name: str, config: str, overrides: list[str], *, workdir: Path, gpus: str,
                 timeout_s: float = 540):
        self.name, self.workdir, self.timeout_s = name, Path(workdir), timeout_s
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.workdir / f"{name}.metrics.jsonl"
        self.log_path = self.workdir / f"{name}.log"
        self.metrics_path.unlink(missing_ok=True)
        nproc = len(gpus.split(","))
        self.cmd = trainer_command(config, [*overrides, f"train.metrics_file={self.metrics_path}"], nproc)
        print(f"[{name}] GPUs {gpus}: {' '.join(self.cmd[-len(overrides) - 3:])}", flush=True)
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=child_env(gpus), stdout=open(self.log_path, "w"),
                                     stderr=subprocess.STDOUT)

    def result(self) -> dict:
        try:
            rc = self.proc.wait(timeout=max(1.0, self.timeout_s - (time.time() - self.t0)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "timeout"
        wall = time.time() - self.t0
        metrics = []
        if self.metrics_path.exists():
            metrics = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        out = {"name": self.name, "command": " ".join(self.cmd), "returncode": rc, "wall_s": round(wall, 1),
               "metrics": metrics}
        if rc != 0:
            out["log_tail"] = self.log_path.read_text(errors="replace").splitlines()[-25:]
        print(f"[{self.name}] rc {rc}, {wall:.0f} s, {len(metrics)} metric records", flush=True)
        if rc != 0:
            print("\n".join(out["log_tail"]), flush=True)
        return out


def run_all(runs: list[tuple], *, gpu_count: int, workdir: Path) -> list[dict]:
    """Run (name, config, overrides, ngpus) jobs, packing them onto `gpu_count` GPUs as they free up."""
    pending, active, done, free = list(runs), [], [], list(range(gpu_count))
    while pending or active:
        while pending and len(free) >= pending[0][3]:
            name, config, overrides, n = pending.pop(0)
            gpus = [free.pop(0) for _ in range(n)]
            active.append((TrainerRun(name, config, overrides, workdir=workdir,
                                      gpus=",".join(map(str, gpus))), gpus))
        if pending and not active:
            raise SystemExit(f"error: job {pending[0][0]} needs {pending[0][3]} GPUs, only {gpu_count} visible")
        for item in list(active):
            run, gpus = item
            if run.proc.poll() is not None or time.time() - run.t0 > run.timeout_s:
                done.append(run.result())
                free.extend(gpus)
                active.remove(item)
        time.sleep(0.5)
    order = {r[0]: i for i, r in enumerate(runs)}
    return sorted(done, key=lambda d: order[d["name"]])


def train_records(result: dict) -> list[dict]:
    return [m for m in result["metrics"] if m.get("kind") == "train"]


def loss_curve(result: dict) -> dict[int, float]:
    """{iteration: loss} of one trainer run's logged training steps."""
    return {m["iteration"]: m["loss"] for m in train_records(result)}


def max_rel_diff(curve: dict[int, float], ref: dict[int, float], iterations) -> float | None:
    """The largest |curve / ref - 1| over the iterations both curves logged (None: none)."""
    return max((abs(curve[i] / ref[i] - 1) for i in iterations if i in curve and i in ref), default=None)


def throughput(result: dict, gpus: int, tokens_per_step: int) -> dict:
    """Steady-state numbers of one trainer run: means over its logged intervals after the first
    (which holds warm-up and allocation); {} when it logged fewer than two intervals."""
    import statistics

    train = train_records(result)[1:]
    if not train:
        return {}
    tps = statistics.fmean(m["tokens_per_s"] for m in train)
    tflops = statistics.fmean(m["tflops_per_gpu"] for m in train)
    return {"tokens_per_s": tps, "tokens_per_s_per_gpu": tps / gpus, "tflops_per_gpu": tflops,
            "mfu": tflops / H200_BF16_DENSE_TFLOPS, "fraction_of_measured_gemm": tflops / H200_MEASURED_GEMM_TFLOPS,
            "step_s": tokens_per_step / tps, "memory_gib": max(m["memory_gib"] for m in train)}


def link_checkpoint(src_save: Path, iteration: int, dst_save: Path) -> Path:
    """A fresh run directory whose latest checkpoint is src_save's `iteration` (a symlink): a
    trainer given checkpoint.save=dst_save resumes from it and writes its own checkpoints there."""
    import shutil

    from ratplus_megatron.train.checkpoint import LATEST, iter_dir

    src = Path(iter_dir(str(src_save), iteration))
    shutil.rmtree(dst_save, ignore_errors=True)
    dst_save.mkdir(parents=True)
    os.symlink(src.resolve(), dst_save / src.name)
    (dst_save / LATEST).write_text(f"{iteration}\n")
    return dst_save


def write_json(path: str | Path, obj, quiet: bool = False) -> None:
    """Write obj as JSON with the project's one atomic writer (ratplus_megatron.files.write_atomic: a killed
    run leaves the old file or the new one, never half of one). quiet: no "wrote" line (for
    saves after every step)."""
    if str(REPO) not in sys.path:  # run as python bench/x.py: bench/ is on sys.path, the repo root may not be
        sys.path.insert(0, str(REPO))
    from ratplus_megatron.files import write_atomic

    path = write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1)))
    if not quiet:
        print(f"wrote {path}", flush=True)
