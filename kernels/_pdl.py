"""Programmatic dependent launch (sm_90+) for kernels that run back to back.

A kernel launched with it may start while the one before still runs; its programs first wait in
``chain_start`` for that kernel (and its writes), then let the next kernel launch. What it saves is
the launch gap between kernels (a few microseconds each), which matters for the short kernels of a
decode step and of the scan's three-launch forward. RATPLUS_PDL=0 turns it off everywhere (the
benchmarks time both by flipping ``ENABLED``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - Triton without grid dependency control
    gdc_launch_dependents = gdc_wait = None

ENABLED = os.environ.get("RATPLUS_PDL", "1") != "0"


def pdl_options(device) -> dict:
    """Launch options of a chain kernel: PDL=True plus Triton's launch_pdl where the GPU has it;
    nothing on CPU, under the interpreter or before sm_90."""
    if (not ENABLED or gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1"
            or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        return {}
    return dict(PDL=True, launch_pdl=True)


@triton.jit
def chain_start(PDL: tl.constexpr):
    """First thing in a chain kernel: nothing may be read before the kernel before has finished."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
