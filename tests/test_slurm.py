"""End to end on a real one-node Slurm cluster: `sbatch slurm/pretrain_olmo2.sh`, unchanged, with the tiny
CPU recipe and two tasks; then the time-limit path (USR1 -> checkpoint -> requeue -> resume).

The cluster comes from scripts/local_slurm.sh (Debian's slurm-wlm + munge, installed with apt-get
when missing; root). No Slurm and no way to install it is a failure, not a skip: CI installs it
(scripts/install_system_deps.sh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
SBATCH_SCRIPT = REPO / "slurm" / "pretrain_olmo2.sh"
SLURM_DIR = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/ratplus-local-slurm"))
RECIPE = "configs/tiny_ratplus_cpu.yaml"
# two data-parallel ranks: micro-batch 4 x 2 ranks = the recipe's global batch of 8
SHORT_RUN = ("batch.micro_batch_size=4 train.train_iters=20 train.log_interval=5 train.eval_interval=10 "
             "train.eval_iters=1 checkpoint.save_interval=10")
JOB_TIMEOUT = 420  # seconds; a job takes ~30 s on an idle 2-core machine (most of it imports)


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def _slurm_logs() -> str:
    return "\n".join(f"--- {p}\n{_tail(p, 20)}" for p in (SLURM_DIR / "log").glob("*.log"))


@pytest.fixture(scope="module")
def slurm_env():
    """A running one-node cluster; environment for the client commands. Stops it if it started it."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm test needs root (it runs slurmctld/slurmd/munged); run the suite as root")
    have_slurm = all(shutil.which(c) or Path("/usr/sbin", c).exists() for c in ("slurmctld", "slurmd", "sbatch"))
    if not have_slurm and shutil.which("apt-get") is None:
        pytest.fail("Slurm is not installed and there is no apt-get to install it: install slurm-wlm and "
                    "munge (Debian: bash scripts/install_system_deps.sh) and run again")
    was_running = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"could not install or start the local Slurm cluster (scripts/local_slurm.sh start, "
                    f"exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    env = dict(os.environ, SLURM_CONF=str(SLURM_DIR / "slurm.conf"))
    yield env
    if not was_running:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small synthetic corpus tokenized with the tiny tokenizer: the --output-prefix (the script
    accepts it as well as PREFIX_text_document)."""
    d = tmp_path_factory.mktemp("slurm_data")
    py = sys.executable
    subprocess.run([py, "-m", "ratplus_megatron.data.synthetic_corpus", "--output", str(d / "corpus.jsonl"),
                    "--documents", "300"], cwd=REPO, check=True, capture_output=True, timeout=300)
    r = subprocess.run([py, "data_prep/tokenize.py", "--input", str(d / "corpus.jsonl"),
                        "--tokenizer", "data_prep/assets/tiny-bpe", "--output-prefix", str(d / "tok"), "--quiet"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"tokenize failed:\n{r.stdout}\n{r.stderr}"
    assert (d / "tok_text_document.bin").exists()
    return d / "tok"


def _export(data_prefix: Path, save: Path, extra: str) -> str:
    # no commas inside the values: --export splits on them
    return ",".join(["--export=ALL", f"RECIPE={RECIPE}", f"DATA_PREFIX={data_prefix}", f"SAVE_DIR={save}",
                     "WANDB_MODE=offline", "WANDB_PROJECT=ratplus-slurm-test", "OMP_NUM_THREADS=1",
                     f"VENV={Path(sys.executable).parent.parent}", f"EXTRA_ARGS={extra}"])


def _job_state(job: str, env) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _jobcomp(job: str) -> str:
    """The jobcomp/filetxt record of a finished job (there is no slurmdbd, so no sacct)."""
    path = SLURM_DIR / "jobcomp.log"
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith(f"JobId={job} ")] if path.exists() else []
    return lines[-1] if lines else ""


def _check_run_dir(save: Path, iters: int):
    latest = save / "latest_checkpointed_iteration.txt"
    assert latest.is_file(), f"no {latest}: {sorted(p.name for p in save.iterdir())}"
    assert latest.read_text().strip() == str(iters)
    it_dir = save / f"iter_{iters:07d}"
    assert it_dir.is_dir() and any(it_dir.iterdir()), f"checkpoint {it_dir} missing or empty"
    runs = list((save / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {save / 'wandb'}"
    assert any(list(r.glob("run-*.wandb")) for r in runs), f"offline W&B runs without data: {runs}"
    return runs


def test_sbatch_tiny_recipe_two_ranks(slurm_env, tiny_data, tmp_path):
    save = tmp_path / "run"
    cmd = ["sbatch", "--wait", "--ntasks-per-node=2", "--job-name=ratplus-slurm-test",
           _export(tiny_data, save, SHORT_RUN), str(SBATCH_SCRIPT)]
    # submitted from tmp_path: the header's --output=%x-%j.out lands there; the script finds the repo itself
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    m = re.search(r"Submitted batch job (\d+)", first)
    if not m:
        proc.kill()
        pytest.fail(f"sbatch did not submit: {first}{proc.stderr.read()}")
    job = m.group(1)
    log = tmp_path / f"ratplus-slurm-test-{job}.out"
    try:
        rc = proc.wait(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job], env=slurm_env)
        proc.kill()
        pytest.fail(f"job {job} did not finish in {JOB_TIMEOUT}s; log:\n{_tail(log)}")
    text = log.read_text(errors="replace") if log.exists() else ""
    assert rc == 0, f"sbatch --wait exit {rc} ({proc.stderr.read()}); log {log}:\n{_tail(log)}\n{_slurm_logs()}"
    comp = _jobcomp(job)
    if comp:
        assert "JobState=COMPLETED" in comp and "ExitCode=0:0" in comp, comp
    assert "training step ended with exit code 0" in text, _tail(log)
    # both ranks ran: each task announces itself, and the trainer saw a world of 2
    assert "[rank 0/2]" in text and "[rank 1/2]" in text, _tail(log)
    assert "world 2 = tp 1 x pp 1 x dp 2; CPU" in text, _tail(log)
    assert "iter 20/20" in text and "done: 20 iterations" in text, _tail(log)
    _check_run_dir(save, 20)
    assert (save / "iter_0000010").is_dir()


def _wait_for(pred, timeout: float, what: str, log: Path, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; log:\n{_tail(log)}\n{_slurm_logs()}")


def test_time_limit_signal_saves_requeues_and_resumes(slurm_env, tiny_data, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@300 sends before the time limit): the tasks
    save a checkpoint and exit, the job requeues itself, and the rerun resumes and finishes."""
    iters = 150
    save = tmp_path / "run"
    extra = (f"batch.micro_batch_size=4 train.train_iters={iters} train.log_interval=10 train.eval_interval=0 "
             "checkpoint.save_interval=0")
    r = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--job-name=ratplus-requeue-test",
                        _export(tiny_data, save, extra), str(SBATCH_SCRIPT)],
                       cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log = tmp_path / f"ratplus-requeue-test-{job}.out"
    text = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731
    try:
        # the trainer's signal handlers are in place once it logs the start of the loop
        _wait_for(lambda: "training from iteration 0" in text() or "training step ended" in text(),
                  JOB_TIMEOUT, "the training loop to start", log)
        assert "training step ended" not in text(), f"the run ended before the signal:\n{_tail(log)}"
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
        _wait_for(lambda: "requeued;" in text() or "requeue failed" in text(), 180, "the requeue", log)
        assert "requeued;" in text(), _tail(log)
        # the requeued job becomes eligible again once its old credential expires (cred_expire=20 s in
        # scripts/local_slurm.sh; Slurm's default is 120 s)
        _wait_for(lambda: _job_state(job, slurm_env).get("JobState") in
                  ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
                  JOB_TIMEOUT, "the requeued job to finish", log, poll=1.0)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    state = _job_state(job, slurm_env)
    log_text = text()
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", f"{state}\n{_tail(log)}"
    assert state.get("Restarts") == "1", state
    m = re.search(r"stopped at iteration (\d+) of %d \(SIGUSR1\); checkpoint saved; REQUEUE" % iters, log_text)
    assert m, f"the trainer did not save on SIGUSR1:\n{_tail(log)}"
    stopped = int(m.group(1))
    assert 0 < stopped < iters
    assert "restart 1:" in log_text, _tail(log)
    assert f"resumed from {save / f'iter_{stopped:07d}'} (iteration {stopped}," in log_text, _tail(log)
    assert f"done: {iters} iterations" in log_text, _tail(log)
    assert not (save / "requeue_requested").exists()
    runs = _check_run_dir(save, iters)
    assert (save / f"iter_{stopped:07d}").is_dir()
    run_id = (save / "wandb_id.txt").read_text().strip()
    assert all(r.name.endswith(run_id) for r in runs), (run_id, runs)  # one W&B run, continued
