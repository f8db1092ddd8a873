"""Triton kernels with their torch reference twins. Must not import megatron."""
from .memory_scan import memory_scan, memory_scan_step

__all__ = ["memory_scan", "memory_scan_step"]
