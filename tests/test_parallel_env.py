"""Where ranks and the rendezvous come from: torchrun, Slurm (srun without torchrun), one process."""
import os

from ratplus_megatron.parallel import _first_slurm_host, distributed_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


def _clear(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)


def test_single_process_picks_a_port_without_touching_the_environment(monkeypatch):
    _clear(monkeypatch)
    before = dict(os.environ)
    rank, world, local, init = distributed_env()
    assert (rank, world, local) == (0, 1, 0) and init.startswith("tcp://127.0.0.1:")
    assert dict(os.environ) == before  # children (sbatch --export=ALL) must not inherit our port


def test_torchrun_variables(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("WORLD_SIZE", "8"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == (3, 8, 1, "env://")


def test_slurm_variables_without_torchrun(monkeypatch):
    _clear(monkeypatch)
    for k, v in dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5",
                     SLURM_JOB_NODELIST="gpu[003-004,010],cpu7", SLURM_JOB_ID="20077").items():
        monkeypatch.setenv(k, v)
    assert distributed_env() == (5, 16, 5, "tcp://gpu003:29577")
    monkeypatch.setenv("MASTER_ADDR", "head"), monkeypatch.setenv("MASTER_PORT", "4000")
    assert distributed_env()[3] == "tcp://head:4000"  # the sbatch script's choice wins


def test_first_slurm_host():
    assert _first_slurm_host("node17") == "node17"
    assert _first_slurm_host("a[01-04]") == "a01"
    assert _first_slurm_host("b[7,9],c[1-2]") == "b7"
    assert _first_slurm_host("x1,y[2-3]") == "x1"
