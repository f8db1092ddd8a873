"""Every Triton launch of kernels/ compiles for sm_90 (H100/H200) under Triton's own argument
specialisation, which the CPU interpreter never applies (tests/sm90_compile.py says how)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

triton = pytest.importorskip("triton")


def test_every_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "sm90_compile.py")], env=env,
                       capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr[-3000:]
    assert p.returncode == 0, out
    assert "compiled" in p.stdout and "_fwd_chunk_scan_kernel" in p.stdout, out
