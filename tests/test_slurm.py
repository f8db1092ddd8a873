"""End to end on a real one-node Slurm cluster: `sbatch slurm/pretrain_olmo2.sh`, unchanged, with the tiny
CPU recipe and two tasks; then the time-limit path (USR1 -> checkpoint -> requeue -> resume).

The cluster comes from scripts/local_slurm.sh (Debian's slurm-wlm + munge, installed with apt-get
when missing; root). No Slurm and no way to install it is a failure, not a skip: CI installs it
(scripts/install_system_deps.sh).
"""
from __future__ import annotations

import json
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


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _usr1_then_requeue(job: str, env, text, log: Path) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@... sends before the time limit); the script
    must say that it requeued the job."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _wait_for(lambda: "requeued;" in text() or "requeue failed" in text(), 180, "the requeue", log)
    assert "requeued;" in text(), _tail(log)


def _wait_job_end(job: str, env, log: Path) -> None:
    # a requeued job becomes eligible again once its old credential expires (cred_expire=20 s in
    # scripts/local_slurm.sh; Slurm's default is 120 s)
    _wait_for(lambda: _job_state(job, env).get("JobState") in _ENDED, JOB_TIMEOUT, "the requeued job to finish",
              log, poll=1.0)


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
        _usr1_then_requeue(job, slurm_env, text, log)
        _wait_job_end(job, slurm_env, log)
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


NIAH_SCRIPT = REPO / "slurm" / "niah.sh"


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A tiny attention OLMo2 with the shipped tokenizer, saved as an HF model dir."""
    from test_niah import TINY_BPE, make_model
    from transformers import AutoTokenizer

    model_dir = tmp_path_factory.mktemp("tiny-olmo2")
    tok = AutoTokenizer.from_pretrained(TINY_BPE)
    model = make_model("attention")
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def _niah_env(slurm_env, model_dir: Path, niah_args: str) -> dict:
    # through the submitting environment: --export would split NIAH_ARGS on its commas
    return dict(slurm_env, MODEL=str(model_dir), OUT="niah", OMP_NUM_THREADS="1", NIAH_ARGS=niah_args,
                VENV=str(Path(sys.executable).parent.parent))


def test_niah_job_array_two_shards(slurm_env, tiny_hf_model, tmp_path):
    """`sbatch --array=0-1 slurm/niah.sh`, unchanged, on a tiny HF model on CPU: each array task
    decodes its shard into its own files, and the reports hold every sample of both."""
    out = tmp_path / "niah"
    env = _niah_env(slurm_env, tiny_hf_model, "--tasks niah_single_1,niah_multikey_1 --lengths 512 --methods dense,quest "
                                              "--budgets 1/4 --samples 3 --device cpu --dtype fp32 --max-new-tokens 4")
    r = subprocess.run(["sbatch", "--parsable", "--wait", "--array=0-1", "--job-name=niah-array-test", str(NIAH_SCRIPT)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    job = r.stdout.strip().split(";")[0]
    logs = [tmp_path / f"niah-array-test-{job}_{i}.out" for i in (0, 1)]
    assert r.returncode == 0, f"sbatch --wait exit {r.returncode}: {r.stderr}\n" + "\n".join(_tail(x) for x in logs)
    for i, log in enumerate(logs):
        text = log.read_text(errors="replace")
        assert f"shard {i}/2 on" in text and f"shard {i}/2 ended with exit code 0" in text, _tail(log)
    run = out / "pred" / "512" / "quest_1-4_plain"
    assert sorted(p.name for p in run.iterdir()) == [f"{t}.shard-{i}-of-2.jsonl" for t in ("niah_multikey_1", "niah_single_1")
                                                     for i in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert [(x["method"], x["n"]) for x in summary["runs"]] == [
        ("dense", {"niah_single_1": 3, "niah_multikey_1": 3}), ("quest", {"niah_single_1": 3, "niah_multikey_1": 3})]
    assert (out / "summary.md").exists() and (out / "accuracy_vs_budget.png").exists()


def test_niah_time_limit_signal_requeues_and_completes(slurm_env, tiny_hf_model, tmp_path):
    """USR1 to the batch shell of a NIAH task (what --signal=B:USR1@120 sends) while it decodes: the
    task stops, requeues itself, and the rerun adds only the missing predictions, then the reports."""
    samples = 48
    env = _niah_env(slurm_env, tiny_hf_model, f"--tasks niah_single_1 --lengths 1024 --methods dense,quest --budgets 1/4 "
                                              f"--samples {samples} --device cpu --dtype fp32 --max-new-tokens 32")
    r = subprocess.run(["sbatch", "--parsable", "--job-name=niah-requeue-test", str(NIAH_SCRIPT)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log = tmp_path / f"niah-requeue-test-{job}_4294967294.out"  # %a of a job that is not an array
    text = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731
    preds = [tmp_path / "niah" / "pred" / "1024" / run / "niah_single_1.jsonl"
             for run in ("dense_full_plain", "quest_1-4_plain")]
    lines = lambda: sum(len(p.read_text().splitlines()) for p in preds if p.exists())  # noqa: E731
    try:
        _wait_for(lambda: lines() > 0 or "ended with exit code" in text(), JOB_TIMEOUT, "the first prediction", log)
        assert "ended with exit code" not in text(), f"the run ended before the signal:\n{_tail(log)}"
        _usr1_then_requeue(job, slurm_env, text, log)
        before = lines()
        _wait_job_end(job, slurm_env, log)
    finally:
        subprocess.run(["scancel", job], env=slurm_env, capture_output=True)
    state = _job_state(job, slurm_env)
    assert state.get("JobState") == "COMPLETED" and state.get("Restarts") == "1", f"{state}\n{_tail(log)}"
    assert "restart 1: shard 0/1" in text() and "shard 0/1 ended with exit code 0" in text(), _tail(log)
    assert 0 < before < 2 * samples, before
    for p in preds:  # the rerun appended only what was missing: every sample once
        assert sorted(json.loads(x)["index"] for x in p.read_text().splitlines()) == list(range(samples)), p
    summary = json.loads((tmp_path / "niah" / "summary.json").read_text())
    assert [x["n"] for x in summary["runs"]] == [{"niah_single_1": samples}] * 2
