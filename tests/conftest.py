"""Shared pytest setup. Everything here runs on CPU; nothing is downloaded."""
import os
import sys
from pathlib import Path

# Triton kernels run through the interpreter on CPU (must be set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests' own helpers (reference_olmo2)


@pytest.fixture(scope="session")
def megatron_single_process():
    """megatron's parallel state for one process (TP=1, PP=1, gloo on CPU), set up once."""
    from ratplus_megatron.parallel import init_parallel

    init_parallel(tp=1, pp=1, seed=1234)
    yield
