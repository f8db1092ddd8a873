"""The few places where megatron-core 0.19 hard-codes CUDA, patched for CPU-only runs.

Applied by `parallel.init_parallel` only when CUDA is absent (CI, the quickstart); on a GPU
nothing here runs. Each patch keeps megatron's behaviour and only changes the device.
"""
from __future__ import annotations

import torch

_applied = False


def _rope_get_emb_on_input_device(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    # megatron moves inv_freq to torch.cuda.current_device() here; on CPU it stays put.
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]


def _global_buffer_get_tensor_cpu(self, tensor_shape, dtype, name, mem_alloc_context=None):
    # megatron allocates its scratch buffer on the current CUDA device.
    numel = 1
    for d in tensor_shape:
        numel *= d
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(*tensor_shape)


def _patch_checkpoint_preload() -> None:
    # dist_checkpointing.save copies tensors "to CPU" non-blocking, then torch.cuda.synchronize().
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.preload_tensors

    def preload_tensors(write_buckets, non_blocking=True):
        return original(write_buckets, non_blocking=False)

    FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)


class _CudaOnCpu:
    """torch.cuda as seen by one megatron module: current_device() is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"


class _TorchOnCpu:
    """The ``torch`` name inside one megatron module, with ``cuda`` redirected (see _CudaOnCpu)."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)


# Modules that allocate on torch.cuda.current_device(): the checkpoint save's failure flag, the TP
# gather/scatter buffers, and the sequence-parallel all-gather in the linear layers' backward.
# Inside them `torch` is swapped for _TorchOnCpu.
_CURRENT_DEVICE_MODULES = ("megatron.core.dist_checkpointing.strategies.state_dict_saver",
                           "megatron.core.tensor_parallel.mappings",
                           "megatron.core.tensor_parallel.layers")


def _redirect_current_device() -> None:
    import importlib

    for name in _CURRENT_DEVICE_MODULES:
        importlib.import_module(name).torch = _TorchOnCpu()


def apply() -> None:
    """Patch megatron-core for CPU; idempotent, and refuses to run when CUDA is available."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.apply() is for CPU-only runs; CUDA is available")
    from megatron.core import utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding.get_emb = _rope_get_emb_on_input_device
    utils.GlobalMemoryBuffer.get_tensor = _global_buffer_get_tensor_cpu
    _patch_checkpoint_preload()
    _redirect_current_device()
    _applied = True


def seed_model_parallel_rng(seed: int) -> None:
    """CPU stand-in for model_parallel_cuda_manual_seed: the tracker's CUDA-free inference mode."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
