"""The one backend rule every op in kernels/ follows."""
from __future__ import annotations

import os

BACKENDS = ("auto", "triton", "torch")
# RATPLUS_KERNELS=torch|triton replaces "auto" everywhere: a way to rule a kernel in or out of a
# wrong result (or a crash) on a GPU without touching code.
ENV = "RATPLUS_KERNELS"


def use_triton(backend: str, *tensors) -> bool:
    """"auto": Triton for CUDA tensors, torch twin otherwise; "triton"/"torch" force one side.

    Forcing "triton" on CPU works only under TRITON_INTERPRET=1 (the tests do that).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV} must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend == "triton"
    if not all(t.is_cuda for t in tensors if t is not None and hasattr(t, "is_cuda")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
