"""Process-group and megatron parallel-state setup from torchrun, Slurm, or a single process."""
from __future__ import annotations

import os
import socket

import torch

from . import cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist such as 'gpu[001-004,010],cpu7' -> 'gpu001'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0] + "]"
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def distributed_env() -> tuple[int, int, int, str]:
    """(rank, world size, local rank, init method) from torchrun's or Slurm's variables, else one process.

    Reads the environment and never writes it: a rendezvous address chosen here must not leak into
    child processes (an ``sbatch --export=ALL`` from this process would inherit our own port).
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun started the tasks, no torchrun
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                f"tcp://{addr}:{port}")
    return 0, 1, 0, f"tcp://127.0.0.1:{_free_port()}"


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None) -> tuple[int, int]:
    """Initialise torch.distributed and megatron's TP/PP/DP groups; returns (rank, world size).

    CUDA: NCCL, one GPU per local rank. CPU: gloo plus the megatron CPU workarounds.
    """
    from megatron.core import parallel_state

    rank, world, local_rank, init_method = distributed_env()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor x pipeline parallel = {tp} x {pp}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        cpu_compat.apply()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend or ("nccl" if cuda else "gloo"),
                                             init_method=init_method, rank=rank, world_size=world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.seed_model_parallel_rng(seed)
    return rank, world


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _GradSyncView:
    """What megatron's gradient finalisation reads from a DDP-wrapped model chunk."""

    def __init__(self, module):
        from megatron.core.distributed import DistributedDataParallelConfig

        self.module, self.ddp_config = module, DistributedDataParallelConfig()


def sum_tp_replicated_grads(model, config) -> None:
    """Sum over TP the gradients megatron treats as replicated but partial per rank (q/k-layernorm
    weights; norm weights under sequence parallelism), exactly as its finalize_model_grads does on
    the GPU path. For models without megatron's DDP wrapper: the CPU trainer and the TP tests.
    """
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    _allreduce_non_tensor_model_parallel_grads([_GradSyncView(model)], config)
