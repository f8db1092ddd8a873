"""The README's quickstart (`make quickstart`) end to end, at CI size: every stage runs for real.

Synthetic corpus -> data_prep/tokenize.py -> sbatch slurm/pretrain_olmo2.sh on the one-node Slurm
cluster the script starts -> mcore-to-hf -> eval/niah.py with every method at two budgets -> report.
A second run must reuse everything (no retraining, no re-decoding).
"""
import json
import os
import subprocess

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

METHODS = {"dense", "dilated", "quest", "moba", "snapkv", "random"}


def _run(work):
    env = {**os.environ, "QUICKSTART_SIZE": "ci", "QUICKSTART_DIR": str(work), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def test_quickstart_pipeline_end_to_end(tmp_path):
    work = tmp_path / "qs"
    out = _run(work)
    assert "note: could not start the one-node Slurm cluster" not in out  # CI installs Slurm
    for kind in ("attention", "ratplus"):
        run = work / "runs" / kind
        assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
        assert (work / "hf" / kind / "config.json").is_file()
        summary = json.loads((work / "niah" / kind / "summary.json").read_text())
        assert summary  # per-method results exist
    hf_mem = json.loads((work / "hf" / "ratplus" / "config.json").read_text())
    assert hf_mem["model_type"] == "olmo2_memory" and hf_mem["memory"] is True
    assert json.loads((work / "hf" / "attention" / "config.json").read_text())["model_type"] == "olmo2"
    table = (work / "report" / "summary.md").read_text()
    for method in METHODS:
        assert method in table, method
    assert (work / "report" / "accuracy_vs_budget.png").stat().st_size > 1000
    assert "plot: " in out

    # A second run reuses what exists: no training step, no decoding.
    kept = [*(work / "niah").rglob("*.jsonl"), *(work / "runs").glob("*/metrics.jsonl"),
            *(work / "hf").glob("*/*.safetensors"), work / "tok" / "corpus_text_document.bin"]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    _run(work)
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes
